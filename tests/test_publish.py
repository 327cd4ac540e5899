"""``tgops keygen`` and ``tgops publish``: real .deb files, a real repository directory."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from debian.debfile import DebFile

from bot.demo.debbuild import SOURCE_DATE_EPOCH
from core.errors import (
    ChannelNameError,
    KeyExistsError,
    ManifestSignatureError,
    NotADebError,
    PublishConflictError,
    PublishError,
    SigningKeyError,
)
from core.model import PackageKind
from core.repository.manifest import load_public_key, verify_manifest
from core.repository.publish import keygen, public_key_path, publish, read_control
from tests.debs import build_deb


@pytest.fixture
def key(tmp_path: Path) -> Path:
    out = tmp_path / "keys" / "signing.key"
    out.parent.mkdir()
    keygen(out)
    return out


@pytest.fixture
def debs(tmp_path: Path) -> Path:
    directory = tmp_path / "debs"
    directory.mkdir()
    return directory


def read_channel(repo: Path, channel: str, key: Path) -> dict[str, Any]:
    """The channel's manifest, after checking its signature the way clients do."""
    body = (repo / "channels" / f"{channel}.json").read_bytes()
    sig = (repo / "channels" / f"{channel}.json.sig").read_bytes()
    public = load_public_key(public_key_path(key).read_text())
    verify_manifest(channel, body, sig, public)
    data: dict[str, Any] = json.loads(body)
    return data


def test_keygen_writes_a_private_key_only_the_owner_reads_and_the_config_value(
    tmp_path: Path,
) -> None:
    out = tmp_path / "k"
    keygen(out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    pub_text = (tmp_path / "k.pub").read_text()
    assert pub_text.endswith("\n")
    assert len(base64.b64decode(pub_text.strip(), validate=True)) == 32
    load_public_key(pub_text)  # the value of updates.public_key


@pytest.mark.parametrize("existing", ["k", "k.pub"])
def test_keygen_never_overwrites(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_text("precious\n")
    with pytest.raises(KeyExistsError, match="already exists"):
        keygen(tmp_path / "k")
    assert (tmp_path / existing).read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]


def test_keygen_refuses_a_symlink_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "k").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(KeyExistsError):
        keygen(tmp_path / "k")
    assert not (tmp_path / "elsewhere").exists()


def test_publish_copies_to_the_pool_and_signs_the_manifest(
    tmp_path: Path, key: Path, debs: Path
) -> None:
    repo = tmp_path / "repo"
    deb = build_deb(debs, "tg-base", "2.1-1")
    seen: list[tuple[str, int, int]] = []
    result = publish(
        repo,
        "stable",
        key,
        [deb],
        summary="base system",
        progress=lambda name, done, total: seen.append((name, done, total)),
    )
    assert result.changed
    assert [e.name for e in result.added] == ["tg-base"]
    assert result.unchanged == ()
    data = read_channel(repo, "stable", key)
    assert data["channel"] == "stable"
    assert isinstance(data["generated_at"], str)
    [entry] = data["packages"]
    size = deb.stat().st_size
    assert entry == {
        "name": "tg-base",
        "version": "2.1-1",
        "kind": "regular",
        "id": None,
        "urgency": None,
        "summary": "base system",
        "size": size,
        "sha256": result.added[0].sha256,
        "path": "pool/tg-base_2.1-1_all.deb",
        "arch": "all",
    }
    assert (repo / "pool" / "tg-base_2.1-1_all.deb").read_bytes() == deb.read_bytes()
    assert seen[-1] == (deb.name, size, size)
    leftovers = [p.name for p in (repo / "pool").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_publishing_the_same_file_again_changes_nothing(
    tmp_path: Path, key: Path, debs: Path
) -> None:
    repo = tmp_path / "repo"
    deb = build_deb(debs, "tg-base", "2.1-1")
    publish(repo, "stable", key, [deb])
    manifest = repo / "channels" / "stable.json"
    before = (manifest.read_bytes(), manifest.stat().st_mtime_ns)
    again = publish(repo, "stable", key, [deb])
    assert not again.changed
    assert [e.name for e in again.unchanged] == ["tg-base"]
    assert (manifest.read_bytes(), manifest.stat().st_mtime_ns) == before


def test_a_rebuilt_package_is_the_same_file_and_publishing_it_is_a_no_op(
    tmp_path: Path, key: Path, debs: Path
) -> None:
    repo = tmp_path / "repo"
    files = {"usr/share/tg-base/VERSION": b"2.1-1\n", "etc/tg/base.conf": b"on\n"}
    first = build_deb(debs, "tg-base", "2.1-1", files, postinst="#!/bin/sh\nexit 0\n")
    publish(repo, "stable", key, [first])
    manifest = repo / "channels" / "stable.json"
    before = (manifest.read_bytes(), manifest.stat().st_mtime_ns)
    other = tmp_path / "other"
    other.mkdir()
    old_umask = os.umask(0o027)  # files written group-only, others nothing
    try:
        again = build_deb(other, "tg-base", "2.1-1", files, postinst="#!/bin/sh\nexit 0\n")
    finally:
        os.umask(old_umask)
    assert again.read_bytes() == first.read_bytes()
    assert not publish(repo, "stable", key, [again]).changed
    assert (manifest.read_bytes(), manifest.stat().st_mtime_ns) == before
    with again.open("rb") as handle:
        deb = DebFile(fileobj=handle)
        entries = {str(m.name): m for m in deb.data.tgz().getmembers()}
        control = {str(m.name): m for m in deb.control.tgz().getmembers()}
        deb.close()
    assert {m.mtime for m in [*entries.values(), *control.values()]} == {SOURCE_DATE_EPOCH}
    assert {(m.uname, m.gname) for m in entries.values()} == {("root", "root")}
    assert stat.S_IMODE(entries["./etc/tg/base.conf"].mode) == 0o644
    assert stat.S_IMODE(entries["./etc/tg"].mode) == 0o755
    assert stat.S_IMODE(control["./postinst"].mode) == 0o755


def test_a_different_file_under_a_published_version_is_refused(
    tmp_path: Path, key: Path, debs: Path
) -> None:
    repo = tmp_path / "repo"
    publish(repo, "stable", key, [build_deb(debs, "tg-base", "2.1-1")])
    snapshot = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    other = tmp_path / "other"
    other.mkdir()
    rebuilt = build_deb(other, "tg-base", "2.1-1", {"etc/tg/changed": b"new content"})
    new = build_deb(other, "tg-new", "1.0")
    with pytest.raises(
        PublishConflictError, match=r"tg-base 2\.1-1: .*different file.*new version"
    ):
        publish(repo, "stable", key, [new, rebuilt])
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == snapshot


def test_a_newer_version_is_added_beside_the_older_one(
    tmp_path: Path, key: Path, debs: Path
) -> None:
    repo = tmp_path / "repo"
    publish(repo, "stable", key, [build_deb(debs, "tg-base", "2.1-1")])
    publish(repo, "stable", key, [build_deb(debs, "tg-base", "2.10-1")])
    publish(repo, "stable", key, [build_deb(debs, "tg-base", "2.2~rc1-1")])
    data = read_channel(repo, "stable", key)
    versions = [p["version"] for p in data["packages"]]
    assert versions == ["2.1-1", "2.2~rc1-1", "2.10-1"]  # Debian order, all kept


def test_an_epoch_is_written_percent_encoded_in_the_pool(
    tmp_path: Path, key: Path, debs: Path
) -> None:
    repo = tmp_path / "repo"
    result = publish(repo, "stable", key, [build_deb(debs, "tg-base", "1:0.9-1", arch="amd64")])
    assert result.added[0].path == "pool/tg-base_1%3a0.9-1_amd64.deb"
    assert (repo / "pool" / "tg-base_1%3a0.9-1_amd64.deb").is_file()


def test_hotfix_entries_carry_id_and_urgency(tmp_path: Path, key: Path, debs: Path) -> None:
    repo = tmp_path / "repo"
    normal = publish(
        repo, "stable", key, [build_deb(debs, "tg-vnc", "1.0-2")], hotfix_id="HF-1"
    ).added[0]
    urgent = publish(
        repo,
        "stable",
        key,
        [build_deb(debs, "tg-web", "3.0-2")],
        hotfix_id="HF-2",
        urgency="urgent",
        summary="fixes a remote crash",
    ).added[0]
    assert (normal.kind, normal.id, normal.urgency) == (PackageKind.HOTFIX, "HF-1", "normal")
    assert (urgent.kind, urgent.id, urgent.urgency) == (PackageKind.HOTFIX, "HF-2", "urgent")
    data = read_channel(repo, "stable", key)
    assert [(p["id"], p["urgency"]) for p in data["packages"]] == [
        ("HF-1", "normal"),
        ("HF-2", "urgent"),
    ]


def test_hotfix_options_must_fit_together(tmp_path: Path, key: Path, debs: Path) -> None:
    deb = build_deb(debs, "tg-vnc", "1.0-2")
    repo = tmp_path / "repo"
    with pytest.raises(PublishError, match="needs an id"):
        publish(repo, "stable", key, [deb], kind=PackageKind.HOTFIX)
    with pytest.raises(PublishError, match="hotfixes only"):
        publish(repo, "stable", key, [deb], urgency="urgent")
    with pytest.raises(PublishError, match="cannot be combined"):
        publish(repo, "stable", key, [deb], kind=PackageKind.CORE, hotfix_id="HF-1")
    with pytest.raises(PublishError, match="hotfix id"):
        publish(repo, "stable", key, [deb], hotfix_id="no spaces")
    assert not (repo / "channels" / "stable.json").exists()


def test_republishing_with_other_metadata_is_refused(tmp_path: Path, key: Path, debs: Path) -> None:
    deb = build_deb(debs, "tg-vnc", "1.0-2")
    repo = tmp_path / "repo"
    publish(repo, "stable", key, [deb])
    with pytest.raises(PublishConflictError, match="with kind 'regular', not 'hotfix'"):
        publish(repo, "stable", key, [deb], hotfix_id="HF-1")


@pytest.mark.parametrize("kind", [PackageKind.CORE, PackageKind.OPTIONAL])
def test_core_and_optional_kinds(tmp_path: Path, key: Path, debs: Path, kind: PackageKind) -> None:
    repo = tmp_path / "repo"
    publish(repo, "stable", key, [build_deb(debs, "tg-pkg", "1.0")], kind=kind)
    data = read_channel(repo, "stable", key)
    assert data["packages"][0]["kind"] == kind.value


def test_channels_share_the_pool(tmp_path: Path, key: Path, debs: Path) -> None:
    repo = tmp_path / "repo"
    deb = build_deb(debs, "tg-base", "2.0-1")
    publish(repo, "stable", key, [deb])
    old = publish(repo, "oldstable", key, [deb])
    assert old.added[0].path == "pool/tg-base_2.0-1_all.deb"
    other = tmp_path / "other"
    other.mkdir()
    rebuilt = build_deb(other, "tg-base", "2.0-1", {"x": b"different"})
    with pytest.raises(PublishConflictError, match="already holds a different file"):
        publish(repo, "testing", key, [rebuilt])
    assert not (repo / "channels" / "testing.json").exists()


@pytest.mark.parametrize("channel", ["Stable", "", "../x", "a/b", "-x", "st able", "a..b"])
def test_channel_names_are_checked(tmp_path: Path, key: Path, debs: Path, channel: str) -> None:
    with pytest.raises(ChannelNameError, match="not a channel name"):
        publish(tmp_path / "repo", channel, key, [build_deb(debs, "tg-base", "1.0")])
    assert not (tmp_path / "repo").exists()


def test_not_a_deb(tmp_path: Path, key: Path) -> None:
    junk = tmp_path / "junk.deb"
    junk.write_bytes(b"this is not an ar archive\n")
    with pytest.raises(NotADebError, match=r"junk\.deb: not a usable \.deb package"):
        publish(tmp_path / "repo", "stable", key, [junk])
    with pytest.raises(NotADebError, match="no such file"):
        publish(tmp_path / "repo", "stable", key, [tmp_path / "missing.deb"])
    assert not (tmp_path / "repo").exists()


def test_read_control(debs: Path) -> None:
    control = read_control(build_deb(debs, "tg-base", "1:2.0-3", arch="amd64"))
    assert (control.name, control.version, control.arch) == ("tg-base", "1:2.0-3", "amd64")


def test_signing_key_problems_are_one_line_each(tmp_path: Path, debs: Path) -> None:
    deb = build_deb(debs, "tg-base", "1.0")
    repo = tmp_path / "repo"
    with pytest.raises(SigningKeyError, match=r"missing\.key: no such file \(create a key pair"):
        publish(repo, "stable", tmp_path / "missing.key", [deb])
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    with pytest.raises(SigningKeyError, match="not a PEM private key"):
        publish(repo, "stable", garbage, [deb])
    ec_key = ec.generate_private_key(ec.SECP256R1())
    wrong = tmp_path / "ec.key"
    wrong.write_bytes(ec_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    with pytest.raises(SigningKeyError, match="not an ed25519 key"):
        publish(repo, "stable", wrong, [deb])
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        ec_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"pw"))
    )
    with pytest.raises(SigningKeyError, match="encrypted"):
        publish(repo, "stable", locked, [deb])
    with pytest.raises(SigningKeyError, match="is a directory"):
        publish(repo, "stable", tmp_path, [deb])
    for error in (SigningKeyError("k", "x"), NotADebError("d", "y")):
        assert "\n" not in str(error)


def test_a_manifest_changed_behind_publishs_back_is_not_re_signed(
    tmp_path: Path, key: Path, debs: Path
) -> None:
    repo = tmp_path / "repo"
    publish(repo, "stable", key, [build_deb(debs, "tg-base", "1.0")])
    manifest = repo / "channels" / "stable.json"
    tampered = manifest.read_bytes().replace(b'"regular"', b'"core"')
    manifest.write_bytes(tampered)
    with pytest.raises(PublishError, match="does not verify with this key") as caught:
        publish(repo, "stable", key, [build_deb(debs, "tg-web", "1.0")])
    assert isinstance(caught.value.__cause__, ManifestSignatureError)
    assert manifest.read_bytes() == tampered


def test_another_key_cannot_extend_a_channel(tmp_path: Path, key: Path, debs: Path) -> None:
    repo = tmp_path / "repo"
    publish(repo, "stable", key, [build_deb(debs, "tg-base", "1.0")])
    second = tmp_path / "second.key"
    keygen(second)
    with pytest.raises(PublishError, match="signed with another key"):
        publish(repo, "stable", second, [build_deb(debs, "tg-web", "1.0")])


def test_a_missing_pool_file_is_put_back(tmp_path: Path, key: Path, debs: Path) -> None:
    repo = tmp_path / "repo"
    deb = build_deb(debs, "tg-base", "1.0")
    publish(repo, "stable", key, [deb])
    (repo / "pool" / deb.name).unlink()
    result = publish(repo, "stable", key, [deb])
    assert not result.changed
    assert (repo / "pool" / deb.name).read_bytes() == deb.read_bytes()
