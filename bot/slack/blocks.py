"""Block Kit rendering of replies, alert headers, confirmations and run progress.

Pure functions from values to Slack message payloads (``{"text": …, "blocks": […]}``);
nothing here talks to Slack. Limits respected: 3000 characters per section text, 50
blocks per message, 75 characters per button label, 300 per confirm-dialog text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SECTION_LIMIT = 2900
MAX_BODY_SECTIONS = 40
CONFIRM_ACTION = "tg_confirm"

Block = dict[str, Any]

_SLACK_ID = re.compile(r"^[UW][A-Z0-9]{2,}$")
_MAINT = re.compile(r"^-- Maintenance (\S+) at (\d{4}-\d\d-\d\d [\d:]+): (.*)$", re.DOTALL)


def escape(text: str) -> str:
    """Slack's three control characters in message text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def who(actor: str) -> str:
    """A Slack user ID as a mention; any other actor (token, scheduler) as plain text."""
    return f"<@{actor}>" if _SLACK_ID.match(actor) else escape(actor)


def plain(text: str, limit: int = 75) -> dict[str, Any]:
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return {"type": "plain_text", "text": text, "emoji": True}


def mrkdwn_section(text: str) -> Block:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}}


def context(text: str) -> Block:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": text[:3000]}]}


DIVIDER: Block = {"type": "divider"}


# -- the status header ---------------------------------------------------------------------


def alert_line(line: str) -> str:
    """One line of ``alert_header`` as Slack mrkdwn.

    Slack cannot colour text. "Restart required" is shown "in red" (L2) by a red
    circle emoji in front of bold text; the other alerts get their own emoji, also bold.
    """
    if line.startswith("!! "):
        title, _, rest = line[3:].partition(": ")
        emoji = {
            "Restart required": ":red_circle:",  # the red of the status header (no red text)
            "Update lock set": ":lock:",
            "Update download error": ":warning:",
            "Update held": ":pause_button:",
        }.get(title, ":rotating_light:")
        return f"{emoji} *{escape(title)}:* {escape(rest)}"
    match = _MAINT.match(line)
    if match is not None:
        node, when, reason = match.groups()  # when: local time (``alert_header``)
        return f":calendar: *Maintenance* {escape(node)} at {when}: {escape(reason)}"
    return escape(line)


def header_blocks(alerts: Sequence[str] | None) -> list[Block]:
    """The status header every reply begins with: the fleet's alerts, or that there are none."""
    if alerts is None:
        return [context(":grey_question: Fleet alerts are not available right now.")]
    if not alerts:
        return [context(":large_green_circle: No alerts: no download errors, locks or restarts.")]
    return [mrkdwn_section("\n".join(alert_line(a) for a in alerts))]


def header_text(alerts: Sequence[str] | None) -> str:
    """The header as notification text (what a phone shows)."""
    if not alerts:
        return ""
    return escape(" | ".join(a.removeprefix("!! ").removeprefix("-- ") for a in alerts)) + "\n"


# -- replies ---------------------------------------------------------------------------------


_ESCAPED_SIZE = {"&": 5, "<": 4, ">": 4}
"""Characters ``escape`` lengthens, and their length once escaped."""


def _size(text: str, escaped: bool) -> int:
    if not escaped:
        return len(text)
    return len(text) + sum(text.count(c) * (n - 1) for c, n in _ESCAPED_SIZE.items())


def _fitting(line: str, limit: int, escaped: bool) -> int:
    """How many characters of ``line`` fit into ``limit`` (measured escaped if asked)."""
    if not escaped:
        return min(len(line), limit)
    used = 0
    for index, char in enumerate(line):
        used += _ESCAPED_SIZE.get(char, 1)
        if used > limit:
            return index
    return len(line)


def chunks(text: str, limit: int = SECTION_LIMIT, *, escaped: bool = False) -> list[str]:
    """Split at line ends into pieces of at most ``limit`` characters; with ``escaped``
    the pieces are plain text measured as they will be once escaped, so that each piece
    is escaped after the split and no escape (``&amp;``) is ever cut in two."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for whole in text.splitlines() or [""]:
        line = whole
        while _size(line, escaped) > limit:
            if current:
                pieces.append("\n".join(current))
                current, size = [], 0
            cut = max(1, _fitting(line, limit, escaped))
            pieces.append(line[:cut])
            line = line[cut:]
        length = _size(line, escaped)
        if size + length + 1 > limit and current:
            pieces.append("\n".join(current))
            current, size = [], 0
        current.append(line)
        size += length + 1
    if current:
        pieces.append("\n".join(current))
    return pieces


def escaped_within(text: str, limit: int) -> str:
    """``escape`` of the longest start of ``text`` that fits into ``limit`` once escaped."""
    return escape(text[: _fitting(text, limit, escaped=True)])


def body_blocks(
    text: str, *, preformatted: bool, prefix: str = "", mrkdwn: bool = False
) -> list[Block]:
    """Reply text as sections; tables as code blocks, sentences as mrkdwn.

    ``mrkdwn``: the text is Slack markup already (mentions, escaped parts), not plain text.
    """
    limit = SECTION_LIMIT - len(prefix) - 8
    if mrkdwn:
        pieces = chunks(text, limit)
    else:  # split first, then escape each piece
        plain_text = text.replace("```", "'''")
        pieces = [escape(p) for p in chunks(plain_text, limit, escaped=True)]
    blocks = []
    for i, piece in enumerate(pieces[:MAX_BODY_SECTIONS]):
        shown = f"```{piece}```" if preformatted else piece
        blocks.append(mrkdwn_section((prefix if i == 0 else "") + shown))
    if len(pieces) > MAX_BODY_SECTIONS:
        cut = sum(p.count("\n") + 1 for p in pieces[MAX_BODY_SECTIONS:])
        blocks.append(context(f"… {cut} more lines not shown; narrow it down with a target T."))
    return blocks


@dataclass(frozen=True, slots=True, kw_only=True)
class Shown:
    """How a reply appears: its text, whether it is a table, and whether it was refused.

    ``mrkdwn``: the text is Slack markup already (written by the bot, with mentions);
    otherwise it is plain text (a command's reply) and escaped.
    """

    text: str
    ok: bool
    preformatted: bool
    mrkdwn: bool = False


def reply_message(
    shown: Shown, alerts: Sequence[str] | None, *, header: bool = True
) -> dict[str, Any]:
    """A reply: the status header (not for users without any role), then the text."""
    prefix = "" if shown.ok else ":no_entry: "
    head = [*header_blocks(alerts), DIVIDER] if header else []
    blocks = [
        *head,
        *body_blocks(
            shown.text,
            preformatted=shown.preformatted and shown.ok,
            prefix=prefix,
            mrkdwn=shown.mrkdwn,
        ),
    ]
    if not header:
        alerts = None
    first = shown.text.splitlines()[0] if shown.text else ""
    head_text = header_text(alerts)
    room = max(0, 3000 - len(head_text))
    first = first[:room] if shown.mrkdwn else escaped_within(first, room)
    return {"text": head_text + first, "blocks": blocks}


def confirm_message(
    *,
    text: str,
    command: str,
    total: int,
    sessions: Sequence[str],
    value: str,
    alerts: Sequence[str] | None,
) -> dict[str, Any]:
    """A disruptive command's question: a danger button with Slack's confirm dialog."""
    who_ends = "; ".join(sessions)
    dialog = f"These sessions will be ended: {who_ends}."
    if len(dialog) > 300:
        dialog = dialog[:299] + "…"
    button = {
        "type": "button",
        "action_id": CONFIRM_ACTION,
        "style": "danger",
        "text": plain(f"End {total} session(s): {command}"),
        "value": value,
        "confirm": {
            "title": plain(f"End {total} user session(s)?", 100),
            "text": {"type": "plain_text", "text": dialog},
            "confirm": plain("End sessions and go ahead", 30),
            "deny": plain("Cancel", 30),
            "style": "danger",
        },
    }
    blocks = [
        *header_blocks(alerts),
        DIVIDER,
        mrkdwn_section(f":warning: {escape(text)}"),
        mrkdwn_section(f"*Sessions that will end:* {escape(who_ends)}"),
        {"type": "actions", "block_id": "tg_confirm", "elements": [button]},
        context(f"Or type `/tg {escape(command)} --yes`."),
    ]
    head_text = header_text(alerts)
    room = max(0, 3000 - len(head_text))
    return {"text": head_text + escaped_within(text, room), "blocks": blocks}


# -- run progress ------------------------------------------------------------------------------

_UPDATE_STEPS = (
    "download", "slot", "gate", "drain", "notice", "disconnect", "install",
    "restart-services", "verify", "undrain", "release",
)  # fmt: skip
_RESTART_STEPS = (
    "slot", "gate", "drain", "notice", "disconnect", "reboot", "verify", "undrain", "release",
)  # fmt: skip
RUN_STEPS: dict[str, tuple[str, ...]] = {
    # The steps of each run kind, in order, as core.lifecycle.updates runs them; only the progress
    # bar uses them (an unknown step shows the step's own progress).
    "download": ("download",),
    "integrity": ("integrity",),
    "restart": _RESTART_STEPS,
    "auto-update": _UPDATE_STEPS,
    "oldstable-partial": _UPDATE_STEPS,
    "oldstable-full": _UPDATE_STEPS,
    "install": _UPDATE_STEPS,
}


def progress_bar(fraction: float, width: int = 20) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    full = round(fraction * width)
    return "█" * full + "░" * (width - full) + f" {fraction * 100:3.0f} %"


def run_fraction(kind: str, step: str, done: int, total: int) -> float:
    within = done / total if total > 0 else 0.0
    steps = RUN_STEPS.get(kind, ())
    if step not in steps:
        return within
    return (steps.index(step) + within) / len(steps)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunView:
    """What the ops channel shows of one run."""

    run_id: int
    kind: str
    node: str
    actor: str
    step: str = ""
    done: int = 0
    total: int = 0
    outcome: str | None = None
    message: str = ""
    note: str = ""
    """What the current step waits for (e.g. why the gate holds the run)."""


_OUTCOME = {
    "succeeded": ":white_check_mark:",
    "failed": ":x:",
    "cancelled": ":no_entry_sign:",
    "skipped": ":fast_forward:",
}


def run_message(run: RunView) -> dict[str, Any]:
    title = f"Run #{run.run_id} {escape(run.kind)} on {escape(run.node)}"
    by = f"started by {who(run.actor)}"
    if run.outcome is not None:
        emoji = _OUTCOME.get(run.outcome, ":grey_question:")
        head = f"{emoji} *{title}: {escape(run.outcome)}*"
        blocks = [mrkdwn_section(head), context(by)]
        if run.message:
            blocks.insert(1, mrkdwn_section(escape(run.message)))
        return {"text": f"{title}: {escape(run.outcome)}", "blocks": blocks}
    steps = RUN_STEPS.get(run.kind, ())
    where = f" ({steps.index(run.step) + 1}/{len(steps)})" if run.step in steps else ""
    step = f"step *{escape(run.step)}*{where}" if run.step else "starting"
    amount = f", {run.done}/{run.total}" if run.total else ""
    bar = progress_bar(run_fraction(run.kind, run.step, run.done, run.total))
    blocks = [
        mrkdwn_section(f":arrows_counterclockwise: *{title}*"),
        mrkdwn_section(f"{step}{amount}\n`{bar}`"),
        context(by),
    ]
    text = f"{title}: {escape(run.step or 'starting')}"
    if run.note:
        blocks.insert(2, mrkdwn_section(f":pause_button: {escape(run.note)}"))
        text += f" ({escape(run.note)})"
    return {"text": text, "blocks": blocks}


def notice_message(emoji: str, title: str, detail: str, *, by: str = "") -> dict[str, Any]:
    """A one-off ops channel message (warning flag, lock, failure, acknowledgement,
    maintenance); ``by``: who did it, a Slack user ID shown as a mention."""
    line = escape(detail) + (f" (by {who(by)})" if by else "")
    text = f"{emoji} *{escape(title)}*" + (f"\n{line}" if line else "")
    fallback = f"{title}: {detail}" + (f" (by {by})" if by else "")
    return {"text": escaped_within(fallback, 3000), "blocks": [mrkdwn_section(text)]}
