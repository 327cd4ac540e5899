"""The gate: asks the Prometheus (or Alertmanager) a site already runs whether an update
may go ahead, and whether a node is healthy after it.

- ``client.py``: the HTTP side (firing alerts, instant PromQL queries), every request
  bounded by a timeout;
- ``decision.py``: which alerts block which node (``alert_filter``, ``alert_match_only``,
  ``labels``), fail closed or open, and the post-update health check.

The holding of runs lives in the lifecycle (``core.lifecycle.hold``).
"""

from core.gate.client import Alert, GateClient, GateUnreachableError, Sample
from core.gate.decision import Gate, HealthReport, Verdict

__all__ = [
    "Alert",
    "Gate",
    "GateClient",
    "GateUnreachableError",
    "HealthReport",
    "Sample",
    "Verdict",
]
