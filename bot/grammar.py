"""The `/tg` command language: one parser for Slack, the HTTP API and the CLI.

The grammar is a table of ``Spec`` rows; ``help`` is generated from it. ``parse`` never
raises: it returns a ``Command`` or a ``ParseError`` whose text names the bad word and
shows the usage line.

It is over 600 lines on purpose: the whole ``/tg`` language (every command's words,
options, roles and help) is one parser, so that the help and the parser cannot drift.
"""

from __future__ import annotations

import difflib
import re
import shlex
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import Any

from core.model import Role
from core.printable import printable


@dataclass(frozen=True, slots=True, kw_only=True)
class Spec:
    name: str
    usage: str
    summary: str
    role: Role
    flags: frozenset[str] = frozenset()


IGNORE_ALERTS = "--ignore-alerts"
"""Runs pass the gate (``core.lifecycle.hold``): listed apart in messages, as an override."""

SPECS: tuple[Spec, ...] = (
    Spec(
        name="help",
        usage="help [COMMAND]",
        summary="Show the commands you may run, or one in detail.",
        role=Role.VIEWER,
    ),
    Spec(
        name="status",
        usage="status [T]",
        summary="Fleet or node state: versions, pending updates, locks, flags, runs.",
        role=Role.VIEWER,
    ),
    Spec(
        name="nodes",
        usage="nodes",
        summary="List every node with its cluster and driver.",
        role=Role.VIEWER,
    ),
    Spec(
        name="plan",
        usage="plan [T]",
        summary="Timeline of the next scheduled runs and cluster slot waits.",
        role=Role.VIEWER,
    ),
    Spec(
        name="log",
        usage="log [T] [N] [--full]",
        summary="The last N (default 20) audit and lifecycle records; the contacts' "
        "addresses and numbers only for role update (--full insists on them).",
        role=Role.VIEWER,
        flags=frozenset({"--full"}),
    ),
    Spec(
        name="download",
        usage="download T",
        summary="Download pending updates and stage them on the node (L1).",
        role=Role.UPDATE,
    ),
    Spec(
        name="integrity",
        usage="integrity T",
        summary="Verify installed files against the packages' checksums (L10).",
        role=Role.UPDATE,
    ),
    Spec(
        name="auto-update",
        usage="auto-update T [--yes] [--ignore-alerts]",
        summary="Download if needed, end sessions, install, restart services, verify (L2); "
        "--ignore-alerts passes the gate (Prometheus alerts).",
        role=Role.UPDATE,
        flags=frozenset({"--yes", IGNORE_ALERTS}),
    ),
    Spec(
        name="restart",
        usage="restart T [--yes] [--ignore-alerts]",
        summary="Reboot the node (clears 'restart required'); --ignore-alerts passes the gate.",
        role=Role.UPDATE,
        flags=frozenset({"--yes", IGNORE_ALERTS}),
    ),
    Spec(
        name="maintenance",
        usage="maintenance",
        summary="List scheduled maintenance operations.",
        role=Role.MAINT,
    ),
    Spec(
        name="maintenance new",
        usage="maintenance new",
        summary="Open the maintenance form (Slack only).",
        role=Role.MAINT,
    ),
    Spec(
        name="maintenance schedule",
        usage="maintenance schedule T YYYY-MM-DD HH:MM[:SS] REASON… [--disable-logon]",
        summary="Schedule maintenance; users get the reason as notices beforehand (L3).",
        role=Role.MAINT,
        flags=frozenset({"--disable-logon"}),
    ),
    Spec(
        name="maintenance cancel",
        usage="maintenance cancel T",
        summary="End maintenance and tell the users.",
        role=Role.MAINT,
    ),
    Spec(
        name="logon",
        usage="logon disable|enable T",
        summary="Set or remove the logon lock.",
        role=Role.MAINT,
    ),
    Spec(
        name="schedule",
        usage="schedule",
        summary="List download and update schedules with their next run times.",
        role=Role.UPDATE,
    ),
    Spec(
        name="schedule download",
        usage=(
            "schedule download T on DAYS HH:MM[:SS] [until HH:MM[:SS]]  |  schedule download T off"
        ),
        summary="Time-controlled download (L4, L5).",
        role=Role.UPDATE,
    ),
    Spec(
        name="schedule update",
        usage="schedule update T on DAYS HH:MM[:SS]  |  schedule update T off",
        summary="Time-controlled update (L4).",
        role=Role.UPDATE,
    ),
    Spec(
        name="hotfixes",
        usage="hotfixes [T]",
        summary="List hotfixes: selected? installed? (L8)",
        role=Role.UPDATE,
    ),
    Spec(
        name="hotfixes select",
        usage="hotfixes select T ID…",
        summary="Select hotfixes for the next update.",
        role=Role.UPDATE,
    ),
    Spec(
        name="hotfixes unselect",
        usage="hotfixes unselect T ID…",
        summary="Unselect hotfixes.",
        role=Role.UPDATE,
    ),
    Spec(
        name="hotfixes always",
        usage="hotfixes always on|off [T]",
        summary="Always install every hotfix (for T, or the default).",
        role=Role.UPDATE,
    ),
    Spec(
        name="remove-lock",
        usage="remove-lock T [--cancel-schedule]",
        summary="Remove the update lock (L6).",
        role=Role.UPDATE,
        flags=frozenset({"--cancel-schedule"}),
    ),
    Spec(
        name="warning-flag clear",
        usage="warning-flag clear T",
        summary="Always refused: only a complete download clears the flag (L7).",
        role=Role.UPDATE,
    ),
    Spec(
        name="oldstable partial",
        usage="oldstable partial T PKG… [--yes]",
        summary="Install these packages at the oldstable versions (L9).",
        role=Role.UPDATE,
        flags=frozenset({"--yes"}),
    ),
    Spec(
        name="oldstable full",
        usage="oldstable full T [--yes]",
        summary="Bring every package to the oldstable versions (L9).",
        role=Role.UPDATE,
        flags=frozenset({"--yes"}),
    ),
    Spec(
        name="install",
        usage="install T PKG… [--yes]",
        summary="Install optional packages, e.g. iBus input-method modules (L9a).",
        role=Role.UPDATE,
        flags=frozenset({"--yes"}),
    ),
)

SPEC_BY_NAME = {spec.name: spec for spec in SPECS}
GROUPS = {"maintenance", "schedule", "hotfixes", "logon", "oldstable", "warning-flag"}
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
ALL_FLAGS = frozenset(f for spec in SPECS for f in spec.flags)
_TIME = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?$", re.ASCII)
_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$", re.ASCII)
_NUMBER = re.compile(r"^[0-9]+$")
_TARGET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+~-]{0,127}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    """A parsed command. Fields not used by a command keep their defaults."""

    name: str
    text: str
    target: str | None = None
    count: int | None = None
    start: datetime | None = None  # naive, in the configured time zone
    reason: str = ""
    days: tuple[int, ...] = ()  # 0 = Monday
    at: time | None = None
    until: time | None = None
    enabled: bool | None = None  # on/off, enable/disable
    ids: tuple[str, ...] = ()  # hotfix ids or package names
    topic: str | None = None  # help COMMAND
    flags: frozenset[str] = field(default_factory=frozenset)

    @property
    def spec(self) -> Spec:
        return SPEC_BY_NAME[self.name]

    @property
    def role(self) -> Role:
        return self.spec.role

    @property
    def yes(self) -> bool:
        return "--yes" in self.flags

    @property
    def ignore_alerts(self) -> bool:
        return IGNORE_ALERTS in self.flags


@dataclass(frozen=True, slots=True, kw_only=True)
class ParseError:
    message: str
    usage: str

    @property
    def text(self) -> str:
        return f"{self.message}\nUsage: {self.usage}"


class _Bad(Exception):
    def __init__(self, message: str, usage: str) -> None:
        super().__init__(message)
        self.message = message
        self.usage = usage


def _usage(name: str) -> str:
    if name in SPEC_BY_NAME:
        return SPEC_BY_NAME[name].usage
    return "  |  ".join(s.usage for s in SPECS if s.name.startswith(name + " "))


def _group_usage(head: str) -> str:
    return "  |  ".join(s.usage for s in SPECS if s.name.split()[0] == head)


def _heads() -> list[str]:
    return sorted({s.name.split()[0] for s in SPECS})


def _command_names() -> str:
    return ", ".join(_heads())


def _did_you_mean(word: str, choices: list[str]) -> str:
    """``; did you mean `status`?`` for a mistyped word close to one of ``choices``."""
    close = difflib.get_close_matches(word, choices, n=2, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(f"`{c}`" for c in close) + "?)"


def parse_time(word: str) -> time | None:
    match = _TIME.match(word)
    if match is None:
        return None
    hour, minute, second = int(match[1]), int(match[2]), int(match[3] or 0)
    if hour > 23 or minute > 59 or second > 59:
        return None
    return time(hour, minute, second)


def parse_date(word: str) -> date | None:
    match = _DATE.match(word)
    if match is None:
        return None
    try:
        return date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return None


def parse_days(word: str) -> tuple[int, ...] | None:
    """``daily``, ``mon-fri``, or a comma list of day names."""
    word = word.lower()
    if word == "daily":
        return tuple(range(7))
    if word == "mon-fri":
        return tuple(range(5))
    days: list[int] = []
    for part in word.split(","):
        if part not in DAY_NAMES:
            return None
        day = DAY_NAMES.index(part)
        if day in days:
            return None
        days.append(day)
    return tuple(sorted(days))


def format_days(days: tuple[int, ...]) -> str:
    if days == tuple(range(7)):
        return "daily"
    if days == tuple(range(5)):
        return "mon-fri"
    return ",".join(DAY_NAMES[d] for d in days)


class _Words:
    def __init__(self, words: list[str], name: str) -> None:
        self.words = words
        self.name = name

    def take(self, what: str) -> str:
        if not self.words:
            raise _Bad(f"missing {what}", _usage(self.name))
        return self.words.pop(0)

    def target(self) -> str:
        word = self.take("target T (a node, a cluster or 'all')")
        if not _TARGET.match(word):
            raise _Bad(f"{word!r} is not a node, cluster or 'all'", _usage(self.name))
        return word

    def optional_target(self) -> str | None:
        return self.target() if self.words else None

    def time(self, what: str) -> time:
        word = self.take(what)
        value = parse_time(word)
        if value is None:
            raise _Bad(f"{word!r} is not a time; write HH:MM or HH:MM:SS", _usage(self.name))
        return value

    def end(self) -> None:
        if self.words:
            raise _Bad(f"unexpected word {self.words[0]!r}", _usage(self.name))


def parse(text: str) -> Command | ParseError:
    """Parse one command line (with or without a leading ``/tg``)."""
    try:
        return _parse(text)
    except _Bad as bad:
        return ParseError(message=bad.message, usage=bad.usage)


def _split(text: str) -> tuple[str, list[str], set[str]]:
    """The command name, its words, and its options (each checked against the grammar)."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise _Bad(f"cannot read the command: {exc}", "help") from exc
    if words and words[0] in {"/tg", "tg"}:
        words = words[1:]
    if not words:
        raise _Bad("no command given; try `help`", "help [COMMAND]")
    head = words[0].lower()
    words = words[1:]
    name = head
    if head in GROUPS and words and f"{head} {words[0].lower()}" in SPEC_BY_NAME:
        name = f"{head} {words[0].lower()}"
        words = words[1:]
    if name not in SPEC_BY_NAME:
        if head in GROUPS:
            sub = words[0] if words else ""
            subs = [s.name.split()[1] for s in SPECS if s.name.startswith(head + " ")]
            raise _Bad(
                f"unknown {head} command {sub!r}{_did_you_mean(sub.lower(), subs)}"
                if sub
                else f"{head} needs a sub-command",
                _group_usage(head),
            )
        raise _Bad(
            f"unknown command {head!r}{_did_you_mean(head, _heads())}; commands: "
            f"{_command_names()}",
            "help [COMMAND]",
        )
    spec = SPEC_BY_NAME[name]
    flags: set[str] = set()
    rest: list[str] = []
    for word in words:
        if word.startswith("--"):
            if word not in spec.flags:
                accepted = ", ".join(sorted(spec.flags - {IGNORE_ALERTS})) or "none"
                gate = (
                    f"; {IGNORE_ALERTS} passes the gate (Prometheus alerts)"
                    if IGNORE_ALERTS in spec.flags
                    else ""
                )
                raise _Bad(f"unknown option {word!r} (accepted: {accepted}){gate}", spec.usage)
            if word in flags:
                raise _Bad(f"option {word} given twice", spec.usage)
            flags.add(word)
        else:
            rest.append(word)
    return name, rest, flags


def _parse(text: str) -> Command:
    name, rest, flags = _split(text)
    spec = SPEC_BY_NAME[name]
    w = _Words(rest, name)

    def make(**fields: Any) -> Command:
        return Command(name=name, text=text.strip(), flags=frozenset(flags), **fields)

    if name == "help":
        topic = " ".join(rest).lower() or None
        if (
            topic is not None
            and topic.removeprefix("/tg ") not in SPEC_BY_NAME
            and topic not in GROUPS
        ):
            names = sorted({s.name for s in SPECS} | GROUPS)
            raise _Bad(
                f"no command {topic!r}{_did_you_mean(topic, names)}; commands: {_command_names()}",
                spec.usage,
            )
        return make(topic=topic)
    if name in {"nodes", "maintenance", "maintenance new", "schedule"}:
        if rest and name in GROUPS:
            subs = [s.name.split()[1] for s in SPECS if s.name.startswith(name + " ")]
            raise _Bad(
                f"unknown {name} command {rest[0]!r}{_did_you_mean(rest[0].lower(), subs)}",
                _group_usage(name),
            )
        w.end()
        return make()
    if name in {"status", "plan", "hotfixes"}:
        if name == "hotfixes" and len(rest) > 1:
            _mistyped_sub(name, rest[0])
        target = w.optional_target()
        w.end()
        return make(target=target)
    if name == "log":
        return _parse_log(rest, make)
    if name in {"download", "integrity", "auto-update", "restart", "maintenance cancel",
                "remove-lock", "warning-flag clear", "oldstable full"}:  # fmt: skip
        target = w.target()
        w.end()
        return make(target=target)
    if name == "logon":
        action = w.take("disable or enable").lower()
        if action not in {"disable", "enable"}:
            raise _Bad(
                f"{action!r} is neither disable nor enable"
                f"{_did_you_mean(action, ['disable', 'enable'])}",
                spec.usage,
            )
        target = w.target()
        w.end()
        return make(target=target, enabled=action == "enable")
    if name == "maintenance schedule":
        return _parse_maintenance(w, make)
    if name in {"schedule download", "schedule update"}:
        return _parse_schedule(w, make)
    if name in {"hotfixes select", "hotfixes unselect", "oldstable partial", "install"}:
        target = w.target()
        what = "hotfix ID" if name.startswith("hotfixes") else "package name PKG"
        if not w.words:
            raise _Bad(f"missing {what}", spec.usage)
        ids: list[str] = []
        for word in w.words:
            if not _ID.match(word):
                raise _Bad(f"{word!r} is not a valid {what}", spec.usage)
            if word not in ids:
                ids.append(word)
        return make(target=target, ids=tuple(ids))
    if name == "hotfixes always":
        mode = w.take("on or off").lower()
        if mode not in {"on", "off"}:
            raise _Bad(f"{mode!r} is neither on nor off", spec.usage)
        target = w.optional_target()
        w.end()
        return make(target=target, enabled=mode == "on")
    raise _Bad(f"command {name!r} is not understood", spec.usage)  # pragma: no cover


def _mistyped_sub(head: str, word: str) -> None:
    """Refuse ``word`` when it looks like a mistyped sub-command of ``head``."""
    subs = [s.name.split()[1] for s in SPECS if s.name.startswith(head + " ")]
    hint = _did_you_mean(word.lower(), subs)
    if hint:
        raise _Bad(f"unknown {head} command {word!r}{hint}", _group_usage(head))


def _parse_maintenance(w: _Words, make: Any) -> Command:
    usage = _usage(w.name)
    target = w.target()
    day_word = w.take("date YYYY-MM-DD")
    day = parse_date(day_word)
    if day is None:
        raise _Bad(f"{day_word!r} is not a date; write YYYY-MM-DD", usage)
    at = w.time("time HH:MM[:SS]")
    reason = " ".join(printable(" ".join(w.words)).split())  # for terminals: no escapes
    if not reason:
        raise _Bad("missing REASON (shown to the users)", usage)
    if len(reason) > 500:
        raise _Bad("REASON is longer than 500 characters", usage)
    result: Command = make(target=target, start=datetime.combine(day, at), reason=reason)
    return result


def _parse_schedule(w: _Words, make: Any) -> Command:
    usage = _usage(w.name)
    target = w.target()
    mode = w.take("on or off").lower()
    if mode == "off":
        w.end()
        off: Command = make(target=target, enabled=False)
        return off
    if mode != "on":
        raise _Bad(f"{mode!r} is neither on nor off", usage)
    days_word = w.take("DAYS (daily, mon-fri, or e.g. mon,wed,fri)")
    days = parse_days(days_word)
    if days is None:
        raise _Bad(
            f"{days_word!r} is not DAYS; write daily, mon-fri, or a comma list of "
            "mon tue wed thu fri sat sun",
            usage,
        )
    at = w.time("time HH:MM[:SS]")
    until = None
    if w.name == "schedule download" and w.words:
        if w.take("until").lower() != "until":
            raise _Bad("expected 'until HH:MM[:SS]'", usage)
        until = w.time("end time HH:MM[:SS]")
        if until == at:
            raise _Bad("the end time equals the start time", usage)
    w.end()
    result: Command = make(target=target, enabled=True, days=days, at=at, until=until)
    return result


def _parse_log(rest: list[str], make: Any) -> Command:
    usage = SPEC_BY_NAME["log"].usage
    target: str | None = None
    count: int | None = None
    for word in rest[:2]:
        if _NUMBER.match(word) and count is None:
            count = int(word) if len(word) <= 5 else 0
            if not 1 <= count <= 1000:
                raise _Bad("N must be between 1 and 1000", usage)
        elif target is None and count is None and _TARGET.match(word):
            target = word
        else:
            raise _Bad(f"unexpected word {word!r}", usage)
    if len(rest) > 2:
        raise _Bad(f"unexpected word {rest[2]!r}", usage)
    result: Command = make(target=target, count=count)
    return result


def allowed(role_set: frozenset[Role], needed: Role) -> bool:
    """L11: ``maint`` and ``update`` include ``viewer``."""
    if needed is Role.VIEWER:
        return bool(role_set)
    return needed in role_set


def help_text(roles: frozenset[Role], topic: str | None = None) -> str:
    """Help generated from the grammar, showing only what these roles may run."""
    if topic:
        topic = topic.removeprefix("/tg ").lower()
        specs = [s for s in SPECS if s.name == topic or s.name.startswith(topic + " ")]
        lines = []
        for spec in specs:
            mark = "" if allowed(roles, spec.role) else f"  (needs role {spec.role})"
            lines.append(f"/tg {spec.usage}\n    {spec.summary}{mark}")
        if topic in {"schedule", "schedule download", "schedule update"}:
            lines.append("DAYS: daily, mon-fri, or a comma list of mon tue wed thu fri sat sun.")
        lines.append("T is a node name, a cluster name, or all.")
        return "\n".join(lines)
    mine = [s for s in SPECS if allowed(roles, s.role)]
    if not mine:
        return "You have no role in tgops; ask an administrator for viewer, maint or update."
    width = max(len(s.usage.split("  |")[0]) for s in mine)
    body = "\n".join(f"/tg {s.usage.split('  |')[0]:<{width}}  {s.summary}" for s in mine)
    return f"{body}\nT is a node name, a cluster name, or all. `help COMMAND` for details."
