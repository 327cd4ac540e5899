"""Text that reaches a terminal or a mail: no control characters (no escape sequences)."""

from __future__ import annotations

import re

_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def printable(text: str) -> str:
    """``text`` without control characters (newlines and tabs stay) and with lone
    surrogates (which no database can store) replaced by U+FFFD."""
    if text.isprintable():
        # none of those (they are all of Unicode's categories Cc and Cs): the common case,
        # without the expression's search (audit records are written by the thousand)
        return text
    return _UNSAFE.sub(lambda m: "\ufffd" if m.group() >= "\ud800" else "", text)
