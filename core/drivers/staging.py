"""Staged package files: their names on a node and their checksums."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 1 << 20


def staged_file_name(name: str, version: str) -> str:
    """``<name>_<version>.deb``, an epoch colon written ``%3a`` as in Debian pools."""
    return f"{name}_{version.replace(':', '%3a')}.deb"


def parse_staged(names: Iterable[str]) -> dict[str, str]:
    """``{package: version}`` from the file names of a staging directory."""
    staged: dict[str, str] = {}
    for name in names:
        if not name.endswith(".deb") or "_" not in name or name.startswith("."):
            continue
        package, version = name.removesuffix(".deb").split("_", 1)
        staged[package] = version.replace("%3a", ":")
    return staged


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
