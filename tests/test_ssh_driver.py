"""The ssh driver against a real sshd on 127.0.0.1 and a throwaway dpkg root."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shlex
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from core.drivers import SshDriver, make_driver
from core.errors import (
    CommandTimeoutError,
    DriverError,
    HostKeyNotTrustedError,
    NodeAuthenticationError,
    NodeUnreachableError,
)
from core.model import PackageKind, Session, StagedPackage
from core.settings import NodeSettings
from tests.sandbox_files import OutputLog, process_ended, staged_package
from tests.sshd import FakeNode, Sshd, free_port, start_sshd, write_key


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with start_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture
def node(tmp_path: Path) -> FakeNode:
    return FakeNode.create(tmp_path / "node")


def settings(sshd: Sshd, node: FakeNode, tmp_path: Path, **changes: Any) -> NodeSettings:
    commands = node.commands(**changes.pop("commands", {}))
    values: dict[str, Any] = {
        "name": "tg-ssh",
        "driver": "ssh",
        "host": sshd.host,
        "port": sshd.port,
        "user": sshd.user,
        "key_file": sshd.key_file,
        "known_hosts": sshd.known_hosts(tmp_path / "known_hosts"),
        "command_timeout": 30,
        "commands": commands,
    }
    values.update(changes)
    return NodeSettings(**values)


@pytest.fixture
async def driver(sshd: Sshd, node: FakeNode, tmp_path: Path) -> AsyncIterator[SshDriver]:
    made = make_driver(settings(sshd, node, tmp_path), None, staging_dir=node.staging)
    assert isinstance(made, SshDriver)
    try:
        yield made
    finally:
        await made.aclose()


def recording_ssh(directory: Path) -> tuple[Path, Path]:
    """A directory holding an ``ssh`` that writes its arguments to a log, then runs the
    real client: put first on PATH, it shows whether and how OpenSSH's client was used."""
    real = shutil.which("ssh")
    assert real is not None, "the OpenSSH client is needed (scripts/setup --dev)"
    directory.mkdir(parents=True, exist_ok=True)
    calls = directory / "calls"
    script = directory / "ssh"
    script.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$*" >> {shlex.quote(str(calls))}\n'
        f'exec {shlex.quote(real)} "$@"\n'
    )
    script.chmod(0o755)
    return directory, calls


@pytest.fixture(params=["channel", "openssh"])
def stager(
    request: pytest.FixtureRequest,
    driver: SshDriver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> SshDriver:
    """The driver copying every file over its own channel, or every file with OpenSSH's
    client (the recording stand-in first on PATH)."""
    if request.param == "channel":
        driver.runner.openssh_from = None
    else:
        directory, _ = recording_ssh(tmp_path / "bin")
        monkeypatch.setenv("PATH", f"{directory}:{os.environ['PATH']}")
        driver.runner.openssh_from = 0
    return driver


def kill_own_session(sshd: Sshd) -> str:
    """Shell code that kills the sshd process serving this command: the connection drops."""
    return (
        'p=$PPID; while [ "$p" -gt 1 ]; do '
        f"if [ \"$p\" != {sshd.pid} ] && grep -q '^sshd' /proc/$p/comm; then "
        "kill -9 $p; exit 0; fi; p=$(cut -d' ' -f4 /proc/$p/stat); done; exit 1"
    )


async def test_lifecycle_over_one_connection(
    driver: SshDriver, node: FakeNode, tmp_path: Path, sshd: Sshd
) -> None:
    logins = sshd.logins()
    status = await driver.status()
    assert dict(status.installed) == {}
    assert status.sessions == ()
    assert status.logon_enabled is True
    assert status.lb is None
    assert status.restart_required is False

    package = staged_package(
        tmp_path / "debs", "tg-browser", "2.0-1", {"usr/lib/tg/browser": b"browser v2"}
    )
    await driver.stage([package])
    staged = node.staging / "tg-browser_2.0-1.deb"
    assert staged.read_bytes() == package.path.read_bytes()
    assert dict((await driver.status()).staged) == {"tg-browser": "2.0-1"}

    result = await driver.install([package])
    assert dict(result.installed) == {"tg-browser": "2.0-1"}
    assert result.restart_required is False
    assert "Setting up tg-browser (2.0-1)" in result.output
    status = await driver.status()
    assert dict(status.installed) == {"tg-browser": "2.0-1"}
    assert dict(status.staged) == {}
    assert not staged.exists()
    assert (node.root / "usr/lib/tg/browser").read_bytes() == b"browser v2"

    assert await driver.verify_integrity() == []
    (node.root / "usr/lib/tg/browser").write_bytes(b"tampered")
    mismatches = await driver.verify_integrity()
    assert [(m.package, m.path, m.problem) for m in mismatches] == [
        ("tg-browser", "/usr/lib/tg/browser", "checksum differs")
    ]

    await driver.restart_services()
    await driver.post_check()
    assert (node.flags / "restarts").exists()
    assert sshd.logins() == logins + 1


async def test_concurrent_operations_share_one_connection(
    driver: SshDriver, node: FakeNode, sshd: Sshd
) -> None:
    logins = sshd.logins()
    node.login("3", "alice")
    async with asyncio.TaskGroup() as group:
        statuses = [group.create_task(driver.status(), name=f"status-{i}") for i in range(5)]
        group.create_task(driver.announce("hello"), name="announce")
    assert all(len(task.result().sessions) == 1 for task in statuses)
    assert node.notices() == ["hello"]
    assert sshd.logins() == logins + 1


async def test_sessions_are_listed_and_ended_but_not_our_own(
    driver: SshDriver, node: FakeNode
) -> None:
    node.login("3", "alice")
    node.login("c7", "bob", uid=1001)
    node.login("9", "root", uid=0)  # the controller's own SSH login
    status = await driver.status()
    assert sorted(status.sessions, key=lambda s: s.id) == [
        Session(user="alice", id="3"),
        Session(user="bob", id="c7"),
    ]
    assert await driver.disconnect_sessions() == 2
    assert sorted(p.name for p in (node.flags / "sessions").iterdir()) == ["9"]
    assert (await driver.status()).sessions == ()


async def test_notice_text_reaches_users_verbatim(driver: SshDriver, node: FakeNode) -> None:
    marker = node.directory / "injected"
    message = f'Update at 18:00 $(touch {marker}) `touch {marker}`; it\'s "urgent" & 100%'
    await driver.announce(message)
    assert node.notices() == [message]
    assert not marker.exists()


async def test_logon_lock(driver: SshDriver, node: FakeNode) -> None:
    await driver.set_logon(False)
    assert (node.flags / "nologin").exists()
    assert (await driver.status()).logon_enabled is False
    await driver.set_logon(True)
    assert (await driver.status()).logon_enabled is True


async def test_core_update_requires_restart_and_reboot_waits_for_the_node(
    driver: SshDriver, node: FakeNode, tmp_path: Path
) -> None:
    core = staged_package(tmp_path / "debs", "tg-core", "5.0", kind=PackageKind.CORE)
    await driver.stage([core])
    result = await driver.install([core])
    assert result.restart_required is True
    assert (await driver.status()).restart_required is True

    await driver.reboot()
    assert (node.flags / "boot_id").read_text().strip() == "boot-2"
    assert (await driver.status()).restart_required is False


async def test_reboot_that_drops_the_connection(sshd: Sshd, node: FakeNode, tmp_path: Path) -> None:
    flags = node.flags
    reboot = f"echo boot-2 > {flags}/boot_id; {kill_own_session(sshd)}"
    driver = SshDriver(settings(sshd, node, tmp_path, commands={"reboot": reboot}))
    try:
        logins = sshd.logins()
        await driver.reboot()
        await driver.status()
        assert sshd.logins() == logins + 2
    finally:
        await driver.aclose()


async def test_reconnects_after_the_connection_dropped(
    sshd: Sshd, node: FakeNode, tmp_path: Path
) -> None:
    driver = SshDriver(
        settings(sshd, node, tmp_path, commands={"post_check": kill_own_session(sshd)})
    )
    try:
        logins = sshd.logins()
        await driver.status()
        with pytest.raises(NodeUnreachableError, match="connection") as caught:
            await driver.post_check()
        assert caught.value.operation == "post_check"
        status = await driver.status()
        assert status.installed == {}
        assert sshd.logins() == logins + 2
    finally:
        await driver.aclose()


async def test_hanging_command_times_out_and_is_killed(
    sshd: Sshd, node: FakeNode, tmp_path: Path
) -> None:
    pid_file = node.directory / "pid"
    driver = SshDriver(
        settings(
            sshd,
            node,
            tmp_path,
            command_timeout=1,
            commands={"post_check": f"echo $$ > {pid_file}; exec sleep 60"},
        )
    )
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        with pytest.raises(CommandTimeoutError, match="timed out after 1s") as caught:
            await driver.post_check()
        assert loop.time() - started < 10
        assert caught.value.operation == "post_check"
        assert "command_timeout" in str(caught.value)
        pid = int(pid_file.read_text())
        await process_ended(pid, limit=10)
    finally:
        await driver.aclose()


async def test_failing_command_reports_exit_status_and_cause(
    sshd: Sshd, node: FakeNode, tmp_path: Path
) -> None:
    check = "echo checking; echo 'warming up' >&2; echo 'media does not play' >&2; exit 3"
    output = OutputLog()
    driver = SshDriver(
        settings(sshd, node, tmp_path, commands={"post_check": check}), output=output
    )
    try:
        with pytest.raises(DriverError) as caught:
            await driver.post_check()
        assert str(caught.value) == ("node tg-ssh: post_check failed: exit 3: media does not play")
        [entry] = output.entries
        assert (entry.operation, entry.command, entry.exit_status) == ("post_check", check, 3)
        assert entry.stdout == "checking\n"
        assert entry.stderr == "warming up\nmedia does not play\n"
    finally:
        await driver.aclose()


async def test_garbage_session_list_is_an_error(sshd: Sshd, node: FakeNode, tmp_path: Path) -> None:
    driver = SshDriver(settings(sshd, node, tmp_path, commands={"sessions": "echo garbage"}))
    try:
        with pytest.raises(DriverError, match="sessions command") as caught:
            await driver.status()
        assert "'garbage'" in str(caught.value)
        assert "commands.sessions" in str(caught.value)
    finally:
        await driver.aclose()


async def test_broken_package_fails_install_with_dpkg_cause(
    driver: SshDriver, tmp_path: Path
) -> None:
    broken = tmp_path / "tg-broken_1.0_all.deb"
    broken.write_bytes(b"this is not an ar archive")
    package = StagedPackage(
        name="tg-broken",
        version="1.0",
        kind=PackageKind.REGULAR,
        sha256=hashlib.sha256(broken.read_bytes()).hexdigest(),
        path=broken,
    )
    await driver.stage([package])
    with pytest.raises(DriverError, match=r"exit [12]: .*") as caught:
        await driver.install([package])
    assert caught.value.operation == "install"
    assert "tg-broken" in caught.value.cause or "archive" in caught.value.cause
    assert dict((await driver.status()).installed) == {}


async def test_stage_checks_the_checksum_on_the_node(
    stager: SshDriver, node: FakeNode, tmp_path: Path
) -> None:
    driver = stager
    package = staged_package(tmp_path / "debs", "tg-x", "1.0")
    wrong = StagedPackage(
        name=package.name,
        version=package.version,
        kind=package.kind,
        sha256="f" * 64,
        path=package.path,
    )
    with pytest.raises(DriverError, match="the copy on the node has SHA-256"):
        await driver.stage([wrong])
    assert list(node.staging.iterdir()) == []
    with pytest.raises(DriverError, match="not staged"):
        await driver.install([package])


async def test_unknown_host_key_is_refused(sshd: Sshd, node: FakeNode, tmp_path: Path) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    driver = SshDriver(settings(sshd, node, tmp_path, known_hosts=empty))
    with pytest.raises(HostKeyNotTrustedError) as caught:
        await driver.status()
    message = str(caught.value)
    assert sshd.host_key.get_fingerprint() in message
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {empty}" in message
    assert "accept_unknown_host_key = true" in message
    assert caught.value.changed is False
    await driver.aclose()


async def test_unknown_host_key_accepted_when_configured(
    sshd: Sshd, node: FakeNode, tmp_path: Path
) -> None:
    missing = tmp_path / "no_such_known_hosts"
    driver = SshDriver(
        settings(sshd, node, tmp_path, known_hosts=missing, accept_unknown_host_key=True)
    )
    try:
        assert (await driver.status()).installed == {}
    finally:
        await driver.aclose()


async def test_changed_host_key_is_refused_even_when_unknown_keys_are_accepted(
    sshd: Sshd, node: FakeNode, tmp_path: Path
) -> None:
    other = write_key(tmp_path / "other_host_key")
    known = sshd.known_hosts(tmp_path / "changed_known_hosts", other)
    driver = SshDriver(
        settings(sshd, node, tmp_path, known_hosts=known, accept_unknown_host_key=True)
    )
    with pytest.raises(HostKeyNotTrustedError, match="differs from the one in") as caught:
        await driver.status()
    assert caught.value.changed is True
    await driver.aclose()


async def test_wrong_key_is_an_authentication_error(
    sshd: Sshd, node: FakeNode, tmp_path: Path
) -> None:
    stranger = tmp_path / "stranger_key"
    write_key(stranger)
    driver = SshDriver(settings(sshd, node, tmp_path, key_file=stranger))
    with pytest.raises(NodeAuthenticationError) as caught:
        await driver.status()
    assert f"authentication as root at 127.0.0.1:{sshd.port} failed with {stranger}" in str(
        caught.value
    )
    await driver.aclose()


async def test_unusable_key_file(sshd: Sshd, node: FakeNode, tmp_path: Path) -> None:
    driver = SshDriver(settings(sshd, node, tmp_path, key_file=tmp_path / "absent"))
    with pytest.raises(DriverError, match="cannot load key_file"):
        await driver.status()


async def test_unreachable_port_fails_fast(sshd: Sshd, node: FakeNode, tmp_path: Path) -> None:
    driver = SshDriver(settings(sshd, node, tmp_path, port=free_port()))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(NodeUnreachableError, match=r"cannot connect to 127\.0\.0\.1") as caught:
        await driver.status()
    assert caught.value.operation == "status"
    assert loop.time() - started < 5
    await driver.aclose()


async def test_debian_defaults_for_sessions_notices_and_ending_sessions(
    node: FakeNode, tmp_path: Path
) -> None:
    """The DEFAULT templates `loginctl list-sessions --no-legend`, `wall {message}` and
    `loginctl terminate-session {id}` over SSH; `loginctl` and `wall` are stand-ins on the
    PATH of the sshd (they act on the fake node's files, not on this machine)."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    flags = shlex.quote(str(node.flags))
    (stubs / "loginctl").write_text(
        "#!/bin/sh\n"
        'case "$1 $2" in\n'
        f'  "list-sessions --no-legend") cat {flags}/sessions/* 2>/dev/null || true ;;\n'
        f'  "terminate-session "*) rm -- {flags}/sessions/"$2" ;;\n'
        '  *) echo "loginctl stand-in: unexpected $*" >&2; exit 2 ;;\n'
        "esac\n"
    )
    (stubs / "wall").write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {flags}/notices\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    path = f"{stubs}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    commands = {
        k: v for k, v in node.commands().items() if k not in {"sessions", "announce", "disconnect"}
    }
    with start_sshd(tmp_path / "sshd", set_env={"PATH": path}) as server:
        made = make_driver(
            NodeSettings(
                name="tg-ssh",
                driver="ssh",
                host=server.host,
                port=server.port,
                user=server.user,
                key_file=server.key_file,
                known_hosts=server.known_hosts(tmp_path / "known_hosts"),
                command_timeout=30,
                commands=commands,
            ),
            None,
            staging_dir=node.staging,
        )
        try:
            node.login("3", "alice")
            node.login("9", "root", uid=0)  # the controller's own login
            assert (await made.status()).sessions == (Session(user="alice", id="3"),)
            await made.announce("Update at 18:00; it's urgent")
            assert node.notices() == ["Update at 18:00; it's urgent"]
            assert await made.disconnect_sessions() == 1
            assert sorted(p.name for p in (node.flags / "sessions").iterdir()) == ["9"]
        finally:
            await made.aclose()


@pytest.mark.parametrize("change", ["truncated", "altered"])
async def test_stage_refuses_a_truncated_or_altered_transfer(
    stager: SshDriver, node: FakeNode, tmp_path: Path, change: str
) -> None:
    """What reaches the node differs from what the manifest names: the node's own SHA-256
    of the stored file refuses it, and nothing is left in the staging directory."""
    driver = stager
    package = staged_package(tmp_path / "debs", "tg-x", "1.0")
    data = package.path.read_bytes()
    sent = tmp_path / "sent.deb"
    if change == "truncated":
        sent.write_bytes(data[: len(data) // 2])
    else:
        sent.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.raises(DriverError, match="the copy on the node has SHA-256") as caught:
        await driver.stage(
            [
                StagedPackage(
                    name=package.name,
                    version=package.version,
                    kind=package.kind,
                    sha256=package.sha256,
                    path=sent,
                )
            ]
        )
    assert hashlib.sha256(sent.read_bytes()).hexdigest() in caught.value.cause
    assert list(node.staging.iterdir()) == []
    with pytest.raises(DriverError, match="not staged"):
        await driver.install([package])


async def test_stage_checks_with_the_nodes_checksum_override(
    sshd: Sshd, node: FakeNode, tmp_path: Path
) -> None:
    flags = shlex.quote(str(node.flags))
    logged = f"echo {{file}} >> {flags}/checksums; sha256sum {{file}}"
    made = make_driver(
        settings(sshd, node, tmp_path, commands={"checksum": logged}),
        None,
        staging_dir=node.staging,
    )
    package = staged_package(tmp_path / "debs", "tg-x", "1.0")
    try:
        await made.stage([package])
    finally:
        await made.aclose()
    part = f"{node.staging}/tg-x_1.0.deb.part"
    assert (node.flags / "checksums").read_text().splitlines() == [part]
    assert (node.staging / "tg-x_1.0.deb").read_bytes() == package.path.read_bytes()

    liar = make_driver(
        settings(sshd, node, tmp_path, commands={"checksum": f"echo {'0' * 64} {{file}}"}),
        None,
        staging_dir=node.staging,
    )
    other = staged_package(tmp_path / "debs", "tg-y", "1.0")
    try:
        with pytest.raises(DriverError, match="the copy on the node has SHA-256 0000"):
            await liar.stage([other])
    finally:
        await liar.aclose()
    assert sorted(p.name for p in node.staging.iterdir()) == ["tg-x_1.0.deb"]


@pytest.mark.parametrize("openssl", [True, False])
async def test_default_checksum_uses_openssl_and_falls_back_to_sha256sum(
    node: FakeNode, tmp_path: Path, openssl: bool
) -> None:
    """The DEFAULT ``checksum`` template on a node whose PATH has openssl, and on one
    without it: the wrappers log which program hashed the staged file."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for name in ("env", "timeout", "cat"):
        (tools / name).symlink_to(f"/usr/bin/{name}")
    log_file = shlex.quote(str(tmp_path / "hashed-by"))
    programs = ["sha256sum", "openssl"] if openssl else ["sha256sum"]
    for name in programs:
        (tools / name).write_text(
            f'#!/bin/sh\necho {name} >> {log_file}\nexec /usr/bin/{name} "$@"\n'
        )
        (tools / name).chmod(0o755)
    package = staged_package(tmp_path / "debs", "tg-x", "1.0")
    with start_sshd(tmp_path / "sshd", set_env={"PATH": str(tools)}) as server:
        made = make_driver(
            NodeSettings(
                name="tg-ssh",
                driver="ssh",
                host=server.host,
                port=server.port,
                user=server.user,
                key_file=server.key_file,
                known_hosts=server.known_hosts(tmp_path / "known_hosts"),
                command_timeout=30,
                commands=node.commands(),
            ),
            None,
            staging_dir=node.staging,
        )
        try:
            await made.stage([package])
        finally:
            await made.aclose()
    assert (tmp_path / "hashed-by").read_text().split() == ["openssl" if openssl else "sha256sum"]
    assert (node.staging / "tg-x_1.0.deb").read_bytes() == package.path.read_bytes()


async def test_stage_reports_a_node_that_cannot_store_the_file(
    stager: SshDriver, node: FakeNode, tmp_path: Path
) -> None:
    """``cat > NAME.part`` fails on the node (here: a directory has that name): the cause
    comes back with the exit status, and nothing is staged."""
    driver = stager
    (node.staging / "tg-x_1.0.deb.part").mkdir(parents=True)
    package = staged_package(tmp_path / "debs", "tg-x", "1.0")
    with pytest.raises(DriverError, match=r"exit status 2: .*Is a directory") as caught:
        await driver.stage([package])
    assert caught.value.operation == "stage"
    assert "tg-x_1.0.deb.part" in caught.value.cause
    assert dict((await driver.status()).staged) == {}


async def test_a_big_file_goes_through_openssh_trusting_the_verified_key_only(
    sshd: Sshd, node: FakeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From ``openssh_from`` bytes on the file is copied by OpenSSH's client. The node's
    key is in no known_hosts file here (``accept_unknown_host_key``): the client trusts the
    key the driver's connection accepted, pinned in a file of its own, and the operator's
    known_hosts is not written."""
    package = staged_package(tmp_path / "debs", "tg-x", "1.0", {"big.bin": os.urandom(1 << 16)})
    size = package.path.stat().st_size
    directory, calls = recording_ssh(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{directory}:{os.environ['PATH']}")
    missing = tmp_path / "no_such_known_hosts"
    driver = SshDriver(
        settings(sshd, node, tmp_path, known_hosts=missing, accept_unknown_host_key=True),
        staging_dir=str(node.staging),
    )
    try:
        driver.runner.openssh_from = size + 1
        await driver.stage([package])
        assert not calls.exists()
        driver.runner.openssh_from = size
        await driver.stage([package])
        (call,) = calls.read_text().splitlines()
        assert "HostKeyAlias=tgops-node" in call
        assert "StrictHostKeyChecking=yes" in call
        assert f"IdentityFile={sshd.key_file}" in call
        staged = node.staging / "tg-x_1.0.deb"
        assert hashlib.sha256(staged.read_bytes()).hexdigest() == package.sha256
        assert sorted(p.name for p in node.staging.iterdir()) == ["tg-x_1.0.deb"]
        assert not missing.exists()
    finally:
        await driver.aclose()


async def test_the_openssh_copy_refuses_any_other_host_key(
    sshd: Sshd, node: FakeNode, tmp_path: Path
) -> None:
    """The pinned known_hosts decides: given a key other than the node's, the client
    refuses the node, nothing is written there, and the error names the cause."""
    package = staged_package(tmp_path / "debs", "tg-x", "1.0")
    other = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
    driver = SshDriver(settings(sshd, node, tmp_path), staging_dir=str(node.staging))
    client = shutil.which("ssh")
    assert client is not None
    node.staging.mkdir(parents=True, exist_ok=True)
    try:
        with package.path.open("rb") as handle, pytest.raises(NodeUnreachableError) as caught:
            await driver.runner._put_openssh(
                "stage",
                "uploading",
                handle,
                client=client,
                key=other,
                wrapped=f"cat > {shlex.quote(str(node.staging / 'x.part'))}",
                limit=30,
            )
        assert "Host key verification failed" in caught.value.cause
        assert list(node.staging.iterdir()) == []
    finally:
        await driver.aclose()


async def test_without_an_openssh_client_the_channel_copies(
    driver: SshDriver, node: FakeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = staged_package(tmp_path / "debs", "tg-x", "1.0")
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    driver.runner.openssh_from = 0
    await driver.stage([package])
    staged = node.staging / "tg-x_1.0.deb"
    assert hashlib.sha256(staged.read_bytes()).hexdigest() == package.sha256


@pytest.mark.parametrize("openssh", [False, True], ids=["channel", "openssh"])
async def test_a_copy_that_does_not_end_is_stopped_at_the_command_timeout(
    sshd: Sshd, node: FakeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, openssh: bool
) -> None:
    """``cat`` on the node blocks (its target is a FIFO nobody reads): the node's
    ``timeout`` ends it after ``command_timeout``, the copy fails saying so, and the
    controller is not left waiting."""
    package = staged_package(tmp_path / "debs", "tg-x", "1.0")
    node.staging.mkdir(parents=True, exist_ok=True)
    os.mkfifo(node.staging / "tg-x_1.0.deb.part")
    directory, calls = recording_ssh(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{directory}:{os.environ['PATH']}")
    driver = SshDriver(
        settings(sshd, node, tmp_path, command_timeout=1.5), staging_dir=str(node.staging)
    )
    driver.runner.openssh_from = 0 if openssh else None
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(DriverError, match=r"took over 1\.5s"):
            await driver.stage([package])
    finally:
        await driver.aclose()
    assert loop.time() - started < 15
    assert calls.exists() is openssh
