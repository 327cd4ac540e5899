"""``tgops keygen`` and ``tgops publish``: a static update repository, signed per channel.

``publish`` copies ``.deb`` files into ``pool/`` and rewrites the channel's manifest and
signature. Everything is checked before anything is changed, and every file is written
atomically (temporary file, fsync, rename), so a failed publish leaves the repository as
it was and a reader never sees a half-written file.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import fcntl
import hashlib
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)
from debian.arfile import ArError
from debian.debfile import DebError, DebFile
from debian.debian_support import Version
from pydantic import ValidationError

from core.errors import (
    KeyExistsError,
    ManifestError,
    ManifestSignatureError,
    NotADebError,
    PublishConflictError,
    PublishError,
    SigningKeyError,
)
from core.model import PackageKind
from core.repository.client import check_channel, manifest_path, pool_path
from core.repository.manifest import (
    Manifest,
    PackageEntry,
    is_debian_architecture,
    verify_manifest,
)

PublishProgress = Callable[[str, int, int], None]
"""``progress(file name, bytes done, bytes total)`` while a package file is copied."""

Urgency = Literal["normal", "urgent"]

_CHUNK = 1 << 20
_HOTFIX_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


DEFAULT_VALIDITY = 30 * 86400.0
"""How long a published manifest is valid by default (``--valid-for``)."""
MIN_VALIDITY = 3600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishResult:
    """What a publish did: entries added to the channel and entries that were there already."""

    channel: str
    manifest: Path
    added: tuple[PackageEntry, ...]
    unchanged: tuple[PackageEntry, ...]
    resigned: bool = False
    """Re-signed without new packages (a new ``generated_at`` and ``expires``)."""
    expires: str | None = None
    """The manifest's ``expires`` when it was written."""

    @property
    def changed(self) -> bool:
        """Whether the manifest was rewritten and re-signed."""
        return bool(self.added) or self.resigned


def public_key_path(key: Path) -> Path:
    """``K.pub`` beside the private key ``K``."""
    return key.with_name(key.name + ".pub")


def keygen(out: Path) -> None:
    """Write a new ed25519 key pair: ``out`` (PEM PKCS8, mode 0600) and ``out.pub``.

    ``out.pub`` holds the base64 raw public key: the value of ``updates.public_key``.
    Refuses (``KeyExistsError``) when either file exists.
    """
    pub = public_key_path(out)
    for path in (out, pub):
        if path.exists() or path.is_symlink():
            raise KeyExistsError(str(path))
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    _write_new(out, pem, 0o600)
    try:
        _write_new(pub, base64.b64encode(raw) + b"\n", 0o644)
    except BaseException:
        out.unlink(missing_ok=True)
        raise


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (never over an existing file or symlink) holding ``data``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise KeyExistsError(str(path)) from None
    except OSError as exc:
        raise PublishError(f"{path}: cannot create the file ({exc.strerror})") from exc
    try:
        os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The ed25519 private key written by ``keygen``; ``SigningKeyError`` otherwise."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SigningKeyError(str(path), "no such file") from None
    except IsADirectoryError:
        raise SigningKeyError(str(path), "is a directory") from None
    except OSError as exc:
        raise SigningKeyError(str(path), f"not readable ({exc.strerror})") from exc
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:
        raise SigningKeyError(str(path), "is encrypted; use an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise SigningKeyError(str(path), "not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(str(path), f"not an ed25519 key ({type(key).__name__})")
    return key


@dataclass(frozen=True, slots=True, kw_only=True)
class DebControl:
    """The fields of a ``.deb``'s control file that name its pool file."""

    name: str
    version: str
    arch: str


def read_control(path: Path) -> DebControl:
    """Package, Version and Architecture of a ``.deb``; ``NotADebError`` otherwise."""
    try:
        with path.open("rb") as handle:
            deb = DebFile(fileobj=handle)
            try:
                control = deb.debcontrol()
            finally:
                deb.close()
    except FileNotFoundError:
        raise NotADebError(str(path), "no such file") from None
    except IsADirectoryError:
        raise NotADebError(str(path), "is a directory") from None
    except (ArError, DebError, tarfile.TarError, OSError, KeyError, ValueError, EOFError) as exc:
        raise NotADebError(str(path), str(exc) or type(exc).__name__) from exc
    fields = {key: control.get(key) for key in ("Package", "Version", "Architecture")}
    missing = [key for key, value in fields.items() if not value]
    if missing:
        raise NotADebError(str(path), f"its control file lacks {', '.join(missing)}")
    arch = str(fields["Architecture"])
    if not is_debian_architecture(arch):
        raise NotADebError(
            str(path),
            f"its Architecture {arch!r} is not a Debian architecture (lower-case letters, "
            "digits and '-', e.g. amd64, arm64, all)",
        )
    return DebControl(
        name=str(fields["Package"]),
        version=str(fields["Version"]),
        arch=str(fields["Architecture"]),
    )


@dataclass(slots=True, kw_only=True)
class _Staged:
    """A package file copied next to its pool path, waiting to be renamed into place."""

    temp: Path | None
    final: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class _Fields:
    """What the command line says about every file of one publish."""

    kind: PackageKind
    hotfix_id: str | None
    urgency: Urgency | None
    summary: str


class _Plan:
    """The changes of one publish, decided file by file before anything is renamed."""

    def __init__(self, repo: Path, channel: str, current: Manifest) -> None:
        self.repo = repo
        self.channel = channel
        self.entries = {(e.name, e.version): e for e in current.packages}
        self.added: list[PackageEntry] = []
        self.unchanged: list[PackageEntry] = []
        self.staged: dict[str, _Staged] = {}

    def take(
        self, path: Path, control: DebControl, fields: _Fields, progress: PublishProgress | None
    ) -> None:
        rel = pool_path(control.name, control.version, control.arch)
        temp, sha256, size = _copy_hashed(path, self.repo / "pool", progress)
        try:
            entry = PackageEntry(
                name=control.name,
                version=control.version,
                kind=fields.kind,
                id=fields.hotfix_id,
                urgency=fields.urgency,
                summary=fields.summary,
                size=size,
                sha256=sha256,
                path=rel,
                arch=control.arch,
            )
        except ValidationError as exc:
            temp.unlink()
            problem = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise NotADebError(str(path), problem) from exc
        existing = self.entries.get((entry.name, entry.version))
        if existing is not None:
            _check_same(self.channel, existing, entry, temp)
            self.unchanged.append(existing)
            if (self.repo / rel).exists() or rel in self.staged:
                temp.unlink()
            else:  # the pool file went missing: put it back
                self.staged[rel] = _Staged(temp=temp, final=self.repo / rel)
            return
        self.staged[rel] = _stage(temp, self.repo / rel, entry)
        self.entries[(entry.name, entry.version)] = entry
        self.added.append(entry)

    def commit(
        self,
        signing: Ed25519PrivateKey,
        manifest_file: Path,
        valid_for: float,
        *,
        resign: bool = False,
    ) -> str | None:
        """Move the staged files into the pool and, when packages were added (or
        ``resign``), write and sign the manifest; its ``expires`` (else ``None``)."""
        if any(item.temp is not None for item in self.staged.values()):
            for item in self.staged.values():
                if item.temp is not None:
                    os.replace(item.temp, item.final)
                    item.temp = None
            _fsync_dir(self.repo / "pool")
        if not (self.added or resign):
            return None
        packages = sorted(self.entries.values(), key=lambda e: (e.name, Version(e.version)))
        body, expires = _render(self.channel, packages, valid_for)
        signature = base64.b64encode(signing.sign(body)) + b"\n"
        _write_atomic(manifest_file, body)
        _write_atomic(manifest_file.with_name(manifest_file.name + ".sig"), signature)
        return expires

    def discard(self) -> None:
        for item in self.staged.values():
            if item.temp is not None:
                item.temp.unlink(missing_ok=True)


def publish(
    repo: Path,
    channel: str,
    key: Path,
    files: Sequence[Path],
    *,
    kind: PackageKind = PackageKind.REGULAR,
    hotfix_id: str | None = None,
    urgency: Urgency | None = None,
    summary: str = "",
    progress: PublishProgress | None = None,
    valid_for: float = DEFAULT_VALIDITY,
) -> PublishResult:
    """Add ``files`` to ``channel`` of the repository at ``repo`` and re-sign the channel.

    A file already published (same name, version and SHA-256) is left as it is; a different
    file under a published name and version is refused (``PublishConflictError``). Nothing
    is changed unless every file is accepted. Without ``files`` the channel's manifest is
    re-signed as it is, with a new ``generated_at`` and ``expires`` (``valid_for`` seconds
    later): clients refuse a manifest after it expired.
    """
    check_channel(channel)
    fields = _kind_fields(kind, hotfix_id, urgency, summary)
    if valid_for < MIN_VALIDITY:
        raise PublishError(
            f"--valid-for must be at least {MIN_VALIDITY / 3600:g}h (clients refuse a manifest "
            "once it expired)"
        )
    signing = load_signing_key(key)
    if not files and not (repo / manifest_path(channel)).exists():
        raise PublishError(
            f"channel {channel} has no manifest in {repo} yet: name at least one .deb file "
            "(without files, publish re-signs an existing channel)"
        )
    controls = [(path, read_control(path)) for path in files]
    manifest_file = repo / manifest_path(channel)
    for directory in (repo / "pool", manifest_file.parent):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PublishError(f"{directory}: cannot create ({exc.strerror})") from exc
    with _locked(repo):
        plan = _Plan(repo, channel, _load_manifest(manifest_file, channel, signing))
        try:
            for path, control in controls:
                plan.take(path, control, fields, progress)
            expires = plan.commit(signing, manifest_file, valid_for, resign=not files)
        finally:
            plan.discard()
    return PublishResult(
        channel=channel,
        manifest=manifest_file,
        added=tuple(plan.added),
        unchanged=tuple(plan.unchanged),
        resigned=not files,
        expires=expires,
    )


def _kind_fields(
    kind: PackageKind, hotfix_id: str | None, urgency: Urgency | None, summary: str
) -> _Fields:
    if hotfix_id is not None:
        if kind not in (PackageKind.REGULAR, PackageKind.HOTFIX):
            raise PublishError(f"--hotfix publishes hotfixes; it cannot be combined with {kind}")
        if not _HOTFIX_ID.match(hotfix_id):
            raise PublishError(
                f"hotfix id {hotfix_id!r}: use up to 64 letters, digits, '.', '_', '-' "
                "(e.g. HF-2024-07)"
            )
        return _Fields(
            kind=PackageKind.HOTFIX,
            hotfix_id=hotfix_id,
            urgency=urgency or "normal",
            summary=summary,
        )
    if kind is PackageKind.HOTFIX:
        raise PublishError("a hotfix needs an id: add --hotfix ID")
    if urgency is not None:
        raise PublishError("--urgency applies to hotfixes only: add --hotfix ID")
    return _Fields(kind=kind, hotfix_id=None, urgency=None, summary=summary)


def _check_same(channel: str, existing: PackageEntry, entry: PackageEntry, temp: Path) -> None:
    """Re-publishing is a no-op only for the very same file with the same metadata."""
    if existing == entry:
        return
    temp.unlink(missing_ok=True)
    if existing.sha256 != entry.sha256:
        raise PublishConflictError(
            entry.name,
            entry.version,
            f"channel {channel} already has a different file with this name and version "
            f"(SHA-256 {existing.sha256[:16]}…, this one {entry.sha256[:16]}…)",
        )
    for name in ("kind", "id", "urgency", "summary", "arch", "path"):
        if getattr(existing, name) != getattr(entry, name):
            raise PublishConflictError(
                entry.name,
                entry.version,
                f"it is published in channel {channel} with {name} "
                f"{_shown(getattr(existing, name))}, not {_shown(getattr(entry, name))}",
            )


def _shown(value: object) -> str:
    """A manifest value as a user wrote it: ``'hotfix'``, not the enum's repr."""
    return repr(str(value)) if isinstance(value, enum.Enum) else repr(value)


def _stage(temp: Path, final: Path, entry: PackageEntry) -> _Staged:
    """Plan the rename of ``temp`` to ``final`` unless ``final`` already holds that file."""
    if not final.exists():
        return _Staged(temp=temp, final=final)
    temp.unlink()
    if _sha256_of(final) != entry.sha256:
        raise PublishConflictError(
            entry.name,
            entry.version,
            f"{final} already holds a different file (published to another channel?)",
        )
    return _Staged(temp=None, final=final)


def _copy_hashed(
    source: Path, directory: Path, progress: PublishProgress | None
) -> tuple[Path, str, int]:
    """Copy ``source`` to a temporary file in ``directory``; returns it, SHA-256 and size."""
    digest = hashlib.sha256()
    done = 0
    fd, name = tempfile.mkstemp(prefix=f".{source.name}.", suffix=".tmp", dir=directory)
    temp = Path(name)
    try:
        try:
            os.fchmod(fd, 0o644)  # readable by the web server
            with source.open("rb") as src:
                total = os.fstat(src.fileno()).st_size
                while data := src.read(_CHUNK):
                    digest.update(data)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    done += len(data)
                    if progress is not None:
                        progress(source.name, done, total)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise PublishError(f"{source}: cannot copy into {directory} ({exc.strerror})") from exc
        raise
    return temp, digest.hexdigest(), done


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while data := handle.read(_CHUNK):
            digest.update(data)
    return digest.hexdigest()


def _load_manifest(path: Path, channel: str, signing: Ed25519PrivateKey) -> Manifest:
    """The channel's current manifest, verified with the signing key's public half.

    A manifest that does not verify is refused rather than re-signed: it was changed
    outside ``tgops publish`` or signed with another key.
    """
    try:
        body = path.read_bytes()
    except FileNotFoundError:
        return Manifest(channel=channel, generated_at="")
    sig_path = path.with_name(path.name + ".sig")
    try:
        signature = sig_path.read_bytes()
    except FileNotFoundError:
        signature = b""
    try:
        return verify_manifest(channel, body, signature, signing.public_key())
    except ManifestError as exc:
        raise PublishError(f"{path}: {exc}; fix or remove it before publishing") from exc
    except ManifestSignatureError as exc:  # refuse to re-sign what someone else wrote
        raise PublishError(
            f"{path} does not verify with this key (changed outside `tgops publish`, or "
            "signed with another key); check it, or remove the channel's files to start "
            "the channel afresh"
        ) from exc


def _render(channel: str, packages: Sequence[PackageEntry], valid_for: float) -> tuple[bytes, str]:
    now = datetime.now(UTC)  # to the microsecond: manifests are ordered by it
    expires = (now + timedelta(seconds=valid_for)).isoformat()
    document = {
        "channel": channel,
        "generated_at": now.isoformat(),
        "expires": expires,
        "packages": [entry.model_dump(mode="json") for entry in packages],
    }
    return json.dumps(document, indent=2, ensure_ascii=False).encode() + b"\n", expires


def _write_atomic(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(repo: Path) -> Iterator[None]:
    """One publisher at a time per repository (``repo/.publish.lock``, flock)."""
    fd = os.open(repo / ".publish.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
