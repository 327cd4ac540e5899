"""The command-template driver for Debian hosts (used by ``local`` and ``ssh``).

Every step is a shell command line run on the node with a timeout
(``NodeSettings.command_timeout``). Each template has a Debian default and can be replaced
per node with ``commands.KEY = "..."`` in its ``[[nodes]]`` table (appliance specifics:
VNC logon lock, VNC session end, service list). An unknown key is refused when the driver
is built; an empty template turns an optional step off (*required* keys cannot be empty).

Placeholders are written ``{name}``; values are shell-quoted (``shlex.quote``), so user text
such as a notice never reaches the shell unquoted. ``{dpkg}`` and ``{dpkg_query}`` are the
two exceptions: they are command prefixes from the configuration, inserted verbatim, so one
override points every dpkg step at another root (tests use a throwaway dpkg database)::

    dpkg = "dpkg --root=/srv/x --force-not-root --force-script-chrootless"
    dpkg_query = "dpkg-query --root=/srv/x"

Every template may use ``{node}`` (the node's name), ``{dpkg}`` and ``{dpkg_query}``.

=====================  ===============================================================
key                    default, and what it must do
=====================  ===============================================================
dpkg                   ``dpkg`` -- prefix for dpkg (required)
dpkg_query             ``dpkg-query`` -- prefix for dpkg-query (required)
installed              ``{dpkg_query} -W -f '${Package}\\t${Version}\\t${db:Status-Abbrev}\\n'``
                       -- one ``PACKAGE<TAB>VERSION[<TAB>STATUS]`` line per package; with a
                       status column only ``?i?`` (installed) lines count (required)
sessions               ``loginctl list-sessions --no-legend`` -- one ``ID UID USER ...`` line
                       per session (UID may be ``-``). Sessions of the SSH login user are
                       the controller's own and are neither counted nor ended.
announce               ``wall {message}`` -- show ``{message}`` to every logged-in user
logon_disabled         ``test -e /etc/nologin`` -- exit 0: logon disabled, 1: enabled
logon_disable          ``echo 'Logon is disabled for maintenance.' > /etc/nologin``
logon_enable           ``rm -f /etc/nologin``
disconnect             ``loginctl terminate-session {id}`` -- end one session
                       (``{id}``, ``{user}``); run once per session
checksum               ``openssl dgst -sha256 -r {file} 2>/dev/null || sha256sum {file}``
                       -- print the SHA-256 of ``{file}`` as the first word (required: a
                       staged file counts only when it matches)
install                ``DEBIAN_FRONTEND=noninteractive {dpkg} --force-confdef
                       --force-confold -i {files}`` -- install staged ``.deb`` files
                       (required)
reboot_required        ``test -e /var/run/reboot-required`` -- exit 0: restart required,
                       1: not
mark_reboot_required   ``touch /var/run/reboot-required`` -- run after a core package is
                       installed, so that the flag survives until the reboot
restart_services       ``true`` -- e.g. ``systemctl restart unit-a.service unit-b.service``
boot_id                ``cat /proc/sys/kernel/random/boot_id`` -- differs after a reboot;
                       the ssh driver waits for it to change (bounded by command_timeout)
reboot                 ``systemctl reboot``
post_check             ``true`` -- the post-update check; must exit 0 when the node works
                       (``check_url`` is checked as well when set)
integrity              ``{dpkg} --verify`` -- ``dpkg --verify`` output
                       (``??5?????? c /path``, ``missing   /path``)
owners                 ``{dpkg_query} -S {paths}`` -- ``PACKAGE: /path`` lines for the
                       paths the integrity check reported
=====================  ===============================================================

Load balancing (drain/undrain) is not a node command: it goes through the cluster's load
balancer (``core.drivers.loadbalancer``). A single system has none and drain/undrain do nothing.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from core.drivers.checkurl import check_url
from core.drivers.shell import Completed
from core.drivers.staging import parse_staged, staged_file_name
from core.errors import CommandTimeoutError, DriverError, NodeUnreachableError
from core.interfaces import OutputSink
from core.model import (
    CommandOutput,
    InstallResult,
    IntegrityMismatch,
    LbState,
    NodeStatus,
    PackageKind,
    Session,
    StagedPackage,
)
from core.settings import NodeSettings
from core.templates import VERBATIM, Value, fill, resolve_templates

if TYPE_CHECKING:
    from core.drivers.loadbalancer import NodeBalancer

log = logging.getLogger(__name__)

DEFAULT_STAGING_DIR = "/var/cache/tgops/staged"
_REBOOT_POLL = 2.0
"""Seconds between attempts to reach a rebooting node."""


class CommandRunner(Protocol):
    """Runs command lines and moves files on one node (this host, or over SSH)."""

    async def run(self, operation: str, command: str, *, limit: float) -> Completed:
        """Raises ``CommandTimeoutError``, ``NodeUnreachableError``; never a hang."""

    async def put(self, operation: str, source: Path, target: str, *, limit: float) -> None:
        """Copy a local file to ``target`` on the node."""

    async def makedirs(self, operation: str, directory: str, *, limit: float) -> None: ...

    async def listdir(self, operation: str, directory: str, *, limit: float) -> list[str]:
        """Names in ``directory``; empty when it does not exist."""

    async def rename(self, operation: str, source: str, target: str, *, limit: float) -> None:
        """Replace ``target`` by ``source`` atomically."""

    async def remove(self, operation: str, path: str, *, limit: float) -> None:
        """Remove a file; no error when it does not exist."""

    async def reset(self) -> None:
        """Forget the connection (if any); the next call reconnects."""

    async def aclose(self) -> None: ...


_SESSION_ID = re.compile(r"^[A-Za-z0-9_.:@-]+$")
_SESSION_SUMMARY = re.compile(r"^(No sessions\.|\d+ sessions? listed\.)$")
_VERIFY_LINE = re.compile(r"^(missing|[?.A-Za-z0-9]{9}) +(?:(c) +)?(/.*)$")
_VERIFY_CHECKS = {
    0: "size differs",
    1: "mode differs",
    2: "checksum differs",
    3: "device differs",
    4: "link target differs",
    5: "owner differs",
    6: "group differs",
    7: "modification time differs",
}


def parse_sessions(text: str) -> list[Session] | str:
    """Sessions in ``loginctl list-sessions --no-legend`` format, or the problem."""
    sessions: list[Session] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or _SESSION_SUMMARY.match(stripped):
            continue
        fields = stripped.split()
        if (
            len(fields) < 3
            or not _SESSION_ID.match(fields[0])
            or not (fields[1].isdigit() or fields[1] == "-")
        ):
            return f"line {number} is {stripped[:120]!r}, expected 'SESSION UID USER ...'"
        sessions.append(Session(user=fields[2], id=fields[0]))
    return sessions


def parse_installed(text: str) -> dict[str, str] | str:
    installed: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip():
            return f"line {number} is {line[:120]!r}, expected 'PACKAGE<TAB>VERSION[<TAB>STATUS]'"
        name, version = fields[0].strip(), fields[1].strip()
        status = fields[2].strip() if len(fields) > 2 else "ii"
        if version and len(status) >= 2 and status[1] == "i":
            installed[name] = version
    return installed


def parse_verify(text: str) -> list[tuple[str, str]] | str:
    """``(path, problem)`` for every line of ``dpkg --verify`` output, or the problem."""
    found: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _VERIFY_LINE.match(line)
        if match is None:
            return f"line {number} is {line[:120]!r}, expected dpkg --verify output"
        checks, conffile, path = match.groups()
        if checks == "missing":
            problem = "missing"
        else:
            problems = [text for index, text in _VERIFY_CHECKS.items() if checks[index] not in ".?"]
            problem = ", ".join(problems) or f"verification failed ({checks})"
        if conffile:
            problem += " (configuration file)"
        found.append((path, problem))
    return found


def parse_owners(text: str) -> dict[str, str]:
    """``{path: package}`` from ``dpkg-query -S`` output (diversion lines skipped)."""
    owners: dict[str, str] = {}
    for line in text.splitlines():
        if ": " not in line or line.startswith(("diversion by", "local diversion")):
            continue
        packages, path = line.split(": ", 1)
        owners.setdefault(path, packages.split(",")[0].strip().split(":")[0])
    return owners


class CommandDriver:
    """A Debian node driven by command templates (see the module doc for every key)."""

    def __init__(
        self,
        settings: NodeSettings,
        runner: CommandRunner,
        *,
        lb: NodeBalancer | None = None,
        output: OutputSink | None = None,
        staging_dir: str = DEFAULT_STAGING_DIR,
        own_user: str | None = None,
        wait_after_reboot: bool = False,
    ) -> None:
        self.name = settings.name
        self.settings = settings
        self.templates = resolve_templates(settings.name, settings.commands)
        self.staging_dir = staging_dir.rstrip("/") or "/"
        self._runner = runner
        self._lb = lb
        self._clustered = settings.cluster is not None
        self._output = output
        self._timeout = settings.command_timeout
        self._own_user = own_user
        self._wait_after_reboot = wait_after_reboot
        self._lb_state: LbState | None = None
        """What this driver last did to the load balancer; None: nothing since the start
        (the store's record then stands, see ``Engine.refresh``)."""

    # -- running templates ----------------------------------------------------------

    def render(self, key: str, **values: Value) -> str:
        return fill(
            self.templates[key],
            {
                "node": self.name,
                "dpkg": self.templates["dpkg"],
                "dpkg_query": self.templates["dpkg_query"],
                **values,
            },
            verbatim=VERBATIM,
        )

    async def _exec(
        self, operation: str, key: str, *, limit: float | None = None, **values: Value
    ) -> tuple[str, Completed]:
        command = self.render(key, **values)
        log.debug("node %s: %s: running %s", self.name, operation, command)
        result = await self._runner.run(
            operation, command, limit=self._timeout if limit is None else limit
        )
        if self._output is not None:
            await self._output(
                CommandOutput(
                    operation=operation,
                    command=command,
                    exit_status=result.exit_status,
                    stdout=result.stdout,
                    stderr=result.stderr,
                    at=datetime.now(UTC),
                )
            )
        return command, result

    def _failed(self, operation: str, result: Completed) -> DriverError:
        lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
        cause = lines[-1].strip() if lines else "no output"
        return DriverError(self.name, operation, f"exit {result.exit_status}: {cause}")

    async def _check(
        self, operation: str, key: str, *, limit: float | None = None, **values: Value
    ) -> str:
        """Run ``key``; its stdout, or ``DriverError`` on a non-zero exit. Empty: no-op."""
        if not self.templates[key].strip():
            return ""
        _, result = await self._exec(operation, key, limit=limit, **values)
        if result.exit_status != 0:
            raise self._failed(operation, result)
        return result.stdout

    async def _test(self, operation: str, key: str) -> bool:
        """Run a ``test``-like template: exit 0 is True, 1 is False. Empty: False."""
        if not self.templates[key].strip():
            return False
        command, result = await self._exec(operation, key)
        if result.exit_status in (0, 1):
            return result.exit_status == 0
        raise DriverError(
            self.name,
            operation,
            f"{key} command {command!r} must exit 0 or 1, it exited {result.exit_status}: "
            + (result.stderr.strip().splitlines() or ["no output"])[-1],
        )

    def _parse_error(self, operation: str, key: str, problem: str) -> DriverError:
        return DriverError(
            self.name,
            operation,
            f"cannot parse the output of the {key} command {self.render(key)!r}: {problem} "
            f"(fix commands.{key} for this node)",
        )

    # -- NodeDriver -----------------------------------------------------------------

    async def _installed(self, operation: str) -> dict[str, str]:
        installed = parse_installed(await self._check(operation, "installed"))
        if isinstance(installed, str):
            raise self._parse_error(operation, "installed", installed)
        return installed

    async def _sessions(self, operation: str) -> list[Session]:
        sessions = parse_sessions(await self._check(operation, "sessions"))
        if isinstance(sessions, str):
            raise self._parse_error(operation, "sessions", sessions)
        return [s for s in sessions if s.user != self._own_user]

    async def _staged(self, operation: str) -> dict[str, str]:
        names = await self._runner.listdir(operation, self.staging_dir, limit=self._timeout)
        return parse_staged(names)

    async def _lb_status(self) -> LbState | None:
        if not self._clustered:
            return None
        if self._lb is not None:
            known = await self._lb.state(self.name)
            if known is not None:
                return known
        return self._lb_state

    async def status(self) -> NodeStatus:
        operation = "status"
        installed = await self._installed(operation)
        sessions = await self._sessions(operation)
        logon_disabled = await self._test(operation, "logon_disabled")
        restart_required = await self._test(operation, "reboot_required")
        staged = await self._staged(operation)
        return NodeStatus(
            installed=installed,
            sessions=tuple(sessions),
            logon_enabled=not logon_disabled,
            lb=await self._lb_status(),
            restart_required=restart_required,
            staged=staged,
        )

    async def announce(self, message: str) -> None:
        await self._check("announce", "announce", message=message)
        log.info("node %s: announce: %s", self.name, " ".join(message.splitlines()))

    async def set_logon(self, enabled: bool) -> None:
        await self._check("set_logon", "logon_enable" if enabled else "logon_disable")
        log.info("node %s: set_logon: %s", self.name, "enabled" if enabled else "disabled")

    async def _balance(self, operation: str, state: LbState) -> None:
        if not self._clustered:
            log.debug("node %s: %s: single system, no load balancing", self.name, operation)
            return
        if self._lb is None:
            raise DriverError(
                self.name,
                operation,
                f"cluster {self.settings.cluster} has no load balancer; set lb_drain and "
                f"lb_undrain (command templates with {{node}}) or haproxy_socket in "
                f"[clusters.{self.settings.cluster}]",
            )
        if state == "drained":
            await self._lb.drain(self.name)
        else:
            await self._lb.undrain(self.name)
        self._lb_state = state
        log.info("node %s: %s: load balancing %s", self.name, operation, state)

    async def drain(self) -> None:
        await self._balance("drain", "drained")

    async def undrain(self) -> None:
        await self._balance("undrain", "in")

    async def disconnect_sessions(self) -> int:
        operation = "disconnect_sessions"
        sessions = await self._sessions(operation)
        failures: list[str] = []
        for session in sessions:
            try:
                await self._check(operation, "disconnect", id=session.id, user=session.user)
            except DriverError as exc:
                if isinstance(exc, NodeUnreachableError):
                    raise
                failures.append(f"session {session.id} of {session.user}: {exc.cause}")
        if failures:
            raise DriverError(
                self.name,
                operation,
                f"ended {len(sessions) - len(failures)} of {len(sessions)} sessions; "
                + "; ".join(failures),
            )
        log.info("node %s: %s: ended %d session(s)", self.name, operation, len(sessions))
        return len(sessions)

    def _staged_path(self, package: StagedPackage) -> str:
        return f"{self.staging_dir}/{staged_file_name(package.name, package.version)}"

    async def _sha256(self, operation: str, path: str) -> str:
        output = await self._check(operation, "checksum", file=path)
        words = output.split()
        if not words or not re.fullmatch(r"[0-9a-fA-F]{64}", words[0]):
            raise self._parse_error(operation, "checksum", f"no SHA-256 in {output[:120]!r}")
        return words[0].lower()

    async def stage(self, packages: Sequence[StagedPackage]) -> None:
        operation = "stage"
        await self._runner.makedirs(operation, self.staging_dir, limit=self._timeout)
        for package in packages:
            target = self._staged_path(package)
            part = f"{target}.part"
            await self._runner.put(operation, package.path, part, limit=self._timeout)
            actual = await self._sha256(operation, part)
            if actual != package.sha256:
                await self._runner.remove(operation, part, limit=self._timeout)
                raise DriverError(
                    self.name,
                    operation,
                    f"{package.name} {package.version}: the copy on the node has SHA-256 "
                    f"{actual}, expected {package.sha256}; nothing staged (download it again)",
                )
            await self._runner.rename(operation, part, target, limit=self._timeout)
            for name, version in (await self._staged(operation)).items():
                if name == package.name and version != package.version:
                    old = f"{self.staging_dir}/{staged_file_name(name, version)}"
                    await self._runner.remove(operation, old, limit=self._timeout)
            log.info("node %s: stage: %s %s", self.name, package.name, package.version)

    async def install(self, packages: Sequence[StagedPackage]) -> InstallResult:
        operation = "install"
        if not packages:
            return InstallResult(
                installed={}, restart_required=await self._test(operation, "reboot_required")
            )
        staged = await self._staged(operation)
        for package in packages:
            if staged.get(package.name) != package.version:
                raise DriverError(
                    self.name,
                    operation,
                    f"{package.name} {package.version} is not staged in {self.staging_dir}; "
                    "stage (download) it before installing",
                )
            actual = await self._sha256(operation, self._staged_path(package))
            if actual != package.sha256:
                raise DriverError(
                    self.name,
                    operation,
                    f"staged {package.name} {package.version} has SHA-256 {actual}, expected "
                    f"{package.sha256}; it was changed after staging (download it again)",
                )
        files = [self._staged_path(p) for p in packages]
        output = await self._check(operation, "install", files=files)
        installed = await self._installed(operation)
        wrong = [
            f"{p.name} is at {installed.get(p.name, 'not installed')}, expected {p.version}"
            for p in packages
            if installed.get(p.name) != p.version
        ]
        if wrong:
            raise DriverError(
                self.name,
                operation,
                "the install command succeeded but "
                + "; ".join(wrong)
                + " (look at the install output in the run log)",
            )
        for path in files:
            await self._runner.remove(operation, path, limit=self._timeout)
        core = [p.name for p in packages if p.kind is PackageKind.CORE]
        if core:
            await self._check(operation, "mark_reboot_required")
            log.info(
                "node %s: install: core update (%s), restart required", self.name, ", ".join(core)
            )
        restart_required = bool(core) or await self._test(operation, "reboot_required")
        log.info(
            "node %s: install: %s", self.name, ", ".join(f"{p.name} {p.version}" for p in packages)
        )
        return InstallResult(
            installed={p.name: p.version for p in packages},
            restart_required=restart_required,
            output=output,
        )

    async def restart_services(self) -> None:
        await self._check("restart_services", "restart_services")
        log.info("node %s: restart_services: done", self.name)

    async def _boot_id(self, operation: str, limit: float | None = None) -> str:
        return (await self._check(operation, "boot_id", limit=limit)).strip()

    async def reboot(self) -> None:
        operation = "reboot"
        wait = self._wait_after_reboot and bool(self.templates["boot_id"].strip())
        before = await self._boot_id(operation) if wait else ""
        try:
            await self._check(operation, "reboot")
        except NodeUnreachableError as exc:
            # The node went down before the command could report: the reboot is under way.
            log.info("node %s: reboot: connection lost (%s)", self.name, exc.cause)
        if wait:
            await self._wait_for_boot(operation, before)
        log.info("node %s: reboot: done", self.name)

    async def _wait_for_boot(self, operation: str, before: str) -> None:
        """Poll (bounded by ``command_timeout``) until ``boot_id`` differs from ``before``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        last = "the node still reports the old boot id"
        while (remaining := deadline - loop.time()) > 0:
            try:
                current = await self._boot_id(operation, limit=min(remaining, 15.0))
            except (NodeUnreachableError, CommandTimeoutError) as exc:
                await self._runner.reset()
                last = exc.cause
            else:
                if current and current != before:
                    return
            await asyncio.sleep(min(_REBOOT_POLL, max(deadline - loop.time(), 0)))
        raise DriverError(
            self.name,
            operation,
            f"the node did not come back within {self._timeout:g}s after the reboot "
            f"(last: {last}); check its console",
        )

    async def post_check(self) -> None:
        await self._check("post_check", "post_check")
        if self.settings.check_url is not None:
            await check_url(self.name, self.settings.check_url, limit=min(self._timeout, 60.0))

    async def verify_integrity(self) -> list[IntegrityMismatch]:
        operation = "verify_integrity"
        found = parse_verify(await self._check(operation, "integrity"))
        if isinstance(found, str):
            raise self._parse_error(operation, "integrity", found)
        owners: dict[str, str] = {}
        if found and self.templates["owners"].strip():
            _, result = await self._exec(operation, "owners", paths=[path for path, _ in found])
            if result.exit_status not in (0, 1):  # 1: some path belongs to no package
                raise self._failed(operation, result)
            owners = parse_owners(result.stdout)
        return [
            IntegrityMismatch(package=owners.get(path, ""), path=path, problem=problem)
            for path, problem in found
        ]

    async def aclose(self) -> None:
        await self._runner.aclose()
