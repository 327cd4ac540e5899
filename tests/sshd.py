"""A real OpenSSH server on 127.0.0.1 and a throwaway Debian node for the driver tests.

``start_sshd`` runs Debian's ``/usr/sbin/sshd`` (package openssh-server) in the foreground
with its own configuration, host key and authorized key in a temporary directory. Tests run
as root; the server accepts only key logins from 127.0.0.1.

``FakeNode`` is a node that changes nothing on the machine: an empty dpkg database under
its own root (``dpkg --root``) and flag files instead of ``/etc/nologin``, loginctl and wall.
The dpkg steps (installed, install, integrity, owners) and ``checksum`` run their DEFAULT
templates; only the ``dpkg``/``dpkg_query`` prefixes point them at the throwaway root.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import pytest

from tests.ports import free_port

SSHD = "/usr/sbin/sshd"
_START_TIMEOUT = 15.0


def write_key(path: Path) -> asyncssh.SSHKey:
    """A new ed25519 private key at ``path`` (mode 0600), in OpenSSH format."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(path))
    path.chmod(0o600)
    return key


def public_line(key: asyncssh.SSHKey) -> str:
    return bytes(key.export_public_key()).decode().strip()


@dataclass
class Sshd:
    """A running sshd: where it listens, the keys to reach it, and what it logged."""

    port: int
    pid: int
    directory: Path
    key_file: Path
    host_key: asyncssh.SSHKey
    log: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    user: str = "root"

    def known_hosts(self, path: Path, key: asyncssh.SSHKey | None = None) -> Path:
        """Write a known_hosts file listing ``key`` (default: the server's) for this server."""
        path.write_text(f"[{self.host}]:{self.port} {public_line(key or self.host_key)}\n")
        return path

    def logins(self) -> int:
        """How many logins the server accepted so far (one per SSH connection)."""
        return sum("Accepted publickey" in line for line in list(self.log))


@contextmanager
def start_sshd(directory: Path, *, set_env: Mapping[str, str] | None = None) -> Iterator[Sshd]:
    """``set_env``: environment of the commands it runs (sshd's ``SetEnv``, e.g. a PATH
    with stand-ins for programs that must not act on this machine)."""
    if not os.access(SSHD, os.X_OK):
        pytest.fail(
            f"{SSHD} is missing: the ssh driver tests need a real OpenSSH server; run "
            "scripts/setup (it installs the Debian package openssh-server)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    host_key = write_key(directory / "host_ed25519")
    client_key = write_key(directory / "client_ed25519")
    (directory / "authorized_keys").write_text(public_line(client_key) + "\n")
    port = free_port()
    config = directory / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {directory / 'host_ed25519'}",
                f"PidFile {directory / 'sshd.pid'}",
                f"AuthorizedKeysFile {directory / 'authorized_keys'}",
                "StrictModes no",
                "UsePAM no",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "Subsystem sftp internal-sftp",
                "MaxStartups 100",
                "MaxSessions 100",
                "LogLevel INFO",
                *(
                    [f"SetEnv {' '.join(f'{k}={v}' for k, v in set_env.items())}"]
                    if set_env
                    else []
                ),
                "",
            ]
        )
    )
    # sshd refuses to start without its privilege separation directory (systemd creates
    # it at boot; containers may lack it).
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    process = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = Sshd(
        port=port,
        pid=process.pid,
        directory=directory,
        key_file=directory / "client_ed25519",
        host_key=host_key,
    )
    listening = threading.Event()

    def drain() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            server.log.append(line.rstrip("\n"))
            if "Server listening on" in line:
                listening.set()
        listening.set()  # sshd ended: wake the waiter, which then reports the log

    reader = threading.Thread(target=drain, name="sshd-log", daemon=True)
    reader.start()
    try:
        if not listening.wait(_START_TIMEOUT) or process.poll() is not None:
            pytest.fail("sshd did not start:\n" + "\n".join(server.log))
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        reader.join(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


@dataclass(frozen=True)
class FakeNode:
    """A throwaway Debian node in a directory: its own dpkg root and flag files."""

    directory: Path

    @property
    def root(self) -> Path:
        return self.directory / "root"

    @property
    def flags(self) -> Path:
        return self.directory / "flags"

    @property
    def staging(self) -> Path:
        return self.directory / "staged"

    @classmethod
    def create(cls, directory: Path) -> FakeNode:
        node = cls(directory)
        admin = node.root / "var" / "lib" / "dpkg"
        for sub in ("info", "updates", "triggers"):
            (admin / sub).mkdir(parents=True, exist_ok=True)
        for name in ("status", "available"):
            (admin / name).touch()
        (node.flags / "sessions").mkdir(parents=True)
        (node.flags / "boot_id").write_text("boot-1\n")
        return node

    def commands(self, **overrides: str) -> dict[str, str]:
        """Command overrides for this node; dpkg steps keep their default templates."""
        root = shlex.quote(str(self.root))
        flags = shlex.quote(str(self.flags))
        commands = {
            "dpkg": f"dpkg --root={root} --force-not-root --force-script-chrootless",
            "dpkg_query": f"dpkg-query --root={root}",
            "sessions": f"cat {flags}/sessions/* 2>/dev/null || true",
            "disconnect": f"rm -- {flags}/sessions/{{id}}",
            "announce": f"printf '%s\\n' {{message}} >> {flags}/notices",
            "logon_disabled": f"test -e {flags}/nologin",
            "logon_disable": f"touch {flags}/nologin",
            "logon_enable": f"rm -f {flags}/nologin",
            "reboot_required": f"test -e {flags}/reboot-required",
            "mark_reboot_required": f"touch {flags}/reboot-required",
            "restart_services": f"date >> {flags}/restarts",
            "boot_id": f"cat {flags}/boot_id",
            "reboot": f"rm -f {flags}/reboot-required && echo boot-2 > {flags}/boot_id",
        }
        commands.update(overrides)
        return commands

    def login(self, session_id: str, user: str, uid: int = 1000) -> None:
        """A user logs in (a line as ``loginctl list-sessions --no-legend`` prints it)."""
        (self.flags / "sessions" / session_id).write_text(
            f"{session_id:>7} {uid} {user} seat0 tty2\n"
        )

    def notices(self) -> list[str]:
        path = self.flags / "notices"
        return path.read_text().splitlines() if path.exists() else []

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
