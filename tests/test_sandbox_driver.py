"""The sandbox driver: a simulated node whose files other programs read and write."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import pytest
from aiohttp import web

from core.drivers import SandboxDriver, make_driver
from core.drivers.sandbox import OPERATIONS, Unpacks
from core.errors import DriverError, NodeUnreachableError
from core.interfaces import NodeDriver
from core.model import PackageKind, Session, StagedPackage
from core.settings import ClusterSettings, NodeSettings
from tests.sandbox_files import OutputLog, names, staged_package, write_file


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "node"


@pytest.fixture
def debs(tmp_path: Path) -> Path:
    return tmp_path / "debs"


@pytest.fixture
def driver(root: Path) -> SandboxDriver:
    return SandboxDriver("tg1", root, clustered=True)


def state(root: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((root / "state.json").read_text())
    return data


def write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


async def test_is_a_node_driver_and_built_by_make_driver(root: Path) -> None:
    node = NodeSettings(name="tg1", cluster="c1", driver="sandbox", root=root)
    driver = make_driver(node, ClusterSettings())
    assert isinstance(driver, SandboxDriver)
    assert isinstance(driver, NodeDriver)
    assert (await driver.status()).lb == "in"
    await driver.aclose()


async def test_initial_state_of_a_cluster_node(driver: SandboxDriver) -> None:
    status = await driver.status()
    assert dict(status.installed) == {}
    assert status.sessions == ()
    assert status.logon_enabled is True
    assert status.lb == "in"
    assert status.restart_required is False
    assert dict(status.staged) == {}


async def test_single_system_has_no_load_balancing(root: Path) -> None:
    driver = SandboxDriver("single", root, clustered=False)
    await driver.drain()
    await driver.undrain()
    assert (await driver.status()).lb is None
    assert not (root / "state.json").exists()


async def test_drain_and_undrain_are_recorded(driver: SandboxDriver, root: Path) -> None:
    await driver.drain()
    assert state(root)["lb"] == "drained"
    assert (await driver.status()).lb == "drained"
    await driver.undrain()
    assert state(root)["lb"] == "in"
    assert (await driver.status()).lb == "in"


async def test_set_logon(driver: SandboxDriver, root: Path) -> None:
    await driver.set_logon(False)
    assert state(root)["logon_enabled"] is False
    assert (await driver.status()).logon_enabled is False
    await driver.set_logon(True)
    assert (await driver.status()).logon_enabled is True


async def test_sessions_from_the_file_and_disconnect_empties_it(
    driver: SandboxDriver, root: Path
) -> None:
    write_json(root / "sessions.json", [{"user": "alice", "id": 7}, {"user": "bob"}])
    status = await driver.status()
    assert status.sessions == (Session(user="alice", id="7"), Session(user="bob", id=""))

    assert await driver.disconnect_sessions() == 2
    assert json.loads((root / "sessions.json").read_text()) == []
    assert (await driver.status()).sessions == ()
    assert await driver.disconnect_sessions() == 0
    assert names(root) == ["sessions.json"]


async def test_missing_sessions_file_means_nobody(driver: SandboxDriver) -> None:
    assert await driver.disconnect_sessions() == 0
    assert (await driver.status()).sessions == ()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[{'user': 1}", "not valid JSON"),
        ('{"user": "alice"}', "expected a list"),
        ('[{"id": 3}]', "[0].user"),
        ('[{"user": ""}]', "[0].user"),
    ],
)
async def test_garbage_in_sessions_file(
    driver: SandboxDriver, root: Path, content: str, expected: str
) -> None:
    write_file(root / "sessions.json", content)
    with pytest.raises(DriverError) as caught:
        await driver.status()
    assert str(root / "sessions.json") in str(caught.value)
    assert expected in str(caught.value)
    with pytest.raises(DriverError, match=r"sessions\.json"):
        await driver.disconnect_sessions()
    assert (root / "sessions.json").read_text() == content  # left for inspection


async def test_announce_appends_one_line_per_notice(driver: SandboxDriver, root: Path) -> None:
    await driver.announce("Maintenance at 18:00.\nPlease save your work.")
    await driver.announce("Second notice")
    lines = (root / "messages.log").read_text().splitlines()
    assert len(lines) == 2
    stamp, text = lines[0].split(" ", 1)
    assert datetime.fromisoformat(stamp).tzinfo is not None
    assert text == "Maintenance at 18:00. Please save your work."
    assert lines[1].endswith(" Second notice")


async def test_stage_and_install_a_real_deb(debs: Path, root: Path) -> None:
    output = OutputLog()
    driver = SandboxDriver("tg1", root, clustered=True, output=output)
    package = staged_package(
        debs, "tg-browser", "1.2-1", {"usr/lib/tg/browser": b"v1", "etc/tg/browser.conf": b"x"}
    )
    await driver.stage([package])
    assert (root / "staged" / "tg-browser_1.2-1.deb").read_bytes() == package.path.read_bytes()
    assert dict((await driver.status()).staged) == {"tg-browser": "1.2-1"}

    result = await driver.install([package])

    assert dict(result.installed) == {"tg-browser": "1.2-1"}
    assert result.restart_required is False
    assert (root / "fs" / "usr/lib/tg/browser").read_bytes() == b"v1"
    status = await driver.status()
    assert dict(status.installed) == {"tg-browser": "1.2-1"}
    assert dict(status.staged) == {}
    assert not (root / "staged" / "tg-browser_1.2-1.deb").exists()
    recorded = state(root)["files"]
    assert isinstance(recorded, dict)
    assert sorted(recorded["tg-browser"]) == ["/etc/tg/browser.conf", "/usr/lib/tg/browser"]
    assert [e.command.split()[:2] for e in output.entries] == [
        ["dpkg-deb", "-f"],
        ["dpkg-deb", "-X"],
    ]
    assert all(e.exit_status == 0 and e.operation == "install" for e in output.entries)


async def test_install_of_several_packages_at_once(debs: Path, root: Path) -> None:
    output = OutputLog()
    driver = SandboxDriver("tg1", root, clustered=True, output=output)
    first = staged_package(debs, "tg-a", "1.0", {"usr/lib/tg/a": b"a"})
    second = staged_package(debs, "tg-b", "2.0", {"usr/lib/tg/b": b"b"})
    await driver.stage([first, second])

    result = await driver.install([first, second])

    assert dict(result.installed) == {"tg-a": "1.0", "tg-b": "2.0"}
    assert (root / "fs" / "usr/lib/tg/a").read_bytes() == b"a"
    assert (root / "fs" / "usr/lib/tg/b").read_bytes() == b"b"
    assert list((root / "staged").iterdir()) == []
    assert [e.command.split()[:3] for e in output.entries] == [
        ["dpkg-deb", "-f", str(root / "staged" / "tg-a_1.0.deb")],
        ["dpkg-deb", "-X", str(root / "staged" / "tg-a_1.0.deb")],
        ["dpkg-deb", "-f", str(root / "staged" / "tg-b_2.0.deb")],
        ["dpkg-deb", "-X", str(root / "staged" / "tg-b_2.0.deb")],
    ]


async def test_upgrade_replaces_files_and_removes_stale_ones(
    driver: SandboxDriver, debs: Path, root: Path
) -> None:
    old = staged_package(debs, "tg-av", "1.0", {"usr/lib/av/a": b"1", "usr/lib/av/gone": b"1"})
    new = staged_package(debs, "tg-av", "1:2.0", {"usr/lib/av/a": b"2"})
    await driver.stage([old])
    await driver.install([old])
    await driver.stage([new])
    assert dict((await driver.status()).staged) == {"tg-av": "1:2.0"}
    await driver.install([new])
    assert dict((await driver.status()).installed) == {"tg-av": "1:2.0"}
    assert (root / "fs/usr/lib/av/a").read_bytes() == b"2"
    assert not (root / "fs/usr/lib/av/gone").exists()
    assert await driver.verify_integrity() == []


async def test_stage_refuses_a_file_that_does_not_match_its_checksum(
    driver: SandboxDriver, debs: Path, root: Path
) -> None:
    package = staged_package(debs, "tg-x", "1.0")
    wrong = type(package)(
        name=package.name,
        version=package.version,
        kind=package.kind,
        sha256="0" * 64,
        path=package.path,
    )
    with pytest.raises(DriverError, match="SHA-256") as caught:
        await driver.stage([wrong])
    assert "download it again" in str(caught.value)
    assert list((root / "staged").iterdir()) == []
    assert dict((await driver.status()).staged) == {}


def in_cache(package: StagedPackage, cache: Path, *, size: int | None = None) -> StagedPackage:
    """The package as the controller hands it over: its file in the content cache, named
    by its SHA-256, with the manifest's size."""
    cache.mkdir(parents=True, exist_ok=True)
    cached = cache / f"{package.sha256}.deb"
    shutil.copyfile(package.path, cached)
    return dataclasses.replace(
        package, path=cached, size=cached.stat().st_size if size is None else size
    )


async def test_a_package_from_the_cache_is_staged_by_a_link_not_copied(
    driver: SandboxDriver, debs: Path, root: Path, tmp_path: Path
) -> None:
    package = in_cache(staged_package(debs, "tg-x", "1.0"), tmp_path / "cache")
    await driver.stage([package])
    staged = root / "staged" / "tg-x_1.0.deb"
    assert staged.stat().st_ino == package.path.stat().st_ino  # the same file, no copy
    assert staged.stat().st_nlink == 2
    assert staged.stat().st_mode & 0o222 == 0  # read-only: it is the cache's copy too
    assert dict((await driver.status()).staged) == {"tg-x": "1.0"}
    assert [p.name for p in (root / "staged").iterdir()] == ["tg-x_1.0.deb"]
    await driver.install([package])
    assert dict((await driver.status()).installed) == {"tg-x": "1.0"}
    assert not staged.exists()
    assert package.path.read_bytes()  # the cache keeps its file


async def test_a_cached_file_of_another_size_is_copied_and_hashed(
    driver: SandboxDriver, debs: Path, root: Path, tmp_path: Path
) -> None:
    package = staged_package(debs, "tg-x", "1.0")
    cached = in_cache(package, tmp_path / "cache")
    with cached.path.open("ab") as handle:  # no longer the verified file
        handle.write(b"garbage")
    odd = dataclasses.replace(cached, size=package.path.stat().st_size)
    with pytest.raises(DriverError, match="SHA-256") as caught:
        await driver.stage([odd])
    assert "download it again" in str(caught.value)
    assert list((root / "staged").iterdir()) == []
    # right size and name, but no cache name: copied and hashed as before
    await driver.stage([package])
    staged = root / "staged" / "tg-x_1.0.deb"
    assert staged.stat().st_ino != package.path.stat().st_ino
    assert staged.read_bytes() == package.path.read_bytes()


async def _install_on(nodes: int, debs: Path, root: Path, unpacks: Unpacks) -> list[str]:
    """Stage one package on each of ``nodes`` sandbox nodes, then install on all at once."""
    drivers = [
        SandboxDriver(f"tg{i}", root / f"n{i}", clustered=True, unpacks=unpacks)
        for i in range(nodes)
    ]
    packages = [
        staged_package(debs / f"n{i}", "tg-x", "1.0", {"usr/lib/tg/x": b"%d" % i})
        for i in range(nodes)
    ]
    for driver, package in zip(drivers, packages, strict=True):
        await driver.stage([package])
    results = await asyncio.gather(
        *(d.install([p]) for d, p in zip(drivers, packages, strict=True))
    )
    return [r.installed["tg-x"] for r in results]


async def test_installs_on_many_nodes_unpack_at_most_the_limit_at_once(
    debs: Path, tmp_path: Path
) -> None:
    limited = Unpacks(2)
    assert await _install_on(6, debs / "a", tmp_path / "a", limited) == ["1.0"] * 6
    assert limited.peak == 2
    # the same six installs with room for all: every one unpacks at the same time
    roomy = Unpacks(6)
    assert await _install_on(6, debs / "b", tmp_path / "b", roomy) == ["1.0"] * 6
    assert roomy.peak == 6


async def test_one_unpack_limit_serves_several_event_loops(debs: Path, tmp_path: Path) -> None:
    shared = Unpacks(1)
    here = _install_on(3, debs / "a", tmp_path / "a", shared)
    there = asyncio.to_thread(asyncio.run, _install_on(3, debs / "b", tmp_path / "b", shared))
    assert await asyncio.gather(here, there) == [["1.0"] * 3, ["1.0"] * 3]
    assert shared.peak <= 2  # one at a time in each loop


def test_an_unpack_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="1 or more, not 0"):
        Unpacks(0)


async def test_install_of_something_not_staged(driver: SandboxDriver, debs: Path) -> None:
    package = staged_package(debs, "tg-x", "1.0")
    with pytest.raises(DriverError, match="not staged") as caught:
        await driver.install([package])
    assert caught.value.operation == "install"
    assert dict((await driver.status()).installed) == {}


async def test_install_refuses_a_staged_file_changed_after_staging(
    driver: SandboxDriver, debs: Path, root: Path
) -> None:
    package = staged_package(debs, "tg-x", "1.0")
    await driver.stage([package])
    with (root / "staged" / "tg-x_1.0.deb").open("ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(DriverError, match="changed after staging"):
        await driver.install([package])
    assert dict((await driver.status()).installed) == {}


async def test_install_refuses_a_deb_with_other_control_fields(
    driver: SandboxDriver, debs: Path
) -> None:
    package = staged_package(debs, "tg-x", "1.0")
    renamed = type(package)(
        name="tg-y",
        version="1.0",
        kind=package.kind,
        sha256=package.sha256,
        path=package.path,
    )
    await driver.stage([renamed])
    with pytest.raises(DriverError, match=r"contains tg-x 1\.0, not tg-y 1\.0"):
        await driver.install([renamed])


async def test_core_package_requires_a_restart_and_reboot_clears_it(
    driver: SandboxDriver, debs: Path, root: Path
) -> None:
    core = staged_package(debs, "tg-kernel", "6.1-1", kind=PackageKind.CORE)
    await driver.stage([core])
    result = await driver.install([core])
    assert result.restart_required is True
    assert (await driver.status()).restart_required is True

    await driver.restart_services()
    assert (await driver.status()).restart_required is True
    assert state(root)["last_services_restart"] is not None

    await driver.reboot()
    assert (await driver.status()).restart_required is False
    last_reboot = state(root)["last_reboot"]
    assert isinstance(last_reboot, str)
    assert datetime.fromisoformat(last_reboot).tzinfo is not None


async def test_integrity_reports_changed_and_missing_files(
    driver: SandboxDriver, debs: Path, root: Path
) -> None:
    package = staged_package(
        debs, "tg-vnc", "3.0", {"usr/bin/tg-vnc": b"binary", "usr/share/tg/vnc.txt": b"doc"}
    )
    await driver.stage([package])
    await driver.install([package])
    assert await driver.verify_integrity() == []

    (root / "fs/usr/bin/tg-vnc").write_bytes(b"trojan")
    (root / "fs/usr/share/tg/vnc.txt").unlink()
    mismatches = await driver.verify_integrity()
    assert [(m.package, m.path, m.problem) for m in mismatches] == [
        ("tg-vnc", "/usr/bin/tg-vnc", "checksum differs"),
        ("tg-vnc", "/usr/share/tg/vnc.txt", "missing"),
    ]


async def test_one_shot_fault_fails_the_next_call_only(
    driver: SandboxDriver, debs: Path, root: Path
) -> None:
    package = staged_package(debs, "tg-x", "1.0")
    await driver.stage([package])
    write_json(root / "faults.json", {"install": "disk full", "reboot": "later"})

    with pytest.raises(DriverError) as caught:
        await driver.install([package])
    assert (caught.value.node, caught.value.operation, caught.value.cause) == (
        "tg1",
        "install",
        "disk full",
    )
    assert json.loads((root / "faults.json").read_text()) == {"reboot": "later"}

    result = await driver.install([package])
    assert dict(result.installed) == {"tg-x": "1.0"}


@pytest.mark.parametrize("operation", OPERATIONS)
async def test_every_operation_can_be_faulted(
    driver: SandboxDriver, root: Path, operation: str
) -> None:
    write_json(root / "faults.json", {operation: f"{operation} broke"})
    with pytest.raises(DriverError, match=f"{operation} broke"):
        await call(driver, operation)
    await call(driver, operation)  # one-shot: the next call works


async def call(driver: SandboxDriver, operation: str) -> object:
    calls = {
        "status": driver.status,
        "announce": lambda: driver.announce("hello"),
        "set_logon": lambda: driver.set_logon(False),
        "drain": driver.drain,
        "undrain": driver.undrain,
        "disconnect_sessions": driver.disconnect_sessions,
        "stage": lambda: driver.stage([]),
        "install": lambda: driver.install([]),
        "restart_services": driver.restart_services,
        "reboot": driver.reboot,
        "post_check": driver.post_check,
        "verify_integrity": driver.verify_integrity,
    }
    return await calls[operation]()


async def test_unreachable_fault_persists_until_removed(driver: SandboxDriver, root: Path) -> None:
    write_json(root / "faults.json", {"unreachable": "cable cut"})
    for operation in OPERATIONS:
        with pytest.raises(NodeUnreachableError, match="cable cut"):
            await call(driver, operation)
    assert json.loads((root / "faults.json").read_text()) == {"unreachable": "cable cut"}
    (root / "faults.json").unlink()
    await driver.status()


async def test_fault_file_changed_in_place_is_read_again(driver: SandboxDriver, root: Path) -> None:
    # rewritten in place with the same size, at once and after it settled: both are seen
    faults = root / "faults.json"
    for message in ("cable aaaa", "cable bbbb", "cable cccc", "cable dddd"):
        write_json(faults, {"unreachable": message})
        for _ in range(2):
            with pytest.raises(NodeUnreachableError, match=message):
                await driver.status()
        if message == "cable bbbb":
            await asyncio.sleep(0.2)  # settled: read from memory while unchanged
    faults.write_text("{}")
    await driver.status()


async def test_delay_fault_slows_every_call(driver: SandboxDriver, root: Path) -> None:
    write_json(root / "faults.json", {"delay": {"restart_services": 0.3}})
    loop = asyncio.get_running_loop()
    for _ in range(2):
        started = loop.time()
        await driver.restart_services()
        assert loop.time() - started >= 0.3
    started = loop.time()
    await driver.status()
    assert loop.time() - started < 0.3


@pytest.mark.parametrize(
    ("faults", "expected"),
    [
        ({"instal": "x"}, "instal"),
        ({"delay": {"install": -1}}, "delay.install"),
        ({"delay": {"nap": 1}}, "delay.nap"),
        ([], "top level"),
    ],
)
async def test_garbage_in_faults_file(
    driver: SandboxDriver, root: Path, faults: object, expected: str
) -> None:
    write_json(root / "faults.json", faults)
    with pytest.raises(DriverError) as caught:
        await driver.status()
    assert str(root / "faults.json") in str(caught.value)
    assert expected in str(caught.value)
    assert "accepted keys: unreachable, delay, status" in str(caught.value)


async def test_garbage_in_state_file(driver: SandboxDriver, root: Path) -> None:
    write_file(root / "state.json", "{broken")
    with pytest.raises(DriverError, match=r"state\.json: not valid JSON"):
        await driver.status()
    (root / "state.json").write_text('{"installed": ["a"]}')
    with pytest.raises(DriverError, match="installed"):
        await driver.status()


async def test_state_is_replaced_atomically(driver: SandboxDriver, root: Path) -> None:
    await driver.set_logon(False)
    path = root / "state.json"
    before = path.stat().st_ino
    with path.open() as reader:  # a reader that opened the old file keeps a whole file
        await driver.set_logon(True)
        await driver.drain()  # however often it is written meanwhile
        assert json.loads(reader.read())["logon_enabled"] is False
    assert path.stat().st_ino != before
    assert json.loads(path.read_text())["logon_enabled"] is True
    assert json.loads(path.read_text())["lb"] == "drained"
    assert names(root) == ["state.json"]  # no temporary files, no old file left


@pytest.fixture
async def check_server() -> AsyncIterator[tuple[str, list[int]]]:
    """An HTTP server on 127.0.0.1 answering the status code at the head of the list."""
    answers = [200]

    async def handle(request: web.Request) -> web.Response:
        return web.Response(status=answers[0], text="ok")

    app = web.Application()
    app.router.add_get("/health", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/health", answers
    finally:
        await runner.cleanup()


async def test_post_check_with_a_check_url(root: Path, check_server: tuple[str, list[int]]) -> None:
    url, answers = check_server
    driver = SandboxDriver("tg1", root, clustered=False, check_url=url)
    await driver.post_check()
    answers[0] = 503
    with pytest.raises(DriverError, match="answered HTTP 503") as caught:
        await driver.post_check()
    assert caught.value.operation == "post_check"


async def test_files_written_by_other_programs_while_sessions_end(
    driver: SandboxDriver, root: Path
) -> None:
    write_json(root / "sessions.json", [{"user": "alice"}])
    assert await driver.disconnect_sessions() == 1
    write_json(root / "sessions.json", [{"user": "carol"}])
    assert [s.user for s in (await driver.status()).sessions] == ["carol"]
    assert os.listdir(root) == ["sessions.json"]
