"""The channel manifest of the update repository (wire format, pydantic)."""

from __future__ import annotations

import base64
import binascii
import json
import posixpath
import re
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import ManifestError, ManifestSignatureError
from core.model import PackageKind
from core.printable import printable

# Debian policy 5.6.12: [epoch:]upstream[-revision]
_DEB_VERSION = re.compile(
    r"^(?:(?P<epoch>\d+):)?(?P<upstream>[0-9][A-Za-z0-9.+~:-]*?)(?:-(?P<revision>[A-Za-z0-9.+~]+))?$"
)
_PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9.+-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Debian policy 5.6.8: an architecture name (amd64, arm64, all, linux-any, …)
_ARCHITECTURE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


def is_debian_architecture(text: str) -> bool:
    return _ARCHITECTURE.match(text) is not None


def is_debian_version(text: str) -> bool:
    match = _DEB_VERSION.match(text)
    if match is None:
        return False
    upstream = match.group("upstream")
    if ":" in upstream and match.group("epoch") is None:
        return False
    return not ("-" in upstream and match.group("revision") is None)


class PackageEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    kind: PackageKind = PackageKind.REGULAR
    id: str | None = None
    urgency: Literal["normal", "urgent"] | None = None
    summary: str = ""
    size: int = Field(ge=0)
    sha256: str
    path: str
    arch: str = "all"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _PACKAGE_NAME.match(value):
            raise ValueError(f"{value!r} is not a Debian package name")
        return value

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not is_debian_version(value):
            raise ValueError(f"{value!r} is not a Debian version")
        return value

    @field_validator("arch")
    @classmethod
    def _arch(cls, value: str) -> str:
        if not is_debian_architecture(value):
            raise ValueError(
                f"{value!r} is not a Debian architecture (lower-case letters, digits and "
                "'-', e.g. amd64, arm64, all)"
            )
        return value

    @field_validator("summary")
    @classmethod
    def _summary(cls, value: str) -> str:
        return printable(value)  # shown on terminals and in mails: no escape sequences

    @field_validator("sha256")
    @classmethod
    def _sha(cls, value: str) -> str:
        if not _SHA256.match(value):
            raise ValueError("sha256 must be 64 lower-case hex digits")
        return value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not is_confined_path(value):
            raise ValueError(f"path {value!r} leaves the repository")
        return value

    @model_validator(mode="after")
    def _hotfix_id(self) -> PackageEntry:
        if self.kind is PackageKind.HOTFIX and not self.id:
            raise ValueError(f"hotfix {self.name} {self.version} has no id")
        return self

    @property
    def key(self) -> str:
        """The id a user names this entry by: hotfix id, else ``name=version``."""
        return self.id or f"{self.name}={self.version}"


def is_confined_path(path: str) -> bool:
    """A relative POSIX path that stays inside the repository root."""
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        return False
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", path):  # a URL scheme
        return False
    normal = posixpath.normpath(path)
    return not (normal == "." or normal.startswith("../") or normal == "..")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    channel: str
    generated_at: str
    expires: str | None = None
    """When the manifest stops being valid (ISO 8601); clients refuse it after that."""
    packages: tuple[PackageEntry, ...] = ()

    def hotfixes(self) -> list[PackageEntry]:
        return [p for p in self.packages if p.kind is PackageKind.HOTFIX]


def load_public_key(text: str) -> Ed25519PublicKey:
    """An ed25519 public key from its base64 raw form (the value of ``updates.public_key``)."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not a base64 raw ed25519 public key (32 bytes)") from exc


def verify_manifest(
    channel: str, body: bytes, signature: bytes, public_key: Ed25519PublicKey
) -> Manifest:
    """Verify the signature over the exact bytes, then parse and validate every entry."""
    try:
        sig = base64.b64decode(signature.strip(), validate=True)
        public_key.verify(sig, body)
    except (binascii.Error, ValueError, InvalidSignature) as exc:
        raise ManifestSignatureError(channel) from exc
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(channel, f"not JSON ({exc})") from exc
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ManifestError(channel, f"{where}: {first['msg']}") from exc
    if manifest.channel != channel:
        raise ManifestError(channel, f"it is signed for channel {manifest.channel!r}")
    return manifest
