"""The ssh driver: a Debian host reached with asyncssh, driven by command templates.

- Host keys are checked against ``known_hosts`` (default ``~/.ssh/known_hosts``, re-read at
  every connect). An unknown key is refused unless ``accept_unknown_host_key = true``; a
  key that differs from a listed one is always refused.
- Key authentication with ``key_file`` (without it: the SSH agent and ``~/.ssh/id_*``).
  ``~/.ssh/config`` is not read: the node's settings are the whole truth.
- One connection per node, reused by every operation and reopened lazily when it dropped
  (keepalives notice a dead peer). Connecting is bounded by ``connect_timeout``.
- Each command runs as ``env LC_ALL=C timeout -k 5 T /bin/sh -c CMD`` on the node, so a
  hanging command is killed there too, and the controller stops waiting shortly after T.
- AES-GCM is offered first (the CPU's AES instructions on both ends: the ciphers cost
  little next to the copy), then asyncssh's defaults; the server picks the first it has.
- Staging streams the file into ``cat > NAME.part`` in the staging directory, checks the
  SHA-256 of the stored file on the node with the ``checksum`` template, then renames it
  into place (over SFTP, as are listing and removing). A file of ``OPENSSH_FROM`` bytes or
  more goes through OpenSSH's own client (``ssh`` on PATH) when it is installed: asyncssh
  sends every data packet as two (a ``MSG_IGNORE`` before each) and one system call per
  packet, which costs the controller about half again the CPU of OpenSSH on a 512 MiB
  file. The client trusts exactly the host key the driver's own connection has just
  verified (a known_hosts file of one line, under a ``HostKeyAlias``), reads no
  ``~/.ssh/config``, never prompts, and authenticates as the connection did (``key_file``
  only, or the agent and default keys). Smaller files, and every file when ``ssh`` is
  missing, go over one exec channel of the driver's connection.
- After ``reboot`` the driver waits (bounded by ``command_timeout``) until the node answers
  with a new ``boot_id``.

See ``core.drivers.commands`` for every command template.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shlex
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar

import asyncssh
from asyncssh.encryption import get_default_encryption_algs

from core.drivers.commands import DEFAULT_STAGING_DIR, CommandDriver
from core.drivers.shell import Completed
from core.errors import (
    CommandTimeoutError,
    DriverError,
    HostKeyNotTrustedError,
    NodeAuthenticationError,
    NodeUnreachableError,
)
from core.interfaces import OutputSink
from core.settings import NodeSettings

if TYPE_CHECKING:
    from core.drivers.loadbalancer import NodeBalancer

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_CONNECT_TIMEOUT = 15.0
_KILL_AFTER = 5
"""Seconds the node's ``timeout`` waits after TERM before it sends KILL."""
_GRACE = _KILL_AFTER + 5.0
"""How much longer than the command's timeout the controller waits for its exit status."""
_CLOSE_TIMEOUT = 5.0
_KEEPALIVE = 15.0
_FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
_PUT_CHUNK = 1 << 20
"""Bytes read from the local file and written to the channel at a time."""
OPENSSH_FROM = 8 << 20
"""Files of this many bytes or more are copied with OpenSSH's client when it is installed
(below it, starting a second client and handshake costs more than it saves)."""
_OPENSSH_CIPHERS = (
    "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,"
    "aes128-ctr,aes192-ctr,aes256-ctr"
)
_PINNED_ALIAS = "tgops-node"
"""The name the one-line known_hosts file of an OpenSSH copy gives the node's key."""


def _encryption_algs() -> list[str]:
    """AES-GCM first, then asyncssh's defaults in their order."""
    defaults = [name.decode() for name in get_default_encryption_algs()]
    first = [name for name in _FAST_CIPHERS if name in defaults]
    return first + [name for name in defaults if name not in first]


def _on_node(command: str, limit: float) -> str:
    """``command`` as the node runs it: C locale, ended by the node's ``timeout``."""
    return f"env LC_ALL=C timeout -k {_KILL_AFTER} {limit:.3f} /bin/sh -c {shlex.quote(command)}"


def _node_timed_out(status: int | None, started: float, limit: float) -> bool:
    """Whether exit ``status`` is the node's ``timeout`` ending a command started (loop
    time) ``started`` and given ``limit`` seconds."""
    return status in (124, 137) and _ran_out(started, limit)


def _ran_out(started: float, limit: float) -> bool:
    return asyncio.get_running_loop().time() - started >= limit - 0.05


class _Client(asyncssh.SSHClient):
    """Decides about host keys missing from known_hosts; notices a dropped connection."""

    def __init__(self, node: str, known: asyncssh.SSHKnownHosts, *, accept_unknown: bool) -> None:
        self._node = node
        self._known = known
        self._accept_unknown = accept_unknown
        self.seen_key: asyncssh.SSHKey | None = None
        self.listed = False
        self.lost = False

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.seen_key = key
        host_keys, ca_keys, *_ = self._known.match(host, addr, port)
        self.listed = bool(host_keys or ca_keys)
        if self._accept_unknown and not self.listed:
            log.warning(
                "node %s: accepting the unknown host key %s of %s:%s "
                "(accept_unknown_host_key = true)",
                self._node,
                key.get_fingerprint(),
                host,
                port,
            )
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class SshRunner:
    """Runs commands and moves files on a node over one reused SSH connection."""

    def __init__(
        self,
        node: str,
        *,
        host: str,
        port: int = 22,
        user: str = "root",
        key_file: Path | None = None,
        known_hosts: Path | None = None,
        accept_unknown_host_key: bool = False,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        openssh_from: int | None = OPENSSH_FROM,
    ) -> None:
        """``openssh_from``: the size from which a file is copied with OpenSSH's client
        (``None``: never)."""
        self.node = node
        self.host = host
        self.port = port
        self.user = user
        self.key_file = key_file
        self.known_hosts = known_hosts or Path.home() / ".ssh" / "known_hosts"
        self.accept_unknown_host_key = accept_unknown_host_key
        self.connect_timeout = connect_timeout
        self.openssh_from = openssh_from
        self._conn: asyncssh.SSHClientConnection | None = None
        self._client: _Client | None = None
        self._lock = asyncio.Lock()

    @property
    def address(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def _load_known_hosts(self, operation: str) -> asyncssh.SSHKnownHosts:
        try:
            return asyncssh.read_known_hosts(str(self.known_hosts))
        except FileNotFoundError:
            return asyncssh.import_known_hosts("")
        except (OSError, ValueError) as exc:
            raise DriverError(
                self.node, operation, f"cannot read known_hosts {self.known_hosts}: {exc}"
            ) from exc

    def _load_key(self, operation: str) -> list[asyncssh.SSHKey] | None:
        if self.key_file is None:
            return None
        try:
            return [asyncssh.read_private_key(str(self.key_file))]
        except (OSError, asyncssh.KeyImportError) as exc:
            raise DriverError(
                self.node,
                operation,
                f"cannot load key_file {self.key_file}: {exc} (an unencrypted OpenSSH or "
                "PEM private key is needed)",
            ) from exc

    async def _connection(self, operation: str) -> tuple[asyncssh.SSHClientConnection, bool]:
        """The node's connection, and whether it was opened just now."""
        async with self._lock:
            if self._conn is not None and self._client is not None and not self._client.lost:
                return self._conn, False
            await self._drop_locked()
            known = self._load_known_hosts(operation)
            keys = self._load_key(operation)
            client = _Client(self.node, known, accept_unknown=self.accept_unknown_host_key)
            options: dict[str, object] = {}
            if keys is not None:
                options = {"client_keys": keys, "agent_path": None}
            try:
                async with asyncio.timeout(self.connect_timeout):
                    conn = await asyncssh.connect(
                        self.host,
                        self.port,
                        username=self.user,
                        known_hosts=known,
                        client_factory=lambda: client,
                        config=[],
                        connect_timeout=self.connect_timeout,
                        login_timeout=self.connect_timeout,
                        keepalive_interval=_KEEPALIVE,
                        keepalive_count_max=3,
                        encryption_algs=_encryption_algs(),
                        **options,
                    )
            except asyncssh.HostKeyNotVerifiable:
                key = client.seen_key
                raise HostKeyNotTrustedError(
                    self.node,
                    operation,
                    host=self.host,
                    port=self.port,
                    fingerprint=key.get_fingerprint() if key is not None else "key not shown",
                    known_hosts=str(self.known_hosts),
                    changed=client.listed,
                ) from None
            except asyncssh.PermissionDenied:
                raise NodeAuthenticationError(
                    self.node,
                    operation,
                    host=self.host,
                    port=self.port,
                    user=self.user,
                    key=str(self.key_file) if self.key_file else "the agent's and default keys",
                ) from None
            except TimeoutError:
                raise NodeUnreachableError(
                    self.node,
                    operation,
                    f"no SSH answer from {self.host}:{self.port} within "
                    f"{self.connect_timeout:g}s; check that the node is up and reachable",
                ) from None
            except OSError as exc:
                raise NodeUnreachableError(
                    self.node,
                    operation,
                    f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}; "
                    "check that the node is up and sshd listens there",
                ) from exc
            except asyncssh.Error as exc:
                raise NodeUnreachableError(
                    self.node,
                    operation,
                    f"SSH connection to {self.host}:{self.port} failed: {exc.reason}",
                ) from exc
            log.info("node %s: %s: connected to %s", self.node, operation, self.address)
            self._conn, self._client = conn, client
            return conn, True

    async def _drop_locked(self) -> None:
        conn, self._conn, self._client = self._conn, None, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(TimeoutError, OSError, asyncssh.Error):
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await conn.wait_closed()

    async def reset(self) -> None:
        async with self._lock:
            await self._drop_locked()

    async def _forget(self, conn: asyncssh.SSHClientConnection) -> None:
        async with self._lock:
            if self._conn is conn:
                await self._drop_locked()

    def _lost(self, operation: str, exc: BaseException) -> NodeUnreachableError:
        reason = getattr(exc, "reason", "") or str(exc) or type(exc).__name__
        return NodeUnreachableError(
            self.node,
            operation,
            f"the SSH connection to {self.host}:{self.port} failed: {reason} "
            "(the next operation reconnects)",
        )

    async def _open(
        self,
        operation: str,
        channel: Callable[[asyncssh.SSHClientConnection], Awaitable[T]],
    ) -> tuple[T, asyncssh.SSHClientConnection]:
        """Open a channel; a stale reused connection is reopened once."""
        for attempt in (1, 2):
            conn, fresh = await self._connection(operation)
            try:
                async with asyncio.timeout(self.connect_timeout):
                    opened = await channel(conn)
            except (TimeoutError, OSError, asyncssh.Error) as exc:
                await self._forget(conn)
                if fresh or attempt == 2:
                    raise self._lost(operation, exc) from exc
                log.info("node %s: %s: reconnecting (%s)", self.node, operation, exc)
                continue
            return opened, conn
        raise AssertionError("unreachable")

    async def _start(
        self, operation: str, command: str
    ) -> tuple[asyncssh.SSHClientProcess[str], asyncssh.SSHClientConnection]:
        """A channel running ``command``, its input empty, its output text."""

        async def channel(conn: asyncssh.SSHClientConnection) -> asyncssh.SSHClientProcess[str]:
            return await conn.create_process(
                command, stdin=asyncssh.DEVNULL, encoding="utf-8", errors="replace"
            )

        return await self._open(operation, channel)

    async def _start_binary(
        self, operation: str, command: str
    ) -> tuple[asyncssh.SSHClientProcess[bytes], asyncssh.SSHClientConnection]:
        """A channel running ``command`` with a byte stream as its input."""

        async def channel(
            conn: asyncssh.SSHClientConnection,
        ) -> asyncssh.SSHClientProcess[bytes]:
            return await conn.create_process(command, encoding=None)

        return await self._open(operation, channel)

    async def run(self, operation: str, command: str, *, limit: float) -> Completed:
        wrapped = _on_node(command, limit)
        process, conn = await self._start(operation, wrapped)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(limit + _GRACE):
                result = await process.wait()
        except TimeoutError:
            process.close()
            raise CommandTimeoutError(self.node, operation, command, limit) from None
        except (OSError, asyncssh.Error) as exc:
            await self._forget(conn)
            raise self._lost(operation, exc) from exc
        finally:
            process.close()
        stderr = str(result.stderr or "")
        status = result.exit_status
        if status is None:
            if not result.exit_signal:
                # No exit status and no signal: the channel closed with the connection.
                await self._forget(conn)
                raise self._lost(operation, ConnectionError("closed before the command ended"))
            stderr += f"\nkilled by signal {result.exit_signal[0]}"
            status = -1
        if _node_timed_out(status, started, limit):
            raise CommandTimeoutError(self.node, operation, command, limit)
        return Completed(exit_status=status, stdout=str(result.stdout or ""), stderr=stderr)

    async def _sftp(
        self,
        operation: str,
        what: str,
        limit: float,
        action: Callable[[asyncssh.SFTPClient], Awaitable[T]],
    ) -> T:
        conn, _ = await self._connection(operation)
        try:
            async with asyncio.timeout(limit), conn.start_sftp_client() as sftp:
                return await action(sftp)
        except TimeoutError:
            raise DriverError(
                self.node, operation, f"{what} took over {limit:g}s over SFTP"
            ) from None
        except asyncssh.SFTPError as exc:
            raise DriverError(self.node, operation, f"{what}: {exc.reason}") from exc
        except (OSError, asyncssh.Error) as exc:
            await self._forget(conn)
            raise self._lost(operation, exc) from exc

    async def put(self, operation: str, source: Path, target: str, *, limit: float) -> None:
        """Copy ``source`` into ``cat > target`` on the node: with OpenSSH's client from
        ``openssh_from`` bytes on when ``ssh`` is installed, else over one exec channel
        (faster than asyncssh's SFTP at every block size tried, see bench/RESULTS.md)."""
        what = f"uploading {source} to {target}"
        command = f"cat > {shlex.quote(target)}"
        wrapped = _on_node(command, limit)
        try:
            handle = source.open("rb")
        except OSError as exc:
            raise DriverError(self.node, operation, f"{what}: {exc.strerror or exc}") from exc
        with handle:
            client = self._openssh_for(os.fstat(handle.fileno()).st_size)
            if client is not None:
                conn, _ = await self._connection(operation)
                key = conn.get_server_host_key()
                if key is not None:
                    await self._put_openssh(
                        operation,
                        what,
                        handle,
                        client=client,
                        key=key,
                        wrapped=wrapped,
                        limit=limit,
                    )
                    return
            await self._put_channel(operation, what, handle, wrapped, limit)

    def _openssh_for(self, size: int) -> str | None:
        if self.openssh_from is None or size < self.openssh_from:
            return None
        return shutil.which("ssh")

    def _openssh_argv(self, client: str, known_hosts: Path, command: str) -> list[str]:
        """``ssh`` trusting only the key in ``known_hosts``, configured by nothing else."""
        argv = [client, "-F", "/dev/null", "-T", "-x", "-a"]
        options = {
            "BatchMode": "yes",
            "StrictHostKeyChecking": "yes",
            "UserKnownHostsFile": str(known_hosts),
            "GlobalKnownHostsFile": "/dev/null",
            "HostKeyAlias": _PINNED_ALIAS,
            "UpdateHostKeys": "no",
            "CheckHostIP": "no",
            "ConnectTimeout": str(max(1, math.ceil(self.connect_timeout))),
            "ServerAliveInterval": str(int(_KEEPALIVE)),
            "ServerAliveCountMax": "3",
            "Ciphers": _OPENSSH_CIPHERS,
            "ClearAllForwardings": "yes",
            "LogLevel": "ERROR",
        }
        if self.key_file is not None:
            # key_file alone, as the driver's connection (no agent, no default keys)
            options |= {
                "IdentityFile": str(self.key_file),
                "IdentitiesOnly": "yes",
                "IdentityAgent": "none",
            }
        for name, value in options.items():
            argv += ["-o", f"{name}={value}"]
        return [*argv, "-p", str(self.port), "-l", self.user, "--", self.host, command]

    async def _put_openssh(
        self,
        operation: str,
        what: str,
        handle: BinaryIO,
        *,
        client: str,
        key: asyncssh.SSHKey,
        wrapped: str,
        limit: float,
    ) -> None:
        loop = asyncio.get_running_loop()
        with tempfile.TemporaryDirectory(prefix="tgops-ssh-") as directory:
            known = Path(directory) / "known_hosts"
            line = key.export_public_key("openssh").decode().split()[:2]
            known.write_text(f"{_PINNED_ALIAS} {' '.join(line)}\n")
            argv = self._openssh_argv(client, known, wrapped)
            started = loop.time()
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=handle,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                    start_new_session=True,
                )
            except OSError as exc:
                raise DriverError(
                    self.node, operation, f"{what}: cannot start {client}: {exc.strerror or exc}"
                ) from exc
            try:
                async with asyncio.timeout(limit + _GRACE):
                    _, raw = await process.communicate()
            except TimeoutError:
                raise DriverError(self.node, operation, f"{what} took over {limit:g}s") from None
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        stderr = raw.decode(errors="replace").strip()
        status = process.returncode
        if status == 0:
            return
        if _node_timed_out(status, started, limit):
            raise DriverError(self.node, operation, f"{what} took over {limit:g}s")
        if status == 255:
            # ssh's own failure (connection, authentication, host key); cat never ran
            raise NodeUnreachableError(
                self.node,
                operation,
                f"{what} with {client} to {self.host}:{self.port} failed: "
                f"{stderr[-300:] or 'exit status 255'}",
            )
        raise DriverError(self.node, operation, f"{what}: exit status {status}: {stderr[-300:]}")

    async def _put_channel(
        self, operation: str, what: str, handle: BinaryIO, wrapped: str, limit: float
    ) -> None:
        process, conn = await self._start_binary(operation, wrapped)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(limit + _GRACE):
                while chunk := await asyncio.to_thread(handle.read, _PUT_CHUNK):
                    process.stdin.write(chunk)
                    await process.stdin.drain()
                process.stdin.write_eof()
                result = await process.wait()
        except TimeoutError:
            raise DriverError(self.node, operation, f"{what} took over {limit:g}s") from None
        except (OSError, asyncssh.Error) as exc:
            if _ran_out(started, limit):
                # the node's timeout ended cat, which closed the channel
                raise DriverError(self.node, operation, f"{what} took over {limit:g}s") from exc
            await self._forget(conn)
            raise self._lost(operation, exc) from exc
        finally:
            process.close()
        if result.exit_status is None and not result.exit_signal:
            await self._forget(conn)
            raise self._lost(operation, ConnectionError("closed before the upload ended"))
        if _node_timed_out(result.exit_status, started, limit):
            raise DriverError(self.node, operation, f"{what} took over {limit:g}s")
        if result.exit_status != 0:
            raw = result.stderr or b""
            stderr = (raw.decode(errors="replace") if isinstance(raw, bytes) else raw).strip()
            status = result.exit_status if result.exit_status is not None else "a signal"
            raise DriverError(
                self.node, operation, f"{what}: exit status {status}: {stderr[-300:]}"
            )

    async def makedirs(self, operation: str, directory: str, *, limit: float) -> None:
        async def action(sftp: asyncssh.SFTPClient) -> None:
            await sftp.makedirs(directory, exist_ok=True)

        await self._sftp(operation, f"creating {directory}", limit, action)

    async def listdir(self, operation: str, directory: str, *, limit: float) -> list[str]:
        async def action(sftp: asyncssh.SFTPClient) -> list[str]:
            try:
                names = await sftp.listdir(directory)
            except asyncssh.SFTPNoSuchFile:
                return []
            return sorted(str(n) for n in names if n not in (".", ".."))

        return await self._sftp(operation, f"listing {directory}", limit, action)

    async def rename(self, operation: str, source: str, target: str, *, limit: float) -> None:
        async def action(sftp: asyncssh.SFTPClient) -> None:
            await sftp.posix_rename(source, target)

        await self._sftp(operation, f"renaming {source} to {target}", limit, action)

    async def remove(self, operation: str, path: str, *, limit: float) -> None:
        async def action(sftp: asyncssh.SFTPClient) -> None:
            with contextlib.suppress(asyncssh.SFTPNoSuchFile):
                await sftp.remove(path)

        await self._sftp(operation, f"removing {path}", limit, action)

    async def aclose(self) -> None:
        await self.reset()


class SshDriver(CommandDriver):
    """A Debian host reached over SSH (``driver = "ssh"``)."""

    def __init__(
        self,
        settings: NodeSettings,
        *,
        lb: NodeBalancer | None = None,
        output: OutputSink | None = None,
        staging_dir: str = DEFAULT_STAGING_DIR,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        if not settings.host:
            raise DriverError(settings.name, "connect", "the ssh driver needs host")
        runner = SshRunner(
            settings.name,
            host=settings.host,
            port=settings.port,
            user=settings.user,
            key_file=settings.key_file,
            known_hosts=settings.known_hosts,
            accept_unknown_host_key=settings.accept_unknown_host_key,
            connect_timeout=connect_timeout,
        )
        super().__init__(
            settings,
            runner,
            lb=lb,
            output=output,
            staging_dir=staging_dir,
            own_user=settings.user,
            wait_after_reboot=True,
        )
        self.runner = runner
