"""Real ``.deb`` files built with ``dpkg-deb``: the demo's packages, and those of the tests.

The builds are reproducible: the same name, version and files give the same bytes every
time, so publishing a rebuilt package again is a no-op (a published name and version is
never given a different file). Every entry gets the same mtime (``SOURCE_DATE_EPOCH``,
which ``dpkg-deb`` also writes into the ar header), fixed modes, and root as owner;
``dpkg-deb`` sorts the entries itself and its gzip member carries no timestamp.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

DPKG_DEB = shutil.which("dpkg-deb") or "/usr/bin/dpkg-deb"

SOURCE_DATE_EPOCH = 1_704_067_200
"""2024-01-01T00:00:00Z: the mtime of every entry of a built package."""


def build_deb(
    out_dir: Path,
    name: str,
    version: str,
    files: Mapping[str, bytes] | None = None,
    *,
    arch: str = "all",
    postinst: str | None = None,
    description: str = "tgops package",
) -> Path:
    """Build ``out_dir/<name>_<version>_<arch>.deb`` holding ``files`` (path -> content)."""
    root = out_dir / f".build-{name}-{version}"
    shutil.rmtree(root, ignore_errors=True)  # left over by an interrupted build
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: {arch}\n"
        f"Maintainer: tgops <tgops@example.invalid>\nDescription: {description}\n"
    )
    if postinst is not None:
        (root / "DEBIAN" / "postinst").write_text(postinst)
    for rel, content in (files or {f"usr/share/{name}/VERSION": version.encode()}).items():
        target = root / rel.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    _normalise(root)
    out = out_dir / f"{name}_{version.replace(':', '%3a')}_{arch}.deb"
    try:
        subprocess.run(
            [DPKG_DEB, "--root-owner-group", "-Zgzip", "--build", str(root), str(out)],
            check=True,
            capture_output=True,
            env={**os.environ, "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)},
        )
    finally:
        shutil.rmtree(root)
    return out


def _normalise(root: Path) -> None:
    """Modes and mtimes that do not depend on the umask or on when the files were written."""
    scripts = {root / "DEBIAN" / "postinst"}
    paths = sorted(root.rglob("*"), reverse=True)  # children before their directories
    for path in [*paths, root]:
        path.chmod(0o755 if path.is_dir() or path in scripts else 0o644)
        os.utime(path, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))
