"""The `tgops` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from core import __version__
from core.errors import ConfigError, TgopsError
from core.settings import Settings, load_settings, masked

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2


def _settings(path: Path | None) -> Settings:
    return load_settings(path, os.environ)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML configuration file (default: $TGOPS_CONFIG, else built-in defaults)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tgops",
        description="Update lifecycle of a TightGate-Pro style fleet, operated from Slack.",
    )
    parser.add_argument("--version", action="version", version=f"tgops {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser("serve", help="run the service (engine, scheduler, notifier, HTTP)")
    _add_config(serve)
    serve.add_argument("--ready-file", type=Path, default=None, help=argparse.SUPPRESS)

    tg = sub.add_parser("tg", help="send one /tg command to the running service")
    _add_config(tg)
    tg.add_argument("--token-name", default=None, help="which [api.tokens.NAME] to use")
    tg.add_argument("--url", default=None, help="service base URL (default from [http])")
    tg.add_argument("words", nargs=argparse.REMAINDER, help="the command, e.g. status")

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = config_sub.add_parser("check", help="validate and print the resolved configuration")
    _add_config(check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        if args.command == "serve":
            from bot.service import serve  # noqa: PLC0415  (keeps `tgops tg` start-up light)

            asyncio.run(serve(_settings(args.config), ready=args.ready_file))
            return EXIT_OK
        if args.command == "tg":
            return asyncio.run(_tg(args))
        if args.command == "config":
            settings = _settings(args.config)
            print(json.dumps(masked(settings), indent=2, sort_keys=True))
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
    except (aiohttp.ClientError, TimeoutError) as exc:
        print(
            f"tgops tg: cannot reach the service at {url}: {exc or type(exc).__name__}; "
            "is `tgops serve` running?",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except json.JSONDecodeError:
        print(f"tgops tg: {url} did not answer JSON; is that the tgops service?", file=sys.stderr)
        return EXIT_USAGE
    if not isinstance(body, dict) or "text" not in body:
        print(f"tgops tg: unexpected answer from {url}", file=sys.stderr)
        return EXIT_USAGE
    print(body["text"])
    return EXIT_OK if body.get("ok") else EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
