"""The notices users on a node read, from the templates ``notice_*.txt`` in the node's
language (``[[nodes]] language``, then ``[clusters.NAME] language``, then
``notify.language``): the engine's ``NoticeTexts`` in the service."""

from __future__ import annotations

from datetime import datetime

from core.lifecycle.scheduled import SCHEDULED_REASON
from core.settings import Settings
from notify.i18n import message_time, translator
from notify.render import Renderer

KEPT = 20_000
"""Maintenance notices kept as rendered, per node, start and reason: a window's reminders
repeat the same text, so each node's is rendered once per window rather than at every
reminder (1,000 nodes told every second for 8 s: 1,000 renders instead of 8,000). Past
this many (two windows of 10,000 nodes) all are dropped and rendered again when asked."""


class NodeNotices:
    def __init__(self, settings: Settings, renderer: Renderer) -> None:
        self.settings = settings
        self.renderer = renderer
        self._kept: dict[tuple[str, datetime, str], str] = {}

    def _render(self, name: str, node: str, **variables: object) -> str:
        language = self.settings.notice_language(node)
        text = self.renderer.text(name, {"node": node, **variables}, language)
        return " ".join(text.split())

    def maintenance(self, node: str, start: datetime, reason: str) -> str:
        key = (node, start, reason)
        text = self._kept.get(key)
        if text is None:
            language = self.settings.notice_language(node)
            when = message_time(translator(language), start, self.settings.tz)
            shown = (
                translator(language)._("Scheduled update") if reason == SCHEDULED_REASON else reason
            )
            text = self._render("notice_maintenance", node, start=when, reason=shown)
            if len(self._kept) >= KEPT:
                self._kept.clear()
            self._kept[key] = text
        return text

    def maintenance_ended(self, node: str) -> str:
        return self._render("notice_ended", node)

    def work_starts(self, node: str, kind: str) -> str:
        return self._render("notice_starts", node, kind=kind)

    def _at(self, node: str, start: datetime) -> str:
        return message_time(
            translator(self.settings.notice_language(node)), start, self.settings.tz
        )

    def update_held(self, node: str, start: datetime) -> str:
        return self._render("notice_held", node, start=self._at(node, start))

    def update_resumes(self, node: str, start: datetime) -> str:
        return self._render("notice_resumes", node, start=self._at(node, start))
