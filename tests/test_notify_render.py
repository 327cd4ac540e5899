"""E-mails to many recipients: rendered once, the name filled in per recipient.

Every text ``Renderer.email`` gives must be exactly what rendering the templates for that
recipient gives; templates that do more with the name than show it are rendered per
recipient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from notify.render import Rendered, Renderer

NAMES = [
    "Alice",
    "Bob O'Brien & <Partners>",
    'Zoë "Z" Müller',
    "A" * 120,
    "ein Name mit vielen Wörtern, der länger ist als eine Zeile einer E-Mail sein sollte",
    "%(name)s {{ name }} \ue000&\ue001",
]
HOTFIX = {
    "id": "HF-7",
    "package": "tg-vnc",
    "version": "2.0-1",
    "urgency": "urgent",
    "summary": "Fixes a crash",
}


def fresh(renderer: Renderer, template: str, variables: dict[str, Any], lang: str) -> Rendered:
    """The e-mail rendered in full, by a renderer that has rendered nothing before."""
    return renderer._email(template, variables, lang)


@pytest.mark.parametrize("language", ["en", "de"])
def test_each_recipient_gets_exactly_the_fully_rendered_mail(language: str) -> None:
    renderer, reference = Renderer(), Renderer()
    for urgent in (True, False):
        for nodes in (["tg1", "tg2"], []):
            for name in NAMES:
                variables = {
                    "name": name,
                    "hotfix": HOTFIX,
                    "urgent": urgent,
                    "channel": "stable",
                    "nodes": nodes,
                }
                mail = renderer.email("hotfix", variables, language)
                assert mail == fresh(reference, "hotfix", variables, language)
                assert name in mail.text
    # rendered once per set of shared variables, with a hole for the name
    assert len(renderer._forms) == 4
    assert all(forms is not None for forms in renderer._forms.values())


def test_mails_without_a_name_are_rendered_once_per_set_of_variables() -> None:
    renderer, reference = Renderer(), Renderer()
    variables = {
        "title": "Node tg1 is down & <out>",
        "node": "tg1",
        "detail": "a\nb",
        "hint": "look",
        "at": "2030-01-01 10:00",
        "timezone": "UTC",
    }
    for _ in range(3):
        assert renderer.email("admin_alert", variables) == fresh(
            reference, "admin_alert", variables, "en"
        )
    assert len(renderer._forms) == 1


@pytest.mark.parametrize(
    ("text", "html", "split"),
    [
        ("Hello {{ name }}!\n", "<p>{{ _('Hi %(name)s', name=name) }}</p>", True),
        ("{{ name|upper }}\n", "<p>{{ name }}</p>", False),
        ("{% if name|length > 20 %}long{% endif %} {{ name }}\n", "{{ name }}", False),
        ("{% if 'O' in name %}O{% endif %}{{ name }}\n", "{{ name }}", False),
        ("{{ _('Hello %(name)s, ' * 6, name=name)|wordwrap(40) }}\n", "{{ name }}", False),
        ("{% filter upper %}{{ name }}{% endfilter %}\n", "{{ name }}", False),
        ("{% set n = name %}{{ n }}\n", "{{ name }}", False),
        ("{% include 'inner.txt' %}\n", "{{ name }}", False),
        ("{{ name }}\n", "<p>{{ name|safe }}</p>", False),
        ("{{ name ~ '!' }}\n", "{{ name }}", False),
        # shown only, but cut by its format: found by the stand-ins
        ("{{ _('Hi %(name).5s', name=name) }}\n", "{{ name }}", False),
    ],
)
def test_templates_that_do_more_with_the_name_are_rendered_per_recipient(
    tmp_path: Path, text: str, html: str, split: bool
) -> None:
    (tmp_path / "probe.txt").write_text(text)
    (tmp_path / "probe.html").write_text(html)
    (tmp_path / "inner.txt").write_text("{{ name|lower }}")
    renderer, reference = Renderer(overrides=tmp_path), Renderer(overrides=tmp_path)
    for name in NAMES:
        variables = {"name": name, "n": 1}
        assert renderer.email("probe", variables) == fresh(reference, "probe", variables, "en")
    (forms,) = renderer._forms.values()
    assert (forms is not None) is split


def test_names_that_are_not_plain_text_are_rendered_per_recipient(tmp_path: Path) -> None:
    (tmp_path / "probe.txt").write_text("{% if name %}Hello {{ name }}{% else %}Hello{% endif %}")
    (tmp_path / "probe.html").write_text("<p>{{ name }}</p>")
    renderer, reference = Renderer(overrides=tmp_path), Renderer(overrides=tmp_path)
    for name in ["", None, 3, "Ann", ""]:
        variables = {"name": name}
        assert renderer.email("probe", variables) == fresh(reference, "probe", variables, "en")
