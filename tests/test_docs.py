"""The project documents its own rules: every rule cited anywhere is explained in
docs/lifecycle.md, and the README points nowhere outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

from bot.grammar import SPECS, help_text
from core.model import Role

ROOT = Path(__file__).parent.parent
RULE = re.compile(r"\bL(\d{1,2}a?)\b")


def _explained() -> set[str]:
    text = (ROOT / "docs" / "lifecycle.md").read_text()
    return set(re.findall(r"^### L(\d{1,2}a?) ", text, flags=re.MULTILINE))


def test_every_rule_help_cites_is_explained_in_the_docs() -> None:
    cited = set(RULE.findall(help_text(frozenset(Role))))
    for spec in SPECS:
        cited |= set(RULE.findall(help_text(frozenset(Role), spec.name)))
    assert cited >= {"1", "2", "3", "6", "7", "8", "9", "9a", "10"}
    assert cited <= _explained()


def test_every_rule_the_code_and_readme_cite_is_explained_in_the_docs() -> None:
    cited: set[str] = set()
    for folder in ("core", "bot", "notify"):
        for path in (ROOT / folder).rglob("*.py"):
            cited |= set(RULE.findall(path.read_text()))
    cited |= set(RULE.findall((ROOT / "README.md").read_text()))
    assert {f"{n}" for n in range(1, 16)} <= _explained()
    assert cited <= _explained(), sorted(cited - _explained())


def test_the_readme_and_docs_refer_to_nothing_outside_the_repository() -> None:
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        text = path.read_text()
        assert "../shared" not in text, path
        assert "DESIGN.md" not in text, path
        for link in re.findall(r"\]\(([^)#]+)", text):
            if not link.startswith(("http://", "https://")):
                assert (path.parent / link).exists(), (path, link)


def test_the_status_schema_in_the_docs_names_every_key_the_service_answers() -> None:
    text = (ROOT / "docs" / "lifecycle.md").read_text()
    schema = text.split("## Status JSON", 1)[1]
    keys = {
        "nodes", "clusters", "instance", "leader", "name", "cluster", "driver", "installed",
        "pending", "staged", "sessions", "logon", "lb", "maintenance", "update_lock",
        "warning_flag", "restart_required", "schedules", "hotfixes", "run", "omitted_update",
        "reachable", "error", "max_parallel_updates", "updating", "waiting",
    }  # fmt: skip
    for key in keys:
        assert f'"{key}"' in schema, key
