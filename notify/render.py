"""Message texts from the jinja2 templates in ``notify/templates``, in a language.

E-mails have a text and an HTML part (``NAME.txt`` and ``NAME.html``; HTML and Atom are
autoescaped); calls, SMS and node notices have a text (``NAME.txt``); the status page is
``statuspage.html``. Undefined variables are errors.

The templates are written in English and mark their texts for the catalogue
(``{{ _("…") }}``, ``{% trans %}``; ``notify.i18n``). An operator overrides a template by
putting a file of the same name into ``notify.templates_dir``: ``DIR/LANG/NAME`` for one
language, ``DIR/NAME`` for every language; the packaged one is used otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import (
    BaseLoader,
    ChoiceLoader,
    Environment,
    FileSystemLoader,
    StrictUndefined,
    Template,
    select_autoescape,
)

from core.settings import LANGUAGES
from notify.i18n import SOURCE_LANGUAGE, translations, translator

TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True, slots=True, kw_only=True)
class Rendered:
    text: str
    html: str


class _Environment(Environment):
    """``{{ hotfix.id }}`` on a dict looks up the key first (the variables are decoded
    JSON: dicts all the way down). jinja2 tries the attribute first and pays for an
    ``AttributeError`` per lookup; a key named like a dict method (``items``) now gives
    the value instead of the method."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict:
            try:
                return obj[attribute]
            except KeyError:
                pass
        return super().getattr(obj, attribute)


def _environment(loader: BaseLoader, language: str) -> _Environment:
    env = _Environment(
        loader=loader,
        autoescape=select_autoescape(enabled_extensions=("html", "atom"), default=False),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        auto_reload=False,  # packaged templates: no stat() per message
        extensions=["jinja2.ext.i18n"],
    )
    env.install_gettext_translations(translations(language), newstyle=True)  # type: ignore[attr-defined]
    env.globals["lang"] = language
    env.globals["t"] = translator(language)
    return env


class Renderer:
    """Templates per language; ``directory`` is the packaged set, ``overrides`` the
    operator's ``notify.templates_dir``."""

    def __init__(self, directory: Path = TEMPLATES, *, overrides: Path | None = None) -> None:
        self._envs: dict[str, _Environment] = {}
        for language in LANGUAGES:
            loaders: list[BaseLoader] = []
            if overrides is not None:
                loaders += [
                    FileSystemLoader(overrides / language),
                    FileSystemLoader(overrides),
                ]
            loaders.append(FileSystemLoader(directory))
            self._envs[language] = _environment(ChoiceLoader(loaders), language)
        self._templates: dict[tuple[str, str], Template] = {}

    def _template(self, filename: str, language: str) -> Template:
        """The compiled template, kept after its first use (one per message otherwise
        costs a lookup in jinja2's cache with its lock)."""
        key = (language, filename)
        template = self._templates.get(key)
        if template is None:
            env = self._envs.get(language) or self._envs[SOURCE_LANGUAGE]
            template = self._templates[key] = env.get_template(filename)
        return template

    def render(
        self, filename: str, variables: Mapping[str, Any], language: str = SOURCE_LANGUAGE
    ) -> str:
        return self._template(filename, language).render(variables)

    def text(self, name: str, variables: Mapping[str, Any], language: str = SOURCE_LANGUAGE) -> str:
        return self.render(f"{name}.txt", variables, language)

    def email(
        self, name: str, variables: Mapping[str, Any], language: str = SOURCE_LANGUAGE
    ) -> Rendered:
        return Rendered(
            text=self.text(name, variables, language),
            html=self.render(f"{name}.html", variables, language),
        )
