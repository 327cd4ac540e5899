"""Fields that describe what the code logging a line works on: run, node, actor.

A ``ContextVar`` carries them through awaits and into tasks started inside (asyncio
copies the context), so a line logged deep in a driver still names the run it belongs
to. ``bound(run=7, node="tg1")`` adds fields for a block; the JSON log format writes
them (``bot/logs.py``), the text format leaves them out. A field given to one call with
``extra={"node": …}`` wins over the bound one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType

FIELDS = ("run", "node", "actor")
"""The names a log line may carry beyond time, level, logger and message."""

_EMPTY: Mapping[str, str | int] = MappingProxyType({})
_bound: ContextVar[Mapping[str, str | int]] = ContextVar("tgops_log_fields", default=_EMPTY)


def current() -> Mapping[str, str | int]:
    """The fields bound here (read-only)."""
    return _bound.get()


@contextmanager
def bound(**fields: str | int | None) -> Iterator[None]:
    """Bind ``run``, ``node`` and/or ``actor`` for the block (``None`` values are skipped)."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise TypeError(f"unknown log field(s) {sorted(unknown)}; known: {', '.join(FIELDS)}")
    merged = {**_bound.get(), **{k: v for k, v in fields.items() if v is not None}}
    token = _bound.set(MappingProxyType(merged))
    try:
        yield
    finally:
        _bound.reset(token)
