"""A signed update repository built in a test: real .deb files, `tgops publish`'s code."""

from __future__ import annotations

from pathlib import Path

from core.model import PackageKind
from core.repository.publish import keygen, public_key_path, publish
from tests.debs import build_deb


class Repo:
    """A repository directory with its own key pair; ``add`` builds and publishes a .deb."""

    def __init__(self, root: Path) -> None:
        self.root = root / "repo"
        self.debs = root / "debs"
        self.debs.mkdir(parents=True, exist_ok=True)
        self.key = root / "repo.key"
        keygen(self.key)
        self.public_key = public_key_path(self.key).read_text().strip()

    def add(
        self,
        name: str,
        version: str,
        *,
        channel: str = "stable",
        kind: PackageKind = PackageKind.REGULAR,
        hotfix: str | None = None,
        urgency: str = "normal",
        summary: str = "",
        files: dict[str, bytes] | None = None,
    ) -> Path:
        deb = build_deb(self.debs, name, version, files)
        publish(
            self.root,
            channel,
            self.key,
            [deb],
            kind=PackageKind.HOTFIX if hotfix else kind,
            hotfix_id=hotfix,
            urgency="urgent" if urgency == "urgent" else "normal" if hotfix else None,
            summary=summary,
        )
        return deb
