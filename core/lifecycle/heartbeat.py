"""Signs of life in the store, for monitoring that reads the store (``check-versions``,
``/metrics`` of any instance).

* The heartbeat: the leading instance writes ``{"instance", "at", "interval"}`` (kv
  ``heartbeat``, key ``leader``) every ``leader.heartbeat``. Its age says whether a
  service is running and doing its timed work; the other instances and a stopped service
  write nothing.
* The last successful manifest fetch per channel (kv ``manifest-polls``): written by
  ``Engine.remember_manifest`` each time a verified manifest arrives, by any instance.

Times are the real UTC time (not the engine's clock): they are compared with the time of
the machine that reads them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from core.errors import StoreError
from core.store import Store
from core.store.base import utcnow

log = logging.getLogger(__name__)

HEARTBEAT_KV = "heartbeat"
HEARTBEAT_KEY = "leader"
MANIFEST_POLLS_KV = "manifest-polls"
"""kv namespace: channel → ``{"at"}``, the last time its manifest was fetched and verified."""
WRITE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    instance: str
    at: datetime
    interval: float


def _when(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo is not None else None


def parse_heartbeat(value: Any) -> Heartbeat | None:
    """The heartbeat from its stored value (None when absent or unreadable)."""
    if not isinstance(value, Mapping):
        return None
    at = _when(value.get("at"))
    interval = value.get("interval")
    if at is None or not isinstance(interval, int | float):
        return None
    return Heartbeat(instance=str(value.get("instance", "?")), at=at, interval=float(interval))


def parse_poll(value: Any) -> datetime | None:
    """When a channel's manifest was last fetched (None when never or unreadable)."""
    return _when(value.get("at")) if isinstance(value, Mapping) else None


async def read_heartbeat(store: Store) -> Heartbeat | None:
    return parse_heartbeat(await store.kv_get(HEARTBEAT_KV, HEARTBEAT_KEY))


async def read_polls(store: Store) -> dict[str, datetime]:
    """Channel → last successful manifest fetch."""
    items = await store.kv_items(MANIFEST_POLLS_KV)
    return {channel: at for channel, value in items.items() if (at := parse_poll(value))}


async def record_poll(store: Store, channel: str) -> None:
    await store.kv_set(MANIFEST_POLLS_KV, channel, {"at": utcnow().isoformat()})


async def beat(store: Store, instance: str, interval: float) -> None:
    """Write one heartbeat now."""
    value = {"instance": instance, "at": utcnow().isoformat(), "interval": interval}
    await store.kv_set(HEARTBEAT_KV, HEARTBEAT_KEY, value)


async def heartbeats(store: Store, instance: str, interval: float) -> None:
    """Write a heartbeat every ``interval`` seconds until cancelled (the leader's duty).

    A store that cannot be written is logged and tried again at the next beat: monitoring
    then sees the heartbeat age, which is the point.
    """
    while True:
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                await beat(store, instance, interval)
        except (StoreError, SQLAlchemyError, OSError, TimeoutError) as exc:
            log.warning("heartbeat not written: %s", exc)
        await asyncio.sleep(interval)
