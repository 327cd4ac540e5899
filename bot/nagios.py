"""`tgops check-versions`: the fleet's update state as a Nagios plugin, read from the store.

The check reads the store only: it neither starts the service nor contacts a node, so it
answers while the service is down. It opens the database read-only: a missing SQLite file
is reported, never created, and nothing is migrated.

States (monitoring-plugins guidelines): update lock → CRITICAL; warning flag ("Update
download failed") or restart required → WARNING; ``-w``/``-c`` ranges on the number of
pending updates; a store that cannot be read → UNKNOWN.

Pending packages come from the last verified manifest of ``updates.channel`` that the
service saved in the store (kv ``manifests``, see ``Engine.remember_manifest``), with the
same rules as the service (``core.lifecycle.pending.pending_packages``: hotfixes when selected or
"always"; optional packages when installed or requested). Packages staged on a node but
not installed count as pending too. Without a saved manifest only those staged packages
are counted, and the output says so.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

from pydantic import ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from core.durations import format_duration
from core.errors import StoreError, TgopsError
from core.lifecycle.engine import MANIFEST_PROBLEMS_KV, MANIFESTS_KV
from core.lifecycle.heartbeat import MANIFEST_POLLS_KV, Heartbeat, parse_poll, read_heartbeat
from core.lifecycle.pending import hotfixes_missing, is_newer, pending_packages
from core.localtime import local_text
from core.model import PackageKind
from core.repository.manifest import Manifest
from core.settings import Settings
from core.store import NodeRecord, ReadOnlyStore, StoreUnreadableError
from core.store.readonly import error_cause

PREFIX = "TGOPS"
DEFAULT_TIMEOUT = 10.0
"""Seconds (``-t``) before the check gives up with UNKNOWN (the plugins' usual default)."""
DEFAULT_MAX_AGE = 120.0
"""Seconds (``--max-age``): an older heartbeat means the service is not running."""
DEFAULT_URGENT_MAX_AGE = 86400.0
"""Seconds (``--urgent-max-age``) an urgent hotfix may be pending before CRITICAL."""
MANIFEST_POLLS_ALLOWED = 3
"""A manifest fetched longer ago than this many poll intervals is CRITICAL."""
MAX_TEXT = 300
"""Longest reason quoted from the store in one detail line."""


class State(IntEnum):
    """Plugin states and their exit codes."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


class RangeError(TgopsError):
    def __init__(self, text: str) -> None:
        super().__init__(
            f"{text!r} is not a Nagios threshold range (e.g. 10, 10:, ~:10, 10:20, @10:20)"
        )


class CheckError(TgopsError):
    """The check cannot give an answer (reported as UNKNOWN with this message)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Range:
    """A threshold range of the monitoring-plugins guidelines.

    ``N`` alerts outside 0..N (so above N), ``N:`` below N, ``~:N`` above N, ``M:N``
    outside M..N, and a leading ``@`` inverts: alert inside M..N.
    """

    text: str
    low: float
    high: float
    inside: bool = False

    @classmethod
    def parse(cls, text: str) -> Range:
        spec = text.strip()
        inside = spec.startswith("@")
        spec = spec.removeprefix("@")
        if not spec:
            raise RangeError(text)
        low_text, colon, high_text = spec.partition(":")
        if not colon:
            low_text, high_text = "0", spec
        try:
            low = -math.inf if low_text == "~" else float(low_text or "0")
            high = math.inf if not high_text else float(high_text)
        except ValueError as exc:
            raise RangeError(text) from exc
        if math.isnan(low) or math.isnan(high) or low > high:
            raise RangeError(text)
        return cls(text=text.strip(), low=low, high=high, inside=inside)

    def alerts(self, value: float) -> bool:
        within = self.low <= value <= self.high
        return within if self.inside else not within


def _one_line(value: str | None, limit: int = MAX_TEXT) -> str:
    """Store text made safe for plugin output: one line, no ``|``, bounded length."""
    flat = " ".join((value or "").split()).replace("|", "/")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


# -- reading the store --------------------------------------------------------------------


# -- the check ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SavedManifest:
    manifest: Manifest
    saved_at: datetime | None


def saved_manifest(value: Any) -> SavedManifest | None:
    """The manifest ``Engine.remember_manifest`` stored, or None when absent or unreadable."""
    if not isinstance(value, Mapping) or "manifest" not in value:
        return None
    try:
        manifest = Manifest.model_validate(value["manifest"])
    except ValidationError:
        return None
    saved_at = None
    if isinstance(value.get("saved_at"), str):
        try:
            saved_at = datetime.fromisoformat(value["saved_at"])
        except ValueError:
            saved_at = None
    return SavedManifest(manifest=manifest, saved_at=saved_at)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodePending:
    updates: tuple[str, ...]
    hotfixes: tuple[str, ...]


def node_pending(
    record: NodeRecord,
    manifest: Manifest | None,
    *,
    selected: Sequence[str],
    always_hotfixes: bool,
) -> NodePending:
    """Pending package names of a node: from the manifest, plus staged but not installed."""
    updates: set[str] = set()
    hotfixes: set[str] = set()
    if manifest is not None:
        for entry in pending_packages(
            manifest,
            record.installed,
            selected_hotfixes=selected,
            always_hotfixes=always_hotfixes,
            requested_optional=record.optional_packages,
        ):
            (hotfixes if entry.kind is PackageKind.HOTFIX else updates).add(entry.name)
    for name, version in record.staged.items():
        if name not in hotfixes and is_newer(version, record.installed.get(name)):
            updates.add(name)
    return NodePending(updates=tuple(sorted(updates)), hotfixes=tuple(sorted(hotfixes)))


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckResult:
    state: State
    summary: str
    details: tuple[str, ...] = ()
    perfdata: tuple[str, ...] = ()

    def output(self) -> str:
        """Plugin output: the status line with the perfdata, then one line per detail."""
        line = f"{PREFIX} {self.state.name} - {_one_line(self.summary, 1000)}"
        if self.perfdata:
            line += " | " + " ".join(self.perfdata)
        return "\n".join([line, *(_one_line(d, 1000) for d in self.details)]) + "\n"


def unknown(reason: str) -> CheckResult:
    return CheckResult(state=State.UNKNOWN, summary=reason)


def perf(
    label: str,
    value: int,
    *,
    warn: str = "",
    crit: str = "",
    low: int | None = 0,
    high: int | None = None,
) -> str:
    """``label=value;warn;crit;min;max`` (trailing empty fields dropped)."""
    fields = [str(value), warn, crit, "" if low is None else str(low)]
    fields.append("" if high is None else str(high))
    return f"{label}=" + ";".join(fields).rstrip(";")


@dataclass(slots=True)
class _Findings:
    locked: list[str] = field(default_factory=list)
    flagged: list[str] = field(default_factory=list)
    restart: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)


def resolve_nodes(settings: Settings, target: str | None) -> list[str]:
    """Configured node names of ``target`` (a node, a cluster, ``all``; None = all)."""
    names = [n.name for n in settings.nodes]
    if not names:
        raise CheckError("no [[nodes]] are configured; nothing to check")
    if target is None or target == "all":
        return names
    if target in names:
        return [target]
    members = [n.name for n in settings.nodes if n.cluster == target]
    if members:
        return members
    known = ", ".join([*settings.clusters, *names][:20])
    raise CheckError(f"{target!r} is neither a configured node nor a cluster (known: {known})")


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """How old the service's signs of life and an urgent hotfix may be."""

    max_age: float = DEFAULT_MAX_AGE
    """Seconds (``--max-age``) the leader's heartbeat may be old before CRITICAL."""
    urgent_max_age: float = DEFAULT_URGENT_MAX_AGE
    """Seconds (``--urgent-max-age``) an urgent hotfix may be pending before CRITICAL."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreView:
    """What the check reads from the store."""

    records: Mapping[str, NodeRecord]
    selected: Mapping[str, Sequence[str]]
    saved: SavedManifest | None
    heartbeat: Heartbeat | None = None
    polled: datetime | None = None
    """Last successful fetch of ``updates.channel``'s manifest."""
    first_seen: Mapping[str, datetime] = field(default_factory=dict)
    """Hotfix id → when the service first saw it (for the urgent ones of the manifest)."""
    manifest_problems: Mapping[str, str] = field(default_factory=dict)
    """Channel → why its manifest is refused (rollback, expired), while it is."""
    now: datetime = field(default_factory=lambda: datetime.now(UTC))


async def read_store(settings: Settings, names: Sequence[str], *, limit: float) -> StoreView:
    """The nodes, hotfix selections, saved manifest and signs of life, read-only."""
    channel = settings.updates.channel
    async with ReadOnlyStore(settings.database_url, connect_timeout=limit) as store:
        records = {r.name: r for r in await store.nodes(names)}
        selected = await store.selected_hotfixes()
        saved = saved_manifest(await store.kv_get(MANIFESTS_KV, channel))
        heartbeat = await read_heartbeat(store)
        polled = parse_poll(await store.kv_get(MANIFEST_POLLS_KV, channel))
        urgent = [] if saved is None else _urgent_ids(saved.manifest)
        first_seen = await store.announced_at(urgent)
        problems = {
            str(channel): str(problem.get("reason", ""))
            for channel, problem in (await store.kv_items(MANIFEST_PROBLEMS_KV)).items()
            if isinstance(problem, dict)
        }
    return StoreView(
        manifest_problems=problems,
        records=records,
        selected=selected,
        saved=saved,
        heartbeat=heartbeat,
        polled=polled,
        first_seen=first_seen,
    )


def _urgent_ids(manifest: Manifest) -> list[str]:
    return [e.id for e in manifest.hotfixes() if e.id and e.urgency == "urgent"]


async def check_versions(
    settings: Settings,
    *,
    target: str | None = None,
    warning: Range | None = None,
    critical: Range | None = None,
    limit: float = DEFAULT_TIMEOUT,
    limits: Limits | None = None,
    verbosity: int = 0,
) -> CheckResult:
    """Run the check within ``limit`` seconds; a failure to answer is an UNKNOWN result."""
    try:
        async with asyncio.timeout(limit):
            names = resolve_nodes(settings, target)
            view = await read_store(settings, names, limit=limit)
    except TimeoutError:
        return unknown(f"no answer within {limit:g}s (-t); is the database overloaded?")
    except (CheckError, StoreUnreadableError) as exc:
        return unknown(str(exc))
    except (StoreError, SQLAlchemyError, OSError) as exc:
        shown = make_url(settings.database_url).render_as_string(hide_password=True)
        return unknown(str(StoreUnreadableError(shown, _one_line(error_cause(exc)))))
    missing = [n for n in names if n not in view.records]
    if missing:
        return unknown(
            f"node {', '.join(missing)} is configured but not in the store; start "
            "`tgops serve` once with this configuration so that it registers the node"
        )
    return evaluate(
        settings,
        names,
        view,
        warning=warning,
        critical=critical,
        limits=limits or Limits(),
        verbosity=verbosity,
    )


def _node_problems(record: NodeRecord, found: _Findings, settings: Settings) -> None:
    tz = settings.tz
    name = record.name
    problems: list[str] = []
    if record.update_lock_since is not None:
        found.locked.append(name)
        problems.append(
            f"update lock since {local_text(record.update_lock_since, tz)}: "
            f"{_one_line(record.update_lock_reason)}"
        )
    if record.warning_flag_since is not None:
        found.flagged.append(name)
        problems.append(
            f"Update download failed (warning flag since "
            f"{local_text(record.warning_flag_since, tz)}): "
            f"{_one_line(record.warning_flag_reason)}"
        )
    if record.restart_required:
        found.restart.append(name)
        problems.append(f"restart required (core update installed; `restart {name}`)")
    if not record.reachable:
        found.unreachable.append(name)
        problems.append(f"unreachable: {_one_line(record.last_error) or 'no answer'}")
    if problems:
        worst = State.CRITICAL if record.update_lock_since is not None else State.WARNING
        found.details.append(f"{name}: {worst.name}: " + "; ".join(problems))


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def _age(seconds: float) -> str:
    return format_duration(max(0, round(seconds)))


@dataclass(slots=True)
class _Verdict:
    """The state and the status-line parts, worst kinds first."""

    state: State = State.OK
    critical: list[str] = field(default_factory=list)
    warning: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    perfdata: list[str] = field(default_factory=list)

    def raise_to(self, state: State, part: str) -> None:
        self.state = max(self.state, state)
        (self.critical if state is State.CRITICAL else self.warning).append(part)


def _service(view: StoreView, limits: Limits, verdict: _Verdict, verbosity: int) -> None:
    """The leader's heartbeat: CRITICAL when missing or older than ``--max-age``."""
    beat = view.heartbeat
    if beat is None:
        verdict.raise_to(
            State.CRITICAL,
            "tgops service not running: no heartbeat in the store (has `tgops serve` of "
            "this version run with this database_url?)",
        )
        return
    age = (view.now - beat.at).total_seconds()
    if age > limits.max_age:
        verdict.raise_to(
            State.CRITICAL,
            f"tgops service not running: last heartbeat {_age(age)} ago "
            f"(--max-age {_age(limits.max_age)})",
        )
    elif verbosity >= 1:
        verdict.details.append(
            f"service: instance {beat.instance} leads, heartbeat {_age(age)} ago"
        )
    verdict.perfdata.append(
        perf("heartbeat_age_seconds", max(0, round(age)), crit=f"{limits.max_age:g}")
    )


def _manifest_polls(settings: Settings, view: StoreView, verdict: _Verdict, verbosity: int) -> None:
    """CRITICAL when the channel's manifest was last fetched over 3 poll intervals ago."""
    updates = settings.updates
    channel = updates.channel
    if updates.poll_interval <= 0 or (updates.public_key is None and not updates.public_key_file):
        if verbosity >= 1:
            verdict.details.append(
                f"manifest: not polled (updates.poll_interval is 0 or no public key): "
                f"the age of channel {channel}'s manifest is not checked"
            )
        return
    limit = MANIFEST_POLLS_ALLOWED * updates.poll_interval
    if view.polled is None:
        verdict.raise_to(
            State.CRITICAL,
            f"manifest of channel {channel} never fetched successfully "
            f"(the service fetches it every {_age(updates.poll_interval)})",
        )
        return
    age = (view.now - view.polled).total_seconds()
    if age > limit:
        verdict.raise_to(
            State.CRITICAL,
            f"manifest of channel {channel} not fetched for {_age(age)} "
            f"(more than {MANIFEST_POLLS_ALLOWED} x updates.poll_interval "
            f"{_age(updates.poll_interval)}); is the update repository reachable?",
        )
    elif verbosity >= 1:
        verdict.details.append(f"manifest: channel {channel} fetched {_age(age)} ago")
    verdict.perfdata.append(perf("manifest_age_seconds", max(0, round(age)), crit=f"{limit:g}"))


def _urgent(
    settings: Settings,
    names: Sequence[str],
    view: StoreView,
    limits: Limits,
    verdict: _Verdict,
) -> None:
    """Urgent hotfixes of the manifest not installed: WARNING, CRITICAL once older than
    ``--urgent-max-age`` (counted from when the service first saw them)."""
    if view.saved is None:
        return
    missing: dict[str, list[str]] = {}
    for name in names:
        for entry in hotfixes_missing(view.saved.manifest, view.records[name].installed):
            if entry.urgency == "urgent" and entry.id:
                missing.setdefault(entry.id, []).append(name)
    oldest = 0.0
    overdue: list[str] = []
    due: list[str] = []
    for hotfix_id, nodes in sorted(missing.items()):
        seen = view.first_seen.get(hotfix_id) or view.saved.saved_at or view.now
        age = max(0.0, (view.now - seen).total_seconds())
        oldest = max(oldest, age)
        text = f"{hotfix_id} on {', '.join(nodes)}"
        (overdue if age > limits.urgent_max_age else due).append(text)
        verdict.details.append(
            f"urgent hotfix {hotfix_id}: not installed on {', '.join(nodes)}; published "
            f"{_age(age)} ago (first seen {local_text(seen, settings.tz)})"
        )
    if overdue:
        verdict.raise_to(
            State.CRITICAL,
            f"urgent hotfix pending over {_age(limits.urgent_max_age)}: {'; '.join(overdue)}",
        )
    if due:
        verdict.raise_to(State.WARNING, f"urgent hotfix pending: {'; '.join(due)}")
    verdict.perfdata.append(perf("urgent_hotfixes_pending", len(missing), warn="0"))
    verdict.perfdata.append(
        perf("urgent_hotfix_age_seconds", round(oldest), crit=f"{limits.urgent_max_age:g}")
    )


def evaluate(
    settings: Settings,
    names: Sequence[str],
    view: StoreView,
    *,
    warning: Range | None,
    critical: Range | None,
    limits: Limits | None = None,
    verbosity: int = 0,
) -> CheckResult:
    """The plugin result for ``names`` from what was read.

    ``verbosity`` (``-v``, monitoring-plugins guidelines): 0 the status line and a line per
    problem; 1 also what is fine (service, manifest, each node); 2 also the settings the
    check used; 3 also the packages pending per node.
    """
    limits = limits or Limits()
    found = _Findings()
    pending_updates = pending_hotfixes = 0
    manifest = view.saved.manifest if view.saved else None
    per_node: list[str] = []
    for name in names:
        record = view.records[name]
        always = record.hotfixes_always
        if always is None:
            always = settings.updates.always_install_hotfixes
        pending = node_pending(
            record, manifest, selected=view.selected.get(name, []), always_hotfixes=always
        )
        pending_updates += len(pending.updates)
        pending_hotfixes += len(pending.hotfixes)
        _node_problems(record, found, settings)
        if verbosity >= 3:
            per_node.append(
                f"{name}: updates {', '.join(pending.updates) or '-'}; "
                f"hotfixes {', '.join(pending.hotfixes) or '-'}"
            )

    verdict = _Verdict()
    _service(view, limits, verdict, verbosity)
    _manifest_polls(settings, view, verdict, verbosity)
    for channel, reason in sorted(view.manifest_problems.items()):
        verdict.raise_to(
            State.WARNING, _one_line(f"manifest of channel {channel} refused: {reason}")
        )
    if found.locked:
        verdict.raise_to(State.CRITICAL, f"update lock: {', '.join(found.locked)}")
    _urgent(settings, names, view, limits, verdict)
    if found.flagged:
        verdict.raise_to(State.WARNING, f"Update download failed: {', '.join(found.flagged)}")
    if found.restart:
        verdict.raise_to(State.WARNING, f"restart required: {', '.join(found.restart)}")
    if found.unreachable:
        verdict.raise_to(State.WARNING, f"unreachable: {', '.join(found.unreachable)}")
    if critical is not None and critical.alerts(pending_updates):
        verdict.raise_to(
            State.CRITICAL, f"pending updates {pending_updates} (critical: {critical.text})"
        )
    elif warning is not None and warning.alerts(pending_updates):
        verdict.raise_to(
            State.WARNING, f"pending updates {pending_updates} (warning: {warning.text})"
        )
    count = len(names)
    parts = [*verdict.critical, *verdict.warning]
    parts.append(
        f"{_plural(count, 'node')}, {_plural(pending_updates, 'pending update')}, "
        f"{_plural(pending_hotfixes, 'pending hotfix', 'pending hotfixes')}"
    )
    channel = settings.updates.channel
    details = [*found.details, *verdict.details]
    if view.saved is None:
        details.append(
            f"note: no verified manifest of channel {channel} is in the store yet; pending "
            "counts only packages downloaded but not installed (the service saves the "
            "manifest when it next downloads or updates)"
        )
    else:
        saved_at = view.saved.saved_at
        when = f" at {local_text(saved_at, settings.tz)}" if saved_at else ""
        details.append(
            f"pending as of channel {channel}'s manifest generated "
            f"{view.saved.manifest.generated_at}, saved{when}"
        )
    if verbosity >= 2:
        shown = make_url(settings.database_url).render_as_string(hide_password=True)
        details.append(
            f"settings: store {shown}; --max-age {_age(limits.max_age)}; --urgent-max-age "
            f"{_age(limits.urgent_max_age)}; -w {warning.text if warning else '-'}; "
            f"-c {critical.text if critical else '-'}; updates.poll_interval "
            f"{_age(settings.updates.poll_interval)}"
        )
    details.extend(per_node)
    perfdata = (
        perf(
            "pending_updates",
            pending_updates,
            warn=warning.text if warning else "",
            crit=critical.text if critical else "",
        ),
        perf("pending_hotfixes", pending_hotfixes),
        perf("nodes_warning_flag", len(found.flagged), warn="0", high=count),
        perf("nodes_locked", len(found.locked), crit="0", high=count),
        perf("nodes_restart_required", len(found.restart), warn="0", high=count),
        perf("nodes_unreachable", len(found.unreachable), warn="0", high=count),
        *verdict.perfdata,
    )
    return CheckResult(
        state=verdict.state, summary="; ".join(parts), details=tuple(details), perfdata=perfdata
    )
