"""`tgops demo`: the whole product on one machine, with no Slack workspace needed.

Everything is built in the demo directory (default ``./tgops-demo``):

- a signing key pair and a signed update repository with real ``.deb`` packages built with
  ``dpkg-deb``: regular updates, a core update, a normal and an urgent hotfix, optional
  iBus input-method modules, and an ``oldstable`` channel; served on loopback;
- a 3-node sandbox cluster and one sandbox single system (simulated nodes: see
  ``core/drivers/sandbox.py``) with older versions installed and users logged in;
- a mail capture (SMTP on loopback, offering PIPELINING) writing every message into
  ``mail/`` (a Maildir);
- a phone gateway standing in for Twilio's API: it prints the calls and SMS it would
  place, and the first callee of an urgent hotfix presses 1 a few seconds later;
- the service itself, and an interactive ``/tg`` console.

Slack tokens in the environment (``TGOPS_SLACK__BOT_TOKEN``, ``TGOPS_SLACK__SIGNING_SECRET``,
``TGOPS_SLACK__APP_TOKEN``) connect the demo to a real workspace as well.

It is over 600 lines on purpose: the demo's whole world (keys, repository, nodes, mail
and phone stand-ins, configuration, restart state) is built in one place a reader follows
from top to bottom.
"""

from __future__ import annotations

import asyncio
import email.policy
import json
import logging
import mailbox
import os
import secrets
import signal
import sys
import tomllib
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from email import message_from_bytes
from email.parser import BytesParser
from pathlib import Path
from typing import Any
from xml.etree import ElementTree
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiohttp
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from debian.debian_support import Version
from twilio.request_validator import RequestValidator

from bot.demo.console import Console
from bot.demo.debbuild import build_deb
from bot.service import Service
from core.drivers.sandbox import SandboxDriver
from core.drivers.staging import sha256_file
from core.errors import PublishConflictError, PublishError
from core.events import (
    Event,
    HotfixAcknowledged,
    MaintenanceEnded,
    MaintenanceScheduled,
    MaintenanceStarted,
    RunFinished,
    RunStepDone,
)
from core.localtime import zoned_text
from core.model import Actor, PackageKind, Role, StagedPackage
from core.private import make_private, write_private
from core.repository.publish import keygen, public_key_path, publish
from core.settings import Settings, load_settings

log = logging.getLogger(__name__)

CLUSTER = ("tg1", "tg2", "tg3")
SINGLE = "single"
USERS = {"tg1": ["anna", "ben"], "tg2": ["carla"], "tg3": [], SINGLE: ["dora", "emil"]}
OLD = {"tg-base": "1.5", "tg-browser": "118.0", "tg-kernel": "6.1.0"}
VERY_OLD = {"tg-base": "1.0", "tg-browser": "115.0", "tg-kernel": "6.1.0"}


def _files(name: str, version: str) -> dict[str, bytes]:
    return {
        f"usr/share/{name}/VERSION": f"{version}\n".encode(),
        f"usr/lib/{name}/{name}.conf": f"# {name} {version}\nenabled = yes\n".encode(),
    }


def build_repository(root: Path, say: Callable[[str], None] | None = None) -> str:
    """The demo's signed repository in ``root/repo``; returns the public key.

    A second run in the same directory reuses the key and the repository: the packages
    are rebuilt byte for byte (``bot.demo.debbuild``), so publishing them again changes nothing.
    A package a different build already published under the same version (a directory
    left by an earlier tgops, whose builds were not reproducible) is kept as it is.
    """
    key = root / "keys" / "repo.key"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        keygen(key)
    debs = root / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    repo = root / "repo"

    def add(channel: str, name: str, version: str, **kwargs: Any) -> None:
        deb = build_deb(debs, name, version, _files(name, version), description=name)
        try:
            publish(repo, channel, key, [deb], **kwargs)
        except PublishConflictError:
            if say is not None:
                say(f"repository: keeping the published {name} {version} of channel {channel}")

    for name, version in OLD.items():
        add(
            "oldstable",
            name,
            version,
            kind=PackageKind.CORE if name == "tg-kernel" else PackageKind.REGULAR,
        )
    add("stable", "tg-base", "2.0")
    add("stable", "tg-browser", "120.1")
    add("stable", "tg-kernel", "6.1.2", kind=PackageKind.CORE)
    add("stable", "ibus-anthy", "1.5.14", kind=PackageKind.OPTIONAL)
    add("stable", "ibus-hangul", "1.5.4", kind=PackageKind.OPTIONAL)
    add(
        "stable",
        "tg-browser",
        "120.1.1",
        hotfix_id="HF-101",
        urgency="normal",
        summary="Fixes video playback in the browser",
    )
    add(
        "stable",
        "tg-vnc",
        "3.2.1",
        hotfix_id="HF-102",
        urgency="urgent",
        summary="Closes a remote logon vulnerability in the VNC server",
    )
    return public_key_path(key).read_text().strip()


async def prepare_node(root: Path, name: str, clustered: bool, versions: dict[str, str]) -> None:
    """Install older versions on a fresh sandbox node (through its driver) and log users in."""
    node_root = root / "nodes" / name
    if (node_root / "state.json").exists():
        return
    debs = root / "debs"
    driver = SandboxDriver(name, node_root, clustered=clustered)
    packages = []
    for package, version in versions.items():
        deb = build_deb(debs, package, version, _files(package, version), description=package)
        packages.append(
            StagedPackage(
                name=package,
                version=version,
                kind=PackageKind.CORE if package == "tg-kernel" else PackageKind.REGULAR,
                sha256=sha256_file(deb),
                path=deb,
            )
        )
    await driver.stage(packages)
    await driver.install(packages)
    await driver.reboot()
    (node_root / "sessions.json").write_text(
        json.dumps([{"user": user} for user in USERS[name]], indent=2)
    )
    await driver.aclose()


async def prepare(root: Path, say: Callable[[str], None] | None = None) -> str:
    """The repository and the nodes in ``root``, kept from an earlier run; the public key."""
    public_key = await asyncio.to_thread(build_repository, root, say)
    for name in CLUSTER:
        await prepare_node(root, name, True, OLD)
    await prepare_node(root, SINGLE, False, VERY_OLD)
    return public_key


def mail_subject(content: bytes) -> str:
    """A message's subject as people read it: RFC 2047 words decoded, on one line."""
    parsed = BytesParser(policy=email.policy.default).parsebytes(content, headersonly=True)
    return " ".join(str(parsed["Subject"] or "").split())


class _Mailbox:
    """aiosmtpd handler: every message into a Maildir, one line on the console."""

    def __init__(self, path: Path, say: Callable[[str], None]) -> None:
        self.maildir = mailbox.Maildir(path, create=True)
        self.path = path
        self.say = say

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """Offer PIPELINING, as the mail servers of real sites do (aiosmtpd reads the
        commands of a group in order anyway): the demo shows the path they get."""
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content if isinstance(envelope.content, bytes) else b""
        message = message_from_bytes(content)
        self.maildir.add(message)
        # the messages hold the contacts' addresses: only the owner may read them (the
        # Maildir's directories are created 0700 by the mailbox module)
        for folder in ("new", "cur", "tmp"):
            for item in (self.path / folder).iterdir():
                make_private(item)
        subject = mail_subject(content)
        self.say(f"[mail] to {', '.join(envelope.rcpt_tos)}: {subject}")
        return "250 Message accepted for delivery"


class PhoneGateway:
    """Stands in for Twilio's REST API on loopback: prints what it would place.

    The first call of each urgent hotfix is "answered": a few seconds later the gateway
    sends the signed webhook of someone pressing 1, as Twilio would.
    """

    def __init__(self, say: Callable[[str], None], auth_token: str, public_url: str) -> None:
        self.say = say
        self.validator = RequestValidator(auth_token)
        self.public_url = public_url.rstrip("/")
        self.answered = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.app = web.Application()
        self.app.router.add_post("/2010-04-01/Accounts/{sid}/Calls.json", self.call)
        self.app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", self.sms)

    async def call(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        sid = "CA" + secrets.token_hex(16)
        self.say(f"[phone] calling {form.get('To')}: {spoken(form.get('Twiml', ''))}")
        if not self.answered:
            self.answered = True
            task = asyncio.create_task(self._press_one(sid, form.get("To", "")))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return web.json_response(
            {
                "sid": sid,
                "status": "queued",
                "to": form.get("To"),
                "from": form.get("From"),
                "account_sid": request.match_info["sid"],
            },
            status=201,
        )

    async def sms(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.say(f"[sms] to {form.get('To')}: {form.get('Body')}")
        return web.json_response(
            {
                "sid": "SM" + secrets.token_hex(16),
                "status": "queued",
                "to": form.get("To"),
                "account_sid": request.match_info["sid"],
            },
            status=201,
        )

    async def _press_one(self, call_sid: str, to: str) -> None:
        await asyncio.sleep(4)
        url = f"{self.public_url}/twilio/voice/gather"
        params = {"CallSid": call_sid, "Digits": "1", "To": to, "From": to}
        signature = self.validator.compute_signature(url, params)
        self.say(f"[phone] {to} presses key 1")
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
                session.post(
                    url, data=params, headers={"X-Twilio-Signature": signature}
                ) as response,
            ):
                answer = await response.text()
            self.say(f"[phone] the call to {to} then {spoken(answer)}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.say(f"[phone] the webhook did not answer: {exc}")

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def spoken(twiml: str) -> str:
    """What a callee hears from a TwiML document: the first prompt's words (a prompt
    repeated when no key comes is said once), and whether a key is awaited."""
    try:
        # the service's own TwiML, received on loopback
        root = ElementTree.fromstring(twiml)  # noqa: S314
    except ElementTree.ParseError:
        return f"(not TwiML: {twiml[:80]!r})"
    gather = root.find("Gather")
    if gather is not None:
        words = " ".join(" ".join((e.text or "").split()) for e in gather.iter("Say"))
        return f'says "{words}" and waits for a key'
    words = " ".join(" ".join((e.text or "").split()) for e in root.iter("Say"))
    return f'says "{words}"' if words else "(silence)"


@asynccontextmanager
async def _site(app: web.Application, host: str = "127.0.0.1") -> AsyncIterator[int]:
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    try:
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        yield int(server.sockets[0].getsockname()[1])
    finally:
        await runner.cleanup()


def _port_free(port: int) -> bool:
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(
    root: Path,
    *,
    repo_port: int,
    smtp_port: int,
    phone_port: int,
    http_port: int,
    public_key: str,
    token: str,
    twilio_token: str,
    timezone: str = "Europe/Berlin",
) -> Path:
    """The demo's configuration, written where a person can read and change it."""
    nodes = "\n".join(
        f'[[nodes]]\nname = "{n}"\ncluster = "demo"\ndriver = "sandbox"\n'
        f'root = "{root}/nodes/{n}"\n'
        for n in CLUSTER
    )
    text = f"""# Written by `tgops demo`; every key is explained in config/tgops.example.toml.
timezone = "{timezone}"
database_url = "sqlite+aiosqlite:///{root}/state.db"

[http]
host = "127.0.0.1"
port = {http_port}
public_url = "http://127.0.0.1:{http_port}"

[api.tokens.demo]
token = "{token}"
roles = ["update", "maint"]

# with Slack tokens in the environment: everyone in the workspace may look
[roles]
viewer = ["*"]

[updates]
repository_url = "http://127.0.0.1:{repo_port}/"
public_key = "{public_key}"
cache_dir = "{root}/cache"
poll_interval = "20s"
retry_delay = "2s"
download_lead = "1m"

[maintenance]
notice_lead = "2m"
reminder_interval = "20s"
lb_drain_lead = "30s"

[smtp]
host = "127.0.0.1"
port = {smtp_port}
sender = "tgops-demo@localhost"

[twilio]
account_sid = "ACdemo00000000000000000000000000"
auth_token = "{twilio_token}"
from_number = "+4930000000"
api_url = "http://127.0.0.1:{phone_port}"

[escalation]
ack_wait = "10s"
call_rounds = 2

[[contacts]]
name = "Customer operations"
email = "ops@customer.example"
phone = "+4915100000001"

[[contacts]]
name = "On-call engineer"
email = "oncall@customer.example"
phone = "+4915100000002"

[clusters.demo]
max_parallel_updates = 1

{nodes}
[[nodes]]
name = "{SINGLE}"
driver = "sandbox"
root = "{root}/nodes/{SINGLE}"
"""
    path = root / "tgops.toml"
    write_private(path, text)  # it holds the API token and the Twilio auth token
    return path


async def run_demo(
    root: Path, *, console: bool, environ: dict[str, str], timezone: str | None = None
) -> int:
    root = await asyncio.to_thread(_make_dir, root)
    say = _printer()
    say(f"tgops demo in {root}")
    public_key = await prepare(root, say)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    repo_app = web.Application()
    repo_app.router.add_static("/", root / "repo", show_index=True)
    kept = await asyncio.to_thread(Kept.read, root / "tgops.toml")
    twilio_token = kept.twilio_token or secrets.token_hex(16)
    http_port = kept.port if kept.port and _port_free(kept.port) else _free_port()
    if kept.port and http_port != kept.port:
        say(f"port {kept.port} of the last run is taken by another program; using {http_port}")
    zone, origin = (timezone, "--timezone") if timezone else machine_zone(environ)
    say(f"time zone: {zone} (from {origin}); every time you type or read is in it")
    gateway = PhoneGateway(say, twilio_token, f"http://127.0.0.1:{http_port}")
    async with AsyncExitStack() as stack:
        repo_port = await stack.enter_async_context(_site(repo_app))
        phone_port = await stack.enter_async_context(_site(gateway.app))
        stack.push_async_callback(gateway.aclose)
        smtp_port = _free_port()
        smtp = Controller(_Mailbox(root / "mail", say), hostname="127.0.0.1", port=smtp_port)
        await asyncio.to_thread(smtp.start)
        stack.callback(smtp.stop)
        config = write_config(
            root,
            repo_port=repo_port,
            smtp_port=smtp_port,
            phone_port=phone_port,
            http_port=http_port,
            public_key=public_key,
            token=kept.token or secrets.token_hex(16),
            twilio_token=twilio_token,
            timezone=zone,
        )
        settings: Settings = load_settings(config, environ)
        service = await stack.enter_async_context(Service(settings))
        service.bus.subscribe("demo-console", _announcer(say, settings.tz))
        say(f"service: http://127.0.0.1:{service.port} (config {config})")
        say(f"nodes: {root / 'nodes'} (sessions.json, messages.log, faults.json, state.json)")
        say(f"mail:  {root / 'mail'} (Maildir)")
        if console:
            actor = Actor(name=os.environ.get("USER", "demo"), source="cli", roles=frozenset(Role))
            shell = Console(
                service.commands,
                actor,
                names=[*CLUSTER, SINGLE, "demo", "all"],
                history=root / ".history",
                say=say,
                hotfixes=lambda: _names(service, settings.updates.channel, PackageKind.HOTFIX),
                optional=lambda: _names(service, settings.updates.channel, PackageKind.OPTIONAL),
                oldstable=lambda: _names(service, settings.updates.oldstable_channel, None),
            )
            await shell.run(stop)
        else:
            say("running until SIGTERM or Ctrl-C")
            await stop.wait()
        say("stopping")
    return 0


def _make_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def _printer() -> Callable[[str], None]:
    def say(text: str) -> None:
        sys.stdout.write(f"{text}\n")
        sys.stdout.flush()

    return say


def _announcer(say: Callable[[str], None], tz: ZoneInfo) -> Callable[[Event], Any]:
    """The lifecycle on the console as it happens: one line per step of a run (the same
    lines as in `log`), runs ending, maintenance starting and ending, acknowledgements."""

    async def announce(event: Event) -> None:
        if isinstance(event, RunStepDone):
            say(f"[run #{event.run_id}] {event.node}: {event.text}")
        elif isinstance(event, RunFinished):
            extra = f": {event.message}" if event.message else ""
            say(f"[run #{event.run_id}] {event.kind} on {event.node} {event.outcome}{extra}")
        elif isinstance(event, MaintenanceScheduled):
            when = zoned_text(event.start, tz)
            say(f"[maintenance] {event.node}: scheduled for {when} ({event.reason})")
        elif isinstance(event, MaintenanceStarted):
            lock = ", logon locked" if event.logon_disabled else ""
            say(f"[maintenance] {event.node}: started{lock} ({event.reason})")
        elif isinstance(event, MaintenanceEnded):
            say(f"[maintenance] {event.node}: maintenance ended ({event.reason})")
        elif isinstance(event, HotfixAcknowledged):
            say(f"[escalation] hotfix {event.hotfix_id} acknowledged by {event.by}")

    return announce


@dataclass(frozen=True, slots=True, kw_only=True)
class Kept:
    """What a restart of the demo keeps from the last run's ``D/tgops.toml``: the HTTP
    port and the API token (scripts and a second shell keep working), the phone token."""

    port: int | None = None
    token: str | None = None
    twilio_token: str | None = None

    @classmethod
    def read(cls, path: Path) -> Kept:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            return cls()
        port = data.get("http", {}).get("port")
        token = data.get("api", {}).get("tokens", {}).get("demo", {}).get("token")
        twilio = data.get("twilio", {}).get("auth_token")
        return cls(
            port=port if isinstance(port, int) and 0 < port < 65536 else None,
            token=token if isinstance(token, str) and token else None,
            twilio_token=twilio if isinstance(twilio, str) and twilio else None,
        )


def machine_zone(environ: Mapping[str, str]) -> tuple[str, str]:
    """This machine's time zone as an IANA name, and where it was found: ``TZ``, then
    ``/etc/localtime`` (a link into the zoneinfo tree), then ``/etc/timezone``; UTC when
    none names a zone."""
    tz = environ.get("TZ", "").removeprefix(":")
    if tz:
        name = tz.split("zoneinfo/", 1)[1] if "zoneinfo/" in tz else tz
        if _known_zone(name):
            return name, "TZ"
    try:
        target = str(Path("/etc/localtime").resolve())
    except OSError:
        target = ""
    if "zoneinfo/" in target and _known_zone(name := target.split("zoneinfo/", 1)[1]):
        return name, "/etc/localtime"
    try:
        name = Path("/etc/timezone").read_text().strip()
    except OSError:
        name = ""
    if name and _known_zone(name):
        return name, "/etc/timezone"
    return "UTC", "no zone configured on this machine"


def _known_zone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def next_version(versions: list[str]) -> str:
    """The version after the newest of ``versions`` (``2.0`` -> ``2.1``)."""
    newest = max(versions, key=Version) if versions else "2.0"
    head, _, last = newest.rpartition(".")
    if last.isdigit():
        return f"{head}.{int(last) + 1}" if head else str(int(last) + 1)
    return f"{newest}.1"


def publish_update(root: Path) -> str:
    """``tgops demo publish-update``: a new ``tg-base`` in the demo's ``stable`` channel,
    so that every node has an update pending again (e.g. for step 10 of the walkthrough)."""
    key = root / "keys" / "repo.key"
    repo = root / "repo"
    manifest = repo / "channels" / "stable.json"
    if not key.exists() or not manifest.exists():
        raise PublishError(
            f"no demo repository in {root}: start `tgops demo --dir {root}` once first"
        )
    data = json.loads(manifest.read_text())
    versions = [p["version"] for p in data.get("packages", []) if p.get("name") == "tg-base"]
    version = next_version([str(v) for v in versions])
    deb = build_deb(
        root / "debs", "tg-base", version, _files("tg-base", version), description="tg-base"
    )
    publish(repo, "stable", key, [deb])
    return (
        f"published tg-base {version} in channel stable of {repo}; every node has it "
        "pending now (`status`), `auto-update T` installs it"
    )


def _names(service: Service, channel: str, kind: PackageKind | None) -> list[str]:
    """For Tab: hotfix IDs (kind HOTFIX) or package names of a channel's last manifest."""
    manifest = service.engine.manifests.get(channel)
    if manifest is None:
        return []
    if kind is PackageKind.HOTFIX:
        return [p.key for p in manifest.packages if p.kind is kind]
    return [p.name for p in manifest.packages if kind is None or p.kind is kind]
