"""Property tests: arbitrary bodies, command strings and headers against the real HTTP server
of one running service (in a thread of its own): never a 5xx, never a traceback, and every
authenticated command is in the audit log, cut when long."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.client
import json
import logging
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator

from bot.service import Service
from core.store.base import AUDIT_DETAIL_LIMIT
from tests.fake_slack import fake_slack
from tests.fake_twilio import ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER
from tests.notify_env import PUBLIC_URL
from tests.service import VIEWER_TOKEN, running, settings_for

SECRET = "signing-secret-for-tests"
T = TypeVar("T")
EXAMPLES = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass
class Running:
    service: Service
    port: int
    loop: asyncio.AbstractEventLoop

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def request(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


class Tracebacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info is not None:
            self.records.append(self.format(record))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One service with Slack and Twilio configured, run by a thread's own event loop."""
    root: Path = tmp_path_factory.mktemp("hostile")
    ready: list[Running] = []
    started = threading.Event()
    stop: list[asyncio.Event] = []
    failed: list[BaseException] = []

    async def main() -> None:
        async with fake_slack() as fake:
            sections = {
                "slack": {
                    "bot_token": "xoxb-test-token",
                    "signing_secret": SECRET,
                    "api_url": fake.api_url,
                },
                "roles": {"viewer": ["*"]},
                "twilio": {
                    "account_sid": ACCOUNT_SID,
                    "auth_token": AUTH_TOKEN,
                    "from_number": FROM_NUMBER,
                    "api_url": "http://127.0.0.1:9",
                },
            }
            config = settings_for(
                root, sections=sections, environ={"TGOPS_HTTP__PUBLIC_URL": PUBLIC_URL}
            )
            async with running(config) as (service, _):
                assert service.port is not None
                stop.append(asyncio.Event())
                ready.append(Running(service, service.port, asyncio.get_running_loop()))
                started.set()
                await stop[0].wait()

    def thread() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by the fixture
            failed.append(exc)
        finally:
            started.set()

    worker = threading.Thread(target=thread, name="hostile-service", daemon=True)
    worker.start()
    started.wait(timeout=60)
    if failed or not ready:
        raise RuntimeError(f"the service did not start: {failed}")
    catcher = Tracebacks()
    logging.getLogger().addHandler(catcher)
    try:
        yield ready[0]
    finally:
        logging.getLogger().removeHandler(catcher)
        ready[0].loop.call_soon_threadsafe(stop[0].set)
        worker.join(timeout=30)
    assert catcher.records == []


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
COMMAND_WORDS = st.sampled_from(
    ["status", "log", "help", "nodes", "plan", "tg1", "all", "--yes", "9" * 40, '"', "'", "\\"]
)
ANY_TEXT = st.text(st.characters(exclude_categories=()))  # lone surrogates too
COMMANDS = st.one_of(
    ANY_TEXT,
    st.lists(COMMAND_WORDS | st.text(max_size=8), max_size=6).map(" ".join),
    ANY_TEXT.map(lambda t: "log " + t),
    st.text(min_size=AUDIT_DETAIL_LIMIT, max_size=AUDIT_DETAIL_LIMIT * 3),
)
HEADER_VALUES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


@EXAMPLES
@given(text=COMMANDS)
def test_any_command_text_is_answered_and_audited(served: Running, text: str) -> None:
    body = json.dumps({"text": text}).encode()
    headers = {"Authorization": f"Bearer {VIEWER_TOKEN}", "Content-Type": "application/json"}
    status, answer = served.request("POST", "/api/v1/command", body, headers)
    assert status == 200, answer
    assert isinstance(json.loads(answer)["ok"], bool)
    [record] = served.call(served.service.store.audit_log(limit=1))
    assert record.actor == "token:viewer"
    assert record.action in {"command", "refused", "rejected"}
    assert len(record.detail) <= AUDIT_DETAIL_LIMIT + 60


@EXAMPLES
@given(body=JSON, raw=st.binary(max_size=200), use_raw=st.booleans())
def test_any_api_body_gets_no_5xx(served: Running, body: Any, raw: bytes, use_raw: bool) -> None:
    data = raw if use_raw else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {VIEWER_TOKEN}", "Content-Type": "application/json"}
    status, answer = served.request("POST", "/api/v1/command", data, headers)
    assert status in {200, 400}, answer
    status, answer = served.request("POST", "/api/v1/command", data, {})
    assert status == 401, answer


def _slack_headers(body: bytes, stamp: str) -> dict[str, str]:
    digest = hmac.new(SECRET.encode(), b"v0:" + stamp.encode() + b":" + body, hashlib.sha256)
    return {"X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": f"v0={digest.hexdigest()}"}


@EXAMPLES
@given(
    body=st.binary(max_size=300) | st.dictionaries(st.text(max_size=12), st.text(max_size=30)),
    headers=st.dictionaries(
        st.sampled_from(
            ["X-Slack-Request-Timestamp", "X-Slack-Signature", "Content-Type", "X-Other"]
        ),
        HEADER_VALUES,
    ),
    sign=st.booleans(),
    content_type=st.sampled_from(
        ["application/x-www-form-urlencoded", "application/json", "text/plain"]
    ),
)
def test_any_slack_request_gets_no_5xx(
    served: Running,
    *,
    body: bytes | dict[str, str],
    headers: dict[str, str],
    sign: bool,
    content_type: str,
) -> None:
    data = body if isinstance(body, bytes) else urlencode(body).encode()
    sent = {"Content-Type": content_type, **headers}
    if sign:
        sent.update(_slack_headers(data, str(int(time.time()))))
    status, answer = served.request("POST", "/slack/events", data, sent)
    assert status < 500, answer


@EXAMPLES
@given(
    params=st.dictionaries(
        st.sampled_from(["CallSid", "Digits", "CallStatus", "MessageSid", "MessageStatus", "To"])
        | st.text(max_size=10),
        st.text(max_size=40),
    ),
    raw=st.binary(max_size=200),
    use_raw=st.booleans(),
    sign=st.booleans(),
    path=st.sampled_from(["/twilio/voice/gather", "/twilio/status"]),
    signature=HEADER_VALUES,
)
def test_any_twilio_webhook_gets_no_5xx(
    served: Running,
    *,
    params: dict[str, str],
    raw: bytes,
    use_raw: bool,
    sign: bool,
    path: str,
    signature: str,
) -> None:
    data = raw if use_raw else urlencode(params).encode()
    if sign and not use_raw:
        signature = RequestValidator(AUTH_TOKEN).compute_signature(PUBLIC_URL + path, params)
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": signature,
    }
    status, answer = served.request("POST", path, data, headers)
    assert status < 500, answer
