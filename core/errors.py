"""One exception class per failure; each message says what happened and what to do next."""

from __future__ import annotations


class TgopsError(Exception):
    """Base of every error tgops reports to a user."""


class ConfigError(TgopsError):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class DriverError(TgopsError):
    """A node operation failed; names the node, the operation and the cause."""

    def __init__(self, node: str, operation: str, cause: str) -> None:
        self.node = node
        self.operation = operation
        self.cause = cause
        super().__init__(f"node {node}: {operation} failed: {cause}")


class NodeUnreachableError(DriverError):
    """The node could not be reached at all."""


class RepositoryError(TgopsError):
    """The update repository answered with something that cannot be used."""


class ManifestSignatureError(RepositoryError):
    def __init__(self, channel: str) -> None:
        self.channel = channel
        super().__init__(
            f"channel {channel}: the manifest signature does not verify against "
            "updates.public_key; "
            "nothing from it is used (check the key, or re-sign the channel with `tgops publish`)"
        )


class ManifestError(RepositoryError):
    def __init__(self, channel: str, problem: str) -> None:
        self.channel = channel
        super().__init__(f"channel {channel}: invalid manifest: {problem}")


class DownloadError(RepositoryError):
    """A package could not be downloaded; ``transient`` errors are worth retrying."""

    def __init__(self, package: str, cause: str, *, transient: bool) -> None:
        self.package = package
        self.cause = cause
        self.transient = transient
        super().__init__(f"package {package}: {cause}")


class StoreError(TgopsError):
    pass


# --- update repository: publishing, fetching, downloading (core/repository/,
# core/lifecycle/pending.py) ---


class PublishError(TgopsError):
    """``tgops publish`` / ``tgops keygen`` refused; nothing in the repository was changed."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(problem)


class KeyExistsError(PublishError):
    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(
            f"{path} already exists; keygen never overwrites a key "
            "(choose another --out, or remove the old key pair first)"
        )


class SigningKeyError(PublishError):
    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        super().__init__(
            f"signing key {path}: {problem} (create a key pair with `tgops keygen --out K`)"
        )


class NotADebError(PublishError):
    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        super().__init__(f"{path}: not a usable .deb package: {problem}")


class PublishConflictError(PublishError):
    def __init__(self, name: str, version: str, problem: str) -> None:
        self.name = name
        self.version = version
        super().__init__(
            f"{name} {version}: {problem}; a published version is never replaced "
            "(build the package with a new version and publish that)"
        )


class ChannelNameError(RepositoryError):
    def __init__(self, channel: str) -> None:
        self.channel = channel
        super().__init__(
            f"{channel!r} is not a channel name; use lower-case letters, digits, '.', '_' "
            "and '-', starting with a letter or digit (e.g. stable)"
        )


class UnknownChannelError(RepositoryError):
    def __init__(self, channel: str, url: str) -> None:
        self.channel = channel
        self.url = url
        super().__init__(
            f"unknown channel {channel} at {url} (no channels/{channel}.json there); "
            "check updates.channel and updates.repository_url, or publish to that channel"
        )


class ManifestFetchError(RepositoryError):
    """The manifest of a channel could not be fetched; ``transient`` errors are worth retrying."""

    def __init__(self, channel: str, cause: str, *, transient: bool) -> None:
        self.channel = channel
        self.cause = cause
        self.transient = transient
        super().__init__(f"channel {channel}: manifest not fetched: {cause}")


class PackageNotFoundError(DownloadError):
    def __init__(self, package: str, url: str) -> None:
        self.url = url
        super().__init__(
            package,
            f"not found at {url} (HTTP 404); the repository lacks a file its manifest names "
            "(re-publish the package)",
            transient=False,
        )


class UnsafePathError(DownloadError):
    def __init__(self, package: str, path: str) -> None:
        self.path = path
        super().__init__(
            package,
            f"path {path!r} leaves the repository; refused (the manifest is wrong: re-publish it)",
            transient=False,
        )


class DownloadMismatchError(DownloadError):
    """Size or SHA-256 of a downloaded file differs from the manifest; the file was deleted."""

    def __init__(self, package: str, what: str, expected: str, actual: str) -> None:
        self.what = what
        self.expected = expected
        self.actual = actual
        super().__init__(
            package,
            f"{what} mismatch: the manifest says {expected}, the download has {actual}; "
            "the file was deleted and the next attempt fetches it afresh",
            transient=True,
        )


class DownloadFailedError(RepositoryError):
    """A definitive failure under the retry policy (L5, L7): every attempt failed
    (``exhausted``), or one failed in a way no retry can mend. ``last_cause`` is the error
    of the last attempt. Partial files are kept for resume."""

    def __init__(
        self, package: str, attempts: int, last_cause: BaseException, *, exhausted: bool = True
    ) -> None:
        self.package = package
        self.attempts = attempts
        self.last_cause = last_cause
        self.exhausted = exhausted
        cause = last_cause.cause if isinstance(last_cause, DownloadError) else str(last_cause)
        cause = cause or type(last_cause).__name__
        if exhausted:
            message = (
                f"{package}: gave up after {attempts} attempt{'s' if attempts != 1 else ''}; "
                f"last error: {cause} (partial files are kept and resumed next time; check "
                "that the update repository is reachable)"
            )
        else:
            message = f"{last_cause} (not retried: another attempt would fail the same way)"
        super().__init__(message)


class UnknownPackageError(RepositoryError):
    def __init__(self, channel: str, names: list[str]) -> None:
        self.channel = channel
        self.names = names
        super().__init__(
            f"channel {channel} has no package {', '.join(names)}; "
            "name packages as listed by `/tg status`"
        )


# --- node drivers and load balancers (core/drivers/) ---


class CommandTimeoutError(DriverError):
    """A node command ran longer than its timeout and was killed."""

    def __init__(self, node: str, operation: str, command: str, timeout: float) -> None:
        self.command = command
        self.timeout = timeout
        super().__init__(
            node,
            operation,
            f"timed out after {timeout:g}s running {command!r}; the command was killed "
            "(fix the command, or raise command_timeout for this node)",
        )


class HostKeyNotTrustedError(NodeUnreachableError):
    """The SSH host key of a node is unknown (or changed); the connection was refused."""

    def __init__(
        self,
        node: str,
        operation: str,
        *,
        host: str,
        port: int,
        fingerprint: str,
        known_hosts: str,
        changed: bool,
    ) -> None:
        self.host = host
        self.port = port
        self.fingerprint = fingerprint
        self.known_hosts = known_hosts
        self.changed = changed
        entry = host if port == 22 else f"[{host}]:{port}"
        if changed:
            cause = (
                f"the host key of {host}:{port} ({fingerprint}) differs from the one in "
                f"{known_hosts}; refused (possible man-in-the-middle). If the node was "
                f"reinstalled, remove the old key (ssh-keygen -f {known_hosts} -R '{entry}') "
                "and add the new one after checking its fingerprint on the node"
            )
        else:
            cause = (
                f"the host key of {host}:{port} ({fingerprint}) is not in {known_hosts}; "
                "refused. Check the fingerprint on the node (ssh-keygen -lf "
                f"/etc/ssh/ssh_host_ed25519_key.pub), then add it (ssh-keyscan -p {port} "
                f"{host} >> {known_hosts}), or set accept_unknown_host_key = true for this node"
            )
        super().__init__(node, operation, cause)


class NodeAuthenticationError(NodeUnreachableError):
    """The node refused our SSH key."""

    def __init__(
        self, node: str, operation: str, *, host: str, port: int, user: str, key: str
    ) -> None:
        self.host = host
        self.port = port
        self.user = user
        super().__init__(
            node,
            operation,
            f"authentication as {user} at {host}:{port} failed with {key}; add its public key "
            f"to ~{user}/.ssh/authorized_keys on the node, or set key_file for this node",
        )


class ManifestRefusedError(ManifestError):
    """A correctly signed manifest that is older than the one accepted before for its
    channel (a rollback or a frozen mirror) or past its ``expires``, with no good one left."""
