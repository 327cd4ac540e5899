"""The App Home tab: fleet table, alerts, maintenance windows, hotfixes and running runs.

Published (``views.publish``) when a user opens the tab, and again for everyone who has
opened it when the fleet changes: at most once per ``interval`` seconds, a burst of events
coalescing into one refresh. Who has opened the tab is kept in the store (``kv``), so the
refreshes go on after a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Self
from zoneinfo import ZoneInfo

from bot.commands import alert_header
from bot.slack.api import SlackApi
from bot.slack.blocks import (
    DIVIDER,
    Block,
    body_blocks,
    context,
    escape,
    header_blocks,
    mrkdwn_section,
    plain,
    progress_bar,
    run_fraction,
)
from core.lifecycle.engine import Engine
from core.localtime import local_text
from core.model import PackageKind, Role

log = logging.getLogger(__name__)

KV_HOME = "slack.home"
REFRESH_INTERVAL = 3.0
"""Seconds between two refreshes of the App Home (per user at most once in this time)."""
MAX_TABLE_SECTIONS = 30
MAX_USERS = 500


@dataclass(frozen=True, slots=True, kw_only=True)
class HotfixRow:
    id: str
    urgency: str
    summary: str
    missing: tuple[str, ...]
    selected: tuple[str, ...]


def _flags(node: dict[str, Any]) -> str:
    flags = []
    if node["update_lock"]:
        flags.append("LOCK")
    if node["warning_flag"]:
        flags.append("DL-ERROR")
    if node["restart_required"]:
        flags.append("RESTART")
    if node["maintenance"]:
        flags.append("maint")
    if not node.get("reachable", True):
        flags.append("unreachable")
    return ",".join(flags) or "ok"


def fleet_table(status: dict[str, Any]) -> str:
    rows = [("NODE", "CLUSTER", "SESS", "LOGON", "LB", "PEND", "STATE")]
    for node in status["nodes"]:
        rows.append(
            (
                node["name"],
                node["cluster"] or "-",
                str(node["sessions"]),
                node["logon"],
                node["lb"] or "-",
                str(len(node["pending"])),
                _flags(node),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    )


def _runs(status: dict[str, Any]) -> list[str]:
    lines = []
    for node in status["nodes"]:
        run = node["run"]
        if run:
            progress = run.get("progress") or {}
            fraction = run_fraction(
                run["kind"], run["step"] or "", progress.get("done", 0), progress.get("total", 0)
            )
            lines.append(
                f"#{run['id']} {escape(run['kind'])} on {escape(node['name'])}: "
                f"step {escape(run['step'] or 'queued')} `{progress_bar(fraction, 10)}`"
            )
    return lines


def _maintenance(status: dict[str, Any], tz: ZoneInfo) -> list[str]:
    windows = sorted(
        (n["maintenance"]["start"], n["name"], n["maintenance"])
        for n in status["nodes"]
        if n["maintenance"]
    )
    lines = []
    for start, name, m in windows:
        when = local_text(datetime.fromisoformat(start), tz)
        logon = ", logon disabled at the start" if m["disable_logon"] else ""
        lines.append(
            f"{when} *{escape(name)}* ({escape(m['origin'])}{logon}): {escape(m['reason'])}"
        )
    return lines


def _section(title: str, lines: Sequence[str], empty: str, limit: int = 25) -> list[Block]:
    shown = list(lines[:limit])
    if len(lines) > limit:
        shown.append(f"… and {len(lines) - limit} more")
    return [mrkdwn_section(f"*{title}*\n" + ("\n".join(shown) if shown else f"_{empty}_"))]


def home_view(
    status: dict[str, Any],
    *,
    hotfixes: Sequence[HotfixRow],
    tz: ZoneInfo,
    now: datetime,
    roles: frozenset[Role],
) -> dict[str, Any]:
    hotfix_lines = [
        f"*{escape(h.id)}* [{escape(h.urgency)}] {escape(h.summary or '(no summary)')} — "
        f"missing on {escape(', '.join(h.missing[:10]))}"
        + (f" (+{len(h.missing) - 10})" if len(h.missing) > 10 else "")
        + (f"; selected on {escape(', '.join(h.selected[:10]))}" if h.selected else "")
        for h in hotfixes
        if h.missing
    ]
    table = body_blocks(fleet_table(status), preformatted=True)
    if len(table) > MAX_TABLE_SECTIONS:
        table = [
            *table[:MAX_TABLE_SECTIONS],
            context("… more nodes not shown; `/tg status T` shows one."),
        ]
    have = ", ".join(sorted(roles)) or "none"
    blocks: list[Block] = [
        {"type": "header", "text": plain("tgops: the fleet", 150)},
        *header_blocks(alert_header(status, tz)),
        DIVIDER,
        *_section("Running runs", _runs(status), "none"),
        *_section("Next maintenance windows", _maintenance(status, tz), "none scheduled"),
        *_section("Pending hotfixes", hotfix_lines, "none"),
        DIVIDER,
        mrkdwn_section(f"*Fleet* ({len(status['nodes'])} nodes)"),
        *table,
        context(
            f"Updated {local_text(now, tz)} ({tz.key}). Your roles: {have}. "
            "Type `/tg help` for the commands you may run."
        ),
    ]
    return {"type": "home", "blocks": blocks[:100]}


class HomeTab:
    """``async with HomeTab(...)``: publishes the tab and keeps it fresh while open."""

    def __init__(
        self,
        *,
        api: SlackApi,
        engine: Engine,
        fleet: Callable[[], Awaitable[dict[str, Any]]],
        roles_for: Callable[[str], frozenset[Role]],
        interval: float = REFRESH_INTERVAL,
    ) -> None:
        self.api = api
        self.engine = engine
        self.fleet = fleet
        """The fleet's kept state (``CommandService.kept_status``): no node is asked."""
        self.roles_for = roles_for
        self.interval = interval
        self._users: dict[str, float] = {}  # user -> monotonic time of the last publish
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        stored = await self.engine.store.kv_get(KV_HOME, "users")
        if isinstance(stored, list):
            self._users = {str(u): 0.0 for u in stored}
        self._task = asyncio.create_task(self._loop(), name="slack-home-refresh")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def changed(self) -> None:
        """The fleet changed: refresh every open tab soon (bursts coalesce)."""
        if self._users:
            self._dirty.set()

    async def opened(self, user: str) -> None:
        """A user opened the tab: publish it, unless it was published for them just now."""
        if user not in self._users:
            self._users[user] = 0.0
            if len(self._users) > MAX_USERS:  # forget the longest-unpublished user
                del self._users[min(self._users, key=self._users.__getitem__)]
            await self.engine.store.kv_set(KV_HOME, "users", sorted(self._users))
        if time.monotonic() - self._users[user] < self.interval:
            return
        await self.publish([user])

    async def publish(self, users: Sequence[str]) -> None:
        try:
            status = await self.fleet()
        except Exception:
            log.exception("App Home: fleet status not available; not published")
            return
        hotfixes = self._hotfixes(status)
        now = self.engine.clock.now()
        tz = self.engine.settings.tz
        for user in users:
            self._users[user] = time.monotonic()
            view = home_view(status, hotfixes=hotfixes, tz=tz, now=now, roles=self.roles_for(user))
            await self.api.call("views.publish", f"App Home of {user}", user_id=user, view=view)

    def _hotfixes(self, status: dict[str, Any]) -> list[HotfixRow]:
        manifest = self.engine.manifests.get(self.engine.settings.updates.channel)
        if manifest is None:
            return []
        rows = []
        for pkg in manifest.packages:
            if pkg.kind is not PackageKind.HOTFIX:
                continue
            missing = tuple(
                n["name"] for n in status["nodes"] if n["installed"].get(pkg.name) != pkg.version
            )
            selected = tuple(
                n["name"] for n in status["nodes"] if pkg.key in n["hotfixes"]["selected"]
            )
            rows.append(
                HotfixRow(
                    id=pkg.key,
                    urgency=pkg.urgency or "normal",
                    summary=pkg.summary or "",
                    missing=missing,
                    selected=selected,
                )
            )
        return rows

    async def _loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.publish(list(self._users))
            except Exception:
                log.exception("App Home refresh failed")
            # a rate limit, not a wait for something: events meanwhile coalesce into one
            await asyncio.sleep(self.interval)
