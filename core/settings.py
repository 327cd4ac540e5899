"""The settings object: built once at start-up from TOML and the environment, passed down.

TOML comes from ``--config`` or ``TGOPS_CONFIG``; every key can be overridden by an
environment variable ``TGOPS_<SECTION>__<KEY>`` (e.g. ``TGOPS_SLACK__BOT_TOKEN``).
Unknown keys are errors. Problems are reported one line per key by ``ConfigError``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from core.durations import Duration
from core.errors import ConfigError
from core.model import Role
from core.private import others_may_read
from core.repository.manifest import load_public_key
from core.templates import resolve_templates

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///var/lib/tgops/state.db"

Language = Literal["en", "de"]
"""Languages of what users and contacts read (notices, e-mails, calls, the status page)."""
LANGUAGES: tuple[Language, ...] = ("en", "de")

_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("tgops_settings_environ", default=None)


class _GivenEnvironment(EnvSettingsSource):
    """Environment overrides from the mapping handed to ``load_settings``, not ``os.environ``."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        environ = _ENVIRON.get() or {}
        return {k.lower(): v for k, v in environ.items()}


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

    @field_validator("header_timeout", "body_timeout", "idle_timeout")
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


class Settings(BaseSettings):
    """The whole configuration (every key is documented in config/tgops.example.toml)."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix="TGOPS_",
        env_nested_delimiter="__",
        case_sensitive=False,
    )

    timezone: str = "Europe/Berlin"
    database_url: str = DEFAULT_DATABASE_URL
    http: HttpSettings = HttpSettings()
    api: ApiSettings = ApiSettings()
    updates: UpdatesSettings = UpdatesSettings()
    maintenance: MaintenanceSettings = MaintenanceSettings()
    slack: SlackSettings = SlackSettings()
    roles: RolesSettings = RolesSettings()
    smtp: SmtpSettings = SmtpSettings()
    twilio: TwilioSettings = TwilioSettings()
    escalation: EscalationSettings = EscalationSettings()
    leader: LeaderSettings = LeaderSettings()
    audit: AuditSettings = AuditSettings()
    log: LogSettings = LogSettings()
    notify: NotifySettings = NotifySettings()
    statuspage: StatusPageSettings = StatusPageSettings()
    gate: GateSettings = GateSettings()
    contacts: tuple[Contact, ...] = ()
    clusters: dict[str, ClusterSettings] = Field(default_factory=dict)
    nodes: tuple[NodeSettings, ...] = ()

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"{value!r} is not an IANA time zone (e.g. Europe/Berlin)") from exc
        return value

    @field_validator("database_url")
    @classmethod
    def _db(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("use sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DB")
        return value

    @model_validator(mode="after")
    def _references(self) -> Settings:
        names: set[str] = set()
        for i, node in enumerate(self.nodes):
            if node.name in names:
                raise ValueError(f"nodes[{i}].name: node {node.name} is declared twice")
            if node.name in self.clusters:
                raise ValueError(
                    f"nodes[{i}].name: {node.name} is also a cluster name; names must differ"
                )
            names.add(node.name)
            if node.cluster is not None and node.cluster not in self.clusters:
                raise ValueError(
                    f"nodes[{i}].cluster: cluster {node.cluster!r} is not declared; "
                    f"add [clusters.{node.cluster}]"
                )
            cluster = self.clusters.get(node.cluster) if node.cluster is not None else None
            if (
                cluster is not None
                and node.driver in {"local", "ssh"}
                and not (cluster.haproxy_socket or (cluster.lb_drain and cluster.lb_undrain))
            ):
                raise ValueError(
                    f"clusters.{node.cluster}: node {node.name} ({node.driver} driver) leaves "
                    "load balancing before an update; set lb_drain and lb_undrain (command "
                    "templates with {node}) or haproxy_socket"
                )
        if "all" in self.clusters:
            raise ValueError("clusters.all: 'all' is reserved for the whole fleet; rename it")
        for name in self.statuspage.systems:
            if name != "*" and name not in names and name not in self.clusters:
                raise ValueError(
                    f"statuspage.systems: {name!r} is neither a cluster nor a node; give "
                    'cluster or node names, or "*" for all'
                )
        return self

    def notice_language(self, node: str) -> Language:
        """The language of the notices on ``node``: its own, its cluster's, the default."""
        for entry in self.nodes:
            if entry.name == node:
                if entry.language is not None:
                    return entry.language
                cluster = self.clusters.get(entry.cluster) if entry.cluster else None
                if cluster is not None and cluster.language is not None:
                    return cluster.language
        return self.notify.language

    def contact_language(self, contact: Contact) -> Language:
        return contact.language or self.notify.language

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first, then the TOML file (passed as init values by load_settings).
        return (_GivenEnvironment(settings_cls), init_settings)


SECRET_KEYS = frozenset(
    {"token", "bot_token", "signing_secret", "app_token", "password", "auth_token"}
)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError([f"{path}: no such file"]) from exc
    except PermissionError as exc:
        raise ConfigError([f"{path}: not readable ({exc.strerror})"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc


def _describe(error: Mapping[str, Any]) -> str:
    loc = [str(p) for p in error["loc"]]
    key = ""
    for part in loc:
        key += f"[{part}]" if part.isdigit() else (f".{part}" if key else part)
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key (see config/tgops.example.toml for every accepted key)"
    elif error["type"] == "missing":
        message = "required key is missing"
    if "input" in error and error["type"] not in {"missing", "extra_forbidden"}:
        value = error["input"]
        name = key.split(".")[-1]
        if name == "database_url" and isinstance(value, str):
            message += f" (got {masked_url(value)!r})"
        elif not isinstance(value, dict | list) and name not in SECRET_KEYS:
            message += f" (got {value!r})"
    return f"{key}: {message}" if key else message


SECRETS_DIR = "TGOPS_SECRETS_DIR"
"""A directory of secret files named like their variables (``tgops_slack__bot_token``)."""
FILE_SUFFIX = "_FILE"


def _secret_variable(name: str) -> bool:
    """Whether ``TGOPS_…`` names a secret (its last part is a secret key, or the URL)."""
    last = name.upper().removeprefix("TGOPS_").split("__")[-1].lower()
    return last in SECRET_KEYS or last == "database_url"


def _read_secret(path: Path) -> str:
    """A secret file's content without the line end editors and ``echo`` add."""
    return path.read_text(encoding="utf-8").rstrip("\r\n")


def secrets_from_files(environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The environment with secrets read from files, as Docker and Kubernetes mount them:
    ``TGOPS_<SECTION>__<KEY>_FILE=/path`` for one secret, and every file of the directory
    ``TGOPS_SECRETS_DIR`` whose name is a secret's variable (any case, e.g.
    ``tgops_smtp__password``; other files are ignored). A variable given directly wins
    over its ``_FILE``, which wins over the directory. Returns the environment and the
    problems found (one line each, naming the variable)."""
    result = {k: v for k, v in environ.items() if k.upper() != SECRETS_DIR}
    problems: list[str] = []
    given = {k.upper() for k in environ}
    directory = environ.get(SECRETS_DIR)
    if directory:
        folder = Path(directory)
        try:
            entries = sorted(p for p in folder.iterdir() if p.is_file())
        except OSError as exc:
            problems.append(f"environment {SECRETS_DIR}: cannot read {folder} ({exc.strerror})")
            entries = []
        for entry in entries:
            name = entry.name.upper()
            if not name.startswith("TGOPS_") or not _secret_variable(name):
                continue
            if name in given or f"{name}{FILE_SUFFIX}" in given:
                continue
            try:
                result[name] = _read_secret(entry)
            except (OSError, UnicodeDecodeError) as exc:
                problems.append(f"{SECRETS_DIR} {entry}: cannot read it ({exc})")
    for key, value in sorted(environ.items()):
        upper = key.upper()
        if not upper.startswith("TGOPS_") or not upper.endswith(FILE_SUFFIX):
            continue
        target = upper.removesuffix(FILE_SUFFIX)
        if not _secret_variable(target):
            continue  # not a secret's file variable (e.g. updates.public_key_file)
        del result[key]
        if target in given:
            problems.append(f"environment {key}: give {target} or {key}, not both")
            continue
        try:
            result[target] = _read_secret(Path(value))
        except (OSError, UnicodeDecodeError) as exc:
            cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            problems.append(f"environment {key}: cannot read {value} ({cause})")
    return result, problems


def load_settings(path: Path | None, environ: Mapping[str, str]) -> Settings:
    """Build the settings from ``path`` (or ``TGOPS_CONFIG``) and the environment.

    Raises ``ConfigError`` with one line per problem, each naming the key.
    """
    if path is None and environ.get("TGOPS_CONFIG"):
        path = Path(environ["TGOPS_CONFIG"])
    data = _read_toml(path) if path is not None else {}
    environ, problems = secrets_from_files(environ)
    unknown = [
        key
        for key in environ
        if key.upper().startswith("TGOPS_")
        and key.upper() not in {"TGOPS_CONFIG"}
        and not key.upper().startswith("TGOPS_TEST_")
        and key.upper().removeprefix("TGOPS_").split("__")[0].lower() not in Settings.model_fields
    ]
    problems += [f"environment {key}: unknown key" for key in sorted(unknown)]
    try:
        settings = _build(data, environ)
    except ValidationError as exc:
        problems.extend(_describe(error) for error in exc.errors())
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        raise ConfigError(problems)
    return settings


def _build(data: dict[str, Any], environ: Mapping[str, str]) -> Settings:
    relevant = {
        k: v
        for k, v in environ.items()
        if k.upper().startswith("TGOPS_")
        and not k.upper().startswith("TGOPS_TEST_")
        and k.upper() != "TGOPS_CONFIG"
    }
    token = _ENVIRON.set(relevant)
    try:
        return Settings(**data)
    finally:
        _ENVIRON.reset(token)


def masked(settings: Settings) -> dict[str, Any]:
    """The resolved configuration as plain data with every secret masked."""
    data = settings.model_dump(mode="json")

    def walk(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, key) for v in value]
        if key in SECRET_KEYS and value is not None:
            return "********"
        if key == "database_url" and isinstance(value, str):
            return masked_url(value)
        return value

    masked_data: dict[str, Any] = walk(data)
    return masked_data


def masked_url(url: str) -> str:
    """A database URL with its password shown as ``********``."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in credentials:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:********@{host}"


def exposed_secrets(path: Path) -> list[str]:
    """A warning when the configuration file holds secrets and its group or others may
    read it (nothing when it is private or holds none)."""
    mode = others_may_read(path)
    if mode is None:
        return []
    found: list[str] = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                name = f"{where}.{key}" if where else str(key)
                if key in SECRET_KEYS and item:
                    found.append(name)
                elif key == "database_url" and isinstance(item, str):
                    if masked_url(item) != item:
                        found.append(name)
                else:
                    walk(item, name)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]")

    walk(_read_toml(path), "")
    if not found:
        return []
    return [
        f"{path} holds secrets ({', '.join(found)}) and is readable by its group or others "
        f"(mode {mode:04o}); run `chmod 600 {path}` (or keep the secrets in TGOPS_* "
        "environment variables)"
    ]
