"""Command templates: ``{name}`` placeholders filled with shell-quoted values.

A placeholder is ``{name}`` with ``name`` in lower case (letters and ``_``). ``${Package}``
(shell and dpkg-query syntax) and ``{ print $1 }`` (awk) are left alone; write ``{{name}}``
for a literal ``{name}``. Values are quoted with ``shlex.quote``; a sequence becomes several
quoted words. Only prefixes named in ``verbatim`` (trusted configuration such as the ``dpkg``
command) are inserted unquoted. User text is never inserted unquoted.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Collection, Mapping, Sequence

_PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}|(?<!\$)\{([a-z_]+)\}")

Value = str | Sequence[str]


def placeholders(template: str) -> set[str]:
    """The placeholder names a template uses."""
    return {m.group(2) for m in _PLACEHOLDER.finditer(template) if m.group(2)}


def unknown_placeholders(template: str, accepted: Collection[str]) -> list[str]:
    return sorted(placeholders(template) - set(accepted))


def fill(template: str, values: Mapping[str, Value], *, verbatim: Collection[str] = ()) -> str:
    """The command line of ``template`` with every placeholder replaced.

    Raises ``KeyError`` for a placeholder without a value (templates are checked against
    their accepted placeholders when a driver is built, so this is a programming error).
    """

    def replace(match: re.Match[str]) -> str:
        if match.group(1):
            return "{" + match.group(1) + "}"
        name = match.group(2)
        value = values[name]
        if name in verbatim:
            return value if isinstance(value, str) else " ".join(value)
        if isinstance(value, str):
            return shlex.quote(value)
        return " ".join(shlex.quote(item) for item in value)

    return _PLACEHOLDER.sub(replace, template)
