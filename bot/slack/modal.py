"""The ``maintenance new`` form: the modal, and its submission checked into a `/tg` command.

The form offers the configured targets (all, clusters, nodes), a date, a time, the reason
and "disable logon". A valid submission becomes ``maintenance schedule T DATE TIME 'REASON'
[--disable-logon]`` for the shared parser; invalid input is answered with Slack's
``response_action: errors`` next to the field.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from datetime import date, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

from bot.grammar import parse_date, parse_time
from bot.slack.blocks import plain
from core.errors import TgopsError
from core.localtime import to_utc, zoned_text
from core.settings import Settings

CALLBACK = "tg_maintenance"
TARGET = "target"
DATE = "date"
TIME = "time"
REASON = "reason"
OPTIONS = "options"
DISABLE_LOGON = "disable_logon"
MAX_OPTIONS = 100  # Slack: options per group, and groups per select
MAX_REASON = 500  # the grammar's limit


def _option(value: str, label: str) -> dict[str, Any]:
    return {"text": plain(label), "value": value}


def target_groups(settings: Settings) -> list[dict[str, Any]]:
    """Option groups: the fleet, its clusters, its nodes (in groups of 100)."""
    groups = [{"label": plain("Fleet"), "options": [_option("all", "all (every node)")]}]
    clusters = [_option(name, f"cluster {name}") for name in list(settings.clusters)[:MAX_OPTIONS]]
    if clusters:
        groups.append({"label": plain("Clusters"), "options": clusters})
    nodes = [
        _option(n.name, f"{n.name} ({'cluster ' + n.cluster if n.cluster else 'single system'})")
        for n in settings.nodes
    ]
    for start in range(0, len(nodes), MAX_OPTIONS):
        if len(groups) >= MAX_OPTIONS:
            break
        end = min(start + MAX_OPTIONS, len(nodes))
        label = "Nodes" if len(nodes) <= MAX_OPTIONS else f"Nodes {start + 1} to {end}"
        groups.append({"label": plain(label), "options": nodes[start : start + MAX_OPTIONS]})
    return groups


def _input(block_id: str, label: str, element: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "type": "input",
        "block_id": block_id,
        "label": plain(label, 2000),
        "element": element,
        **extra,
    }


def maintenance_view(
    settings: Settings, *, metadata: dict[str, Any], today: date
) -> dict[str, Any]:
    """The modal opened by `/tg maintenance new`."""
    return {
        "type": "modal",
        "callback_id": CALLBACK,
        "private_metadata": json.dumps(metadata),
        "title": plain("Schedule maintenance", 24),
        "submit": plain("Schedule", 24),
        "close": plain("Cancel", 24),
        "blocks": [
            _input(
                TARGET,
                "Node, cluster or all",
                {
                    "type": "static_select",
                    "action_id": TARGET,
                    "placeholder": plain("Choose a target"),
                    "option_groups": target_groups(settings),
                },
            ),
            _input(
                DATE,
                "Date",
                {"type": "datepicker", "action_id": DATE, "initial_date": today.isoformat()},
            ),
            _input(
                TIME,
                f"Time ({settings.timezone})",
                {"type": "timepicker", "action_id": TIME, "initial_time": "22:00"},
            ),
            _input(
                REASON,
                "Reason (shown to the logged-in users)",
                {
                    "type": "plain_text_input",
                    "action_id": REASON,
                    "multiline": True,
                    "max_length": MAX_REASON,
                    "placeholder": plain("e.g. Kernel update, about 30 minutes"),
                },
            ),
            _input(
                OPTIONS,
                "Options",
                {
                    "type": "checkboxes",
                    "action_id": DISABLE_LOGON,
                    "options": [
                        {
                            "text": plain("Disable logon at the start"),
                            "description": plain(
                                "Useful for cluster nodes: new users go to the other nodes.",
                                150,
                            ),
                            "value": DISABLE_LOGON,
                        }
                    ],
                },
                optional=True,
            ),
        ],
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class MaintenanceForm:
    """A submission that passed the form's own checks."""

    target: str
    start: datetime  # naive, in the configured time zone
    reason: str
    disable_logon: bool

    def command(self) -> str:
        """The `/tg` command, with the reason quoted as one word for the shared parser."""
        flag = " --disable-logon" if self.disable_logon else ""
        when = self.start.strftime("%Y-%m-%d %H:%M:%S" if self.start.second else "%Y-%m-%d %H:%M")
        return f"maintenance schedule {self.target} {when} {shlex.quote(self.reason)}{flag}"


def _value(values: dict[str, Any], block: str, action: str) -> dict[str, Any]:
    found = values.get(block, {}).get(action)
    return found if isinstance(found, dict) else {}


def read_submission(
    values: dict[str, Any], *, tz: ZoneInfo, now: datetime
) -> MaintenanceForm | dict[str, str]:
    """The form's values as a ``MaintenanceForm``, or errors per block id."""
    errors: dict[str, str] = {}
    selected = _value(values, TARGET, TARGET).get("selected_option") or {}
    target = str(selected.get("value") or "")
    if not target:
        errors[TARGET] = "Choose a node, a cluster or all."
    day: date | None = parse_date(str(_value(values, DATE, DATE).get("selected_date") or ""))
    if day is None:
        errors[DATE] = "Choose a date."
    at: time | None = parse_time(str(_value(values, TIME, TIME).get("selected_time") or ""))
    if at is None:
        errors[TIME] = "Choose a time."
    reason = " ".join(str(_value(values, REASON, REASON).get("value") or "").split())
    if not reason:
        errors[REASON] = "Say why: the logged-in users are shown this reason."
    elif reason.startswith("--"):
        errors[REASON] = "The reason must not start with --."
    elif len(reason) > MAX_REASON:
        errors[REASON] = f"At most {MAX_REASON} characters."
    checked = _value(values, OPTIONS, DISABLE_LOGON).get("selected_options") or []
    disable_logon = any(o.get("value") == DISABLE_LOGON for o in checked)
    if day is not None and at is not None:
        start = datetime.combine(day, at)
        try:
            past = to_utc(start, tz) <= now
        except TgopsError as exc:  # a time the clocks skip (daylight saving)
            errors[TIME] = str(exc)[:150]
        else:
            if past:
                field = DATE if day < now.astimezone(tz).date() else TIME
                errors[field] = (
                    f"This lies in the past (now {zoned_text(now, tz)}); choose a later time."
                )
    if errors:
        return errors
    assert day is not None
    assert at is not None
    return MaintenanceForm(
        target=target,
        start=datetime.combine(day, at),
        reason=reason,
        disable_logon=disable_logon,
    )
