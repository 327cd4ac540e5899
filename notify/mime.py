"""The bytes of one e-mail: ``multipart/alternative`` with a text and an HTML part.

Built from the standard library's encoders (``formataddr`` and ``email.header.Header`` for
RFC 2047 names and subjects, ``binascii.b2a_qp`` (C) for quoted-printable UTF-8 bodies,
``format_datetime``; ASCII subjects folded at spaces here) rather than with
``EmailMessage``, whose header objects and refolding cost about 1.7 ms per message, thirty
times this (bench/RESULTS.md, "E-mail"), and which moves a folded subject holding ``<``,
``&`` or ``[`` onto a continuation line (parsers then read it with a leading space). A part
that is plain ASCII with lines of at most 998 characters is sent as it is (``7bit``), any
other quoted-printable; the boundary starts with ``=_tgops_``, which quoted-printable
cannot produce and which a ``7bit`` part is checked not to hold, so it cannot occur in a
body. Header values are put on one line first, so no value can add a header.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import re
from datetime import datetime
from email.header import Header
from email.utils import format_datetime, formataddr

CRLF = "\r\n"
QP_LINE = 76
"""Longest line of a quoted-printable body (RFC 2045 6.7)."""
SEVEN_BIT_LINE = 998
"""Longest line of a part sent as it is (RFC 5322 2.1.1)."""
BOUNDARY_MARK = "=_tgops_"
"""How every boundary starts."""
MAX_SUBJECT = 900
"""Characters of a subject kept (a line may not exceed 998, RFC 5322 2.1.1)."""
_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


class AddressError(ValueError):
    def __init__(self, address: str) -> None:
        super().__init__(
            f"{address!r} is not a plain ASCII e-mail address (user@example.org); "
            "internationalized addresses are not supported"
        )


def one_line(value: str) -> str:
    """Whitespace (line breaks included) collapsed to single spaces."""
    return " ".join(value.split())


def message_id(key: str, sender: str) -> str:
    """A stable Message-ID for an outbox key (the same after a retry or a restart)."""
    return _message_id(hashlib.sha256(key.encode()).hexdigest(), sender)


def _message_id(digest: str, sender: str) -> str:
    domain = sender.rpartition("@")[2] or "localhost"
    return f"<{digest[:40]}@{domain}>"


def thread_id(thread: str, sender: str) -> str:
    """The Message-ID the messages of one thread refer to (the same for every recipient)."""
    return _message_id(hashlib.sha256(f"thread:{thread}".encode()).hexdigest(), sender)


def check_address(address: str) -> str:
    if not _ADDRESS.fullmatch(address):
        raise AddressError(address)
    return address


def _header(name: str, value: str) -> str:
    return f"{name}: {value}"


def _fold(value: str, used: int) -> str:
    """An ASCII value folded at its spaces into lines of at most 78 characters where words
    allow (RFC 5322 2.2.3; unfolding gives the value back). ``used``: the "Name: " before."""
    lines: list[str] = []
    current = ""
    limit = 78 - used
    for word in value.split(" "):
        candidate = f"{current} {word}" if current else word
        if current and len(candidate) > limit:
            lines.append(current)
            current = word
            limit = 77  # a continuation line starts with the space
        else:
            current = candidate
    lines.append(current)
    return (CRLF + " ").join(lines)


@functools.lru_cache(maxsize=64)
def _subject(subject: str) -> str:
    text = one_line(subject)[:MAX_SUBJECT]
    if text.isascii():
        return _fold(text, len("Subject: "))
    return Header(text, "utf-8", header_name="Subject").encode(linesep=CRLF)


# The same sender, subject and creation time recur across the messages of one
# announcement: their header values are formatted once.


@functools.lru_cache(maxsize=8)
def _from(sender_name: str, sender: str) -> str:
    return formataddr((one_line(sender_name), sender))


@functools.lru_cache(maxsize=64)
def _date(date: datetime) -> str:
    return format_datetime(date)


def quoted_printable(text: str) -> str:
    """``text`` (LF line ends) as quoted-printable UTF-8 with CRLF line ends (RFC 2045
    6.7): ``=``, non-ASCII bytes, whitespace before a line end and a lone ``.`` line
    encoded, lines of at most 76 characters."""
    lines = binascii.b2a_qp(text.encode("utf-8"), istext=True).decode("ascii").split("\n")
    if max(map(len, lines)) > QP_LINE:
        lines = [part for line in lines for part in _soft_breaks(line)]
    return CRLF.join(lines)


def _soft_breaks(line: str) -> list[str]:
    """An encoded line cut into lines of at most ``QP_LINE`` characters with soft line
    breaks (``=`` at the end), never inside an ``=XX`` escape. ``binascii.b2a_qp`` leaves
    a line of up to 78 when it encodes a space or tab at the end."""
    parts: list[str] = []
    while len(line) > QP_LINE:
        cut = QP_LINE - 1
        escape = line.rfind("=", cut - 2, cut)
        if escape != -1:
            cut = escape
        parts.append(line[:cut] + "=")
        line = line[cut:]
    parts.append(line)
    return parts


def _part(subtype: str, body: str) -> str:
    """One part; line ends in ``body`` may be CRLF, LF or CR."""
    text = body.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if (
        text.isascii()
        and max(map(len, lines)) <= SEVEN_BIT_LINE
        and BOUNDARY_MARK not in text
        and "\0" not in text
    ):
        encoding, encoded = "7bit", CRLF.join(lines)
    else:
        encoding, encoded = "quoted-printable", quoted_printable(text)
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"{CRLF}'
        f"Content-Transfer-Encoding: {encoding}{CRLF}{CRLF}{encoded}"
    )


def compose(
    *,
    key: str,
    sender: str,
    sender_name: str,
    recipient: str,
    name: str | None,
    subject: str,
    date: datetime,
    text: str,
    html: str,
    thread: str | None = None,
) -> bytes:
    """The message as sent (CRLF line ends); ``AddressError`` for a bad recipient.

    ``thread`` names what the message belongs to (a maintenance window): every message of
    one thread has ``In-Reply-To`` and ``References`` set to the same Message-ID made from
    the thread's name (``thread_id``), so mail clients show them as one conversation while
    each message keeps a Message-ID of its own.
    """
    check_address(recipient)
    digest = hashlib.sha256(key.encode()).hexdigest()
    boundary = BOUNDARY_MARK + digest[:24]
    display = one_line(name) if name else ""
    headers = [
        _header("From", _from(sender_name, sender)),
        _header("To", formataddr((display, recipient)) if display else recipient),
        _header("Subject", _subject(subject)),
        _header("Date", _date(date)),
        _header("Message-ID", _message_id(digest, sender)),
        _header("Auto-Submitted", "auto-generated"),
        # Exchange and Outlook ignore Auto-Submitted: no out-of-office replies, read or
        # delivery receipts to an address nobody reads
        _header("X-Auto-Response-Suppress", "All"),
        *(
            (_header("In-Reply-To", ref), _header("References", ref))
            if (ref := thread_id(thread, sender) if thread else None)
            else ()
        ),
        _header("MIME-Version", "1.0"),
        _header("Content-Type", f'multipart/alternative; boundary="{boundary}"'),
    ]
    body = (
        f"--{boundary}{CRLF}{_part('plain', text)}{CRLF}"
        f"--{boundary}{CRLF}{_part('html', html)}{CRLF}"
        f"--{boundary}--{CRLF}"
    )
    return (CRLF.join(headers) + CRLF + CRLF + body).encode("ascii")
