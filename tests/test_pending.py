"""Pending updates, omitted updates and catch-up from oldstable, with Debian version order."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import UnknownPackageError
from core.lifecycle.pending import (
    catch_up,
    compare_versions,
    is_newer,
    newest,
    omitted_update,
    pending_packages,
)
from core.model import PackageKind
from core.repository.manifest import Manifest, PackageEntry


def pkg(name: str, version: str, kind: str = "regular", **extra: Any) -> PackageEntry:
    if kind == "hotfix":
        extra.setdefault("id", f"HF-{name}-{version}")
        extra.setdefault("urgency", "normal")
    return PackageEntry(
        name=name,
        version=version,
        kind=PackageKind(kind),
        size=1,
        sha256="0" * 64,
        path=f"pool/{name}_{version.replace(':', '%3a')}_all.deb",
        **extra,
    )


def channel(*packages: PackageEntry, name: str = "stable") -> Manifest:
    return Manifest(channel=name, generated_at="2024-05-01T00:00:00+00:00", packages=packages)


def names(entries: list[PackageEntry]) -> list[tuple[str, str]]:
    return [(e.name, e.version) for e in entries]


@pytest.mark.parametrize(
    ("older", "newer"),
    [
        ("1.0~rc1", "1.0"),
        ("1.0~~", "1.0~"),
        ("2.0", "1:0.9"),
        ("1.0", "1.0-1"),
        ("1.0-1", "1.0-1+deb12u1"),
        ("1.9", "1.10"),
        ("1.0a", "1.0b"),
        ("1:2.0", "2:0.1"),
    ],
)
def test_debian_version_order(older: str, newer: str) -> None:
    assert compare_versions(older, newer) == -1
    assert compare_versions(newer, older) == 1
    assert is_newer(newer, older)
    assert not is_newer(older, newer)


def test_equal_versions() -> None:
    assert compare_versions("1.0", "0:1.0") == 0
    assert not is_newer("1.0", "1.0")
    assert is_newer("0.1", None)


def test_newest_entry_per_name_wins() -> None:
    manifest = channel(
        pkg("tg-a", "1.0"), pkg("tg-a", "1.0~rc1"), pkg("tg-a", "1:0.1"), pkg("tg-b", "2")
    )
    best = {n: e.version for n, e in newest(manifest.packages).items()}
    assert best == {"tg-a": "1:0.1", "tg-b": "2"}


def pending(manifest: Manifest, installed: dict[str, str], **options: Any) -> list[tuple[str, str]]:
    options.setdefault("selected_hotfixes", ())
    options.setdefault("always_hotfixes", False)
    return names(pending_packages(manifest, installed, **options))


def test_regular_and_core_packages_are_pending_when_missing_or_older() -> None:
    manifest = channel(
        pkg("tg-base", "2.0"),
        pkg("tg-base", "2.1~rc1"),
        pkg("tg-kernel", "6.1", "core"),
        pkg("tg-web", "1.0"),
        pkg("tg-new", "0.1"),
    )
    installed = {"tg-base": "2.0", "tg-kernel": "6.1", "tg-web": "1.1"}
    assert pending(manifest, installed) == [("tg-base", "2.1~rc1"), ("tg-new", "0.1")]


def test_an_epoch_makes_a_lower_looking_version_pending() -> None:
    manifest = channel(pkg("tg-base", "1:0.9"))
    assert pending(manifest, {"tg-base": "2.0"}) == [("tg-base", "1:0.9")]


def test_hotfixes_only_when_selected_or_always() -> None:
    manifest = channel(
        pkg("tg-vnc", "1.0"),
        pkg("tg-vnc", "1.0+hf1", "hotfix", id="HF-1"),
        pkg("tg-web", "3.0+hf2", "hotfix", id="HF-2"),
    )
    installed = {"tg-vnc": "0.9", "tg-web": "3.0"}
    # an unselected hotfix never hides the regular update beneath it
    assert pending(manifest, installed) == [("tg-vnc", "1.0")]
    assert pending(manifest, installed, selected_hotfixes={"HF-1"}) == [("tg-vnc", "1.0+hf1")]
    assert pending(manifest, installed, always_hotfixes=True) == [
        ("tg-vnc", "1.0+hf1"),
        ("tg-web", "3.0+hf2"),
    ]


def test_an_installed_hotfix_is_not_pending_again() -> None:
    manifest = channel(pkg("tg-vnc", "1.0+hf1", "hotfix", id="HF-1"))
    assert pending(manifest, {"tg-vnc": "1.0+hf1"}, selected_hotfixes={"HF-1"}) == []
    assert pending(manifest, {"tg-vnc": "1.1"}, always_hotfixes=True) == []


def test_optional_packages_only_when_installed_or_requested() -> None:
    manifest = channel(pkg("tg-ibus-de", "1.1", "optional"), pkg("tg-ibus-fr", "1.0", "optional"))
    assert pending(manifest, {}) == []
    assert pending(manifest, {"tg-ibus-de": "1.0"}) == [("tg-ibus-de", "1.1")]
    assert pending(manifest, {"tg-ibus-de": "1.1"}) == []
    assert pending(manifest, {}, requested_optional={"tg-ibus-fr"}) == [("tg-ibus-fr", "1.0")]


def test_a_hotfix_of_an_optional_package_needs_the_package() -> None:
    manifest = channel(
        pkg("tg-ibus-de", "1.0", "optional"), pkg("tg-ibus-de", "1.0+hf1", "hotfix", id="HF-7")
    )
    assert pending(manifest, {}, always_hotfixes=True) == []
    assert pending(manifest, {"tg-ibus-de": "1.0"}, always_hotfixes=True) == [
        ("tg-ibus-de", "1.0+hf1")
    ]
    assert pending(manifest, {}, selected_hotfixes={"HF-7"}, requested_optional={"tg-ibus-de"}) == [
        ("tg-ibus-de", "1.0+hf1")
    ]


def test_omitted_updates_are_installed_packages_older_than_oldstable() -> None:
    oldstable = channel(
        pkg("tg-base", "2.0"),
        pkg("tg-web", "1.0"),
        pkg("tg-vnc", "5.0+hf1", "hotfix", id="HF-9"),
        pkg("tg-absent", "1.0"),
        name="oldstable",
    )
    installed = {"tg-base": "1.9", "tg-web": "1.0", "tg-vnc": "4.0"}
    assert omitted_update(installed, oldstable) == ["tg-base"]


def test_catch_up_to_oldstable_for_named_packages_or_all() -> None:
    oldstable = channel(
        pkg("tg-base", "2.0"),
        pkg("tg-base", "1.5"),
        pkg("tg-web", "1.0"),
        pkg("tg-kernel", "6.1", "core"),
        pkg("tg-ibus-de", "1.0", "optional"),
        pkg("tg-ibus-fr", "1.0", "optional"),
        name="oldstable",
    )
    installed = {"tg-base": "1.0", "tg-web": "1.0", "tg-kernel": "6.0", "tg-ibus-de": "0.9"}
    assert names(catch_up(installed, oldstable, ["tg-base"])) == [("tg-base", "2.0")]
    assert names(catch_up(installed, oldstable, ["tg-web"])) == []
    assert names(catch_up(installed, oldstable, None)) == [
        ("tg-base", "2.0"),
        ("tg-ibus-de", "1.0"),
        ("tg-kernel", "6.1"),
    ]
    with pytest.raises(UnknownPackageError, match="channel oldstable has no package tg-nope"):
        catch_up(installed, oldstable, ["tg-base", "tg-nope"])


# -- properties --------------------------------------------------------------------------

_upstream = st.from_regex(r"[0-9]{1,2}(\.[0-9]{1,2}){0,2}(~rc[0-9])?", fullmatch=True)
_version = st.builds(
    lambda epoch, upstream, revision: f"{epoch}{upstream}{revision}",
    st.sampled_from(["", "1:", "2:"]),
    _upstream,
    st.sampled_from(["", "-1", "-2", "-1+b1"]),
)
_names = st.sampled_from(["tg-a", "tg-b", "tg-c", "tg-d"])
# a package keeps its kind across versions; any of them may also get hotfixes
_KIND_OF = {"tg-a": "regular", "tg-b": "core", "tg-c": "optional", "tg-d": "optional"}


def _entry(name: str, version: str, hotfix: bool) -> PackageEntry:
    if hotfix:
        return pkg(name, version, "hotfix", id=f"HF-{name}-{version}")
    return pkg(name, version, _KIND_OF[name])


_entries = st.lists(st.builds(_entry, _names, _version, st.booleans()), max_size=12)


@given(
    entries=_entries,
    installed=st.dictionaries(_names, _version, max_size=4),
    always=st.booleans(),
    data=st.data(),
    requested=st.sets(_names, max_size=2),
)
def test_pending_is_always_newer_than_installed_and_one_per_package(
    entries: list[PackageEntry],
    installed: dict[str, str],
    always: bool,
    data: st.DataObject,
    requested: set[str],
) -> None:
    manifest = channel(*entries)
    ids = sorted({e.key for e in manifest.hotfixes()})
    selected = data.draw(st.sets(st.sampled_from(ids)) if ids else st.just(set[str]()))
    result = pending_packages(
        manifest,
        installed,
        selected_hotfixes=selected,
        always_hotfixes=always,
        requested_optional=requested,
    )
    assert len({e.name for e in result}) == len(result)
    for chosen in result:
        assert chosen in manifest.packages
        assert is_newer(chosen.version, installed.get(chosen.name))
        if chosen.kind is PackageKind.HOTFIX:
            assert always or chosen.key in selected
        if chosen.kind is PackageKind.OPTIONAL:
            assert chosen.name in installed or chosen.name in requested
    # installing the result leaves nothing pending
    after = {**installed, **{e.name: e.version for e in result}}
    assert (
        pending_packages(
            manifest,
            after,
            selected_hotfixes=selected,
            always_hotfixes=always,
            requested_optional=requested,
        )
        == []
    )


@given(a=_version, b=_version, c=_version)
def test_version_comparison_is_a_total_order(a: str, b: str, c: str) -> None:
    assert compare_versions(a, b) == -compare_versions(b, a)
    if compare_versions(a, b) <= 0 and compare_versions(b, c) <= 0:
        assert compare_versions(a, c) <= 0
