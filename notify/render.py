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

import json
from collections import OrderedDict
from collections.abc import Iterator, Mapping
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
    nodes,
    select_autoescape,
)
from markupsafe import escape

from core.settings import LANGUAGES
from notify.i18n import SOURCE_LANGUAGE, translations, translator

TEMPLATES = Path(__file__).parent / "templates"
PERSONAL = "name"
"""The variable of an e-mail that differs per recipient; the rest is rendered once."""
FORMS_KEPT = 256
"""E-mails rendered with a hole for the name that are kept (the most recently used)."""
GETTEXT = frozenset({"_", "gettext", "ngettext", "pgettext", "npgettext"})
_HOLE = "\ue000&\ue001"
"""Stands for the name while a template is rendered once (private-use characters that no
filter changes, and an ``&`` that shows whether the output escapes it)."""
_PROBE = "\ue000" + " <Probe> & 'Name' \"x\"" * 6 + "\ue001"
"""A second, long stand-in with spaces, markup and letters: the output must take it in the
same places as ``_HOLE`` (it would not if the name were wrapped, cut, cased or measured)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Rendered:
    text: str
    html: str


@dataclass(frozen=True, slots=True)
class _Form:
    """A rendered text cut where the name goes; ``escaped``: the name is shown escaped."""

    parts: tuple[str, ...]
    escaped: bool

    def fill(self, name: str) -> str:
        if len(self.parts) == 1:
            return self.parts[0]
        return (str(escape(name)) if self.escaped else name).join(self.parts)


def _form(hole: str, probe: str, real: str, name: str) -> _Form | None:
    """The form of a text rendered with ``_HOLE`` (``hole``) for the name, checked against
    the same rendered with ``_PROBE`` and with the real ``name``; ``None`` if it is not
    one."""
    for escaped in (False, True):
        mark = str(escape(_HOLE)) if escaped else _HOLE
        form = _Form(tuple(hole.split(mark)), escaped)
        stand_in = str(escape(_PROBE)) if escaped else _PROBE
        if stand_in.join(form.parts) == probe and form.fill(name) == real:
            return form
    return None


def _shows_only(template: nodes.Template, variable: str) -> bool:
    """Whether ``template`` uses ``variable`` only to show it: ``{{ variable }}`` or a
    keyword argument of a gettext call that is shown as it is, outside filter blocks and
    macros, in a template that includes or extends no other."""
    barred = (
        nodes.Extends,
        nodes.Include,
        nodes.Import,
        nodes.FromImport,
        nodes.FilterBlock,
        nodes.Macro,
        nodes.CallBlock,
        nodes.AssignBlock,
    )

    def walk(node: nodes.Node, above: tuple[nodes.Node, ...]) -> Iterator[bool]:
        if isinstance(node, barred):
            yield False
            return
        if isinstance(node, nodes.Name) and node.name == variable:
            yield _shown(node, above)
            return
        for child in node.iter_child_nodes():
            yield from walk(child, (*above, node))

    return all(walk(template, ()))


def _shown(name: nodes.Name, above: tuple[nodes.Node, ...]) -> bool:
    if name.ctx != "load" or not above:
        return False
    if isinstance(above[-1], nodes.Output):
        return True
    if len(above) < 3 or not isinstance(above[-1], nodes.Keyword):
        return False
    call, output = above[-2], above[-3]
    return (
        isinstance(call, nodes.Call)
        and isinstance(call.node, nodes.Name)
        and call.node.name in GETTEXT
        and isinstance(output, nodes.Output)
    )


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
        self._forms: OrderedDict[str, tuple[_Form, _Form] | None] = OrderedDict()
        self._plain: dict[tuple[str, str], bool] = {}

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
        """The text and HTML parts of an e-mail; rendered once per set of variables other
        than ``name`` where the templates allow (see the module's docstring)."""
        person = variables.get(PERSONAL)
        if person is not None and (not isinstance(person, str) or not person):
            return self._email(name, variables, language)
        shared = {k: v for k, v in variables.items() if k != PERSONAL}
        try:
            key = json.dumps(
                [name, language, person is not None, shared],
                sort_keys=True,
                separators=(",", ":"),
                allow_nan=False,
            )
        except (TypeError, ValueError):
            return self._email(name, variables, language)
        if key in self._forms:
            self._forms.move_to_end(key)
            forms = self._forms[key]
            if forms is None:
                return self._email(name, variables, language)
            return Rendered(text=forms[0].fill(person or ""), html=forms[1].fill(person or ""))
        real = self._email(name, variables, language)
        self._forms[key] = self._forms_of(name, variables, language, real)
        if len(self._forms) > FORMS_KEPT:
            self._forms.popitem(last=False)
        return real

    def _email(self, name: str, variables: Mapping[str, Any], language: str) -> Rendered:
        return Rendered(
            text=self.text(name, variables, language),
            html=self.render(f"{name}.html", variables, language),
        )

    def _forms_of(
        self, name: str, variables: Mapping[str, Any], language: str, real: Rendered
    ) -> tuple[_Form, _Form] | None:
        """The e-mail's text and HTML with a hole for the name, or ``None`` when they are
        to be rendered per recipient."""
        person = variables.get(PERSONAL)
        if person is None:
            return _Form((real.text,), False), _Form((real.html,), False)
        assert isinstance(person, str)
        if not all(self._plain_for(f"{name}.{kind}", language) for kind in ("txt", "html")):
            return None
        hole = self._email(name, {**variables, PERSONAL: _HOLE}, language)
        probe = self._email(name, {**variables, PERSONAL: _PROBE}, language)
        text = _form(hole.text, probe.text, real.text, person)
        html = _form(hole.html, probe.html, real.html, person)
        return None if text is None or html is None else (text, html)

    def _plain_for(self, filename: str, language: str) -> bool:
        """Whether the template uses the name only to show it."""
        key = (language, filename)
        plain = self._plain.get(key)
        if plain is None:
            env = self._envs.get(language) or self._envs[SOURCE_LANGUAGE]
            assert env.loader is not None
            source = env.loader.get_source(env, filename)[0]
            plain = self._plain[key] = _shows_only(env.parse(source), PERSONAL)
        return plain
