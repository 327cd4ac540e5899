"""The one `/tg` parser shared by Slack, the API and the CLI."""

from __future__ import annotations

from datetime import datetime, time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.grammar import SPECS, Command, ParseError, help_text, parse
from core.model import Role

ALL = frozenset(Role)


def ok(text: str) -> Command:
    result = parse(text)
    assert isinstance(result, Command), getattr(result, "text", result)
    return result


def bad(text: str) -> ParseError:
    result = parse(text)
    assert isinstance(result, ParseError), result
    return result


def test_every_usage_line_in_the_grammar_parses_an_example() -> None:
    examples = {
        "help": "help maintenance",
        "status": "status cluster-a",
        "nodes": "nodes",
        "plan": "plan all",
        "log": "log tg1 5",
        "download": "download tg1",
        "integrity": "integrity tg1",
        "auto-update": "auto-update cluster-a --yes",
        "restart": "restart tg1",
        "maintenance": "maintenance",
        "maintenance new": "maintenance new",
        "maintenance schedule": "maintenance schedule tg1 2026-12-01 22:00 Kernel update",
        "maintenance cancel": "maintenance cancel tg1",
        "logon": "logon disable tg1",
        "schedule": "schedule",
        "schedule download": "schedule download tg1 on daily 01:00 until 04:30",
        "schedule update": "schedule update tg1 on mon,wed 03:00:30",
        "hotfixes": "hotfixes",
        "hotfixes select": "hotfixes select tg1 HF-1 HF-2",
        "hotfixes unselect": "hotfixes unselect tg1 HF-1",
        "hotfixes always": "hotfixes always on tg1",
        "remove-lock": "remove-lock tg1 --cancel-schedule",
        "warning-flag clear": "warning-flag clear tg1",
        "oldstable partial": "oldstable partial tg1 tg-browser tg-base --yes",
        "oldstable full": "oldstable full tg1",
        "install": "install tg1 ibus-anthy",
    }
    assert set(examples) == {s.name for s in SPECS}
    for name, text in examples.items():
        assert ok(text).name == name


def test_fields() -> None:
    cmd = ok("/tg maintenance schedule tg1 2026-12-01 22:00 Kernel   update --disable-logon")
    assert cmd.target == "tg1"
    assert cmd.start == datetime(2026, 12, 1, 22, 0)
    assert cmd.reason == "Kernel update"
    assert cmd.flags == {"--disable-logon"}
    cmd = ok("schedule download c on mon-fri 01:00 until 05:00:30")
    assert (cmd.days, cmd.at, cmd.until, cmd.enabled) == (
        (0, 1, 2, 3, 4),
        time(1, 0),
        time(5, 0, 30),
        True,
    )
    assert ok("schedule update c off").enabled is False
    assert ok("schedule update c on sat,sun 3:00").days == (5, 6)
    assert ok('maintenance schedule tg1 2026-12-01 22:00 "quoted reason"').reason == "quoted reason"
    assert ok("log 7").count == 7 and ok("log 7").target is None
    assert ok("hotfixes select tg1 HF-1 HF-1").ids == ("HF-1",)
    assert ok("auto-update tg1").yes is False and ok("auto-update tg1 --yes").yes is True
    assert ok("logon enable x").enabled is True


@pytest.mark.parametrize(
    ("text", "message", "usage"),
    [
        ("frobnicate", "unknown command 'frobnicate'", "help [COMMAND]"),
        ("download", "missing target T", "download T"),
        ("download tg1 tg2", "unexpected word 'tg2'", "download T"),
        (
            "auto-update tg1 --force",
            "unknown option '--force' (accepted: --yes)",
            "auto-update T [--yes]",
        ),
        (
            "maintenance schedule tg1 2026-12-01 22:00 x --disable-logon --disable-logon",
            "option --disable-logon given twice",
            "maintenance schedule T",
        ),
        (
            "maintenance schedule tg1 2026-13-01 22:00 x",
            "'2026-13-01' is not a date",
            "maintenance schedule T",
        ),
        (
            "maintenance schedule tg1 2026-12-01 25:00 x",
            "'25:00' is not a time",
            "maintenance schedule T",
        ),
        ("maintenance schedule tg1 2026-12-01 22:00", "missing REASON", "maintenance schedule T"),
        ("maintenance frob", "unknown maintenance command 'frob'", "maintenance cancel T"),
        (
            "schedule update tg1 on weekdays 03:00",
            "'weekdays' is not DAYS",
            "schedule update T on DAYS",
        ),
        (
            "schedule download tg1 on daily 03:00 till 04:00",
            "expected 'until HH:MM[:SS]'",
            "schedule download T",
        ),
        ("schedule update tg1 maybe", "'maybe' is neither on nor off", "schedule update T"),
        ("logon toggle tg1", "'toggle' is neither disable nor enable", "logon disable|enable T"),
        ("hotfixes select tg1", "missing hotfix ID", "hotfixes select T ID…"),
        ("log tg1 0", "N must be between 1 and 1000", "log [T] [N]"),
        ("help frob", "no command 'frob'", "help [COMMAND]"),
        ('status "unterminated', "cannot read the command", "help"),
        ("", "no command given", "help"),
        ("oldstable", "oldstable needs a sub-command", "oldstable full T"),
    ],
)
def test_bad_commands_name_the_word_and_show_usage(text: str, message: str, usage: str) -> None:
    error = bad(text)
    assert message in error.message
    assert usage in error.usage
    assert error.text.splitlines()[-1].startswith("Usage: ")


def test_help_is_generated_and_shows_only_what_a_role_may_run() -> None:
    viewer = help_text(frozenset({Role.VIEWER}))
    assert "/tg status [T]" in viewer
    assert "auto-update" not in viewer and "maintenance" not in viewer
    maint = help_text(frozenset({Role.MAINT}))
    assert "/tg maintenance schedule T" in maint and "/tg status" in maint
    assert "auto-update" not in maint
    full = help_text(ALL)
    for spec in SPECS:
        assert spec.usage.split("  |")[0] in full
    detail = help_text(frozenset({Role.VIEWER}), "auto-update")
    assert "(needs role update)" in detail
    assert "DAYS: daily, mon-fri" in help_text(ALL, "schedule")
    assert "no role" in help_text(frozenset())


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200))
def test_random_text_never_raises_and_always_answers(text: str) -> None:
    result = parse(text)
    if isinstance(result, ParseError):
        assert result.message
        assert result.usage
        assert result.text.splitlines()[-1].startswith("Usage: ")
    else:
        assert result.name in {s.name for s in SPECS}


WORDS = [
    "status",
    "maintenance",
    "schedule",
    "download",
    "update",
    "on",
    "off",
    "daily",
    "mon-fri",
    "until",
    "01:00",
    "2026-12-01",
    "--yes",
    "--disable-logon",
    "tg1",
    "all",
    "select",
    "always",
    "hotfixes",
    "logon",
    "enable",
    "oldstable",
    "full",
    "partial",
    "log",
    "5",
    "help",
    "cancel",
    "new",
    "x",
    "25:99",
    '"',
    "--",
]


@settings(max_examples=600, deadline=None)
@given(st.lists(st.sampled_from(WORDS), max_size=9))
def test_random_word_salad_never_raises(words: list[str]) -> None:
    result = parse(" ".join(words))
    assert isinstance(result, Command | ParseError)
    if isinstance(result, ParseError):
        assert result.usage
