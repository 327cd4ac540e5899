"""Message texts from the jinja2 templates in ``notify/templates``.

E-mails have a text and an HTML part (``NAME.txt`` and ``NAME.html``; only HTML is
autoescaped); calls and SMS have a text (``NAME.txt``). Undefined variables are errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, Template, select_autoescape

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


class Renderer:
    def __init__(self, directory: Path = TEMPLATES) -> None:
        self._env = _Environment(
            loader=FileSystemLoader(directory),
            autoescape=select_autoescape(enabled_extensions=("html",), default=False),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            auto_reload=False,  # packaged templates: no stat() per message
        )
        self._templates: dict[str, Template] = {}

    def _template(self, filename: str) -> Template:
        """The compiled template, kept after its first use (one per message otherwise
        costs a lookup in jinja2's cache with its lock)."""
        template = self._templates.get(filename)
        if template is None:
            template = self._templates[filename] = self._env.get_template(filename)
        return template

    def text(self, name: str, variables: Mapping[str, Any]) -> str:
        return self._template(f"{name}.txt").render(variables)

    def email(self, name: str, variables: Mapping[str, Any]) -> Rendered:
        return Rendered(
            text=self.text(name, variables),
            html=self._template(f"{name}.html").render(variables),
        )
