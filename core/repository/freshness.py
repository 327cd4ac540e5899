"""Manifest freshness: a signature alone does not say that a manifest is current.

A mirror or a man in the middle can serve an older, correctly signed manifest and so hide
new updates and hotfixes. ``tgops publish`` therefore writes ``generated_at`` and
``expires`` into every manifest, and the client refuses one that

* was generated before the newest manifest it accepted for that channel (a rollback), or
* has expired (a frozen mirror: the vendor re-signs within the validity).

The last good manifest stays in use while it has not expired itself; each new refusal is
reported once (``on_refused``), and so is the end of a refusal (``on_accepted``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from core.errors import ManifestRefusedError
from core.repository.manifest import Manifest

RESIGN_HINT = "the vendor re-signs it with `tgops publish --repo DIR --channel {channel} --key K`"


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """Why a channel's manifest was refused; ``key`` is the same for the same manifest and
    cause (so it is reported once, also across restarts)."""

    channel: str
    reason: str
    key: str


Refused = Callable[[Refusal], Awaitable[None]]
Accepted = Callable[[str], Awaitable[None]]


def moment(text: str | None) -> datetime | None:
    """An ISO 8601 time of a manifest (UTC when it names no zone); ``None`` if unreadable."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def expired(manifest: Manifest, now: datetime) -> bool:
    expires = moment(manifest.expires)
    return expires is not None and expires <= now


class Freshness:
    """The newest accepted manifest per channel, and the refusals in force."""

    def __init__(
        self,
        *,
        accepted: Mapping[str, Manifest] | None = None,
        refused: Mapping[str, str] | None = None,
        on_refused: Refused | None = None,
        on_accepted: Accepted | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.accepted: dict[str, Manifest] = dict(accepted or {})
        self.refused: dict[str, str] = dict(refused or {})
        """Channel → key of the refusal in force."""
        self._on_refused = on_refused
        self._on_accepted = on_accepted
        self._now = now

    def problem(self, manifest: Manifest) -> Refusal | None:
        """Why ``manifest`` must be refused, or ``None``."""
        channel = manifest.channel
        now = self._now()
        generated = moment(manifest.generated_at)
        last = self.accepted.get(channel)
        newest = moment(last.generated_at) if last is not None else None
        if newest is not None and (generated is None or generated < newest):
            shown = manifest.generated_at or "no time"
            return Refusal(
                channel=channel,
                reason=(
                    f"rollback refused: the manifest served was generated {shown}, before "
                    f"the one accepted earlier (generated {last.generated_at if last else ''}); "
                    "the repository or a mirror serves an old copy"
                ),
                key=f"{channel}:rollback:{shown}",
            )
        if expired(manifest, now):
            return Refusal(
                channel=channel,
                reason=(
                    f"the manifest expired at {manifest.expires}; "
                    + RESIGN_HINT.format(channel=channel)
                ),
                key=f"{channel}:expired:{manifest.generated_at}",
            )
        return None

    async def check(self, manifest: Manifest) -> Manifest:
        """``manifest`` when it is fresh; else the last good one of its channel (the refusal
        is reported once); ``ManifestRefusedError`` when there is no good one left."""
        channel = manifest.channel
        refusal = self.problem(manifest)
        if refusal is None:
            self.accepted[channel] = manifest
            if self.refused.pop(channel, None) is not None and self._on_accepted is not None:
                await self._on_accepted(channel)
            return manifest
        if self.refused.get(channel) != refusal.key:
            self.refused[channel] = refusal.key
            if self._on_refused is not None:
                await self._on_refused(refusal)
        last = self.accepted.get(channel)
        if last is not None and not expired(last, self._now()):
            return last
        if last is not None:
            raise ManifestRefusedError(
                channel,
                f"{refusal.reason}; the last good manifest expired at {last.expires} too, so "
                f"no updates can be planned until {RESIGN_HINT.format(channel=channel)}",
            )
        raise ManifestRefusedError(channel, refusal.reason)
