"""Slack's Web API and response URLs as the bot uses them: retried, bounded, never silent.

Transient failures (HTTP 429 with ``Retry-After``, every 5xx, dropped connections) are retried
by slack_sdk's retry handlers, each attempt logged. What still fails is logged with the
method and what it was for, and the caller gets ``None``/``False`` to fall back on. The bot
token never reaches a log line (slack_sdk redacts the Authorization header itself).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

log = logging.getLogger(__name__)

CALL_TIMEOUT = 10
"""Seconds for one HTTP attempt against Slack."""
TOTAL_TIMEOUT = 90.0
"""Seconds for one call including every retry (a Retry-After can be long)."""


def _what(request: HttpRequest) -> str:
    """The API method of a request (``chat.update``), or ``response_url`` for webhooks."""
    path = urlsplit(request.url).path
    if "/api/" in path:
        return path.rsplit("/", 1)[-1]
    return "response_url"


class RateLimitRetry(AsyncRateLimitErrorRetryHandler):
    """429: wait as long as ``Retry-After`` says, then try again (logged)."""

    async def prepare_for_next_attempt_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> None:
        after = None
        if response is not None:
            for key, values in response.headers.items():
                if key.lower() == "retry-after" and values:
                    after = values[0]
        log.warning(
            "Slack %s: rate limited (HTTP 429, Retry-After %s s); retry %d of %d",
            _what(request),
            after or "?",
            state.current_attempt + 1,
            self.max_retry_count,
        )
        await super().prepare_for_next_attempt_async(
            state=state, request=request, response=response, error=error
        )


class ServerErrorRetry(AsyncServerErrorRetryHandler):
    """Every 5xx (slack_sdk's own handler only knows 500 and 503; Slack's edge also answers
    502 and 504): back off and try again (logged)."""

    async def _can_retry_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        return response is not None and 500 <= response.status_code <= 599

    async def prepare_for_next_attempt_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> None:
        log.warning(
            "Slack %s: HTTP %s; retry %d of %d",
            _what(request),
            response.status_code if response is not None else "?",
            state.current_attempt + 1,
            self.max_retry_count,
        )
        await super().prepare_for_next_attempt_async(
            state=state, request=request, response=response, error=error
        )


class ConnectionErrorRetry(AsyncConnectionErrorRetryHandler):
    """A refused or dropped connection: back off and try again (logged)."""

    async def prepare_for_next_attempt_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> None:
        log.warning(
            "Slack %s: connection failed (%s); retry %d of %d",
            _what(request),
            type(error).__name__ if error is not None else "?",
            state.current_attempt + 1,
            self.max_retry_count,
        )
        await super().prepare_for_next_attempt_async(
            state=state, request=request, response=response, error=error
        )


def retry_handlers() -> list[AsyncRetryHandler]:
    """The one retry policy for every Slack call: only these named transient failures."""
    return [
        ConnectionErrorRetry(max_retry_count=2),
        RateLimitRetry(max_retry_count=3),
        ServerErrorRetry(max_retry_count=2),
    ]


class SlackApi:
    """The Web API (``slack.api_url``) and response URLs, on one aiohttp session."""

    def __init__(self, *, token: str, base_url: str, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.client = AsyncWebClient(
            token=token,
            base_url=base_url,
            session=session,
            timeout=CALL_TIMEOUT,
            retry_handlers=retry_handlers(),
        )

    async def call(self, method: str, what: str, **params: Any) -> dict[str, Any] | None:
        """One Web API call; its data, or ``None`` after logging why it finally failed."""
        try:
            async with asyncio.timeout(TOTAL_TIMEOUT):
                response = await self.client.api_call(method, json=params)
        except SlackApiError as exc:
            answer = exc.response
            problem = f"HTTP {answer.status_code}, {answer.get('error') or exc}"
        except TimeoutError:
            problem = f"no answer within {TOTAL_TIMEOUT:.0f}s"
        except (aiohttp.ClientError, OSError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        else:
            data = response.data
            return data if isinstance(data, dict) else {}
        log.error("Slack %s for %s failed: %s", method, what, problem)
        return None

    async def respond(self, url: str, body: dict[str, Any], what: str) -> bool:
        """Post to a ``response_url``; ``False`` (logged) when it finally failed."""
        hook = AsyncWebhookClient(
            url, session=self.session, timeout=CALL_TIMEOUT, retry_handlers=retry_handlers()
        )
        try:
            async with asyncio.timeout(TOTAL_TIMEOUT):
                response = await hook.send_dict(body)
        except TimeoutError:
            problem = f"no answer within {TOTAL_TIMEOUT:.0f}s"
        except (aiohttp.ClientError, OSError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        else:
            if response.status_code == 200:
                return True
            problem = f"HTTP {response.status_code}, {(response.body or '')[:200]}"
        log.error("Slack response_url for %s failed: %s", what, problem)
        return False
