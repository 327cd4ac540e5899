"""Values of the domain: frozen dataclasses shared by every layer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Literal

LbState = Literal["in", "drained"]


class Role(StrEnum):
    """L11: ``maint`` and ``update`` include ``viewer``."""

    VIEWER = "viewer"
    MAINT = "maint"
    UPDATE = "update"


class PackageKind(StrEnum):
    REGULAR = "regular"
    CORE = "core"
    HOTFIX = "hotfix"
    OPTIONAL = "optional"


@dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    """A user logged in to a node."""

    user: str
    id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeStatus:
    """What a node driver reports about its node."""

    installed: Mapping[str, str]
    sessions: tuple[Session, ...]
    logon_enabled: bool
    lb: LbState | None
    restart_required: bool
    staged: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class StagedPackage:
    """A verified package file handed to a driver for staging on its node."""

    name: str
    version: str
    kind: PackageKind
    sha256: str
    path: Path
    size: int | None = None
    """The file's size from the manifest, when known (a staged copy is checked by it)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class InstallResult:
    installed: Mapping[str, str]
    restart_required: bool
    output: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class IntegrityMismatch:
    package: str
    path: str
    problem: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandOutput:
    """What one driver command printed, for the run's log."""

    operation: str
    command: str
    exit_status: int
    stdout: str
    stderr: str
    at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Actor:
    """Who asked for something, and from where (L13)."""

    name: str
    source: str  # slack, api, cli, scheduler, system
    roles: frozenset[Role] = frozenset()

    def __str__(self) -> str:
        return f"{self.name} ({self.source})"


SYSTEM = Actor(name="tgops", source="system", roles=frozenset(Role))
