"""The gate's HTTP client: firing alerts from Prometheus or Alertmanager, and instant
PromQL queries from Prometheus.

``prometheus_url`` may point to either server. The first look asks ``api/v1/alerts``
(Prometheus; Alertmanager before 0.27 answers it too, in its own shape); a 404 or 410
there means an Alertmanager without the v1 API, which is then asked ``api/v2/alerts``.
What answered is remembered. Only firing alerts count (Prometheus: ``state`` firing, not
pending; Alertmanager: ``active``, not silenced or inhibited).

Every request is bounded by ``timeout``; credentials (basic auth, or a bearer token) are
read from their files at each request, so a rotated secret is used at once.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from core.errors import TgopsError

ApiKind = Literal["prometheus", "alertmanager-v1", "alertmanager-v2"]


class GateUnreachableError(TgopsError):
    """The alert source could not be asked, or its answer could not be used."""

    def __init__(self, url: str, cause: str) -> None:
        self.url = url
        self.cause = cause
        super().__init__(f"{url}: {cause}")


class QueryRejectedError(TgopsError):
    """Prometheus refused a PromQL expression (a configuration problem, not an outage)."""

    def __init__(self, query: str, cause: str) -> None:
        self.query = query
        self.cause = cause
        super().__init__(
            f"Prometheus rejected the query {query!r}: {cause} (check gate.health_query)"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Alert:
    """One firing alert: its name and its labels (``alertname`` among them)."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """``NAME (key=value, …)``: the name and its other labels, sorted."""
        rest = ", ".join(f"{k}={v}" for k, v in sorted(self.labels.items()) if k != "alertname")
        return f"{self.name} ({rest})" if rest else self.name


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """One series of an instant query's answer."""

    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """Basic auth (``username`` and the password in ``password_file``) or a bearer token
    (in ``bearer_token_file``); none when all are unset."""

    username: str | None = None
    password_file: Path | None = None
    bearer_token_file: Path | None = None

    def headers(self) -> dict[str, str]:
        """The Authorization header; ``OSError`` when a file cannot be read."""
        if self.bearer_token_file is not None:
            return {"Authorization": f"Bearer {_secret(self.bearer_token_file)}"}
        if self.username is not None:
            password = _secret(self.password_file) if self.password_file is not None else ""
            return {"Authorization": basic_auth(self.username, password)}
        return {}


def basic_auth(user: str, password: str) -> str:
    """The value of an ``Authorization`` header for basic auth (RFC 7617, UTF-8)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def _secret(path: Path) -> str:
    return path.read_text().strip()


# -- wire formats ------------------------------------------------------------------------


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _PromAlert(_Wire):
    labels: dict[str, str]
    state: str = "firing"


class _PromAlertData(_Wire):
    alerts: list[_PromAlert]


class _PromAlerts(_Wire):
    """Prometheus ``GET /api/v1/alerts``."""

    status: str
    data: _PromAlertData


class _AmV1Status(_Wire):
    state: str = "active"


class _AmV1Alert(_Wire):
    labels: dict[str, str]
    status: _AmV1Status = _AmV1Status()


class _AmV1Alerts(_Wire):
    """Alertmanager (before 0.27) ``GET /api/v1/alerts``."""

    status: str
    data: list[_AmV1Alert]


class _AmV2Status(_Wire):
    state: str = "active"


class _AmV2Alert(_Wire):
    labels: dict[str, str]
    status: _AmV2Status = _AmV2Status()


_AM_V2 = TypeAdapter(list[_AmV2Alert])


class _QueryData(_Wire):
    resultType: str
    result: Any


class _Query(_Wire):
    """Prometheus ``GET /api/v1/query``."""

    status: str
    data: _QueryData | None = None
    error: str | None = None


def _number(text: object) -> float:
    try:
        return float(str(text))
    except ValueError:
        return float("nan")


class GateClient:
    """Talks to one Prometheus or Alertmanager; ``timeout`` bounds each request."""

    def __init__(self, url: str, *, timeout: float, credentials: Credentials | None = None) -> None:
        self.url = url if url.endswith("/") else url + "/"
        self.timeout = timeout
        self.credentials = credentials or Credentials()
        self.kind: ApiKind | None = None
        """What answered the last time (``None`` until the first answer)."""

    async def _get(
        self, path: str, params: Mapping[str, str] | None = None
    ) -> tuple[int, Any, str]:
        """Status, parsed JSON (``None`` when the body is no JSON) and the body's start."""
        try:
            headers = await asyncio.to_thread(self.credentials.headers)
        except OSError as exc:
            raise GateUnreachableError(
                self.url, f"cannot read the credentials file {exc.filename} ({exc.strerror})"
            ) from exc
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with (
                asyncio.timeout(self.timeout + 1),
                aiohttp.ClientSession(timeout=timeout, headers=headers) as session,
                session.get(self.url + path, params=params) as response,
            ):
                body = await response.read()
        except TimeoutError as exc:
            raise GateUnreachableError(self.url, f"no answer within {self.timeout:g}s") from exc
        except aiohttp.ClientError as exc:
            raise GateUnreachableError(self.url, str(exc) or type(exc).__name__) from exc
        text = body.decode("utf-8", "replace")
        try:
            data = TypeAdapter(Any).validate_json(body) if body else None
        except ValidationError:
            data = None
        return response.status, data, text[:200]

    async def firing_alerts(self) -> list[Alert]:
        """Every firing alert the server knows (unfiltered)."""
        if self.kind == "alertmanager-v2":
            return await self._am_v2()
        status, data, text = await self._get("api/v1/alerts")
        if status in {404, 410} and self.kind is None:
            return await self._am_v2()
        self._check(status, text)
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            try:
                v1 = _AmV1Alerts.model_validate(data)
            except ValidationError as exc:
                raise self._unusable(exc) from exc
            self.kind = "alertmanager-v1"
            return [_alert(a.labels) for a in v1.data if a.status.state not in {"suppressed"}]
        try:
            prom = _PromAlerts.model_validate(data)
        except ValidationError as exc:
            raise self._unusable(exc) from exc
        self.kind = "prometheus"
        return [_alert(a.labels) for a in prom.data.alerts if a.state == "firing"]

    async def _am_v2(self) -> list[Alert]:
        status, data, text = await self._get(
            "api/v2/alerts", {"active": "true", "silenced": "false", "inhibited": "false"}
        )
        self._check(status, text)
        try:
            alerts = _AM_V2.validate_python(data)
        except ValidationError as exc:
            raise self._unusable(exc) from exc
        self.kind = "alertmanager-v2"
        return [_alert(a.labels) for a in alerts if a.status.state == "active"]

    async def query(self, promql: str) -> list[Sample]:
        """An instant query: one sample per series (a scalar answer is one sample)."""
        status, data, text = await self._get("api/v1/query", {"query": promql})
        if status in {404, 410}:
            raise GateUnreachableError(
                self.url,
                "no PromQL query API here (HTTP 404): gate.health_query needs a Prometheus "
                "URL, not an Alertmanager",
            )
        if status in {400, 422} and isinstance(data, dict):
            raise QueryRejectedError(promql, str(data.get("error") or text))
        self._check(status, text)
        try:
            answer = _Query.model_validate(data)
        except ValidationError as exc:
            raise self._unusable(exc) from exc
        if answer.status != "success" or answer.data is None:
            raise QueryRejectedError(promql, answer.error or answer.status)
        result = answer.data.result
        if answer.data.resultType == "vector" and isinstance(result, list):
            return [
                Sample(
                    labels={str(k): str(v) for k, v in (item.get("metric") or {}).items()},
                    value=_number((item.get("value") or [0, "nan"])[1]),
                )
                for item in result
                if isinstance(item, dict)
            ]
        if answer.data.resultType == "scalar" and isinstance(result, list) and len(result) == 2:
            return [Sample(labels={}, value=_number(result[1]))]
        raise QueryRejectedError(
            promql, f"answers a {answer.data.resultType}; write an expression giving a vector"
        )

    def _check(self, status: int, text: str) -> None:
        if status in {401, 403}:
            raise GateUnreachableError(
                self.url,
                f"HTTP {status}: not allowed (check gate.username / password_file / "
                "bearer_token_file)",
            )
        if status != 200:
            raise GateUnreachableError(self.url, f"HTTP {status}: {text.strip()[:120]}")

    def _unusable(self, exc: ValidationError) -> GateUnreachableError:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the answer"
        return GateUnreachableError(
            self.url,
            f"the answer is not a Prometheus or Alertmanager alert list ({where}: {first['msg']})",
        )


def _alert(labels: Mapping[str, str]) -> Alert:
    return Alert(name=labels.get("alertname", "(unnamed)"), labels=dict(labels))
