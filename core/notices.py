"""The notices users on a node read, in English: the default ``NoticeTexts``.

The service replaces it with the translated templates of ``notify`` (``notify.notices``),
so the texts an operator sees here are the English ones of ``notify/templates``.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from core.localtime import local_text


class EnglishNotices:
    def __init__(self, tz: ZoneInfo) -> None:
        self.tz = tz

    def maintenance(self, node: str, start: datetime, reason: str) -> str:
        when = local_text(start, self.tz)
        return (
            f"Maintenance of {node} at {when}: {reason}. "
            "Please save your work; your session will be ended."
        )

    def maintenance_ended(self, node: str) -> str:
        return f"The maintenance of {node} has ended; {node} is available again."

    def work_starts(self, node: str, kind: str) -> str:
        what = "restart" if kind == "restart" else "update"
        return (
            f"The {what} of {node} starts now; your session will be ended. Please save your work."
        )

    def update_held(self, node: str, start: datetime) -> str:
        return (
            f"The update of {node} planned for {local_text(start, self.tz)} is held back: the "
            "monitoring reports a problem. You will be told when it starts."
        )

    def update_resumes(self, node: str, start: datetime) -> str:
        return (
            f"The update of {node} was held back by the monitoring; it now starts at "
            f"{local_text(start, self.tz)}. Please save your work."
        )
