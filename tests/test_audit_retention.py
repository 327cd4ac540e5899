"""The audit log stays bounded: records past ``[audit] retention`` are removed by the
leading instance, long details are cut, and `log` shows at most 1000 records."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import insert

from core.store import tables as t
from core.store.base import AUDIT_DETAIL_LIMIT, utcnow
from tests.events import until
from tests.service import VIEWER_TOKEN, running, settings_for


async def test_records_past_the_retention_are_removed_at_start(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, environ={"TGOPS_AUDIT__RETENTION": "30d"})
    async with running(settings) as (service, _):
        now = utcnow()
        async with service.store.transaction() as conn:
            await conn.execute(
                insert(t.audit),
                [
                    {
                        "at": now - timedelta(days=days),
                        "actor": "U1",
                        "source": "slack",
                        "action": "command",
                        "target": None,
                        "detail": f"{days} days ago",
                        "run_id": None,
                    }
                    for days in (400, 31, 29, 1)
                ],
            )
    async with running(settings) as (service, api):

        async def pruned() -> bool:
            details = [r.detail for r in await service.store.audit_log(limit=1000)]
            return "31 days ago" not in details

        await until(pruned, within=20)
        details = [r.detail for r in await service.store.audit_log(limit=1000)]
        assert "29 days ago" in details and "1 days ago" in details
        assert "400 days ago" not in details
        reply = await api.command("log 1000", VIEWER_TOKEN)
        assert "29 days ago" in reply["text"] and "31 days ago" not in reply["text"]


async def test_log_is_bounded_in_records_and_in_size(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    async with running(settings) as (_, api):
        for _ in range(3):
            await api.command("status " + "y" * 60_000, VIEWER_TOKEN)
        reply = await api.command("log 1000", VIEWER_TOKEN)
        assert reply["ok"] is True
        assert len(reply["text"]) < 4 * (AUDIT_DETAIL_LIMIT + 200)
        assert reply["text"].count("[cut: ") == 3
        reply = await api.command("log 1001", VIEWER_TOKEN)
        assert reply["ok"] is False and "between 1 and 1000" in reply["text"]
