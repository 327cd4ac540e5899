"""Carries out parsed commands against the engine; shared by Slack, the API and the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from bot.grammar import Command, ParseError, allowed, format_days, help_text, parse
from bot.redact import ContactMask
from core import logfields
from core.durations import format_duration
from core.errors import TgopsError
from core.lifecycle.calendar import time_text
from core.lifecycle.engine import Engine
from core.lifecycle.hold import held_text
from core.lifecycle.leader import Election
from core.lifecycle.maintenance import Maintenance
from core.lifecycle.scheduler import Scheduler
from core.lifecycle.updates import (
    Lifecycle,
    NeedsConfirmation,
    describe_confirmation,
    describe_start,
)
from core.localtime import local_text, zone_note, zoned_text
from core.model import Actor, PackageKind, Role

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """What a command answers: ``ok`` false when refused. ``data`` carries structured extras."""

    ok: bool
    text: str
    command: str | None = None
    run_ids: tuple[int, ...] = ()
    data: dict[str, Any] = field(default_factory=dict)


def refused(text: str, command: str | None = None) -> Reply:
    return Reply(ok=False, text=text, command=command)


RUN_KINDS = {
    "download": "download",
    "integrity": "integrity",
    "auto-update": "auto-update",
    "restart": "restart",
    "oldstable partial": "oldstable-partial",
    "oldstable full": "oldstable-full",
    "install": "install",
}


ASK_AT_MOST = 100
"""A status of more nodes than this does not ask each of them: it shows the state the
service keeps (the leader asks every node each ``leader.node_check``, runs record what
they change), computed at most ``http.status_cache`` ago (or ten times as long as
computing it took, when that is longer: computing statuses takes at most a tenth of the
service's time); while a newer one is computed the last one answers (a large fleet's
status stays quick while thousands of runs go on)."""


def _status_failed(task: asyncio.Task[dict[str, Any]]) -> None:
    """A large status that could not be computed is logged (the last one keeps answering)."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("status of a large fleet not computed: %s", task.exception())


class CommandService:
    def __init__(
        self,
        engine: Engine,
        *,
        lifecycle: Lifecycle | None = None,
        maintenance: Maintenance | None = None,
        scheduler: Scheduler | None = None,
        election: Election | None = None,
    ) -> None:
        self.engine = engine
        self.lifecycle = lifecycle
        self.maintenance = maintenance
        self.scheduler = scheduler
        self.election = election
        self._snapshots: dict[str, tuple[float, dict[str, Any], float]] = {}
        """Per target, the latest status of a large fleet, when its computing began and
        how long it took."""
        self._computing: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self._rendered: tuple[dict[str, Any], str] | None = None
        """The latest large status shown and its text."""
        self._with_leader: tuple[dict[str, Any], str | None, dict[str, Any]] | None = None
        """The latest large status, the leader then, and the two together."""
        self._json: tuple[dict[str, Any], bytes] | None = None
        """The latest large status served as JSON and its JSON."""

    async def status(self, target: str | None = None, *, max_age: float = 0.0) -> dict[str, Any]:
        """The fleet's status (``GET /api/v1/status``, ``status``) with, when this service
        takes part in an election, ``instance`` (this one) and ``leader`` (the best known
        leading instance; null when none is known). Concurrent requests share one look at
        each node; with ``max_age`` a look that recent serves too (``http.status_cache``).
        The nodes' answers are awaited ``http.status_wait`` at most: a node that has not
        answered by then is shown as last seen and named in ``not_answered_yet``."""
        large = len(self.engine.resolve(target)) > ASK_AT_MOST
        if large:
            status = await self._large_status(target)
        else:
            wait = self.engine.settings.http.status_wait
            status = await self.engine.status(target, max_age=max_age, wait=wait)
        if self.election is None:
            return status
        leader = await self.election.leader()
        last = self._with_leader
        if large and last is not None and last[0] is status and last[1] == leader:
            return last[2]  # the same large status as last time: the same object
        shown = {**status, "instance": self.election.instance, "leader": leader}
        if large:
            self._with_leader = (status, leader, shown)
        return shown

    async def status_json(self, target: str | None = None, *, max_age: float = 0.0) -> bytes:
        """``status`` as JSON (``GET /api/v1/status``); a large status's JSON is made once
        and served as long as that status is (7 MB for 10,000 nodes)."""
        status = await self.status(target, max_age=max_age)
        last = self._json
        if last is not None and last[0] is status:
            return last[1]
        body = json.dumps(status).encode()
        if len(status["nodes"]) > ASK_AT_MOST:
            self._json = (status, body)
        return body

    async def kept_status(self) -> dict[str, Any]:
        """The whole fleet's state as the service keeps it, no node asked (the status
        header of every Slack reply, App Home): for more than ``ASK_AT_MOST`` nodes the
        large status's snapshot, so that replies do not each compute the fleet's state."""
        if len(self.engine.settings.nodes) > ASK_AT_MOST:
            return await self._large_status(None)
        return await self.engine.status(refresh=False)

    async def _large_status(self, target: str | None) -> dict[str, Any]:
        """The status of more than ``ASK_AT_MOST`` nodes from the state the service keeps:
        one computed at most ``http.status_cache`` ago, else the last one while a new one
        is computed (the first request waits for it)."""
        key = target or "all"
        loop = asyncio.get_running_loop()
        last = self._snapshots.get(key)
        if last is not None:
            began, status, took = last
            # a new one at most every status_cache, and never more than a tenth of the time
            if loop.time() - began <= max(self.engine.settings.http.status_cache, took * 10):
                return status
        computing = self._computing.get(key)
        if computing is None or computing.done():
            computing = loop.create_task(self._compute_status(key, target), name="status")
            computing.add_done_callback(_status_failed)
            self._computing[key] = computing
        if last is not None and not computing.done():
            return last[1]
        return await asyncio.shield(computing)

    async def _compute_status(self, key: str, target: str | None) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        began = loop.time()
        status = await self.engine.status(target, refresh=False)
        self._snapshots[key] = (began, status, loop.time() - began)
        return status

    async def execute(self, text: str, actor: Actor) -> Reply:
        """Parse, check the role (L11), audit (L13) and carry out one command."""
        with logfields.bound(actor=actor.name):
            return await self._execute(text, actor)

    async def _execute(self, text: str, actor: Actor) -> Reply:
        parsed = parse(text)
        if isinstance(parsed, ParseError):
            # L13: every command is recorded, also one that could not be understood
            first = parsed.text.splitlines()[0] if parsed.text else ""
            await self.engine.record(
                actor, "rejected", detail=f"{' '.join(text.split())[:500]} ({first})"
            )
            return refused(parsed.text)
        if not allowed(actor.roles, parsed.role):
            have = ", ".join(sorted(actor.roles)) or "none"
            await self.engine.record(
                actor, "refused", target=parsed.target, detail=f"{text} (needs role {parsed.role})"
            )
            return refused(
                f"`{parsed.name}` needs role {parsed.role}; you have: {have}.", parsed.name
            )
        # a command that only shows something (role viewer) does not wait for its record
        # to be committed: under a large fleet's load that wait was most of its answer
        await self.engine.command_received(
            actor, parsed.text, parsed.target, wait=parsed.role is not Role.VIEWER
        )
        try:
            return await self._dispatch(parsed, actor)
        except TgopsError as exc:
            return refused(str(exc), parsed.name)

    async def _dispatch(self, cmd: Command, actor: Actor) -> Reply:
        if cmd.name in RUN_KINDS:
            return await self._run(cmd, actor)
        handler = getattr(self, "_" + cmd.name.replace(" ", "_").replace("-", "_"), None)
        if handler is None:
            return refused(
                f"`{cmd.name}` is not available in this version of tgops yet; nothing was done.",
                cmd.name,
            )
        reply: Reply = await handler(cmd, actor)
        return reply

    # -- viewer ----------------------------------------------------------------------------

    async def _help(self, cmd: Command, actor: Actor) -> Reply:
        return Reply(ok=True, text=help_text(actor.roles, cmd.topic), command=cmd.name)

    async def _nodes(self, cmd: Command, actor: Actor) -> Reply:
        lines = []
        for node in self.engine.settings.nodes:
            where = f"cluster {node.cluster}" if node.cluster else "single system"
            lines.append(f"{node.name:<16} {where:<24} driver {node.driver}")
        return Reply(ok=True, text="\n".join(lines) or "No nodes configured.", command=cmd.name)

    async def _status(self, cmd: Command, actor: Actor) -> Reply:
        status = await self.status(cmd.target)
        rendered = self._rendered
        if rendered is not None and rendered[0] is status:
            text = rendered[1]  # the same large status as last time: its text too
        else:
            text = render_status(status, self.engine.settings.tz)
            if len(status["nodes"]) > ASK_AT_MOST:
                self._rendered = (status, text)
        return Reply(
            ok=True,
            text=text,
            command=cmd.name,
            data=status,
        )

    async def _log(self, cmd: Command, actor: Actor) -> Reply:
        full = Role.UPDATE in actor.roles  # the contacts' addresses are need-to-know
        if "--full" in cmd.flags and not full:
            return refused(
                "`log --full` (the contacts' addresses and numbers) needs role update; "
                "`log` shows the records with the contacts' names only.",
                cmd.name,
            )
        targets = None
        if cmd.target is not None:
            names = self.engine.resolve(cmd.target)
            targets = [*names, cmd.target]
        records = await self.engine.store.audit_log(targets=targets, limit=cmd.count or 20)
        if not records:
            return Reply(ok=True, text="No records yet.", command=cmd.name)
        tz = self.engine.settings.tz
        mask = ContactMask(self.engine.settings.contacts)
        lines = []
        for rec in reversed(records):
            # with the zone: the reader's own zone may be another one (L13)
            when = rec.at.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S %Z")
            target = f" {rec.target}" if rec.target else ""
            run = f" run #{rec.run_id}" if rec.run_id else ""
            detail = rec.detail if full else mask.hide(rec.detail)
            detail = detail.replace("\n", "\n    ")  # a command's output, indented
            lines.append(f"{when} {rec.actor} ({rec.source}) {rec.action}{target}{run}: {detail}")
        return Reply(ok=True, text="\n".join(lines), command=cmd.name)

    # -- maint -----------------------------------------------------------------------------

    async def _logon(self, cmd: Command, actor: Actor) -> Reply:
        assert cmd.target is not None
        assert cmd.enabled is not None
        names = self.engine.resolve(cmd.target)
        done = []
        failed = []
        for name in names:
            try:
                await self.engine.set_logon(name, cmd.enabled, actor)
                done.append(name)
            except TgopsError as exc:
                failed.append(str(exc))
        word = "enabled" if cmd.enabled else "disabled"
        text = f"Logon {word} on {', '.join(done)}." if done else ""
        if failed:
            text = "\n".join([text, *failed]).strip()
        return Reply(ok=not failed, text=text, command=cmd.name)

    # -- runs --------------------------------------------------------------------------------

    def _life(self) -> Lifecycle:
        if self.lifecycle is None:
            raise TgopsError("update runs are not available in this process")
        return self.lifecycle

    def _maint(self) -> Maintenance:
        if self.maintenance is None:
            raise TgopsError("maintenance operations are not available in this process")
        return self.maintenance

    async def _run(self, cmd: Command, actor: Actor) -> Reply:
        assert cmd.target is not None
        kind = RUN_KINDS[cmd.name]
        result = await self._life().start(
            kind,
            cmd.target,
            actor,
            yes=cmd.yes,
            packages=cmd.ids,
            ignore_alerts=cmd.ignore_alerts,
        )
        if isinstance(result, NeedsConfirmation):
            return Reply(
                ok=False,
                text=describe_confirmation(result, cmd.text.removeprefix("/tg ").strip()),
                command=cmd.name,
                data={
                    "confirm": {
                        "sessions": result.sessions,
                        "total": result.total,
                        "text": cmd.text,
                    }
                },
            )
        return Reply(
            ok=True,
            text=describe_start(result, kind, self.engine.settings.tz),
            command=cmd.name,
            run_ids=tuple(i for _, i in result.runs),
        )

    async def _remove_lock(self, cmd: Command, actor: Actor) -> Reply:
        assert cmd.target is not None
        text = await self._life().remove_lock(
            cmd.target, actor, cancel_schedule="--cancel-schedule" in cmd.flags
        )
        return Reply(ok=True, text=text, command=cmd.name)

    async def _warning_flag_clear(self, cmd: Command, actor: Actor) -> Reply:
        assert cmd.target is not None
        self.engine.resolve(cmd.target)
        return refused(
            "The warning flag cannot be removed by command (L7): it records that a download "
            "failed for good, and only a complete download clears it. Run `download "
            f"{cmd.target}`; when it completes, the flag is gone.",
            cmd.name,
        )

    # -- maintenance (L3) -------------------------------------------------------------------

    async def _maintenance(self, cmd: Command, actor: Actor) -> Reply:
        windows = await self.engine.store.maintenance()
        if not windows:
            return Reply(ok=True, text="No maintenance scheduled.", command=cmd.name)
        tz = self.engine.settings.tz
        lines = []
        for m in windows:
            logon = ", logon disabled at the start" if m.disable_logon else ""
            lines.append(
                f"{m.node}: {local_text(m.start, tz)} ({m.origin}{logon}): {m.reason}"
                f" — by {m.created_by}"
            )
        lines.append(f"({zone_note(tz)})")
        return Reply(ok=True, text="\n".join(lines), command=cmd.name)

    async def _maintenance_new(self, cmd: Command, actor: Actor) -> Reply:
        return refused(
            "`maintenance new` opens a form in Slack. Here, use "
            "`maintenance schedule T YYYY-MM-DD HH:MM REASON… [--disable-logon]`.",
            cmd.name,
        )

    async def _maintenance_schedule(self, cmd: Command, actor: Actor) -> Reply:
        assert cmd.target is not None
        assert cmd.start is not None
        done = await self._maint().schedule(
            cmd.target,
            cmd.start,
            cmd.reason,
            disable_logon="--disable-logon" in cmd.flags,
            actor=actor,
        )
        tz = self.engine.settings.tz
        lead = self.engine.settings.maintenance
        text = (
            f"Maintenance scheduled on {', '.join(done.nodes)} at {zoned_text(done.start, tz)}: "
            f"{cmd.reason}. Users get notices from {format_duration(lead.notice_lead)} "
            f"before, every {format_duration(lead.reminder_interval)}."
        )
        return Reply(ok=True, text="\n".join([text, *done.warnings]), command=cmd.name)

    async def _maintenance_cancel(self, cmd: Command, actor: Actor) -> Reply:
        assert cmd.target is not None
        done = await self._maint().cancel(cmd.target, actor=actor)
        lines = []
        if done.nodes:
            lines.append(f"Maintenance ended on {', '.join(done.nodes)}; users were told.")
        if done.none:
            lines.append(f"No maintenance was scheduled on {', '.join(done.none)}.")
        lines.extend(done.problems)
        return Reply(
            ok=bool(done.nodes) and not done.problems, text="\n".join(lines), command=cmd.name
        )

    # -- schedules (L4, L5) -------------------------------------------------------------------

    def _sched(self) -> Scheduler:
        if self.scheduler is None:
            raise TgopsError("schedules are not available in this process")
        return self.scheduler

    async def _schedule(self, cmd: Command, actor: Actor) -> Reply:
        return Reply(ok=True, text=await self._sched().listing(), command=cmd.name)

    async def _schedule_download(self, cmd: Command, actor: Actor) -> Reply:
        return await self._set_schedule(cmd, actor, "download")

    async def _schedule_update(self, cmd: Command, actor: Actor) -> Reply:
        return await self._set_schedule(cmd, actor, "update")

    async def _set_schedule(self, cmd: Command, actor: Actor, kind: str) -> Reply:
        assert cmd.target is not None
        scheduler = self._sched()
        if not cmd.enabled:
            off, none = await scheduler.disable(cmd.target, kind, actor=actor)
            lines = []
            if off:
                lines.append(f"Scheduled {kind} switched off on {', '.join(off)}.")
            if none:
                lines.append(f"No scheduled {kind} was on for {', '.join(none)}.")
            return Reply(ok=True, text="\n".join(lines), command=cmd.name)
        assert cmd.at is not None
        names = await scheduler.set(
            cmd.target, kind, days=cmd.days, at=cmd.at, until=cmd.until, actor=actor
        )
        until = f" until {time_text(cmd.until)}" if cmd.until else ""
        text = (
            f"Scheduled {kind} on {', '.join(names)}: {format_days(cmd.days)} "
            f"{time_text(cmd.at)}{until} ({self.engine.settings.timezone}).\n"
            + await scheduler.listing()
        )
        return Reply(ok=True, text=text, command=cmd.name)

    async def _plan(self, cmd: Command, actor: Actor) -> Reply:
        return Reply(ok=True, text=await self._sched().plan(cmd.target), command=cmd.name)

    # -- hotfixes (L8) ------------------------------------------------------------------------

    async def _hotfixes(self, cmd: Command, actor: Actor) -> Reply:
        names = self.engine.resolve(cmd.target)
        manifest = await self._life().interactive_manifest()
        hotfixes = [p for p in manifest.packages if p.kind is PackageKind.HOTFIX]
        if not hotfixes:
            return Reply(
                ok=True, text=f"Channel {manifest.channel} has no hotfixes.", command=cmd.name
            )
        selected = await self.engine.store.selected_hotfixes()
        records = {r.name: r for r in await self.engine.store.nodes(names)}
        lines = []
        for hf in hotfixes:
            lines.append(
                f"{hf.id} [{hf.urgency or 'normal'}] {hf.name} {hf.version}: "
                f"{hf.summary or '(no summary)'}"
            )
            for name in names:
                rec = records[name]
                installed = rec.installed.get(hf.name) == hf.version
                always = self.engine.hotfixes_always(rec)
                chosen = (
                    "always"
                    if always
                    else ("selected" if hf.key in selected.get(name, []) else "not selected")
                )
                lines.append(
                    f"    {name}: {chosen}, {'installed' if installed else 'not installed'}"
                )
        return Reply(ok=True, text="\n".join(lines), command=cmd.name)

    async def _known_hotfixes(self, ids: tuple[str, ...]) -> None:
        manifest = await self._life().interactive_manifest()
        known = {p.key for p in manifest.packages if p.kind is PackageKind.HOTFIX}
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise TgopsError(
                f"unknown hotfix {', '.join(unknown)} in channel {manifest.channel} "
                f"(known: {', '.join(sorted(known)) or 'none'}); nothing was changed"
            )

    async def _hotfixes_select(self, cmd: Command, actor: Actor) -> Reply:
        assert cmd.target is not None
        names = self.engine.resolve(cmd.target)
        await self._known_hotfixes(cmd.ids)
        for name in names:
            added = await self.engine.store.select_hotfixes(name, cmd.ids, by=actor.name)
            if added:
                await self.engine.record(
                    actor, "hotfixes selected", target=name, detail=", ".join(added)
                )
        return Reply(
            ok=True,
            text=f"Selected {', '.join(cmd.ids)} on {', '.join(names)}; "
            "installed with the next auto-update or scheduled update.",
            command=cmd.name,
        )

    async def _hotfixes_unselect(self, cmd: Command, actor: Actor) -> Reply:
        assert cmd.target is not None
        names = self.engine.resolve(cmd.target)
        lines = []
        for name in names:
            removed = await self.engine.store.unselect_hotfixes(name, cmd.ids)
            if removed:
                await self.engine.record(
                    actor, "hotfixes unselected", target=name, detail=", ".join(removed)
                )
                lines.append(f"{name}: unselected {', '.join(removed)}")
            else:
                lines.append(f"{name}: none of {', '.join(cmd.ids)} was selected")
        return Reply(ok=True, text="\n".join(lines), command=cmd.name)

    async def _hotfixes_always(self, cmd: Command, actor: Actor) -> Reply:
        names = self.engine.resolve(cmd.target)
        for name in names:
            await self.engine.store.update_node(name, hotfixes_always=cmd.enabled)
            await self.engine.record(
                actor, "hotfixes always", target=name, detail="on" if cmd.enabled else "off"
            )
        word = "on" if cmd.enabled else "off"
        return Reply(
            ok=True,
            text=f"Always install hotfixes: {word} for {', '.join(names)}.",
            command=cmd.name,
        )


def alert_header(status: dict[str, Any], tz: ZoneInfo) -> list[str]:
    """The fleet's alerts, as every status header shows them (L6, L7, L2, L3).

    Maintenance starts are shown in ``tz`` (``bot.slack.blocks`` reads them back by that form).
    """
    lines = []
    flagged = [n["name"] for n in status["nodes"] if n["warning_flag"]]
    locked = [n["name"] for n in status["nodes"] if n["update_lock"]]
    restart = [n["name"] for n in status["nodes"] if n["restart_required"]]
    maint = [n for n in status["nodes"] if n["maintenance"]]
    if flagged:
        lines.append(f"!! Update download error: {', '.join(flagged)}")
    if locked:
        lines.append(f"!! Update lock set: {', '.join(locked)}")
    if restart:
        lines.append(f"!! Restart required: {', '.join(restart)}")
    for node in status["nodes"]:
        held = node.get("held")
        if held:
            since = local_text(datetime.fromisoformat(held["since"]), tz)
            reason = f"{held['reason']}; waiting since {since}"
            lines.append(f"!! Update held: {node['name']} ({reason})")
    late = [n for n in status["nodes"] if n.get("preparation_late")]
    if late:
        parts = []
        for node in late:
            info = node["preparation_late"]
            due = local_text(datetime.fromisoformat(info["due"]), tz)
            parts.append(f"{node['name']} (still at {info['step']}, due by {due})")
        lines.append(f"!! Preparation late: {', '.join(parts)}")
    for channel, reason in sorted(status.get("manifest_problems", {}).items()):
        lines.append(f"!! Manifest refused: channel {channel}: {reason}")
    for node in maint:
        m = node["maintenance"]
        start = local_text(datetime.fromisoformat(m["start"]), tz)
        lines.append(f"-- Maintenance {node['name']} at {start}: {m['reason']}")
    return lines


def render_status(status: dict[str, Any], tz: ZoneInfo) -> str:
    lines = alert_header(status, tz)
    late = status.get("not_answered_yet") or []
    if late:
        shown = ", ".join(late[:10]) + (f" and {len(late) - 10} more" if len(late) > 10 else "")
        lines.append(
            f"{len(late)} node{'s' if len(late) != 1 else ''} had not answered yet and "
            f"{'are' if len(late) != 1 else 'is'} shown as last seen: {shown} (ask again "
            "for their answers)"
        )
    if lines:
        lines.append("")
    for node in status["nodes"]:
        where = f"cluster {node['cluster']}" if node["cluster"] else "single system"
        lb = f", lb {node['lb']}" if node["lb"] else ""
        sessions = "1 session" if node["sessions"] == 1 else f"{node['sessions']} sessions"
        head = f"{node['name']} ({where}): {sessions}, logon {node['logon']}{lb}"
        if not node.get("reachable", True):
            head += f" | UNREACHABLE: {node.get('error')}"
        lines.append(head)
        installed = ", ".join(f"{k} {v}" for k, v in sorted(node["installed"].items()))
        lines.append(f"  installed: {installed or 'nothing recorded'}")
        if node["update_lock"]:
            lock = node["update_lock"]
            since = zoned_text(datetime.fromisoformat(lock["since"]), tz)
            lines.append(
                f"  ! update lock since {since}: {lock['reason']} "
                f"(check the node, then `remove-lock {node['name']}`)"
            )
        if node["warning_flag"]:
            flag = node["warning_flag"]
            since = zoned_text(datetime.fromisoformat(flag["since"]), tz)
            lines.append(
                f"  ! update download error since {since}: {flag['reason']} "
                "(a complete download clears it)"
            )
        if node["pending"]:
            pending = ", ".join(f"{p['name']} {p['version']}" for p in node["pending"])
            lines.append(f"  pending: {pending}")
        if node["staged"]:
            staged = ", ".join(f"{p['name']} {p['version']}" for p in node["staged"])
            lines.append(f"  staged: {staged}")
        if node.get("omitted_update"):
            lines.append(
                "  ! update omitted: older than oldstable: "
                + ", ".join(node["omitted_update"])
                + " (`oldstable partial|full`)"
            )
        if node["run"]:
            run = node["run"]
            # a run whose first step is not recorded yet (a moment after it began)
            lines.append(f"  run #{run['id']} {run['kind']}: {run['step'] or 'starting'}")
        if node.get("held"):
            lines.append(f"  {held_text(node['held'], tz)}")
    by_name = {node["name"]: node for node in status["nodes"]}
    for cluster in status["clusters"]:
        lines.append(cluster_text(cluster, by_name))
    if "instance" in status:
        lines.append(leadership_text(status["instance"], status["leader"]))
    return "\n".join(lines)


def cluster_text(cluster: dict[str, Any], shown: dict[str, dict[str, Any]]) -> str:
    """``cluster c1: 1/2 updating``; a slot held by a node that an update left locked and
    out of load balancing (L12: it is not back yet) is named apart, with what frees it."""
    held = [
        name
        for name in cluster["updating"]
        if name in shown and shown[name]["update_lock"] is not None and not shown[name]["run"]
    ]
    busy = len(cluster["updating"]) - len(held)
    text = f"cluster {cluster['name']}: {busy}/{cluster['max_parallel_updates']} updating"
    if held:
        text += (
            f", {len(held)} slot{'s' if len(held) != 1 else ''} held by "
            f"{', '.join(held)} (update lock, out of load balancing; `remove-lock` frees "
            f"{'it' if len(held) == 1 else 'them'})"
        )
    if cluster["waiting"]:
        text += f", waiting: {', '.join(cluster['waiting'])}"
    return text


def leadership_text(instance: str, leader: str | None) -> str:
    """Which instance answers and which one leads (several instances share one store)."""
    if leader == instance:
        return f"instance {instance} (the leader)"
    return f"instance {instance}; leader: {leader or 'none known right now'}"
