"""Slack: the ``/tg`` slash command, buttons, modal, App Home and the ops channel.

- ``app``: the Bolt app (HTTP events or Socket Mode) and its handlers.
- ``blocks``: Block Kit of replies and confirmations; ``home``: the App Home tab;
  ``modal``: the schedule-maintenance modal; ``ops``: run messages in the ops channel;
  ``api``: the Web API client; ``jobs``: background work started by a handler.

May import: ``core``, ``bot.commands`` and ``bot.grammar``. Never ``notify``.
"""
