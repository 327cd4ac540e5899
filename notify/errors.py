"""Why a notification could not be delivered: one class per failure, each saying what to do.

``transient`` failures are retried by the outbox with backoff; the others fail the
notification for good, with the message as its recorded reason.
"""

from __future__ import annotations

from core.errors import TgopsError


class DeliveryError(TgopsError):
    """One notification was not delivered; ``transient`` ones are worth another attempt."""

    def __init__(self, message: str, *, transient: bool) -> None:
        self.transient = transient
        super().__init__(message)


class SmtpNotConfiguredError(DeliveryError):
    def __init__(self) -> None:
        super().__init__(
            "smtp.host is not configured; set smtp.host (and smtp.sender) to send e-mail",
            transient=False,
        )


class SmtpUnavailableError(DeliveryError):
    """No usable SMTP session: connect, TLS, greeting or login failed. Says nothing about
    the message itself, so it is retried (an operator may be fixing the server meanwhile)."""

    def __init__(self, host: str, port: int, cause: str) -> None:
        self.host = host
        self.port = port
        self.cause = cause
        super().__init__(
            f"SMTP server {host}:{port} not usable: {cause} (check smtp.host, smtp.port, "
            "smtp.starttls/use_tls and the login; retrying)",
            transient=True,
        )


class SmtpConnectionLostError(DeliveryError):
    def __init__(self, host: str, port: int, cause: str) -> None:
        self.cause = cause
        super().__init__(
            f"SMTP server {host}:{port} dropped the connection while sending: {cause}; retrying",
            transient=True,
        )


class DeliveryUncertainError(DeliveryError):
    """The transmission of a message had begun (an e-mail's DATA) when it broke off: the
    receiving server may have taken it. It is not sent again (no duplicate); the admins
    are told to check."""

    def __init__(self, cause: str) -> None:
        self.cause = cause
        super().__init__(
            f"delivery uncertain: {cause}; not sent again, check with the recipient whether "
            "it arrived",
            transient=False,
        )


class MarkerNotRecordedError(DeliveryError):
    """The store did not record that a message's transmission begins: it is not sent
    now (a crash could not tell whether it went out), but later."""

    def __init__(self, cause: str) -> None:
        super().__init__(
            f"not sent: the start of its transmission could not be recorded ({cause}); retrying",
            transient=True,
        )


class SmtpRefusedError(DeliveryError):
    """The server answered the message with an error: 4xx is retried, 5xx is final."""

    def __init__(self, what: str, code: int, reply: str) -> None:
        self.what = what
        self.code = code
        self.reply = reply
        transient = 400 <= code < 500
        hint = {
            "sender": "check smtp.sender",
            "recipient": "check the address",
            "message": "the server did not accept the message",
        }.get(what, "")
        super().__init__(
            f"the SMTP server refused the {what} ({code} {reply.strip()})"
            + (f"; {hint}" if hint and not transient else "; retrying" if transient else ""),
            transient=transient,
        )


class MessageComposeError(DeliveryError):
    def __init__(self, what: str, cause: str) -> None:
        super().__init__(
            f"{what} could not be composed: {cause} (a bug or a broken template in "
            "notify/templates; the notification is not retried)",
            transient=False,
        )


class TwilioNotConfiguredError(DeliveryError):
    def __init__(self, missing: list[str]) -> None:
        self.missing = missing
        super().__init__(
            f"{', '.join(f'twilio.{k}' for k in missing)} not configured; calls and SMS "
            "need twilio.account_sid, twilio.auth_token and twilio.from_number",
            transient=False,
        )


class TwilioApiError(DeliveryError):
    """Twilio's REST API answered with an error: 429 and 5xx are retried, 4xx is final."""

    def __init__(self, status: int, code: int | None, message: str) -> None:
        self.status = status
        self.code = code
        transient = status == 429 or status >= 500
        detail = f"Twilio error {code}: " if code and code != status else ""
        super().__init__(
            f"Twilio answered HTTP {status}: {detail}{message.strip() or 'no message'}"
            + ("; retrying" if transient else ""),
            transient=transient,
        )


class TwilioUnreachableError(DeliveryError):
    def __init__(self, url: str, cause: str) -> None:
        self.url = url
        self.cause = cause
        super().__init__(
            f"Twilio's API at {url} not reachable: {cause} (check twilio.api_url; retrying)",
            transient=True,
        )


class DeliveryTimeoutError(DeliveryError):
    def __init__(self, what: str, seconds: float) -> None:
        super().__init__(f"{what} took longer than {seconds:g}s; retrying", transient=True)


class UnexpectedDeliveryError(DeliveryError):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(
            f"unexpected error while delivering: {type(cause).__name__}: {cause} "
            "(see the service log; retrying)",
            transient=True,
        )
