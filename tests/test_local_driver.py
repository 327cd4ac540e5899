"""The local driver (and the command templates it shares with ssh) on a throwaway dpkg root."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from bot.service import Service
from core.drivers import TEMPLATES, LocalDriver, make_driver
from core.drivers.commands import parse_installed, parse_sessions, parse_verify
from core.drivers.shell import RUNNERS
from core.errors import CommandTimeoutError, ConfigError, DriverError
from core.interfaces import NodeDriver
from core.model import PackageKind, Session
from core.settings import ClusterSettings, NodeSettings
from tests.sandbox_files import OutputLog, cancel_once_started, process_ended, staged_package
from tests.service import settings_for
from tests.sshd import FakeNode


@pytest.fixture
def node(tmp_path: Path) -> FakeNode:
    return FakeNode.create(tmp_path / "node")


def settings(node: FakeNode, **changes: Any) -> NodeSettings:
    values: dict[str, Any] = {
        "name": "tg-local",
        "driver": "local",
        "command_timeout": 30,
        "commands": node.commands(**changes.pop("commands", {})),
    }
    values.update(changes)
    return NodeSettings(**values)


@pytest.fixture
async def driver(node: FakeNode) -> AsyncIterator[LocalDriver]:
    made = make_driver(settings(node), None, staging_dir=node.staging)
    assert isinstance(made, LocalDriver)
    assert isinstance(made, NodeDriver)
    try:
        yield made
    finally:
        await made.aclose()


async def test_lifecycle(driver: LocalDriver, node: FakeNode, tmp_path: Path) -> None:
    debs = tmp_path / "debs"
    first = staged_package(debs, "tg-vnc", "1.0-1", {"usr/bin/tg-vnc": b"1", "usr/lib/x": b"x"})
    second = staged_package(debs, "tg-ibus-de", "0.9", {"usr/share/ibus/de.xml": b"<de/>"})
    await driver.stage([first, second])
    assert dict((await driver.status()).staged) == {"tg-vnc": "1.0-1", "tg-ibus-de": "0.9"}

    result = await driver.install([first, second])
    assert dict(result.installed) == {"tg-vnc": "1.0-1", "tg-ibus-de": "0.9"}
    status = await driver.status()
    assert dict(status.installed) == {"tg-vnc": "1.0-1", "tg-ibus-de": "0.9"}
    assert dict(status.staged) == {}

    upgrade = staged_package(debs, "tg-vnc", "1.1-1", {"usr/bin/tg-vnc": b"2"})
    await driver.stage([upgrade])
    await driver.install([upgrade])
    assert (await driver.status()).installed["tg-vnc"] == "1.1-1"
    assert (node.root / "usr/bin/tg-vnc").read_bytes() == b"2"

    (node.root / "usr/share/ibus/de.xml").unlink()
    (node.root / "usr/bin/tg-vnc").write_bytes(b"changed")
    mismatches = await driver.verify_integrity()
    assert sorted((m.package, m.path, m.problem) for m in mismatches) == [
        ("tg-ibus-de", "/usr/share/ibus/de.xml", "missing"),
        ("tg-vnc", "/usr/bin/tg-vnc", "checksum differs"),
    ]


async def test_staging_replaces_an_older_staged_version(
    driver: LocalDriver, node: FakeNode, tmp_path: Path
) -> None:
    old = staged_package(tmp_path / "debs", "tg-x", "1.0")
    new = staged_package(tmp_path / "debs", "tg-x", "1:1.1")
    await driver.stage([old])
    await driver.stage([new])
    assert sorted(p.name for p in node.staging.iterdir()) == ["tg-x_1%3a1.1.deb"]
    assert dict((await driver.status()).staged) == {"tg-x": "1:1.1"}
    await driver.install([new])
    assert (await driver.status()).installed == {"tg-x": "1:1.1"}


async def test_core_update_marks_restart_required_until_reboot(
    driver: LocalDriver, node: FakeNode, tmp_path: Path
) -> None:
    core = staged_package(tmp_path / "debs", "tg-core", "7", kind=PackageKind.CORE)
    await driver.stage([core])
    assert (await driver.install([core])).restart_required is True
    assert (await driver.status()).restart_required is True
    await driver.reboot()
    assert (await driver.status()).restart_required is False


async def test_sessions_notices_and_logon(driver: LocalDriver, node: FakeNode) -> None:
    node.login("4", "dora")
    node.login("5", "emil")
    await driver.announce("Maintenance tonight;\nsave your work $HOME")
    assert node.notices() == ["Maintenance tonight;", "save your work $HOME"]
    await driver.set_logon(False)
    status = await driver.status()
    assert status.logon_enabled is False
    assert [s.user for s in status.sessions] == ["dora", "emil"]
    assert await driver.disconnect_sessions() == 2
    assert (await driver.status()).sessions == ()


async def test_failed_session_end_is_reported(node: FakeNode) -> None:
    driver = LocalDriver(
        settings(node, commands={"disconnect": "echo 'no such session' >&2; false"})
    )
    node.login("4", "dora")
    with pytest.raises(DriverError, match="ended 0 of 1 sessions; session 4 of dora: exit 1"):
        await driver.disconnect_sessions()


async def test_hanging_command_is_killed_with_its_children(node: FakeNode) -> None:
    pid_file = node.directory / "pid"
    command = f"sleep 60 & echo $! > {pid_file}; wait"
    driver = LocalDriver(settings(node, command_timeout=0.5, commands={"post_check": command}))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(CommandTimeoutError, match=r"timed out after 0.5s running 'sleep 60"):
        await driver.post_check()
    assert loop.time() - started < 5
    pid = int(pid_file.read_text())
    await process_ended(pid, limit=5)


async def test_cancelled_command_is_killed_with_its_children(node: FakeNode) -> None:
    pid_file = node.directory / "pid"
    command = f"sleep 60 & echo $! > {pid_file}; wait"
    driver = LocalDriver(settings(node, command_timeout=30, commands={"post_check": command}))
    await cancel_once_started(asyncio.create_task(driver.post_check()), pid_file)


async def test_many_commands_at_once_all_finish(node: FakeNode) -> None:
    # more commands than the pool has threads: the rest wait for one and still finish
    driver = LocalDriver(settings(node, commands={"post_check": "sleep 0.2"}))
    async with asyncio.timeout(30):
        await asyncio.gather(*(driver.post_check() for _ in range(RUNNERS + 8)))


async def test_output_sink_sees_every_command(node: FakeNode) -> None:
    output = OutputLog()
    driver = LocalDriver(settings(node), output=output)
    await driver.status()
    assert output.operations() == ["status"] * 4
    assert [entry.command for entry in output.entries] == [
        driver.render(key) for key in ("installed", "sessions", "logon_disabled", "reboot_required")
    ]
    assert output.entries[0].command.startswith("dpkg-query --root=")
    assert [entry.exit_status for entry in output.entries] == [0, 0, 1, 1]


async def test_unknown_command_key_is_refused(node: FakeNode) -> None:
    # refused when the settings are read (also by `tgops config check`), before any driver
    with pytest.raises(ValidationError) as caught:
        settings(node, commands={"disconnect_all": "true", "reboot": "true"})
    message = str(caught.value)
    assert "nodes.tg-local.commands.disconnect_all: unknown command key" in message
    assert "accepted keys: " + ", ".join(TEMPLATES) in message


async def test_unknown_placeholder_is_refused(node: FakeNode) -> None:
    with pytest.raises(ValidationError, match=r"commands.announce: unknown placeholder \{msg\}"):
        settings(node, commands={"announce": "wall {msg}"})
    with pytest.raises(ValidationError, match=r"commands\.install: must not be empty"):
        settings(node, commands={"install": " "})


async def test_templates_keep_shell_braces(node: FakeNode) -> None:
    driver = LocalDriver(
        settings(node, commands={"post_check": 'x=ok; test "${x}" = ok && echo {{node}}'})
    )
    await driver.post_check()


async def test_empty_template_turns_a_step_off(node: FakeNode) -> None:
    driver = LocalDriver(settings(node, commands={"sessions": "", "announce": ""}))
    await driver.announce("nobody sees this")
    assert node.notices() == []
    assert (await driver.status()).sessions == ()


async def test_test_commands_must_exit_0_or_1(node: FakeNode) -> None:
    driver = LocalDriver(settings(node, commands={"logon_disabled": "echo boom >&2; exit 2"}))
    with pytest.raises(DriverError, match="must exit 0 or 1, it exited 2: boom"):
        await driver.status()


async def test_load_balancing_of_single_systems_and_clusters(node: FakeNode) -> None:
    single = make_driver(settings(node), None)
    await single.drain()
    assert (await single.status()).lb is None

    member = make_driver(settings(node, cluster="c1"), ClusterSettings())
    with pytest.raises(DriverError, match=r"set lb_drain and lb_undrain .* \[clusters.c1\]"):
        await member.drain()

    with pytest.raises(ConfigError, match=r"clusters\.c1"):
        make_driver(settings(node, cluster="c1"), None)


async def test_command_load_balancer_through_the_driver(node: FakeNode) -> None:
    log = node.directory / "lb.log"
    cluster = ClusterSettings(
        lb_drain=f"echo drain {{node}} {{cluster}} >> {log}",
        lb_undrain=f"echo ready {{node}} >> {log}",
    )
    driver = make_driver(settings(node, cluster="c1"), cluster)
    # command templates cannot be asked: unknown until the driver drains or undrains
    assert (await driver.status()).lb is None
    await driver.drain()
    assert (await driver.status()).lb == "drained"
    await driver.undrain()
    assert (await driver.status()).lb == "in"
    assert log.read_text().splitlines() == ["drain tg-local c1", "ready tg-local"]


def test_parsers_accept_real_output_and_reject_garbage() -> None:
    assert parse_sessions("      3 1000 alice seat0 tty2\n     c1  120 gdm   seat0 tty1\n") == [
        Session(user="alice", id="3"),
        Session(user="gdm", id="c1"),
    ]
    assert parse_sessions("No sessions.\n") == []
    assert isinstance(parse_sessions("garbage\n"), str)
    assert parse_installed("a\t1.0\tii \nb\t2.0\trc \nc\t\tun \n") == {"a": "1.0"}
    assert isinstance(parse_installed("no tabs here\n"), str)
    assert parse_verify("??5?????? c /etc/x.conf\nmissing     /usr/bin/y\n") == [
        ("/etc/x.conf", "checksum differs (configuration file)"),
        ("/usr/bin/y", "missing"),
    ]
    assert isinstance(parse_verify("dpkg: warning: something\n"), str)


async def test_a_drained_node_stays_drained_in_the_store_after_a_restart(
    node: FakeNode, tmp_path: Path
) -> None:
    """With lb_drain/lb_undrain templates the driver cannot ask the load balancer, so a
    restarted service keeps the state its store recorded instead of assuming "in"."""
    commands = ", ".join(f"{k} = {json.dumps(v)}" for k, v in node.commands().items())
    extra = (
        '[clusters.c9]\nlb_drain = "true"\nlb_undrain = "true"\n'
        f'[[nodes]]\nname = "tg-local"\ncluster = "c9"\ndriver = "local"\n'
        f"commands = {{ {commands} }}\n"
    )
    config = settings_for(tmp_path / "svc", cluster_nodes=0, singles=1, extra=extra)
    async with Service(config) as service:
        await service.store.update_node("tg-local", lb="drained", left_drained_by_run=7)
    async with Service(config) as service:
        (record,) = await service.engine.refresh(["tg-local"])
        assert record.lb == "drained" and record.left_drained_by_run == 7
