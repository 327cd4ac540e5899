"""Operator interfaces of tgops: the ``/tg`` command language, the HTTP API, Slack and the CLI.

- ``grammar`` (the ``/tg`` language and roles), ``commands`` (carries out one parsed
  command), ``service`` (builds and runs every component), ``http`` (the API and the
  aiohttp server), ``cli`` (``tgops ...``), ``metrics`` (Prometheus), ``calendar_feed``
  (``/maintenance.ics``), ``nagios`` (``tgops check-versions``, reads the store read-only).
- ``slack/``: the Slack app; ``demo/``: ``tgops demo``.

May import: ``core`` and ``notify`` (``service`` wires the notifier in). ``core`` never
imports this package.
"""
