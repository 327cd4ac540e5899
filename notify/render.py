"""Message texts from the jinja2 templates in ``notify/templates``.

E-mails have a text and an HTML part (``NAME.txt`` and ``NAME.html``; only HTML is
autoescaped); calls and SMS have a text (``NAME.txt``). Undefined variables are errors.

Rendered texts are cached (``CACHE_SIZE`` of them, least recently used dropped), so a
notification to many recipients renders each template once: a variable a template only
prints as it is (``{{ name }}``: no filter, test, attribute or condition on it, never
assigned) is left out of the cache key; it is rendered as a placeholder and put in (as
``str``, HTML-escaped where autoescaping is on) for each message. The result is the same
text a full rendering gives; a template using anything else than plain output,
conditions, loops and expressions is rendered in full every time.
"""

from __future__ import annotations

import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, nodes, select_autoescape
from jinja2.filters import FILTERS
from jinja2.tests import TESTS
from markupsafe import escape

TEMPLATES = Path(__file__).parent / "templates"
CACHE_SIZE = 256
"""Rendered texts kept (each of a template and one set of the variables it depends on)."""

_PLAIN_NODES = (
    nodes.Template,
    nodes.Output,
    nodes.TemplateData,
    nodes.If,
    nodes.For,
    nodes.Expr,
    nodes.Helper,
)
"""Node kinds a template may consist of to be cached (every expression is an ``Expr``;
statements other than ``if`` and ``for`` are not cached)."""
_CONTEXT_READERS = (nodes.ContextReference, nodes.DerivedContextReference)
"""Expressions that read the template's variables by other ways than their names."""
_RESERVED = frozenset({"loop", "caller", "varargs", "kwargs", "self", "super"})
_FIXED_FILTERS = frozenset(FILTERS) - {"random"}
"""Filters whose result depends on their arguments only (``random`` does not)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Rendered:
    text: str
    html: str


@dataclass(frozen=True, slots=True, kw_only=True)
class _Plan:
    """How a template is cached: the variables put in per message (``spliced``, each with
    its placeholder) and whether its output is HTML-escaped."""

    spliced: Mapping[str, str]
    names: tuple[str, ...]
    pattern: re.Pattern[str]
    autoescape: bool


class Renderer:
    def __init__(self, directory: Path = TEMPLATES, *, cache_size: int = CACHE_SIZE) -> None:
        self._env = Environment(
            loader=FileSystemLoader(directory),
            autoescape=select_autoescape(enabled_extensions=("html",), default=False),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            auto_reload=False,  # packaged templates: no stat() per message
        )
        self._cache_size = cache_size
        self._cache: OrderedDict[Hashable, tuple[str, ...]] = OrderedDict()
        self._plans: dict[str, _Plan | None] = {}

    def text(self, name: str, variables: Mapping[str, Any]) -> str:
        return self._render(f"{name}.txt", variables, _keys(variables))

    def email(self, name: str, variables: Mapping[str, Any]) -> Rendered:
        keys = _keys(variables)
        return Rendered(
            text=self._render(f"{name}.txt", variables, keys),
            html=self._render(f"{name}.html", variables, keys),
        )

    # -- caching ---------------------------------------------------------------------------

    def _render(
        self, filename: str, variables: Mapping[str, Any], keys: Mapping[str, str] | None
    ) -> str:
        """``keys``: each variable's value as a cache key (``None``: not cacheable)."""
        template = self._env.get_template(filename)
        plan = self._plan(filename)
        if plan is None or keys is None or self._cache_size <= 0:
            return template.render(variables)
        # a variable put in per message counts by its presence only
        key = (filename, tuple((k, "" if k in plan.spliced else v) for k, v in keys.items()))
        pieces = self._cache.get(key)
        if pieces is None:
            placeholders = {k: plan.spliced[k] for k in variables if k in plan.spliced}
            text = template.render({**variables, **placeholders})
            pieces = tuple(plan.pattern.split(text))
            self._cache[key] = pieces
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        if len(pieces) == 1:
            return pieces[0]
        show: Callable[[Any], str] = escape if plan.autoescape else str
        names = plan.names
        # pieces: text, variable number, text, variable number, …, text
        return "".join(
            piece if i % 2 == 0 else show(variables[names[int(piece)]])
            for i, piece in enumerate(pieces)
        )

    def _plan(self, filename: str) -> _Plan | None:
        if filename not in self._plans:
            self._plans[filename] = self._make_plan(filename)
        return self._plans[filename]

    def _make_plan(self, filename: str) -> _Plan | None:
        """Which variables of a template are only ever printed as they are; ``None`` when
        the template uses statements, filters or functions whose effect on the output is
        not followed here (then it is rendered in full every time)."""
        source, _, _ = self._env.loader.get_source(self._env, filename)  # type: ignore[union-attr]
        tree = self._env.parse(source, filename)
        printed: set[str] = set()
        other: set[str] = set()
        for node, parent in _walk(tree, None):
            if not isinstance(node, _PLAIN_NODES) or isinstance(node, _CONTEXT_READERS):
                return None
            if isinstance(node, nodes.Filter) and node.name not in _FIXED_FILTERS:
                return None
            if isinstance(node, nodes.Test) and node.name not in TESTS:
                return None
            if isinstance(node, nodes.Name):
                if node.ctx == "load" and isinstance(parent, nodes.Output):
                    printed.add(node.name)
                else:
                    other.add(node.name)
        if (printed | other) & set(self._env.globals):
            return None  # range(), lipsum(), cycler(), …: not followed here
        names = printed - other - _RESERVED
        token = secrets.token_hex(8)
        ordered = tuple(sorted(names))
        return _Plan(
            spliced={name: f"tgops{token}v{i}z" for i, name in enumerate(ordered)},
            names=ordered,
            pattern=re.compile(f"tgops{token}v([0-9]+)z"),
            autoescape=_autoescapes(self._env, filename),
        )


def _autoescapes(env: Environment, filename: str) -> bool:
    setting = env.autoescape
    return bool(setting(filename) if callable(setting) else setting)


def _walk(node: nodes.Node, parent: nodes.Node | None) -> Iterator[tuple[nodes.Node, Any]]:
    yield node, parent
    for child in node.iter_child_nodes():
        yield from _walk(child, node)


def _keys(variables: Mapping[str, Any]) -> dict[str, str] | None:
    """Each variable's ``repr`` as its cache key, when all values are built of ``str``,
    ``int``, ``float``, ``bool``, ``None``, lists, tuples and dicts (``repr`` then tells
    apart values that render differently: ``1``, ``1.0`` and ``True``; lists and tuples);
    ``None`` otherwise."""
    if not all(_plain(v) for v in variables.values()):
        return None
    return {str(k): repr(v) for k, v in variables.items()}


def _plain(value: Any) -> bool:
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return True
    if kind is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())
    if kind is list or kind is tuple:
        return all(_plain(v) for v in value)
    return False
