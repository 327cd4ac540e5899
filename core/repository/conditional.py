"""Conditional manifest requests: a verified manifest is kept with the validators of its bytes.

The repository answers ``ETag`` and/or ``Last-Modified`` with a manifest; the next request
for it sends them back (``If-None-Match``, or ``If-Modified-Since`` when there is no ETag),
and an unchanged manifest comes back as ``304 Not Modified`` without a body. The manifest
kept is the one whose signature was checked when it arrived, so a 304 reuses it without
downloading or verifying it again; freshness (expiry, rollback) is still checked every time.

The signature file (some 90 bytes) is always fetched in full: it must be the one the kept
manifest was verified with, else the manifest is downloaded and verified again. A kept
manifest is used only with the public key that verified it.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from core.repository.manifest import Manifest


def key_id(key: Ed25519PublicKey) -> str:
    """A short fingerprint of a public key (first 16 hex digits of SHA-256 of its raw bytes)."""
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def signature_text(signature: bytes) -> str:
    """The signature file's content as kept (ASCII base64, surrounding white space removed);
    bytes that are not ASCII are kept base64-encoded once more, so that they still compare."""
    try:
        return signature.decode("ascii").strip()
    except UnicodeDecodeError:
        return "raw:" + base64.b64encode(signature).decode("ascii")


@dataclass(frozen=True, slots=True, kw_only=True)
class Validators:
    """What the repository said identifies the bytes it sent (either may be missing)."""

    etag: str | None = None
    last_modified: str | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Validators:
        return cls(
            etag=headers.get("ETag") or None, last_modified=headers.get("Last-Modified") or None
        )

    def __bool__(self) -> bool:
        return self.etag is not None or self.last_modified is not None

    def request_headers(self) -> dict[str, str]:
        """The conditional request: ``If-None-Match`` when there is an ETag (the precise one),
        else ``If-Modified-Since`` (a time to the second)."""
        if self.etag is not None:
            return {"If-None-Match": self.etag}
        if self.last_modified is not None:
            return {"If-Modified-Since": self.last_modified}
        return {}


@dataclass(frozen=True, slots=True, kw_only=True)
class Verified:
    """A manifest whose signature was checked, the validators of its bytes, the signature
    file it was checked with and the key that checked it."""

    manifest: Manifest
    validators: Validators
    signature: str
    key: str

    def same_source(self, other: Verified | None) -> bool:
        """Whether ``other`` names the same bytes, signature and key (manifest not compared)."""
        return (
            other is not None
            and other.validators == self.validators
            and other.signature == self.signature
            and other.key == self.key
        )

    def to_json(self) -> dict[str, str | None]:
        """What is stored beside the manifest (kv ``manifests``, key ``conditional``)."""
        return {
            "etag": self.validators.etag,
            "last_modified": self.validators.last_modified,
            "signature": self.signature,
            "key": self.key,
        }

    @classmethod
    def from_json(cls, manifest: Manifest, value: Any) -> Verified | None:
        """The stored record of ``manifest``; None when absent or unreadable."""
        if not isinstance(value, Mapping):
            return None
        etag, modified = value.get("etag"), value.get("last_modified")
        signature, key = value.get("signature"), value.get("key")
        if not isinstance(signature, str) or not signature or not isinstance(key, str):
            return None
        if not (etag is None or isinstance(etag, str)):
            return None
        if not (modified is None or isinstance(modified, str)):
            return None
        validators = Validators(etag=etag or None, last_modified=modified or None)
        if not validators:
            return None
        return cls(manifest=manifest, validators=validators, signature=signature, key=key)


@runtime_checkable
class KeepsVerified(Protocol):
    """A repository client that makes conditional manifest requests (``HttpRepository``)."""

    def verified_record(self, manifest: Manifest) -> Verified | None:
        """What to keep with ``manifest`` (just returned by its ``manifest``) so that the
        next request for it is conditional; None when there is nothing to keep."""
