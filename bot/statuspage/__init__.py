"""The users' maintenance status page (``/status``), its live updates and Atom feed."""

from bot.statuspage.app import StatusPage

__all__ = ["StatusPage"]
