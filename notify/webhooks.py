"""Twilio's webhooks: the digit pressed on a call, and call and SMS status callbacks.

Every request must carry a valid ``X-Twilio-Signature`` (twilio's ``RequestValidator``
with ``twilio.auth_token``) over ``http.public_url`` + path and the form parameters;
anything else is answered 403 and nothing is done.

``POST /twilio/voice/gather``: 1 acknowledges the hotfix of the call (L14); another key
(or none) repeats the prompt; an unknown call is told so and recorded.
``POST /twilio/status``: the call's progress (wakes its escalation), an SMS's delivery.
"""

from __future__ import annotations

import logging
import re

from aiohttp import web
from twilio.request_validator import RequestValidator

from core.settings import Settings
from core.store import Store
from notify.calls import CallRegistry
from notify.escalation import Escalations
from notify.i18n import translator
from notify.phone import GATHER_PATH, STATUS_PATH, prompt_twiml, say_twiml

log = logging.getLogger(__name__)

_KEYS = re.compile(r"^[0-9*#]{1,8}$")
SMS_FAILED = frozenset({"failed", "undelivered"})


def _twiml(body: str) -> web.Response:
    return web.Response(text=body, content_type="text/xml")


class TwilioWebhooks:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        registry: CallRegistry,
        escalations: Escalations,
    ) -> None:
        token = settings.twilio.auth_token
        self._validator = RequestValidator(token.get_secret_value()) if token else None
        self._base = settings.http.public_url.rstrip("/")
        self.store = store
        self.registry = registry
        self.escalations = escalations

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(GATHER_PATH, self.gather)
        app.router.add_post(STATUS_PATH, self.status)

    async def _verified(self, request: web.Request) -> dict[str, str] | None:
        """The form parameters of a request signed by Twilio, else ``None``."""
        if self._validator is None:
            log.warning(
                "%s: rejected, twilio.auth_token is not set so no signature can be checked",
                request.path,
            )
            return None
        signature = request.headers.get("X-Twilio-Signature", "")
        try:
            form = await request.post()
        except (web.HTTPException, ValueError, UnicodeDecodeError):
            log.warning("%s: rejected, the body is not a readable form", request.path)
            return None
        params = {k: v for k, v in form.items() if isinstance(v, str)}
        url = self._base + str(request.rel_url)
        if not signature or not self._validator.validate(url, params, signature):
            log.warning(
                "%s: rejected, X-Twilio-Signature %s for %s",
                request.path,
                "does not match" if signature else "is missing",
                url,
            )
            return None
        return params

    async def gather(self, request: web.Request) -> web.Response:
        params = await self._verified(request)
        if params is None:
            return web.Response(status=403, text="invalid or missing X-Twilio-Signature")
        sid = params.get("CallSid", "")
        digits = params.get("Digits", "")
        call = await self.registry.find(sid)
        if call is None or call.hotfix is None:
            log.warning("key %r pressed on unknown call %s", digits, sid)
            await self.store.audit(
                actor="twilio",
                source="phone",
                action="unknown call",
                target=None,
                detail=(
                    f"key {digits!r} pressed on call {sid[:64] or '(no CallSid)'} from "
                    f"{params.get('To', '?')[:32]}, which tgops did not place; the caller "
                    "was told so"
                ),
            )
            return _twiml(say_twiml("This call is not known to tgops. Goodbye."))
        language = call.language
        t = translator(language)
        if digits != "1":
            speech = await self.escalations.speech(call)
            if speech is None:
                gone = t._("This call is no longer known to tgops. Goodbye.")
                return _twiml(say_twiml(gone, language))
            pressed = (
                t._("You pressed %(keys)s.", keys=" ".join(digits)) + " "
                if _KEYS.match(digits)
                else t._("No valid key was pressed.") + " "
            )
            return _twiml(
                prompt_twiml(speech, self._base + GATHER_PATH, prefix=pressed, language=language)
            )
        ack = await self.escalations.acknowledge(call)
        if ack is None:
            gone = t._("This call is no longer known to tgops. Goodbye.")
            return _twiml(say_twiml(gone, language))
        if ack.new:
            text = t._(
                "Thank you, %(name)s. Hotfix %(id)s is acknowledged. Goodbye.",
                name=call.name,
                id=ack.hotfix,
            )
        else:
            text = t._(
                "Thank you. Hotfix %(id)s was already acknowledged by %(name)s. Goodbye.",
                id=ack.hotfix,
                name=ack.by,
            )
        return _twiml(say_twiml(text, language))

    async def status(self, request: web.Request) -> web.Response:
        params = await self._verified(request)
        if params is None:
            return web.Response(status=403, text="invalid or missing X-Twilio-Signature")
        if "MessageSid" in params:
            status = params.get("MessageStatus", "")
            if status in SMS_FAILED:
                code = params.get("ErrorCode", "")
                await self.store.audit(
                    actor="notify",
                    source="system",
                    action="notification failed",
                    target=None,
                    detail=(
                        f"SMS {params['MessageSid'][:64]} to {params.get('To', '?')[:32]}: "
                        f"{status}" + (f" (Twilio error {code[:16]})" if code else "")
                    ),
                )
            return web.Response(status=204)
        sid = params.get("CallSid", "")
        status = params.get("CallStatus", "")
        call = await self.escalations.call_status(sid, status)
        if call is None:
            log.warning("status %r of unknown call %s", status, sid)
            await self.store.audit(
                actor="twilio",
                source="phone",
                action="unknown call",
                target=None,
                detail=f"status {status[:32]!r} of call {sid[:64] or '(no CallSid)'}, "
                "which tgops did not place; ignored",
            )
        return web.Response(status=204)
