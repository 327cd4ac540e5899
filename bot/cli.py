"""The `tgops` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiohttp

from bot.logs import configure as configure_logs
from core import __version__
from core.durations import DurationError, parse_duration
from core.errors import ConfigError, TgopsError
from core.model import PackageKind
from core.repository.publish import DEFAULT_VALIDITY, keygen, public_key_path, publish
from core.settings import Settings, exposed_secrets, load_settings, masked

if TYPE_CHECKING:
    from bot.nagios import Range

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
"""`tgops tg`: the service did not answer (not running, wrong URL, not tgops)."""
QUIET_COMMANDS = frozenset({"demo", "tg", "keygen", "publish", "config", "completion"})
"""Commands whose output is their answer: their log starts at warning."""


def _settings(path: Path | None) -> Settings:
    return load_settings(path, os.environ)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML configuration file (default: $TGOPS_CONFIG, else built-in defaults)",
    )


def _add_log_flags(parser: argparse.ArgumentParser, *, after: bool) -> None:
    """``-v``/``-q``: before the subcommand (``after`` False) or after it; both count."""
    suffix = "_after" if after else ""
    default: Any = argparse.SUPPRESS if after else 0
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default,
        dest=f"verbose{suffix}",
        help="log more: one level per -v ([log] level, info by default)",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="count",
        default=default,
        dest=f"quiet{suffix}",
        help="log less: one level per -q",
    )


class _Parser(argparse.ArgumentParser):
    """Subcommand parsers: ``-v``/``-q`` are accepted after the subcommand too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if kwargs.get("prog", "").endswith("check-versions"):
            return  # there -v is the plugin's verbosity (monitoring-plugins guidelines)
        if kwargs.get("add_help", True):
            _add_log_flags(self, after=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tgops",
        description="Update lifecycle of a TightGate-Pro style fleet, operated from Slack.",
    )
    parser.add_argument("--version", action="version", version=f"tgops {__version__}")
    _add_log_flags(parser, after=False)
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )

    serve = sub.add_parser("serve", help="run the service (engine, scheduler, notifier, HTTP)")
    _add_config(serve)
    serve.add_argument("--ready-file", type=Path, default=None, help=argparse.SUPPRESS)

    demo = sub.add_parser(
        "demo", help="the embedded default: repository, sandbox fleet, mail, phone, console"
    )
    demo.add_argument(
        "action",
        nargs="?",
        choices=["publish-update"],
        help="publish-update: publish a new tg-base in the running demo's repository",
    )
    demo.add_argument("--dir", type=Path, default=Path("tgops-demo"), help="where it lives")
    demo.add_argument(
        "--no-console", action="store_true", help="no console: run until SIGTERM (scripts)"
    )
    demo.add_argument(
        "--timezone",
        type=_zone,
        default=None,
        metavar="ZONE",
        help="IANA time zone of the demo, e.g. Europe/Berlin (default: this machine's: TZ, "
        "/etc/localtime)",
    )

    tg = sub.add_parser("tg", help="send one /tg command to the running service")
    _add_config(tg)
    tg.add_argument("--token-name", default=None, help="which [api.tokens.NAME] to use")
    tg.add_argument("--url", default=None, help="service base URL (default from [http])")
    tg.add_argument(
        "--json", action="store_true", help="print the API's JSON answer instead of the text"
    )
    tg.add_argument("words", nargs=argparse.REMAINDER, help="the command, e.g. status")

    keygen = sub.add_parser("keygen", help="write an ed25519 signing key pair (K and K.pub)")
    keygen.add_argument("--out", type=Path, required=True, help="private key file K")

    publish = sub.add_parser(
        "publish", help="add .deb packages to a static repository and re-sign the channel"
    )
    publish.add_argument("--repo", type=Path, required=True, help="repository directory")
    publish.add_argument("--channel", required=True, help="channel, e.g. stable")
    publish.add_argument("--key", type=Path, required=True, help="private signing key")
    publish.add_argument(
        "--kind",
        choices=["regular", "core", "optional"],
        default="regular",
        help="core: needs a reboot; optional: installed only on request (default regular)",
    )
    publish.add_argument("--hotfix", metavar="ID", default=None, help="mark as hotfix ID")
    publish.add_argument("--urgency", choices=["normal", "urgent"], default=None)
    publish.add_argument("--summary", default="", help="one line shown to admins and contacts")
    publish.add_argument(
        "--valid-for",
        type=_duration,
        default=DEFAULT_VALIDITY,
        metavar="DURATION",
        help="how long the signed manifest is valid, e.g. 30d (default), 90d; clients "
        "refuse it after that",
    )
    publish.add_argument(
        "files",
        nargs="*",
        type=Path,
        metavar="FILE.deb",
        help="packages to add; none: re-sign the channel as it is (new expiry)",
    )

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(
        dest="config_command", metavar="ACTION", required=True, parser_class=_Parser
    )
    check = config_sub.add_parser("check", help="validate and print the resolved configuration")
    _add_config(check)
    _add_check_versions(sub)
    completion = sub.add_parser(
        "completion",
        help="print a shell completion script",
        description="Print a completion script for bash or zsh, e.g. "
        "`tgops completion bash > /etc/bash_completion.d/tgops` or, in ~/.bashrc, "
        '`source <(tgops completion bash)`; zsh: `tgops completion zsh > "${fpath[1]}/_tgops"`.',
    )
    completion.add_argument("shell", choices=["bash", "zsh"], help="the shell")
    return parser


def _log_level(args: argparse.Namespace, base: str) -> int:
    from bot.logs import shifted  # noqa: PLC0415  (light, but only needed here)

    louder = args.verbose + getattr(args, "verbose_after", 0)
    quieter = args.quiet + getattr(args, "quiet_after", 0)
    return shifted(base, quieter - louder)


def _zone(text: str) -> str:
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time zone; give an IANA name such as Europe/Berlin or UTC"
        ) from exc
    return text


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except DurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _range(text: str) -> Range:
    from bot.nagios import Range, RangeError  # noqa: PLC0415  (only check-versions needs it)

    try:
        return Range.parse(text)
    except RangeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 to 3600")
    return value


def _age(text: str) -> float:
    try:
        value = parse_duration(text)
    except DurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a duration above 0, e.g. 2m or 24h")
    return value


def _add_check_versions(sub: Any) -> None:
    nagios = sub.add_parser(
        "check-versions",
        help="Nagios plugin: the fleet's update state, read from the store",
        description="Nagios plugin: the update state of the fleet (or of one node), read "
        "from the store alone; the service may be down, nodes are not contacted.",
        epilog='Exit codes: 0 OK, 1 WARNING (warning flag "Update download failed", '
        "restart required, unreachable node, urgent hotfix pending, -w), 2 CRITICAL (service "
        "not running: heartbeat older than --max-age; manifest not fetched for 3 poll "
        "intervals; update lock; urgent hotfix pending longer than --urgent-max-age; -c), "
        "3 UNKNOWN (store unreadable, timeout, bad arguments). Ranges follow the "
        "monitoring-plugins guidelines: N alerts above N, N: below N, M:N outside M..N, "
        "@M:N inside M..N. Durations: 90s, 2m, 24h, 1h30m.",
    )
    _add_config(nagios)
    nagios.add_argument(
        "--node", metavar="N", default=None, help="check this node (or cluster) only"
    )
    nagios.add_argument(
        "-t",
        "--timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="give up with UNKNOWN after this long (default 10)",
    )
    nagios.add_argument(
        "-w",
        "--warning",
        type=_range,
        default=None,
        metavar="PENDING",
        help="WARNING when the number of pending updates is outside this range",
    )
    nagios.add_argument(
        "-c",
        "--critical",
        type=_range,
        default=None,
        metavar="PENDING",
        help="CRITICAL when the number of pending updates is outside this range",
    )
    nagios.add_argument(
        "--max-age",
        type=_age,
        default=None,
        metavar="DURATION",
        help="CRITICAL when the service's last heartbeat is older (default 2m)",
    )
    nagios.add_argument(
        "--urgent-max-age",
        type=_age,
        default=None,
        metavar="DURATION",
        help="an urgent hotfix pending longer is CRITICAL, before that WARNING (default 24h)",
    )
    nagios.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        dest="verbosity",
        help="more detail: -v what is fine too, -vv the settings used, -vvv pending per node",
    )
    nagios.add_argument(
        "-V", "--version", action="version", version=f"tgops check-versions {__version__}"
    )


def _is_check(argv: Sequence[str]) -> bool:
    """Whether the command line asks for check-versions (its first word that is no option)."""
    return next((a for a in argv if not a.startswith("-")), None) == "check-versions"


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace | int:
    """Parsed arguments; for check-versions a usage error is UNKNOWN (3), as plugins do."""
    if not _is_check(argv):
        return parser.parse_args(argv)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parser.parse_args(argv)
    except SystemExit as exc:
        captured = errors.getvalue()
        sys.stderr.write(captured)
        if exc.code in {0, None}:
            raise
        from bot.nagios import PREFIX, State  # noqa: PLC0415  (only check-versions needs it)

        lines = captured.strip().splitlines()
        reason = lines[-1] if lines else "invalid arguments"
        print(f"{PREFIX} UNKNOWN - {reason} (see `tgops check-versions -h`)")
        return int(State.UNKNOWN)


def _check_versions(args: argparse.Namespace) -> int:
    """`tgops check-versions`: print the plugin output, return its state as exit code."""
    # imported here: the check's modules are not needed by the other commands
    from bot.nagios import (  # noqa: PLC0415
        DEFAULT_MAX_AGE,
        DEFAULT_TIMEOUT,
        DEFAULT_URGENT_MAX_AGE,
        PREFIX,
        Limits,
        State,
        check_versions,
        unknown,
    )

    limit: float = args.timeout or DEFAULT_TIMEOUT

    def give_up(_signum: int, _frame: object) -> None:
        # backstop when the event loop itself is stuck: the plugin must still answer
        sys.stdout.write(f"{PREFIX} UNKNOWN - no answer within {limit:g}s (-t)\n")
        sys.stdout.flush()
        os._exit(int(State.UNKNOWN))

    signal.signal(signal.SIGALRM, give_up)
    signal.setitimer(signal.ITIMER_REAL, limit + 2)
    try:
        try:
            settings = _settings(args.config)
        except ConfigError as exc:
            problems = (p.removeprefix("config: ") for p in exc.problems)
            result = unknown("config: " + "; ".join(problems))
        else:
            result = asyncio.run(
                check_versions(
                    settings,
                    target=args.node,
                    warning=args.warning,
                    critical=args.critical,
                    limit=limit,
                    limits=Limits(
                        max_age=args.max_age or DEFAULT_MAX_AGE,
                        urgent_max_age=args.urgent_max_age or DEFAULT_URGENT_MAX_AGE,
                    ),
                    verbosity=args.verbosity,
                )
            )
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    sys.stdout.write(result.output())
    return int(result.state)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parsed = _parse(parser, list(sys.argv[1:] if argv is None else argv))
    if isinstance(parsed, int):
        return parsed
    args = parsed
    if args.command == "check-versions":
        logging.basicConfig(level=logging.WARNING, format="tgops: %(message)s")
        return _check_versions(args)
    quiet = args.command in QUIET_COMMANDS
    configure_logs(level=_log_level(args, "warning" if quiet else "info"))
    try:
        if args.command == "serve":
            from bot.service import serve  # noqa: PLC0415  (keeps `tgops tg` start-up light)

            settings = _settings(args.config)
            configure_logs(level=_log_level(args, settings.log.level), fmt=settings.log.format)
            asyncio.run(serve(settings, ready=args.ready_file))
            return EXIT_OK
        if args.command == "completion":
            from bot.completion import script  # noqa: PLC0415  (only this command needs it)

            sys.stdout.write(script(args.shell, parser))
            return EXIT_OK
        if args.command == "demo":
            from bot.demo.demo import publish_update, run_demo  # noqa: PLC0415  (pulls in the whole service)

            if args.action == "publish-update":
                print(publish_update(args.dir.resolve()))
                return EXIT_OK
            return asyncio.run(
                run_demo(
                    args.dir,
                    console=not args.no_console,
                    environ=dict(os.environ),
                    timezone=args.timezone,
                )
            )
        if args.command == "tg":
            return asyncio.run(_tg(args))
        if args.command == "keygen":
            keygen(args.out)
            print(f"wrote {args.out} (private, mode 0600) and {public_key_path(args.out)}")
            print(f'updates.public_key = "{public_key_path(args.out).read_text().strip()}"')
            return EXIT_OK
        if args.command == "publish":
            return _publish(args)
        if args.command == "config":
            settings = _settings(args.config)
            settings.updates.verification_key()  # what `serve` would refuse, refused here
            print(json.dumps(masked(settings), indent=2, sort_keys=True))
            path = args.config or (
                Path(os.environ["TGOPS_CONFIG"]) if os.environ.get("TGOPS_CONFIG") else None
            )
            if path is not None:
                for warning in exposed_secrets(path):
                    print(f"tgops: config: warning: {warning}", file=sys.stderr)
            print("configuration OK", file=sys.stderr)
            return EXIT_OK
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"tgops: config: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except TgopsError as exc:
        print(f"tgops: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE  # pragma: no cover


class _Bar:
    """A progress bar on stderr for files of 8 MiB and more (a line each when not a tty)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.shown = -1

    def __call__(self, name: str, done: int, total: int) -> None:
        if total < 8 * 1024 * 1024:
            return
        percent = done * 100 // total
        if self.tty:
            filled = percent // 4
            sys.stderr.write(f"\r{name} [{'#' * filled:<25}] {percent:3d}%")
            if done >= total:
                sys.stderr.write("\n")
        elif percent // 25 != self.shown // 25 or done >= total:
            sys.stderr.write(f"{name}: {percent}%\n")
        self.shown = percent
        sys.stderr.flush()


def _publish(args: argparse.Namespace) -> int:
    if args.urgency and not args.hotfix:
        print("tgops publish: --urgency needs --hotfix ID", file=sys.stderr)
        return EXIT_USAGE
    if args.hotfix and args.kind != "regular":
        print("tgops publish: a hotfix is its own kind; leave out --kind", file=sys.stderr)
        return EXIT_USAGE
    kind = PackageKind.HOTFIX if args.hotfix else PackageKind(args.kind)
    result = publish(
        args.repo,
        args.channel,
        args.key,
        args.files,
        kind=kind,
        hotfix_id=args.hotfix,
        urgency=args.urgency or ("normal" if args.hotfix else None),
        summary=args.summary,
        progress=_Bar(),
        valid_for=args.valid_for,
    )
    for entry in result.added:
        extra = f" hotfix {entry.id} ({entry.urgency})" if entry.id else f" {entry.kind}"
        print(f"added {entry.name} {entry.version}{extra} -> {entry.path}")
    for entry in result.unchanged:
        print(f"unchanged {entry.name} {entry.version} (already published)")
    print(
        f"channel {result.channel}: re-signed {result.manifest}, valid until {result.expires}"
        if result.changed
        else f"channel {result.channel}: nothing changed"
    )
    return EXIT_OK


def _base_url(settings: Settings) -> str:
    host = settings.http.host
    if host in {"0.0.0.0", "::", ""}:  # noqa: S104  (a wildcard bind is reached on loopback)
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.http.port}"


async def _tg(args: argparse.Namespace) -> int:
    settings = _settings(args.config)
    words = [w for w in args.words if w != "--"]
    if not words:
        print(
            "tgops tg: give a command, e.g. `tgops tg status` or `tgops tg help`", file=sys.stderr
        )
        return EXIT_USAGE
    tokens = settings.api.tokens
    if not tokens:
        print(
            "tgops tg: no [api.tokens.NAME] in the configuration; add one with the roles you need",
            file=sys.stderr,
        )
        return EXIT_USAGE
    name = args.token_name or next(iter(tokens))
    if name not in tokens:
        print(
            f"tgops tg: no token named {name!r}; configured: {', '.join(tokens)}", file=sys.stderr
        )
        return EXIT_USAGE
    url = (args.url or _base_url(settings)).rstrip("/") + "/api/v1/command"
    text = " ".join(words)
    headers = {"Authorization": f"Bearer {tokens[name].token.get_secret_value()}"}
    timeout = aiohttp.ClientTimeout(total=120, sock_connect=5)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(url, json={"text": text}, headers=headers) as response,
        ):
            body = await response.json(content_type=None)
        status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        print(
            f"tgops tg: cannot reach the service at {url}: {exc or type(exc).__name__}; "
            "is `tgops serve` running?",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    except json.JSONDecodeError:
        print(f"tgops tg: {url} did not answer JSON; is that the tgops service?", file=sys.stderr)
        return EXIT_UNREACHABLE
    if not isinstance(body, dict) or "text" not in body:
        print(f"tgops tg: unexpected answer from {url}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if status == 401:
        print(
            f"tgops tg: the service does not accept token {name!r}: {body['text']}; check "
            f"[api.tokens.{name}] against the service's configuration",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.json:
        print(json.dumps(body, indent=2, ensure_ascii=False))
    else:
        print(body["text"])
    return EXIT_OK if body.get("ok") else EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
