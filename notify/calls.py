"""What tgops knows about the calls it placed, by Twilio call SID (store: ``kv``).

Written right after Twilio accepted a call (before the outbox records it as sent), so that
every webhook about the call finds it; updated by status callbacks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

from core.store import OutboxRecord, Store, utcnow

CALLS = "notify.calls"
"""kv namespace: call SID → the call's record."""
CALL_KEYS = "notify.call-keys"
"""kv namespace: outbox key of a call → its SID."""

LATE_WEBHOOK = 3.0
"""How long a webhook about a call not (yet) recorded waits for it."""
FINAL_STATUSES = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})
UNREACHED_STATUSES = frozenset({"busy", "failed", "no-answer", "canceled"})
"""Final call statuses that mean nobody answered (SMS fallback, L14)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CallRecord:
    sid: str
    key: str
    phone: str
    name: str
    hotfix: str | None
    round: int
    position: int
    status: str
    placed_at: str
    language: str = "en"

    @classmethod
    def from_value(cls, value: Any) -> CallRecord | None:
        if not isinstance(value, dict):
            return None
        return cls(
            sid=str(value["sid"]),
            key=str(value["key"]),
            phone=str(value["phone"]),
            name=str(value.get("name") or value["phone"]),
            hotfix=value.get("hotfix"),
            round=int(value.get("round", 0)),
            position=int(value.get("position", 0)),
            status=str(value.get("status", "queued")),
            placed_at=str(value.get("placed_at", "")),
            language=str(value.get("language", "en")),
        )

    def value(self) -> dict[str, Any]:
        return {
            "sid": self.sid,
            "key": self.key,
            "phone": self.phone,
            "name": self.name,
            "hotfix": self.hotfix,
            "round": self.round,
            "position": self.position,
            "status": self.status,
            "placed_at": self.placed_at,
            "language": self.language,
        }


class CallRegistry:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._placed = asyncio.Condition()

    async def placed(self, item: OutboxRecord, sid: str, status: str) -> CallRecord:
        payload = item.payload
        record = CallRecord(
            sid=sid,
            key=item.key,
            phone=item.recipient,
            name=str(payload.get("name") or item.recipient),
            hotfix=payload.get("escalation"),
            round=int(payload.get("round", 0)),
            position=int(payload.get("position", 0)),
            status=status or "queued",
            placed_at=utcnow().isoformat(),
            language=str(payload.get("language") or "en"),
        )
        await self.store.kv_set(CALLS, sid, record.value())
        await self.store.kv_set(CALL_KEYS, item.key, sid)
        async with self._placed:
            self._placed.notify_all()
        return record

    async def get(self, sid: str) -> CallRecord | None:
        if not sid:
            return None
        return CallRecord.from_value(await self.store.kv_get(CALLS, sid[:256]))

    async def find(self, sid: str, *, within: float = LATE_WEBHOOK) -> CallRecord | None:
        """The call, waiting up to ``within`` seconds for it to be recorded: Twilio may call
        back before the request that placed the call has returned here."""
        deadline = asyncio.get_running_loop().time() + within
        while True:
            record = await self.get(sid)
            left = deadline - asyncio.get_running_loop().time()
            if record is not None or left <= 0:
                return record
            try:
                # woken by a call placed here; looks again at least every 0.2s (another
                # instance may have placed it)
                async with asyncio.timeout(min(left, 0.2)), self._placed:
                    await self._placed.wait()
            except TimeoutError:
                pass

    async def by_key(self, key: str) -> CallRecord | None:
        sid = await self.store.kv_get(CALL_KEYS, key)
        return None if sid is None else await self.get(str(sid))

    async def set_status(self, sid: str, status: str) -> CallRecord | None:
        record = await self.find(sid)
        if record is None:
            return None
        if record.status in FINAL_STATUSES:
            return record  # a late "ringing" does not undo "completed"
        record = replace(record, status=status)
        await self.store.kv_set(CALLS, sid, record.value())
        return record
