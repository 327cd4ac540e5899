"""The signed channel manifest: signature first, then every entry validated."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from core.errors import ManifestError, ManifestSignatureError
from core.model import PackageKind
from core.repository.manifest import (
    PackageEntry,
    is_confined_path,
    is_debian_version,
    load_public_key,
    verify_manifest,
)

SHA = "ab" * 32


def entry(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "tg-base",
        "version": "2.0-1",
        "kind": "regular",
        "id": None,
        "urgency": None,
        "summary": "",
        "size": 10,
        "sha256": SHA,
        "path": "pool/tg-base_2.0-1_all.deb",
    }
    data.update(changes)
    return data


def signed(key: Ed25519PrivateKey, body: bytes) -> bytes:
    return base64.b64encode(key.sign(body)) + b"\n"


def document(*packages: dict[str, Any], channel: str = "stable") -> bytes:
    return json.dumps(
        {"channel": channel, "generated_at": "2024-05-01T10:00:00+00:00", "packages": packages}
    ).encode()


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_a_signed_manifest_verifies_and_parses(key: Ed25519PrivateKey) -> None:
    body = document(entry(), entry(name="tg-vnc", kind="hotfix", id="HF-1", urgency="urgent"))
    manifest = verify_manifest("stable", body, signed(key, body), key.public_key())
    assert [p.name for p in manifest.packages] == ["tg-base", "tg-vnc"]
    assert [p.key for p in manifest.hotfixes()] == ["HF-1"]
    assert manifest.packages[0].key == "tg-base=2.0-1"


def test_a_changed_byte_breaks_the_signature(key: Ed25519PrivateKey) -> None:
    body = document(entry())
    sig = signed(key, body)
    with pytest.raises(ManifestSignatureError, match="does not verify"):
        verify_manifest("stable", body.replace(b"2.0-1", b"2.0-2"), sig, key.public_key())


def test_another_key_is_rejected(key: Ed25519PrivateKey) -> None:
    body = document(entry())
    other = Ed25519PrivateKey.generate()
    with pytest.raises(ManifestSignatureError):
        verify_manifest("stable", body, signed(other, body), key.public_key())


@pytest.mark.parametrize("signature", [b"", b"not base64!", base64.b64encode(b"short")])
def test_garbage_signatures_are_rejected(key: Ed25519PrivateKey, signature: bytes) -> None:
    with pytest.raises(ManifestSignatureError):
        verify_manifest("stable", document(entry()), signature, key.public_key())


def test_signed_but_malformed_json_is_a_manifest_error(key: Ed25519PrivateKey) -> None:
    body = b'{"channel": "stable", "packages": ['
    with pytest.raises(ManifestError, match="channel stable: invalid manifest: not JSON"):
        verify_manifest("stable", body, signed(key, body), key.public_key())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"path": "../x"}, "leaves the repository"),
        ({"path": "/etc/passwd"}, "leaves the repository"),
        ({"path": "pool/../../x"}, "leaves the repository"),
        ({"path": "http://evil.example/x.deb"}, "leaves the repository"),
        ({"sha256": "AB" * 32}, "sha256"),
        ({"size": -1}, "size"),
        ({"version": "not a version"}, "Debian version"),
        ({"name": "Bad_Name"}, "Debian package name"),
        ({"kind": "hotfix"}, "has no id"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_entries_are_rejected_with_the_field_named(
    key: Ed25519PrivateKey, change: dict[str, Any], message: str
) -> None:
    body = document(entry(**change))
    with pytest.raises(ManifestError, match=message):
        verify_manifest("stable", body, signed(key, body), key.public_key())


def test_a_manifest_signed_for_another_channel_is_refused(key: Ed25519PrivateKey) -> None:
    body = document(entry(), channel="oldstable")
    with pytest.raises(ManifestError, match="signed for channel 'oldstable'"):
        verify_manifest("stable", body, signed(key, body), key.public_key())


def test_public_keys_load_from_their_base64_raw_form(key: Ed25519PrivateKey) -> None:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    loaded = load_public_key(base64.b64encode(raw).decode() + "\n")
    assert loaded.public_bytes(Encoding.Raw, PublicFormat.Raw) == raw
    for bad in ("", "xyz", base64.b64encode(b"too short").decode()):
        with pytest.raises(ValueError, match="ed25519"):
            load_public_key(bad)


@pytest.mark.parametrize(
    ("version", "valid"),
    [
        ("1.0", True),
        ("1.0~rc1", True),
        ("1:0.9", True),
        ("2.0-1", True),
        ("1:2.0-1+deb12u1", True),
        ("1.0-2-3", True),
        ("a1.0", False),
        ("1:2:3", True),
        ("2:3", True),
        ("1.0-", False),
        ("", False),
        ("1.0 1", False),
    ],
)
def test_debian_versions(version: str, valid: bool) -> None:
    assert is_debian_version(version) is valid


@pytest.mark.parametrize(
    ("path", "confined"),
    [
        ("pool/a.deb", True),
        ("./pool/a.deb", True),
        ("pool/x/../a.deb", True),
        ("../a.deb", False),
        ("..", False),
        (".", False),
        ("", False),
        ("/etc/passwd", False),
        ("pool\\..\\..\\a", False),
        ("file:///etc/passwd", False),
        ("pool/a\x00.deb", False),
    ],
)
def test_confined_paths(path: str, confined: bool) -> None:
    assert is_confined_path(path) is confined


def test_entries_are_values() -> None:
    one = PackageEntry.model_validate(entry())
    assert one.kind is PackageKind.REGULAR
    assert one == PackageEntry.model_validate(entry())
    assert one.arch == "all"
