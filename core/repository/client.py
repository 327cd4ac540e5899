"""The update repository over HTTP(S) (or ``file://``): signed manifests and package files.

Layout (README, "Update repository")::

    channels/<channel>.json       the manifest
    channels/<channel>.json.sig   base64 ed25519 signature of its exact bytes
    pool/<name>_<version>_<arch>.deb
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote, urljoin

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from core.errors import (
    ChannelNameError,
    DownloadError,
    ManifestError,
    ManifestFetchError,
    PackageNotFoundError,
    UnknownChannelError,
    UnsafePathError,
)
from core.repository.cache import MANIFEST_LIMIT, Downloader, Fetched, Progress
from core.repository.conditional import Verified, key_id, signature_text
from core.repository.freshness import Freshness
from core.repository.manifest import Manifest, PackageEntry, is_confined_path, verify_manifest

CHANNEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def check_channel(channel: str) -> str:
    """``channel`` when it is a valid channel name, else ``ChannelNameError``."""
    if not CHANNEL_NAME.match(channel) or ".." in channel:
        raise ChannelNameError(channel)
    return channel


def manifest_path(channel: str) -> str:
    """The manifest's path relative to the repository root; its signature adds ``.sig``."""
    return f"channels/{check_channel(channel)}.json"


def pool_path(name: str, version: str, arch: str) -> str:
    """The pool file of a package (``:`` of an epoch written ``%3a``, as dpkg-deb does)."""
    return f"pool/{name}_{version.replace(':', '%3a')}_{arch}.deb"


class HttpRepository:
    """``RepositoryClient`` over a static repository at ``base_url``.

    The ``downloader`` (an entered ``Downloader``) does the transfers and owns the cache.
    """

    def __init__(
        self,
        base_url: str,
        public_key: Ed25519PublicKey,
        downloader: Downloader,
        *,
        manifest_limit: int = MANIFEST_LIMIT,
        freshness: Freshness | None = None,
        verified: Mapping[str, Verified] | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://", "file://")):
            raise ValueError(f"{base_url!r}: the repository URL must be http(s):// or file://")
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self._key = public_key
        self._downloader = downloader
        self._limit = manifest_limit
        self.freshness = freshness
        """Refuses rolled-back and expired manifests (``None``: the signature only)."""
        self._key_id = key_id(public_key)
        self.verified: dict[str, Verified] = dict(verified or {})
        """Channel → the last accepted manifest with its validators (conditional requests)."""
        self.downloaded = 0
        """Manifests downloaded and verified."""
        self.not_modified = 0
        """Manifests reused after a ``304 Not Modified``."""

    @property
    def downloader(self) -> Downloader:
        """The downloader doing the transfers (and owning the cache)."""
        return self._downloader

    def url_of(self, path: str) -> str:
        """The URL of a repository-relative file path; ``ValueError`` if it leaves the root."""
        if not is_confined_path(path):
            raise ValueError(path)
        url = urljoin(self.base_url, quote(path, safe="/"))
        if not url.startswith(self.base_url) or url == self.base_url:
            raise ValueError(path)
        return url

    async def manifest(self, channel: str) -> Manifest:
        """The channel's manifest; the signature is verified before anything is parsed.

        Over HTTP the request is conditional when a verified manifest of the channel is kept
        (``conditional``): a ``304 Not Modified`` whose signature file is unchanged reuses
        it without downloading or verifying it again. Freshness is checked either way.
        """
        path = manifest_path(channel)
        url = self.url_of(path)
        what = f"channel {channel} manifest"
        kept = self.verified.get(channel)
        if kept is not None and kept.key != self._key_id:
            kept = None  # verified with another key: download and verify again
        fetched = await self._read(channel, url, what, kept)
        signature = await self._signature(channel, path, url, what)
        if fetched is None and kept is not None and signature_text(signature) == kept.signature:
            self.not_modified += 1
            manifest = kept.manifest
        else:
            if fetched is None:  # the signature changed while the manifest did not
                fetched = await self._read(channel, url, what, None)
                assert fetched is not None
            self.downloaded += 1
            manifest = verify_manifest(channel, fetched.body, signature, self._key)
            kept = Verified(
                manifest=manifest,
                validators=fetched.validators,
                signature=signature_text(signature),
                key=self._key_id,
            )
        accepted = manifest if self.freshness is None else await self.freshness.check(manifest)
        if accepted is manifest:
            self.verified[channel] = kept
        return accepted

    def verified_record(self, manifest: Manifest) -> Verified | None:
        """How ``manifest`` (returned by ``manifest``) is requested conditionally next time:
        the record to keep with it, or None when its repository sent no validators."""
        kept = self.verified.get(manifest.channel)
        if kept is None or kept.manifest is not manifest or not kept.validators:
            return None
        return kept

    async def _read(
        self, channel: str, url: str, what: str, kept: Verified | None
    ) -> Fetched | None:
        validators = kept.validators if kept is not None else None
        try:
            return await self._downloader.read_if_changed(
                url, package=what, limit=self._limit, validators=validators
            )
        except PackageNotFoundError as exc:
            raise UnknownChannelError(channel, self.base_url) from exc
        except DownloadError as exc:
            raise ManifestFetchError(channel, exc.cause, transient=exc.transient) from exc

    async def _signature(self, channel: str, path: str, url: str, what: str) -> bytes:
        try:
            return await self._downloader.read(url + ".sig", package=what, limit=4096)
        except PackageNotFoundError as exc:
            raise ManifestError(
                channel,
                f"it is not signed ({path}.sig is missing); re-sign it with `tgops publish`",
            ) from exc
        except DownloadError as exc:
            raise ManifestFetchError(channel, exc.cause, transient=exc.transient) from exc

    async def download(self, entry: PackageEntry, progress: Progress | None = None) -> Path:
        """A verified local copy of the entry's file (from the cache when present)."""
        package = f"{entry.name} {entry.version}"
        try:
            url = self.url_of(entry.path)
        except ValueError as exc:
            raise UnsafePathError(package, entry.path) from exc
        return await self._downloader.fetch(
            url, package=package, sha256=entry.sha256, size=entry.size, progress=progress
        )
