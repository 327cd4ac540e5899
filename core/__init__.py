"""The update lifecycle of a TightGate-Pro style fleet: model, rules, runs, store, drivers.

Rooms (each package's docstring says what lives in it):

- the shared vocabulary at the top: ``model`` (values), ``events`` (domain events and the
  bus), ``errors``, ``durations``, ``clock``, ``localtime``, ``settings`` (loading; with
  ``sections``, one model per table), ``interfaces`` (every pluggable boundary as a
  protocol), ``templates`` (node command templates), ``background``;
- ``lifecycle/``: the manual's rules (runs, steps, schedules, maintenance, slots);
- ``repository/``: manifests, downloads and the cache, publishing, retries;
- ``store/``: the durable store, one module per aggregate;
- ``drivers/``: nodes (sandbox, local, ssh) and cluster load balancers.

Imports point one way: the rooms import the vocabulary (which itself imports only
``repository.manifest``, the manifest's wire format); ``lifecycle`` imports ``store`` and
``repository``; ``store``, ``repository`` and ``drivers`` import no other room. ``core``
never imports ``bot`` or ``notify``; they subscribe to its events.
"""

__version__ = "0.1.0"
