"""Programs run one after another on one worker thread (``core.drivers.shell.Programs``),
as the sandbox's install unpacks: real processes, their timeouts and cancellation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from core.drivers.shell import Programs
from core.errors import CommandTimeoutError, DriverError
from tests.sandbox_files import cancel_once_started, process_ended


async def test_programs_run_in_order_and_are_all_reported(tmp_path: Path) -> None:
    target = tmp_path / "out"

    first = ["sh", "-c", f"echo one > {target}"]
    second = ["sh", "-c", f"echo two >> {target}; echo done; exit 3"]

    def work(programs: Programs) -> str:
        programs.run(first)
        return programs.run(second).stdout.strip()

    programs = Programs(node="n1", operation="install", limit=10)
    assert await programs.hand_over(work) == "done"
    assert target.read_text() == "one\ntwo\n"
    assert [argv for argv, _ in programs.ran] == [first, second]
    assert [completed.exit_status for _, completed in programs.ran] == [0, 3]


async def test_a_program_over_its_limit_is_killed_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"

    def work(programs: Programs) -> None:
        programs.run(["echo", "before"])
        programs.run(["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"])

    programs = Programs(node="n1", operation="install", limit=0.5)
    with pytest.raises(CommandTimeoutError, match=r"timed out after 0.5s"):
        await programs.hand_over(work)
    # what ran before stays reported
    assert [(argv, done.stdout) for argv, done in programs.ran] == [
        (["echo", "before"], "before\n")
    ]
    await process_ended(int(pid_file.read_text()), limit=5)


async def test_a_cancelled_caller_kills_the_program_and_starts_no_other(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    after = tmp_path / "after"
    finished = asyncio.Event()
    loop = asyncio.get_running_loop()

    def work(programs: Programs) -> None:
        try:
            programs.run(["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"])
            programs.run(["touch", str(after)])
        finally:
            loop.call_soon_threadsafe(finished.set)

    programs = Programs(node="n1", operation="install", limit=30)
    task = asyncio.create_task(programs.hand_over(work))
    await cancel_once_started(task, pid_file)
    async with asyncio.timeout(10):
        await finished.wait()
    assert not after.exists()


async def test_a_program_that_cannot_start_is_a_driver_error(tmp_path: Path) -> None:
    def work(programs: Programs) -> None:
        programs.run([str(tmp_path / "no-such-program")])

    programs = Programs(node="n1", operation="install", limit=10)
    with pytest.raises(DriverError, match=r"cannot start .*no-such-program.*is it installed"):
        await programs.hand_over(work)
