"""The bytes of one e-mail: ``multipart/alternative`` with a text and an HTML part.

Built from the standard library's encoders (``formataddr`` and ``email.header.Header`` for
RFC 2047 names and subjects, ``email.charset`` for quoted-printable UTF-8 bodies,
``format_datetime``; ASCII subjects folded at spaces here) rather than with
``EmailMessage``, whose header objects and refolding cost about 1.7 ms per message, thirty
times this (bench/RESULTS.md, "E-mail"), and which moves a folded subject holding ``<``,
``&`` or ``[`` onto a continuation line (parsers then read it with a leading space). Every part
is quoted-printable, so the boundary (it holds ``=_``) cannot occur in a body; header values
are put on one line first, so no value can add a header.
"""

from __future__ import annotations

import email.charset
import hashlib
import re
from datetime import datetime
from email.header import Header
from email.utils import format_datetime, formataddr

CRLF = "\r\n"
MAX_SUBJECT = 900
"""Characters of a subject kept (a line may not exceed 998, RFC 5322 2.1.1)."""
_UTF8 = email.charset.Charset("utf-8")
_UTF8.body_encoding = email.charset.QP
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
    domain = sender.rpartition("@")[2] or "localhost"
    digest = hashlib.sha256(key.encode()).hexdigest()[:40]
    return f"<{digest}@{domain}>"


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


def _subject(subject: str) -> str:
    text = one_line(subject)[:MAX_SUBJECT]
    if text.isascii():
        return _fold(text, len("Subject: "))
    return Header(text, "utf-8", header_name="Subject").encode(linesep=CRLF)


def _part(subtype: str, body: str) -> str:
    encoded = _UTF8.body_encode(body.replace("\r\n", "\n")) or ""
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"{CRLF}'
        f"Content-Transfer-Encoding: quoted-printable{CRLF}{CRLF}" + encoded.replace("\n", CRLF)
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
) -> bytes:
    """The message as sent (CRLF line ends); ``AddressError`` for a bad recipient."""
    check_address(recipient)
    boundary = "=_tgops_" + hashlib.sha256(key.encode()).hexdigest()[:24]
    display = one_line(name) if name else ""
    headers = [
        _header("From", formataddr((one_line(sender_name), sender))),
        _header("To", formataddr((display, recipient)) if display else recipient),
        _header("Subject", _subject(subject)),
        _header("Date", format_datetime(date)),
        _header("Message-ID", message_id(key, sender)),
        _header("Auto-Submitted", "auto-generated"),
        _header("MIME-Version", "1.0"),
        _header("Content-Type", f'multipart/alternative; boundary="{boundary}"'),
    ]
    body = (
        f"--{boundary}{CRLF}{_part('plain', text)}{CRLF}"
        f"--{boundary}{CRLF}{_part('html', html)}{CRLF}"
        f"--{boundary}--{CRLF}"
    )
    return (CRLF.join(headers) + CRLF + CRLF + body).encode("ascii")
