"""The sections of the configuration file: one pydantic model per ``[table]``.

``core.settings.Settings`` puts them together and loads them; import them from there.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core.durations import Duration
from core.errors import ConfigError
from core.model import Role
from core.repository.manifest import load_public_key
from core.templates import resolve_templates

Language = Literal["en", "de"]
"""Languages of what users and contacts read (notices, e-mails, calls, the status page)."""


LANGUAGES: tuple[Language, ...] = ("en", "de")


def _not_blank(value: SecretStr) -> SecretStr:
    if not value.get_secret_value().strip():
        raise ValueError("must not be empty (leave the key out to switch the feature off)")
    return value


Secret = Annotated[SecretStr, AfterValidator(_not_blank)]
"""A secret (token, password): never printed, never empty."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HttpSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    public_url: str = "http://127.0.0.1:8080"
    """How Slack and Twilio reach this service (Twilio signatures are checked against it)."""
    header_timeout: Duration = 10.0
    """A new connection must send a request's headers within this time (else it is closed)."""
    body_timeout: Duration = 30.0
    """A request's body must arrive within this time after its headers (else 408)."""
    idle_timeout: Duration = 15.0
    """A kept-alive connection without a new request is closed after this time."""
    max_connections: int = Field(default=512, ge=8, le=100_000)
    """Connections served at once; beyond it the longest-idle one is closed for the new one,
    and when none is idle the new one is answered 503."""
    status_cache: Duration = 5.0
    """How long the nodes' state read for one status request serves the next ones."""
    status_wait: Duration = 2.0
    """How long a status request waits for the nodes' answers; a node that has not
    answered by then is shown as last seen (its answer serves the next request)."""

    @field_validator("header_timeout", "body_timeout", "idle_timeout", "status_wait")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be longer than 0s")
        return value


class ApiToken(_Section):
    token: Secret
    roles: tuple[Role, ...] = (Role.VIEWER,)


class ApiSettings(_Section):
    tokens: dict[str, ApiToken] = Field(default_factory=dict)


class UpdatesSettings(_Section):
    repository_url: str = "http://127.0.0.1:8081/"
    channel: str = "stable"
    oldstable_channel: str = "oldstable"
    public_key: str | None = None
    public_key_file: Path | None = None
    cache_dir: Path = Path("/var/cache/tgops")
    poll_interval: Duration = 900.0
    download_attempts: int = Field(default=10, ge=1, le=1000)
    retry_delay: Duration = 30.0
    download_lead: Duration = 3600.0
    always_install_hotfixes: bool = False
    max_parallel_downloads: int = Field(default=4, ge=1, le=64)
    connect_timeout: Duration = 10.0
    read_timeout: Duration = 60.0
    manifest_timeout: Duration = 60.0
    """Overall deadline of fetching one manifest (or its signature)."""
    min_transfer_rate: int = Field(default=65536, ge=1024, le=10**10)
    """Bytes per second a package transfer must average at least: a file of SIZE bytes may
    take connect_timeout + read_timeout + SIZE / min_transfer_rate seconds in all."""
    update_grace: Duration = 900.0
    """How late a scheduled update may still start after the service was down."""
    slot_wait: Duration = 14400.0
    """How long after its update time a scheduled cluster node waits for a slot of its
    cluster (the nodes before it are updating) before it is skipped and logged."""

    @field_validator("public_key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        if value is not None:
            load_public_key(value)
        return value

    @field_validator("repository_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://", "file://")):
            raise ValueError("must start with http://, https:// or file://")
        return value if value.endswith("/") else value + "/"

    def resolved_public_key(self) -> str | None:
        if self.public_key is not None:
            return self.public_key
        if self.public_key_file is not None:
            return self.public_key_file.read_text().strip()
        return None

    def verification_key(self) -> Ed25519PublicKey | None:
        """The key manifests are verified with (None: not configured); ``ConfigError`` when
        the key file cannot be read or holds no key."""
        try:
            text = self.resolved_public_key()
        except OSError as exc:
            raise ConfigError(
                [f"updates.public_key_file: cannot read {self.public_key_file} ({exc.strerror})"]
            ) from exc
        if text is None:
            return None
        try:
            return load_public_key(text)
        except ValueError as exc:
            key = "public_key" if self.public_key is not None else "public_key_file"
            raise ConfigError([f"updates.{key}: {exc}"]) from exc


class MaintenanceSettings(_Section):
    notice_lead: Duration = 7200.0
    reminder_interval: Duration = 900.0
    lb_drain_lead: Duration = 3600.0

    @field_validator("reminder_interval")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be longer than 0s")
        return value


class SlackSettings(_Section):
    bot_token: Secret | None = None
    signing_secret: Secret | None = None
    app_token: Secret | None = None
    api_url: str = "https://slack.com/api/"
    channel: str | None = None
    team_id: str | None = None
    """The workspace's team ID (T…): requests of any other workspace are refused (403)."""


class RolesSettings(_Section):
    maint: tuple[str, ...] = ()
    update: tuple[str, ...] = ()
    viewer: tuple[str, ...] = ()
    """Nobody by default: ``["*"]`` lets everyone in the workspace look."""


class SmtpSettings(_Section):
    host: str | None = None
    port: int = Field(default=25, ge=1, le=65535)
    username: str | None = None
    password: Secret | None = None
    starttls: bool = False
    use_tls: bool = False
    sender: str = "tgops@localhost"
    timeout: Duration = 30.0
    ca_file: Path | None = None
    """PEM file of the CA(s) that sign the SMTP server's certificate (default: system CAs)."""
    connections: int = Field(default=1, ge=1, le=16)
    """SMTP connections used at once when many e-mails are due (each sends a batch)."""

    @field_validator("sender")
    @classmethod
    def _ascii_sender(cls, value: str) -> str:
        if not value.isascii():
            raise ValueError(
                "is not a plain ASCII e-mail address (user@example.org); "
                "internationalized addresses are not supported"
            )
        return value

    @model_validator(mode="after")
    def _tls(self) -> SmtpSettings:
        if self.starttls and self.use_tls:
            raise ValueError("starttls and use_tls exclude each other; set one of them")
        return self


class TwilioSettings(_Section):
    account_sid: str | None = None
    auth_token: Secret | None = None
    from_number: str | None = None
    api_url: str = "https://api.twilio.com"
    timeout: Duration = 15.0
    """Longest wait for one answer of Twilio's REST API."""


class EscalationSettings(_Section):
    call_rounds: int = Field(default=3, ge=1, le=20)
    ack_wait: Duration = 120.0
    sms_fallback: bool = True


class NotifySettings(_Section):
    admin_emails: tuple[str, ...] = ()
    """Addresses that get admin alerts: warning flag, update lock, failed run."""
    users_list: str | None = None
    """The users' mailing list: told when maintenance is scheduled, starts and ends (L3)."""
    announce_existing_hotfixes: bool = True
    """First poll of a fresh store: announce the hotfixes already published (false: only
    remember them, and announce only hotfixes published later)."""
    retry_base: Duration = 30.0
    """Wait after the first transient delivery failure; doubled after each further one."""
    retry_max: Duration = 3600.0
    """Longest wait between two delivery attempts."""
    max_attempts: int = Field(default=12, ge=1, le=1000)
    """Delivery attempts before a notification counts as failed for good."""
    batch_size: int = Field(default=100, ge=1, le=10_000)
    """E-mails sent over one SMTP connection at most."""
    language: Language = "en"
    """Language of what users and contacts read, unless a contact, node or cluster says
    otherwise; the status page follows the browser's language and falls back to it."""
    templates_dir: Path | None = None
    """Operator's templates: ``DIR/LANG/NAME`` (one language) or ``DIR/NAME`` (all)
    replace the packaged template of that name."""

    @field_validator("admin_emails")
    @classmethod
    def _addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for address in value:
            _check_address(address)
        return value

    @field_validator("users_list")
    @classmethod
    def _list(cls, value: str | None) -> str | None:
        return None if value is None else _check_address(value)


def _check_address(value: str) -> str:
    local, at, domain = value.partition("@")
    if not at or not local or not domain or any(c.isspace() or c in "<>," for c in value):
        raise ValueError(f"{value!r} is not an e-mail address (write user@example.org)")
    return value


class Contact(_Section):
    name: str
    email: str | None = None
    phone: str | None = None
    clusters: tuple[str, ...] = ("*",)
    urgent_calls: bool = True
    language: Language | None = None
    """Language of this contact's e-mails, calls and SMS (default: ``notify.language``)."""

    def covers(self, cluster: str | None) -> bool:
        return "*" in self.clusters or (cluster is not None and cluster in self.clusters)


class ClusterSettings(_Section):
    max_parallel_updates: int = Field(default=1, ge=1, le=1000)
    lb_drain: str | None = None
    """Command template run on the controller to drain ``{node}`` (e.g. an HAProxy call)."""
    lb_undrain: str | None = None
    haproxy_socket: str | None = None
    """HAProxy runtime API socket (a path, or ``tcp:HOST:PORT``); used when set."""
    haproxy_backend: str | None = None
    language: Language | None = None
    """Language of the notices on the cluster's nodes (default: ``notify.language``)."""


class NodeSettings(_Section):
    name: str
    cluster: str | None = None
    driver: Literal["sandbox", "local", "ssh"] = "sandbox"
    root: Path | None = None
    host: str | None = None
    port: int = Field(default=22, ge=1, le=65535)
    user: str = "root"
    key_file: Path | None = None
    known_hosts: Path | None = None
    """known_hosts file for the ssh driver (default: ~/.ssh/known_hosts)."""
    accept_unknown_host_key: bool = False
    command_timeout: Duration = 600.0
    commands: dict[str, str] = Field(default_factory=dict)
    check_url: str | None = None
    """Post-update check: a URL that must answer 2xx (besides ``commands.post_check``)."""
    language: Language | None = None
    """Language of the notices on this node (default: its cluster's, then
    ``notify.language``)."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value or not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError("node names use letters, digits, '-', '_' and '.'")
        if value == "all":
            raise ValueError("'all' is reserved for the whole fleet")
        return value

    @model_validator(mode="after")
    def _driver_keys(self) -> NodeSettings:
        if self.driver == "sandbox" and self.root is None:
            raise ValueError(f"node {self.name}: the sandbox driver needs root (a directory)")
        if self.driver == "ssh" and not self.host:
            raise ValueError(f"node {self.name}: the ssh driver needs host")
        if self.driver in {"local", "ssh"}:
            # the command templates are checked here, so that `config check` finds what
            # `serve` would refuse
            try:
                resolve_templates(self.name, self.commands)
            except ConfigError as exc:
                raise ValueError("; ".join(exc.problems)) from exc
        return self


class AuditSettings(_Section):
    retention: Duration = 400 * 86400.0
    """Audit records older than this are removed (once a day, by the leading instance)."""

    @field_validator("retention")
    @classmethod
    def _a_day_at_least(cls, value: float) -> float:
        if value < 86400:
            raise ValueError("must be at least 1d")
        return value


class GateSettings(_Section):
    """Holding updates while the site's Prometheus (or Alertmanager) reports alerts."""

    prometheus_url: str | None = None
    """Prometheus or Alertmanager base URL; unset: no gate."""
    username: str | None = None
    password_file: Path | None = None
    bearer_token_file: Path | None = None
    alert_filter: str | None = None
    """Regular expression searched in alert names: matching alerts are ignored."""
    alert_match_only: bool = False
    """Invert ``alert_filter``: only matching alerts hold updates."""
    labels: dict[str, str] = Field(default_factory=dict)
    """label = template ({node}, {cluster}): only alerts carrying these values count."""
    check_interval: Duration = 60.0
    max_wait: Duration = 7200.0
    gate_fail_open: bool = False
    health_query: str | None = None
    health_wait: Duration = 300.0
    timeout: Duration = 10.0
    """Longest wait for one answer of Prometheus or Alertmanager."""

    @field_validator("prometheus_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https:// (e.g. http://prometheus:9090/)")
        return value

    @field_validator("alert_filter")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from exc
        return value

    @field_validator("labels")
    @classmethod
    def _templates(cls, value: dict[str, str]) -> dict[str, str]:
        for key, template in value.items():
            rest = template.replace("{node}", "").replace("{cluster}", "")
            if "{" in rest or "}" in rest:
                raise ValueError(
                    f"{key} = {template!r}: a template may use only {{node}} and {{cluster}}"
                )
        return value

    @field_validator("check_interval", "timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be longer than 0s")
        return value

    @field_validator("health_query")
    @classmethod
    def _needs_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("prometheus_url") is None:
            raise ValueError("needs gate.prometheus_url (the Prometheus to ask)")
        return value

    @field_validator("bearer_token_file")
    @classmethod
    def _one_kind_of_auth(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("username") is not None:
            raise ValueError("set either username (basic auth) or bearer_token_file, not both")
        return value


class LeaderSettings(_Section):
    takeover: Duration = 10.0
    """With several instances on one PostgreSQL: another instance takes over this long
    after the leader died or lost its database connection (at most)."""
    heartbeat: Duration = 15.0
    """The leading instance writes a heartbeat into the store this often (monitoring:
    ``tgops check-versions --max-age``, ``tgops_heartbeat_timestamp_seconds``)."""
    node_check: Duration = 60.0
    """The leading instance reads every node's state this often, so that a node that
    stops answering shows in monitoring without anyone asking for its status."""

    @field_validator("takeover", "heartbeat", "node_check")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value < 0.4:
            raise ValueError("must be at least 0.4s")
        return value


class StatusPageSettings(_Section):
    enabled: bool = True
    """Serve the users' status page at ``/status`` (and its feed and live updates)."""
    title: str | None = None
    """The page's heading (default: "Maintenance status" in the reader's language)."""
    token: SecretStr | None = None
    """When set, the page needs it: ``?token=TOKEN`` or ``Authorization: Bearer TOKEN``."""
    systems: tuple[str, ...] = ("*",)
    """Clusters and nodes the page shows (``"*"``: every cluster and single system)."""
    show_versions: bool = False
    """Also show the installed package versions of each node."""
    refresh: Duration = 60.0
    """Seconds between the page's own refreshes (without JavaScript, or when an
    instance's live updates cannot reach the browser)."""

    @field_validator("refresh")
    @classmethod
    def _refresh(cls, value: float) -> float:
        if not 5 <= value <= 3600:
            raise ValueError("must be from 5s to 1h")
        return value


class LogSettings(_Section):
    format: Literal["text", "json"] = "text"
    """``text``: one line per record for people; ``json``: one JSON object per line (time,
    level, logger, message, and run, node, actor where the record has them)."""
    level: Literal["debug", "info", "warning", "error"] = "info"
    """The least severe records written; ``-v``/``-q`` move it one step per flag."""
