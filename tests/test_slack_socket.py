"""Socket Mode: with ``slack.app_token`` set, the service connects to Slack's WebSocket
(here the fake's, handed out by ``apps.connections.open``) and answers `/tg` over it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.fake_slack import SlackUser, fake_slack
from tests.service import running, settings_for

SECRET = "signing-secret-for-tests"


async def test_socket_mode_acknowledges_and_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with fake_slack() as fake:
        sections = {
            "slack": {
                "bot_token": "xoxb-test-token",
                "signing_secret": SECRET,
                "app_token": "xapp-test",
                "api_url": fake.api_url,
            },
            "roles": {"viewer": ["*"]},
        }
        async with running(settings_for(tmp_path, sections=sections)) as (_, api):
            [opened] = await fake.wait_for("apps.connections.open")
            assert opened.headers["Authorization"] == "Bearer xapp-test"
            user = SlackUser(url="", secret=SECRET, session=api.session, fake=fake)
            url = fake.response_url()
            envelope = await fake.send_envelope("slash_commands", user.command_body("nodes", url))
            ack = await fake.wait_ack(envelope)
            assert ack == {"envelope_id": envelope}
            path = url.split(fake.base)[1]
            [reply] = await fake.wait_for("response_url", where=lambda c: c.path == path)
            assert reply.body["response_type"] == "ephemeral"
            assert "tg1" in reply.text and "single system" in reply.text
    for secret in ("xoxb-test-token", "xapp-test", SECRET):
        assert secret not in caplog.text  # not even at DEBUG level
