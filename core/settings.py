"""The settings object: built once at start-up from TOML and the environment, passed down.

TOML comes from ``--config`` or ``TGOPS_CONFIG``; every key can be overridden by an
environment variable ``TGOPS_<SECTION>__<KEY>`` (e.g. ``TGOPS_SLACK__BOT_TOKEN``).
Unknown keys are errors. Problems are reported one line per key by ``ConfigError``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from functools import cached_property
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from core.errors import ConfigError
from core.private import others_may_read
from core.sections import (
    LANGUAGES,
    ApiSettings,
    ApiToken,
    AuditSettings,
    ClusterSettings,
    Contact,
    EscalationSettings,
    GateSettings,
    HttpSettings,
    Language,
    LeaderSettings,
    LogSettings,
    MaintenanceSettings,
    NodeSettings,
    NotifySettings,
    RolesSettings,
    Secret,
    SlackSettings,
    SmtpSettings,
    StatusPageSettings,
    TwilioSettings,
    UpdatesSettings,
)

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///var/lib/tgops/state.db"


_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("tgops_settings_environ", default=None)


class _GivenEnvironment(EnvSettingsSource):
    """Environment overrides from the mapping handed to ``load_settings``, not ``os.environ``."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        environ = _ENVIRON.get() or {}
        return {k.lower(): v for k, v in environ.items()}


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

    @cached_property
    def _nodes_by_name(self) -> dict[str, NodeSettings]:
        return {entry.name: entry for entry in self.nodes}

    def node(self, name: str) -> NodeSettings | None:
        """The configured node ``name`` (None if there is none), found without a scan."""
        return self._nodes_by_name.get(name)

    def notice_language(self, node: str) -> Language:
        """The language of the notices on ``node``: its own, its cluster's, the default."""
        entry = self.node(node)
        if entry is not None:
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


__all__ = [
    "DEFAULT_DATABASE_URL",
    "LANGUAGES",
    "ApiSettings",
    "ApiToken",
    "AuditSettings",
    "ClusterSettings",
    "Contact",
    "EscalationSettings",
    "GateSettings",
    "HttpSettings",
    "Language",
    "LeaderSettings",
    "LogSettings",
    "MaintenanceSettings",
    "NodeSettings",
    "NotifySettings",
    "RolesSettings",
    "Secret",
    "Settings",
    "SlackSettings",
    "SmtpSettings",
    "StatusPageSettings",
    "TwilioSettings",
    "UpdatesSettings",
]
