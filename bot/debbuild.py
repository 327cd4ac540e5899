"""Real ``.deb`` files built with ``dpkg-deb``: the demo's packages, and those of the tests."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

DPKG_DEB = shutil.which("dpkg-deb") or "/usr/bin/dpkg-deb"


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
    (root / "DEBIAN").mkdir(parents=True, exist_ok=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: {arch}\n"
        f"Maintainer: tgops <tgops@example.invalid>\nDescription: {description}\n"
    )
    if postinst is not None:
        script = root / "DEBIAN" / "postinst"
        script.write_text(postinst)
        script.chmod(0o755)
    for rel, content in (files or {f"usr/share/{name}/VERSION": version.encode()}).items():
        target = root / rel.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    out = out_dir / f"{name}_{version.replace(':', '%3a')}_{arch}.deb"
    subprocess.run(
        [DPKG_DEB, "--root-owner-group", "-Zgzip", "--build", str(root), str(out)],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(root)
    return out
