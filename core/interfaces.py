"""Every pluggable boundary of ``core``, as small protocols.

Implementations live beside this module: ``drivers/`` (nodes), ``store/``,
``repository/client.py`` (update repository), ``events.py`` (local bus), ``clock.py``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

from core.events import Event
from core.model import (
    CommandOutput,
    InstallResult,
    IntegrityMismatch,
    NodeStatus,
    StagedPackage,
)
from core.repository.manifest import Manifest, PackageEntry

OutputSink = Callable[[CommandOutput], Awaitable[None]]
"""Receives the output and exit status of every command a driver runs (the run's log)."""


@runtime_checkable
class NodeDriver(Protocol):
    """Acts on one node. Every method raises ``DriverError`` naming node, operation and cause."""

    name: str

    async def status(self) -> NodeStatus: ...

    async def announce(self, message: str) -> None:
        """Show a notice to every logged-in user."""

    async def set_logon(self, enabled: bool) -> None: ...

    async def drain(self) -> None:
        """Take the node out of load balancing."""

    async def undrain(self) -> None:
        """Put the node back into load balancing."""

    async def disconnect_sessions(self) -> int:
        """End every user session; returns how many were ended."""

    async def stage(self, packages: Sequence[StagedPackage]) -> None:
        """Copy verified package files onto the node, ready to install."""

    async def install(self, packages: Sequence[StagedPackage]) -> InstallResult:
        """Install staged packages; core packages make the result ask for a restart."""

    async def restart_services(self) -> None: ...

    async def reboot(self) -> None: ...

    async def post_check(self) -> None:
        """The post-update check: raises ``DriverError`` when the node does not work."""

    async def verify_integrity(self) -> list[IntegrityMismatch]: ...

    async def aclose(self) -> None: ...


class LoadBalancer(Protocol):
    """Takes cluster nodes out of and back into load distribution."""

    async def drain(self, node: str) -> None: ...

    async def undrain(self, node: str) -> None: ...


class RepositoryClient(Protocol):
    async def manifest(self, channel: str) -> Manifest:
        """The channel's manifest, signature verified before anything is parsed."""

    async def download(
        self,
        entry: PackageEntry,
        progress: Callable[[int, int], Awaitable[None]] | None = None,
    ) -> Path:
        """A verified local copy of the package (from the content cache if present)."""


class EventSink(Protocol):
    async def publish(self, event: Event) -> None: ...


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware (UTC)."""

    async def sleep_until(self, when: datetime) -> None: ...


class NoticeTexts(Protocol):
    """The notices users logged in to a node read (``NodeDriver.announce``), in the
    node's language. ``core.notices.EnglishNotices`` is the default; the service hands
    the engine the translated templates of ``notify``."""

    def maintenance(self, node: str, start: datetime, reason: str) -> str:
        """A reminder of a maintenance window (sent until it starts)."""

    def maintenance_ended(self, node: str) -> str: ...

    def work_starts(self, node: str, kind: str) -> str:
        """An update (or ``kind`` ``restart``) ends the sessions now."""

    def update_held(self, node: str, start: datetime) -> str:
        """The scheduled update planned for ``start`` waits: the gate holds it."""

    def update_resumes(self, node: str, start: datetime) -> str:
        """A held scheduled update goes on; it starts at ``start``."""
