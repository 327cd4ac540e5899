"""The text of `status` (what `/tg status`, the console and `tgops tg status` show)."""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo

from bot.commands import render_status


def _node(run: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "name": "tg1",
        "cluster": "c1",
        "lb": "in",
        "sessions": 1,
        "logon": "enabled",
        "installed": {"tg-base": "1.0"},
        "update_lock": None,
        "warning_flag": None,
        "restart_required": False,
        "maintenance": None,
        "pending": [],
        "staged": [],
        "run": run,
    }


def test_a_run_whose_first_step_is_not_recorded_yet_is_starting() -> None:
    """A moment after a run began its first step may not be recorded yet (a step that
    does not wait for its record): the run is shown as starting, not as "None"."""
    tz = ZoneInfo("Europe/Berlin")
    status = {"nodes": [_node({"id": 1, "kind": "auto-update", "step": None})], "clusters": []}
    assert "  run #1 auto-update: starting" in render_status(status, tz).splitlines()
    status["nodes"] = [_node({"id": 1, "kind": "auto-update", "step": "download"})]
    assert "  run #1 auto-update: download" in render_status(status, tz).splitlines()
