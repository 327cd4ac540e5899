"""Contacts are need-to-know: the customers' e-mail addresses and phone numbers in texts
shown to people who may not see them are replaced by a mark (their names stay).

Hidden are the addresses of ``[[contacts]]`` and every international phone number (tgops
phones nobody else); the admins' and the users' mailing lists stay visible.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from core.settings import Contact

_PHONE = re.compile(r"(?<![\w.+~:-])\+[0-9][0-9 ()/-]{5,}[0-9]")
ADDRESS_HIDDEN = "address hidden"
NUMBER_HIDDEN = "number hidden"


class ContactMask:
    """Replaces the contacts' addresses and phone numbers in a text."""

    def __init__(self, contacts: Iterable[Contact]) -> None:
        addresses = sorted({c.email for c in contacts if c.email}, key=len, reverse=True)
        self._addresses = (
            re.compile("|".join(re.escape(a) for a in addresses), re.IGNORECASE)
            if addresses
            else None
        )

    def hide(self, text: str) -> str:
        if self._addresses is not None:
            text = self._addresses.sub(ADDRESS_HIDDEN, text)
        return _PHONE.sub(NUMBER_HIDDEN, text)
