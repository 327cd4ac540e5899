"""Contacts are need-to-know: `log` shows contacts by name to viewers and maint admins,
their addresses and numbers only to the update role; nobody is a viewer unless configured."""

from __future__ import annotations

from pathlib import Path

from core.model import PackageKind
from core.settings import RolesSettings
from tests.notify_env import audit_rows, notify_settings, wait_until
from tests.repo_server import serve_repo
from tests.repository import Repo
from tests.service import ADMIN_TOKEN, MAINT_TOKEN, VIEWER_TOKEN, running
from tests.smtp_server import smtp_server

EMAIL = "c1@customer.example"
PHONE = "+4915100000001"


async def test_viewers_see_names_and_the_update_role_sees_addresses(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.add("tg-base", "1.0")
    repo.add("tg-vnc", "3.2", kind=PackageKind.HOTFIX, hotfix="HF-7", summary="Fixes a crash.")
    async with serve_repo(repo.root) as server, smtp_server() as smtp:
        settings = notify_settings(
            tmp_path,
            smtp={"host": "127.0.0.1", "port": smtp.port},
            contacts=[{"name": "Customer operations", "email": EMAIL, "phone": PHONE}],
            repository_url=server.url,
            public_key=repo.public_key,
            poll_interval="1s",
        )
        async with running(settings) as (service, api):
            await wait_until(lambda: audit_rows(service.store, "notification sent"), within=30)
            await service.store.audit(
                actor="twilio",
                source="phone",
                action="escalation",
                detail=f"call to Customer operations ({PHONE}): no-answer",
            )

            for token in (VIEWER_TOKEN, MAINT_TOKEN):
                text = (await api.command("log 50", token))["text"]
                assert "to Customer operations (address hidden)" in text
                assert "call to Customer operations (number hidden)" in text
                assert EMAIL not in text and PHONE not in text

            reply = await api.command("log 50 --full", MAINT_TOKEN)
            assert reply["ok"] is False and "needs role update" in reply["text"]
            assert EMAIL not in reply["text"]

            for command in ("log 50 --full", "log 50"):
                text = (await api.command(command, ADMIN_TOKEN))["text"]
                assert f"to Customer operations ({EMAIL})" in text
                assert f"call to Customer operations ({PHONE})" in text


def test_nobody_is_a_viewer_by_default() -> None:
    assert RolesSettings().viewer == ()
