"""Configuration and waiting helpers of the notify tests (tests/test_notify_*.py)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from core.settings import Settings, load_settings
from core.store import AuditRecord, OutboxRecord, Store
from tests.fake_twilio import ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER
from tests.service import _toml_value, fleet_toml

PUBLIC_URL = "https://tgops.example.org/base"
"""The service's public URL in these tests: Twilio signs webhooks for it; the fake Twilio
delivers them to the service on 127.0.0.1 (like a reverse proxy)."""
SENDER = "tgops@ops.example.org"


def notify_settings(
    root: Path,
    *,
    smtp: Mapping[str, Any] | None = None,
    twilio_url: str | None = None,
    escalation: Mapping[str, Any] | None = None,
    notify: Mapping[str, Any] | None = None,
    contacts: Sequence[Mapping[str, Any]] = (),
    repository_url: str = "http://127.0.0.1:9/",
    public_key: str | None = None,
    poll_interval: str = "15m",
    singles: int = 1,
) -> Settings:
    """The sandbox fleet of tests/service.py (cluster c1: tg1-tg3, single solo1) with the
    notifier's sections; durations shortened to fractions of a second."""
    sections: dict[str, Mapping[str, Any]] = {
        "smtp": {"sender": SENDER, "timeout": "2s", **(smtp or {})},
        "escalation": {"call_rounds": 2, "ack_wait": "5s", **(escalation or {})},
        "notify": {"retry_base": "0.1s", "retry_max": "0.5s", **(notify or {})},
    }
    if twilio_url is not None:
        sections["twilio"] = {
            "account_sid": ACCOUNT_SID,
            "auth_token": AUTH_TOKEN,
            "from_number": FROM_NUMBER,
            "api_url": twilio_url,
            "timeout": "3s",
        }
    extra = ""
    for contact in contacts:
        extra += "[[contacts]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in contact.items())
    root.mkdir(parents=True, exist_ok=True)
    path = root / "tgops.toml"
    path.write_text(
        fleet_toml(
            root,
            sections=sections,
            extra=extra,
            repository_url=repository_url,
            public_key=public_key,
            singles=singles,
        )
    )
    environ = {
        "TGOPS_HTTP__PUBLIC_URL": PUBLIC_URL,
        "TGOPS_UPDATES__POLL_INTERVAL": poll_interval,
    }
    return load_settings(path, environ)


async def wait_until(
    check: Callable[[], Any | Awaitable[Any]], *, within: float = 20.0, what: str = ""
) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; bounded in time."""
    try:
        async with asyncio.timeout(within):
            while True:
                result = check()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return result
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not reached within {within}s: {what or check}") from None


async def outbox_rows(store: Store) -> list[OutboxRecord]:
    return list(reversed(await store.outbox(limit=10_000)))


async def audit_rows(store: Store, action: str | None = None) -> list[AuditRecord]:
    rows = list(reversed(await store.audit_log(limit=10_000)))
    return [r for r in rows if action is None or r.action == action]
