"""Which firing alerts hold an update of a node, and whether a node is healthy after one.

- ``alert_filter``: a regular expression searched in each alert's name; matching alerts are
  ignored (with ``alert_match_only``: only matching alerts count).
- ``labels``: label = template pairs; an alert counts for a node only when it carries
  every one of these labels with the template's value for that node (``{node}``, and
  ``{cluster}``: the node's cluster, or the node's name for a single system). Without
  ``labels`` every firing alert counts for every node.
- The source cannot be asked: "gate unreachable", which holds (fail closed) unless
  ``fail_open``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from core.gate.client import (
    Alert,
    Credentials,
    GateClient,
    GateUnreachableError,
    QueryRejectedError,
)

if TYPE_CHECKING:
    from core.settings import GateSettings

Result = Literal["clear", "blocked", "unreachable"]
SHOWN_ALERTS = 5
"""Alerts named in a hold's reason; the rest are counted."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """One look at the gate for one node."""

    result: Result
    alerts: tuple[Alert, ...] = ()
    cause: str = ""
    """Why the source could not be asked (``unreachable``)."""
    fail_open: bool = False

    @property
    def passes(self) -> bool:
        return self.result == "clear" or (self.result == "unreachable" and self.fail_open)

    @property
    def text(self) -> str:
        """``alerts firing: NAME (labels), …``, ``gate unreachable: …`` or ``clear``."""
        if self.result == "unreachable":
            opened = " (gate_fail_open: going ahead)" if self.fail_open else ""
            return f"gate unreachable: {self.cause}{opened}"
        if self.result == "blocked":
            shown = ", ".join(a.describe() for a in self.alerts[:SHOWN_ALERTS])
            more = len(self.alerts) - SHOWN_ALERTS
            return "alerts firing: " + shown + (f" and {more} more" if more > 0 else "")
        return "clear"


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthReport:
    healthy: bool
    text: str


def render(template: str, *, node: str, cluster: str | None) -> str:
    """A ``labels`` or ``health_query`` template for one node."""
    return template.replace("{node}", node).replace("{cluster}", cluster or node)


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertRules:
    pattern: re.Pattern[str] | None = None
    match_only: bool = False
    labels: Mapping[str, str] | None = None

    def counts(self, alert: Alert, *, node: str, cluster: str | None) -> bool:
        if self.pattern is not None:
            matched = self.pattern.search(alert.name) is not None
            if matched != self.match_only:
                return False
        for key, template in (self.labels or {}).items():
            if alert.labels.get(key) != render(template, node=node, cluster=cluster):
                return False
        return True

    def blocking(
        self, alerts: Sequence[Alert], *, node: str, cluster: str | None
    ) -> tuple[Alert, ...]:
        found = [a for a in alerts if self.counts(a, node=node, cluster=cluster)]
        return tuple(sorted(found, key=lambda a: (a.name, sorted(a.labels.items()))))


class Gate:
    """The gate of one service: ``check`` before disruptive steps, ``health`` after an
    update."""

    def __init__(
        self,
        client: GateClient,
        *,
        rules: AlertRules,
        fail_open: bool = False,
        check_interval: float = 60.0,
        max_wait: float = 7200.0,
        health_query: str | None = None,
        health_wait: float = 300.0,
    ) -> None:
        self.client = client
        self.rules = rules
        self.fail_open = fail_open
        self.check_interval = check_interval
        self.max_wait = max_wait
        self.health_query = health_query
        self.health_wait = health_wait

    @classmethod
    def from_settings(cls, settings: GateSettings) -> Gate | None:
        """The configured gate; ``None`` when ``gate.prometheus_url`` is unset."""
        if settings.prometheus_url is None:
            return None
        client = GateClient(
            settings.prometheus_url,
            timeout=settings.timeout,
            credentials=Credentials(
                username=settings.username,
                password_file=settings.password_file,
                bearer_token_file=settings.bearer_token_file,
            ),
        )
        rules = AlertRules(
            pattern=re.compile(settings.alert_filter) if settings.alert_filter else None,
            match_only=settings.alert_match_only,
            labels=dict(settings.labels),
        )
        return cls(
            client,
            rules=rules,
            fail_open=settings.gate_fail_open,
            check_interval=settings.check_interval,
            max_wait=settings.max_wait,
            health_query=settings.health_query,
            health_wait=settings.health_wait,
        )

    async def check(self, node: str, cluster: str | None) -> Verdict:
        """Whether an update of ``node`` may go ahead now."""
        try:
            alerts = await self.client.firing_alerts()
        except GateUnreachableError as exc:
            return Verdict(result="unreachable", cause=str(exc), fail_open=self.fail_open)
        blocking = self.rules.blocking(alerts, node=node, cluster=cluster)
        return Verdict(result="blocked" if blocking else "clear", alerts=blocking)

    async def check_many(self, nodes: Mapping[str, str | None]) -> dict[str, Verdict]:
        """One look at the source for several nodes (``plan``)."""
        try:
            alerts = await self.client.firing_alerts()
        except GateUnreachableError as exc:
            down = Verdict(result="unreachable", cause=str(exc), fail_open=self.fail_open)
            return dict.fromkeys(nodes, down)
        verdicts = {}
        for node, cluster in nodes.items():
            blocking = self.rules.blocking(alerts, node=node, cluster=cluster)
            verdicts[node] = Verdict(result="blocked" if blocking else "clear", alerts=blocking)
        return verdicts

    async def health(self, node: str, cluster: str | None) -> HealthReport:
        """One evaluation of ``health_query`` for ``node``: healthy when it returns at
        least one series whose value is not 0."""
        assert self.health_query is not None
        query = render(self.health_query, node=node, cluster=cluster)
        try:
            samples = await self.client.query(query)
        except GateUnreachableError as exc:
            if self.fail_open:
                return HealthReport(
                    healthy=True, text=f"gate unreachable: {exc} (gate_fail_open: passed)"
                )
            return HealthReport(healthy=False, text=f"gate unreachable: {exc}")
        except QueryRejectedError as exc:
            return HealthReport(healthy=False, text=str(exc))
        good = [s for s in samples if s.value != 0 and s.value == s.value]
        if good:
            return HealthReport(healthy=True, text=f"{query}: {len(good)} healthy series")
        if samples:
            return HealthReport(
                healthy=False, text=f"{query}: every series is 0 ({len(samples)} series)"
            )
        return HealthReport(healthy=False, text=f"{query}: no series (empty result)")
