"""Log output: ``[log] format``/``level`` and ``-v``/``-q`` on either side of the
subcommand, seen as an operator's log collector sees them: the lines the process writes."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bot.logs import configure
from tests.fleet import fleet
from tests.ports import free_port
from tests.service import fleet_toml

ROOT = Path(__file__).parent.parent


@contextmanager
def captured(fmt: str) -> Iterator[io.StringIO]:
    """The root logger writing into a buffer for the block (pytest's handlers restored)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buffer = io.StringIO()
    configure(level=logging.INFO, fmt="json" if fmt == "json" else "text", stream=buffer)
    try:
        yield buffer
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


def records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


async def test_json_lines_name_the_run_node_and_actor(tmp_path: Path) -> None:
    with captured("json") as buffer:
        async with fleet(tmp_path) as f:
            f.fault("tg2", '{"stage": "disk full"}')
            assert await f.outcomes("download tg1") == {"tg1": "succeeded"}
            assert await f.outcomes("download tg2") == {"tg2": "failed"}
    lines = records(buffer.getvalue())  # every line is one JSON object
    assert lines
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
        assert line["time"].endswith("+00:00")
        assert line["level"] in {"debug", "info", "warning", "error", "critical"}
    (done,) = [r for r in lines if r["message"].startswith("run #") and r.get("node") == "tg1"]
    assert done["message"] == f"run #{done['run']} download on tg1 succeeded: staged tg-base 1.0"
    assert (done["level"], done["actor"], done["logger"]) == (
        "info",
        "token:admin",
        "core.lifecycle.runs",
    )
    assert isinstance(done["run"], int)
    (failed,) = [r for r in lines if r["message"].startswith("run #") and r.get("node") == "tg2"]
    assert failed["level"] == "warning"
    assert "disk full" in failed["message"]
    assert failed["run"] == done["run"] + 1
    # lines outside a run have no run fields
    started = [r for r in lines if r["message"].startswith("tgops serving on ")]
    assert started and "run" not in started[0] and "node" not in started[0]


def _fail() -> None:
    raise ValueError("broken\nacross lines")


def test_exceptions_go_into_one_json_line() -> None:
    with captured("json") as buffer:
        try:
            _fail()
        except ValueError:
            logging.getLogger("tgops.test").exception("it failed")
    (line,) = records(buffer.getvalue())
    assert line["message"] == "it failed"
    assert line["exception"].startswith("Traceback")
    assert "ValueError: broken\nacross lines" in line["exception"]


def _serve(config: Path, *args: str, env: dict[str, str]) -> list[str]:
    """Start ``tgops serve`` with these arguments, stop it with SIGTERM; its stderr lines."""
    ready = config.parent / "ready"
    ready.unlink(missing_ok=True)
    before = [a for a in args[:1] if a]
    command = [sys.executable, "-m", "bot.cli", *before, "serve", "--config", str(config)]
    command += ["--ready-file", str(ready), *args[1:]]
    server = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert server.poll() is None, server.communicate()[1]
            assert time.monotonic() < deadline, "the service did not start within 30 s"
            time.sleep(0.05)
    finally:
        server.send_signal(signal.SIGTERM)
        err = server.communicate(timeout=20)[1]
    assert server.returncode == 0, err
    return err.splitlines()


@pytest.mark.slow
def test_format_and_level_from_the_environment_and_flags_after_the_subcommand(
    tmp_path: Path,
) -> None:
    config = tmp_path / "tgops.toml"
    config.write_text(fleet_toml(tmp_path).replace("port = 0", f"port = {free_port()}"))
    json_env = {"TGOPS_LOG__FORMAT": "json"}

    levels = {r["level"] for r in records("\n".join(_serve(config, "", env=json_env)))}
    assert "info" in levels and "debug" not in levels
    # -v after the subcommand: one step more (debug)
    lines = _serve(config, "", "-v", env=json_env)
    assert "debug" in {r["level"] for r in records("\n".join(lines))}
    # -q after it and [log] level warning from the environment: only warnings and worse
    quiet = {**json_env, "TGOPS_LOG__LEVEL": "warning"}
    levels = {r["level"] for r in records("\n".join(_serve(config, "", "-q", env=quiet)))}
    assert levels <= {"error", "critical"}
    # -v before and after add up; the default text format is one line per record
    lines = _serve(config, "-v", "-q", env={})
    assert lines and all(" INFO " in line or " WARNING " in line for line in lines), lines
    assert not any(line.startswith("{") for line in lines)

    bad = subprocess.run(
        [sys.executable, "-m", "bot.cli", "config", "check", "--config", str(config)],
        cwd=ROOT,
        env={**os.environ, "TGOPS_LOG__FORMAT": "xml"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "log.format" in bad.stderr and "'text' or 'json'" in bad.stderr
