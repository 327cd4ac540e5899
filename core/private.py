"""Files that hold secrets or personal data: created readable by their owner only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_MODE = 0o600


def write_private(path: Path, data: str) -> None:
    """Write ``data`` to ``path`` with mode 0600 (also when the file existed with another)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)
        view = memoryview(data.encode())
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def make_private(path: Path) -> bool:
    """Take group and others' access from an existing file; whether it had any."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return False
    if not mode & 0o077:
        return False
    path.chmod(mode & 0o700)
    return True


def create_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (then only its mode is fixed)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_MODE)
    except FileExistsError:
        make_private(path)
    else:
        os.close(fd)


def others_may_read(path: Path) -> int | None:
    """The file's permission bits when its group or others may read it, else ``None``."""
    mode = stat.S_IMODE(path.stat().st_mode)
    return mode if mode & 0o044 else None
