"""The download retry policy (L5): named transient errors only, every attempt logged."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

import aiohttp

from core.errors import DownloadError, DownloadFailedError, ManifestFetchError, TgopsError
from core.repository.cache import is_transient_status

if TYPE_CHECKING:
    from core.settings import UpdatesSettings

log = logging.getLogger(__name__)

_T = TypeVar("_T")

AttemptOutcome = Literal["ok", "transient", "fatal"]
"""How one attempt ended, for metrics: succeeded, failed worth a retry, failed for good."""


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt may succeed where this error happened."""
    if isinstance(exc, DownloadError | ManifestFetchError):
        return exc.transient
    if isinstance(exc, aiohttp.ClientResponseError):
        return is_transient_status(exc.status)
    return isinstance(
        exc,
        aiohttp.ClientConnectionError | aiohttp.ClientPayloadError | TimeoutError | ConnectionError,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Up to ``attempts`` attempts, ``delay`` seconds apart, retrying transient errors only.

    ``sleep`` is injectable so that tests can pass ``delay=0`` or a fake; ``on_attempt`` is
    called with the outcome of every attempt (metrics).
    """

    attempts: int = 10
    delay: float = 30.0
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    on_attempt: Callable[[AttemptOutcome], None] | None = None

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("a retry policy needs at least one attempt")
        if self.delay < 0:
            raise ValueError("the retry delay cannot be negative")

    @classmethod
    def from_settings(
        cls,
        updates: UpdatesSettings,
        *,
        on_attempt: Callable[[AttemptOutcome], None] | None = None,
    ) -> RetryPolicy:
        return cls(
            attempts=updates.download_attempts, delay=updates.retry_delay, on_attempt=on_attempt
        )

    def _count(self, outcome: AttemptOutcome) -> None:
        if self.on_attempt is not None:
            self.on_attempt(outcome)

    async def once(self, operation: Callable[[], Awaitable[_T]], *, describe: str) -> _T:
        """One attempt of ``operation``, counted and logged like each attempt of ``run``;
        its error is raised as it is (the caller decides what comes next)."""
        try:
            result = await operation()
        except Exception as exc:
            self._count("transient" if is_transient(exc) else "fatal")
            log.warning("%s: attempt failed: %s", describe, exc)
            raise
        self._count("ok")
        return result

    async def run(
        self,
        operation: Callable[[], Awaitable[_T]],
        *,
        describe: str,
        on_attempt_failed: Callable[[int, BaseException], Awaitable[None]] | None = None,
    ) -> _T:
        """``await operation()`` until it succeeds, at most ``attempts`` times.

        Every definitive failure raises ``DownloadFailedError`` (the original error is its
        ``last_cause`` and ``__cause__``): a non-transient ``TgopsError`` at once
        (``exhausted=False``), transient errors after the last attempt (``exhausted=True``).
        Any other exception (a bug) propagates unchanged at once.
        ``on_attempt_failed(attempt, error)`` is awaited after every failed attempt.
        """
        for attempt in range(1, self.attempts + 1):
            try:
                result = await operation()
            except Exception as exc:
                transient = is_transient(exc)
                self._count("transient" if transient else "fatal")
                if not transient:
                    log.warning(
                        "%s: attempt %d of %d failed, not retrying: %s",
                        describe,
                        attempt,
                        self.attempts,
                        exc,
                    )
                    if on_attempt_failed is not None:
                        await on_attempt_failed(attempt, exc)
                    if not isinstance(exc, TgopsError):
                        raise  # a bug, not a download failure: let it show as what it is
                    raise DownloadFailedError(describe, attempt, exc, exhausted=False) from exc
                last = attempt == self.attempts
                log.warning(
                    "%s: attempt %d of %d failed: %s%s",
                    describe,
                    attempt,
                    self.attempts,
                    exc,
                    "; giving up" if last else f"; retrying in {self.delay:g}s",
                )
                if on_attempt_failed is not None:
                    await on_attempt_failed(attempt, exc)
                if last:
                    raise DownloadFailedError(describe, self.attempts, exc) from exc
                await self.sleep(self.delay)
            else:
                self._count("ok")
                return result
        raise AssertionError("unreachable: the loop returns or raises")
