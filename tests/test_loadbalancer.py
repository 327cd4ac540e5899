"""Load balancers: a real HAProxy's runtime API, and the lb_drain/lb_undrain commands."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.drivers import make_driver
from core.drivers.loadbalancer import CommandLoadBalancer, HAProxyLoadBalancer, make_load_balancer
from core.errors import CommandTimeoutError, ConfigError, DriverError
from core.settings import ClusterSettings, NodeSettings
from tests.sandbox_files import OutputLog
from tests.sshd import FakeNode, free_port

HAPROXY = "/usr/sbin/haproxy"


@dataclass(frozen=True)
class HAProxy:
    unix_socket: Path
    tcp_port: int
    backend: str = "tgpro"


async def _answers(path: Path) -> bool:
    """Whether HAProxy answers on its admin socket yet."""
    try:
        async with asyncio.timeout(2):
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b"show info\n")
            await writer.drain()
            answer = await reader.read()
            writer.close()
            await writer.wait_closed()
    except (OSError, TimeoutError):
        return False
    return b"Name: HAProxy" in answer


@pytest.fixture
async def haproxy(tmp_path: Path) -> AsyncIterator[HAProxy]:
    if not os.access(HAPROXY, os.X_OK):
        pytest.fail(
            f"{HAPROXY} is missing: the load balancer tests need a real HAProxy; run "
            "scripts/setup (it installs the Debian package haproxy)"
        )
    sock = tmp_path / "admin.sock"
    tcp_port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        f"""\
global
    stats socket {sock} level admin
    stats socket ipv4@127.0.0.1:{tcp_port} level admin

defaults
    mode tcp
    timeout connect 1s
    timeout client 5s
    timeout server 5s

backend tgpro
    server tg1 127.0.0.1:{free_port()}
    server tg2 127.0.0.1:{free_port()}
"""
    )
    process = await asyncio.create_subprocess_exec(
        HAPROXY,
        "-f",
        str(config),
        "-db",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(300):  # bounded: at most 15 s
            if await _answers(sock):
                break
            if process.returncode is not None:
                pytest.fail(f"haproxy exited with {process.returncode}; config:\n{config}")
            await asyncio.sleep(0.05)
        else:
            pytest.fail(f"haproxy did not open {sock} within 15 s")
        yield HAProxy(unix_socket=sock, tcp_port=tcp_port)
    finally:
        if process.returncode is None:
            process.terminate()
        try:
            async with asyncio.timeout(10):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


async def admin_states(lb: HAProxyLoadBalancer) -> dict[str, int]:
    """srv_admin_state per server, from ``show servers state``."""
    answer = await lb.ask("test", "status", f"show servers state {lb.backend}")
    states = {}
    for line in answer.splitlines()[1:]:
        fields = line.split()
        if fields and not line.startswith("#"):
            states[fields[3]] = int(fields[6])
    return states


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_haproxy_drain_and_ready(haproxy: HAProxy, transport: str) -> None:
    socket = (
        str(haproxy.unix_socket) if transport == "unix" else f"tcp:127.0.0.1:{haproxy.tcp_port}"
    )
    output = OutputLog()
    lb = HAProxyLoadBalancer(socket, haproxy.backend, output=output)

    await lb.drain("tg1")
    assert await admin_states(lb) == {"tg1": 8, "tg2": 0}  # 8: SRV_ADMF_FDRAIN
    assert await lb.state("tg1") == "drained"
    assert await lb.state("tg2") == "in"

    await lb.undrain("tg1")
    assert await admin_states(lb) == {"tg1": 0, "tg2": 0}
    assert await lb.state("tg1") == "in"
    assert output.entries[0].command == "haproxy: set server tgpro/tg1 state drain"
    assert output.entries[0].operation == "drain"


async def test_haproxy_error_answers(haproxy: HAProxy) -> None:
    lb = HAProxyLoadBalancer(str(haproxy.unix_socket), haproxy.backend)
    with pytest.raises(DriverError, match=r"HAProxy answered 'No such server\.'") as caught:
        await lb.drain("tg9")
    assert (caught.value.node, caught.value.operation) == ("tg9", "drain")
    with pytest.raises(DriverError, match="has no server tg9"):
        await lb.state("tg9")
    other = HAProxyLoadBalancer(str(haproxy.unix_socket), "nosuch")
    with pytest.raises(DriverError, match="No such backend"):
        await other.undrain("tg1")


async def test_haproxy_not_running(tmp_path: Path) -> None:
    lb = HAProxyLoadBalancer(str(tmp_path / "absent.sock"), "tgpro")
    with pytest.raises(DriverError, match="not reachable") as caught:
        await lb.drain("tg1")
    assert "level admin" in str(caught.value)
    tcp = HAProxyLoadBalancer(f"tcp:127.0.0.1:{free_port()}", "tgpro")
    with pytest.raises(DriverError, match="not reachable"):
        await tcp.drain("tg1")


def test_haproxy_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="tcp:HOST:PORT"):
        HAProxyLoadBalancer("tcp:nohost", "tgpro")
    with pytest.raises(ConfigError, match="haproxy_backend"):
        HAProxyLoadBalancer("/run/haproxy.sock", "bad name\nshow")


async def test_cluster_node_drained_through_haproxy(haproxy: HAProxy, tmp_path: Path) -> None:
    node = FakeNode.create(tmp_path / "node")
    settings = NodeSettings(name="tg2", cluster="tgpro", driver="local", commands=node.commands())
    driver = make_driver(settings, ClusterSettings(haproxy_socket=str(haproxy.unix_socket)))
    assert (await driver.status()).lb == "in"
    await driver.drain()
    assert (await driver.status()).lb == "drained"
    lb = HAProxyLoadBalancer(str(haproxy.unix_socket), "tgpro")
    assert await admin_states(lb) == {"tg1": 0, "tg2": 8}
    await driver.undrain()
    assert (await driver.status()).lb == "in"


async def test_command_load_balancer(tmp_path: Path) -> None:
    log = tmp_path / "lb.log"
    output = OutputLog()
    lb = make_load_balancer(
        "c1",
        ClusterSettings(
            lb_drain=f"printf '%s %s\\n' drain {{node}} >> {log}",
            lb_undrain="echo 'backend refused' >&2; exit 4",
        ),
        timeout=5,
        output=output,
    )
    assert isinstance(lb, CommandLoadBalancer)
    await lb.drain("tg1; touch injected")
    assert log.read_text() == "drain tg1; touch injected\n"
    assert not (tmp_path / "injected").exists()
    assert await lb.state("tg1") is None
    with pytest.raises(DriverError) as caught:
        await lb.undrain("tg1")
    assert str(caught.value) == "node tg1: undrain failed: lb_undrain exit 4: backend refused"
    assert [e.exit_status for e in output.entries] == [0, 4]


async def test_command_load_balancer_limits(tmp_path: Path) -> None:
    lb = CommandLoadBalancer("c1", drain="sleep 30", undrain=None, timeout=0.3)
    with pytest.raises(CommandTimeoutError, match=r"timed out after 0\.3s"):
        await lb.drain("tg1")
    with pytest.raises(DriverError, match=r"set clusters.c1.lb_undrain"):
        await lb.undrain("tg1")
    with pytest.raises(ConfigError, match=r"clusters.c1.lb_drain: unknown placeholder \{host\}"):
        CommandLoadBalancer("c1", drain="drain {host}", undrain=None, timeout=1)
    assert make_load_balancer("c1", ClusterSettings(), timeout=1) is None
