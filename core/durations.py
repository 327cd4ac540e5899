"""Durations as written in the configuration: ``90s``, ``0.5s``, ``15m``, ``2h``, ``1h30m``."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer

_PART = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_FACTORS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


class DurationError(ValueError):
    def __init__(self, text: str) -> None:
        super().__init__(
            f"{text!r} is not a duration; "
            "write e.g. 90s, 0.5s, 15m, 2h, 1h30m or a number of seconds"
        )


def parse_duration(value: object) -> float:
    """Seconds in a duration string (or a bare number of seconds)."""
    if isinstance(value, bool):
        raise DurationError(str(value))
    if isinstance(value, int | float):
        if value < 0:
            raise DurationError(str(value))
        return float(value)
    if not isinstance(value, str):
        raise DurationError(repr(value))
    text = value.strip().lower()
    if not text:
        raise DurationError(value)
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if seconds < 0:
            raise DurationError(value)
        return seconds
    pos = 0
    total = 0.0
    for match in _PART.finditer(text):
        if match.start() != pos:
            raise DurationError(value)
        total += float(match.group(1)) * _FACTORS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise DurationError(value)
    return total


def format_duration(seconds: float) -> str:
    """The shortest config-style spelling of a number of seconds."""
    if seconds != int(seconds):
        return f"{seconds:g}s"
    rest = int(seconds)
    parts = []
    for unit, factor in (("h", 3600), ("m", 60), ("s", 1)):
        if rest >= factor:
            parts.append(f"{rest // factor}{unit}")
            rest %= factor
    return "".join(parts) or "0s"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]
"""A pydantic field type: seconds as float, written like ``1h30m``."""
