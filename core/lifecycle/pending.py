"""What a node should install: pending updates, omitted updates and catch-up from oldstable.

Versions compare as Debian versions (``debian.debian_support.Version``): ``1.0~rc1`` is
older than ``1.0``, and an epoch beats everything after it (``1:0.9`` is newer than ``2.0``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from debian.debian_support import Version

from core.errors import UnknownPackageError
from core.model import PackageKind
from core.repository.manifest import Manifest, PackageEntry


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as Debian version ``a`` is older than, equal to or newer than ``b``."""
    left, right = Version(a), Version(b)
    return (left > right) - (left < right)


def is_newer(version: str, than: str | None) -> bool:
    """Whether ``version`` is newer than the installed ``than`` (None: not installed)."""
    return than is None or Version(version) > Version(than)


def newest(entries: Iterable[PackageEntry]) -> dict[str, PackageEntry]:
    """The newest entry per package name."""
    best: dict[str, PackageEntry] = {}
    for entry in entries:
        current = best.get(entry.name)
        if current is None or Version(entry.version) > Version(current.version):
            best[entry.name] = entry
    return best


def pending_packages(
    manifest: Manifest,
    installed: Mapping[str, str],
    *,
    selected_hotfixes: Collection[str],
    always_hotfixes: bool,
    requested_optional: Collection[str] = (),
) -> list[PackageEntry]:
    """The entries a node should install from ``manifest`` (docs/lifecycle.md, L1 and L8), by name.

    Per package name the newest entry the node may take counts:
    ``regular`` and ``core`` always; ``hotfix`` when its id is selected or
    ``always_hotfixes`` is on; ``optional`` when the package is installed already or named
    in ``requested_optional``. It is pending when the node lacks the package or has an
    older version. An unselected hotfix therefore never hides a regular update beneath it,
    and a hotfix of an optional package counts only where the package is wanted.
    """
    optional = {e.name for e in manifest.packages if e.kind is PackageKind.OPTIONAL}

    def wanted(name: str) -> bool:
        return name not in optional or name in installed or name in requested_optional

    def eligible(entry: PackageEntry) -> bool:
        if entry.kind is PackageKind.HOTFIX:
            return wanted(entry.name) and (always_hotfixes or entry.key in selected_hotfixes)
        return wanted(entry.name)

    best = newest(e for e in manifest.packages if eligible(e))
    return [
        entry
        for name, entry in sorted(best.items())
        if is_newer(entry.version, installed.get(name))
    ]


def _baseline(manifest: Manifest) -> dict[str, PackageEntry]:
    """The newest non-hotfix entry per package: what a channel's release consists of."""
    return newest(e for e in manifest.packages if e.kind is not PackageKind.HOTFIX)


def omitted_update(installed: Mapping[str, str], oldstable_manifest: Manifest) -> list[str]:
    """Installed packages older than the oldstable channel's version (L9's warning), by name."""
    return sorted(
        name
        for name, entry in _baseline(oldstable_manifest).items()
        if name in installed and is_newer(entry.version, installed[name])
    )


def catch_up(
    installed: Mapping[str, str],
    oldstable_manifest: Manifest,
    packages: Collection[str] | None = None,
) -> list[PackageEntry]:
    """The entries that bring ``packages`` (all when None) up to the oldstable versions (L9).

    With ``packages`` None: every ``regular`` and ``core`` package, and ``optional`` ones that
    are installed. Named packages are taken whatever their kind (hotfixes excepted); a name
    the channel lacks raises ``UnknownPackageError``.
    """
    baseline = _baseline(oldstable_manifest)
    if packages is None:
        names = [
            name
            for name, entry in baseline.items()
            if entry.kind is not PackageKind.OPTIONAL or name in installed
        ]
    else:
        unknown = sorted(set(packages) - baseline.keys())
        if unknown:
            raise UnknownPackageError(oldstable_manifest.channel, unknown)
        names = list(packages)
    return [
        baseline[name]
        for name in sorted(set(names))
        if is_newer(baseline[name].version, installed.get(name))
    ]


def hotfixes_missing(manifest: Manifest, installed: Mapping[str, str]) -> list[PackageEntry]:
    """The channel's hotfixes not installed (at their version or newer) on a node, selected
    or not: what monitoring reports, since an urgent hotfix nobody selected is still
    missing."""
    return [
        entry
        for entry in manifest.hotfixes()
        if entry.id and is_newer(entry.version, installed.get(entry.name))
    ]
