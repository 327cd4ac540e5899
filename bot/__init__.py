"""Operator interfaces of tgops: the `/tg` command language, the HTTP API, Slack and the CLI."""
