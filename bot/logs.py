"""Log output: ``[log] format = "text" | "json"`` and ``[log] level``.

``text`` is one human line per record (time, level, logger, message). ``json`` is one JSON
object per line (JSON Lines, for Loki, Elasticsearch, journald's forwarders …) with
``time`` (UTC, RFC 3339 with milliseconds), ``level``, ``logger``, ``message`` and, where
the record belongs to one, ``run``, ``node`` and ``actor`` (``core.logfields``); an
exception's traceback goes into ``exception``. The command line's ``-v`` / ``-q`` move the
configured level one step down or up.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from core import logfields

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_LOGGERS = ("alembic", "twilio", "mail.log", "apscheduler", "aiosqlite")
"""Libraries whose INFO lines are noise for an operator (WARNING and above still show)."""
LEVELS = ("debug", "info", "warning", "error")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        bound = logfields.current()
        for name in logfields.FIELDS:
            value = getattr(record, name, None)
            if value is None:
                value = bound.get(name)
            if value is not None:
                entry[name] = value if isinstance(value, int | str) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def shifted(level: str, shift: int) -> int:
    """``level`` moved by ``shift`` steps (-1: one more verbose, +1: one quieter)."""
    index = LEVELS.index(level.lower()) + shift
    return getattr(logging, LEVELS[max(0, min(len(LEVELS) - 1, index))].upper())  # type: ignore[no-any-return]


def configure(
    *, level: int, fmt: LogFormat = "text", stream: TextIO | None = None
) -> logging.Handler:
    """Set up the root logger (replacing earlier handlers); returns the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    return handler
