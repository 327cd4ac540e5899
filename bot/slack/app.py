"""The Slack app (slack-bolt ``AsyncApp``): every `/tg` command, confirmations, the
maintenance form, App Home and the ops channel; over HTTP (``POST /slack/events`` on the
service's own aiohttp server) and, when ``slack.app_token`` is set, Socket Mode.

Every request is acknowledged at once (Slack allows 3 s); the command runs afterwards in a
job this component owns and answers through the request's ``response_url`` (or
``chat.postMessage`` / ``chat.postEphemeral`` when that is gone). Commands go through the
shared parser and ``CommandService`` with the Slack user's roles from ``[roles]``.
Refusals, errors and queries are ephemeral; actions are posted in the channel.

It is over 600 lines on purpose: ``SlackBot`` is one class because every handler
shares its job group, its acknowledgement window and its reply path (response URL or
Web API); Block Kit, App Home, the modal, the ops channel and the API client live in
the modules beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import aiohttp
from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.authorization import AuthorizeResult
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_sdk.web.async_client import AsyncWebClient

from bot.commands import CommandService, Reply, alert_header, refused
from bot.grammar import Command, allowed, parse
from bot.slack.api import SlackApi, retry_handlers
from bot.slack.blocks import CONFIRM_ACTION, Shown, confirm_message, escape, reply_message, who
from bot.slack.home import HomeTab
from bot.slack.jobs import Jobs
from bot.slack.modal import CALLBACK, DATE, TARGET, maintenance_view, read_submission
from bot.slack.ops import OpsChannel
from core import events as ev
from core.events import LocalEventBus
from core.lifecycle.engine import Engine
from core.model import Actor, Role
from core.settings import RolesSettings, Settings

log = logging.getLogger(__name__)

_TIMESTAMP = re.compile(r"^[0-9]{1,12}$")

EVENTS_PATH = "/slack/events"
KV_CONFIRM = "slack.confirm"
QUERIES = frozenset(
    {"help", "status", "nodes", "plan", "log", "maintenance", "schedule", "hotfixes"}
)
"""Commands that only show something: answered to the asker alone (ephemeral)."""
TABLES = QUERIES
"""Commands whose output is a table: shown as a code block."""
COMMAND_TIMEOUT = 300.0
"""Seconds a command may take; then it is stopped (runs it started go on) and the user told."""
FORM_WAIT = 2.0
"""Seconds a form submission waits for its command, to show a refusal next to the field."""
RESPONSE_URL_TTL = 29 * 60
"""Slack accepts posts to a response_url for 30 minutes."""
SESSIONS_TIMEOUT = 5.0
SOCKET_CONNECT_TIMEOUT = 60.0
CLOSE_TIMEOUT = 5.0
PARALLEL_COMMANDS = 4
"""Commands carried out at once; more wait their turn (the acks never wait)."""
ACK_QUIET = 0.05
"""Seconds without a new Slack request before commands start: a burst is acknowledged first."""
ACK_QUIET_MAX = 1.0
"""Longest a command waits for such a pause (a steady stream of requests cannot starve it)."""

_BUSY = re.compile(r"(\S+) is busy with run #(\d+)")
_OPS_EVENTS = (
    ev.RunStarted,
    ev.RunFinished,
    ev.WarningFlagSet,
    ev.UpdateLockSet,
    ev.HotfixAcknowledged,
    ev.MaintenanceStarted,
    ev.MaintenanceEnded,
)
_HOME_EVENTS = (
    ev.RunStarted,
    ev.RunProgress,
    ev.RunFinished,
    ev.NodeStateChanged,
    ev.WarningFlagSet,
    ev.UpdateLockSet,
    ev.MaintenanceScheduled,
    ev.MaintenanceStarted,
    ev.MaintenanceEnded,
    ev.HotfixPublished,
    ev.HotfixAcknowledged,
)


def slack_roles(user: str, roles: RolesSettings) -> frozenset[Role]:
    """L11 by Slack user ID; ``"*"`` grants a role to everyone. Any role includes viewer."""
    found = {
        role
        for role, members in (
            (Role.MAINT, roles.maint),
            (Role.UPDATE, roles.update),
            (Role.VIEWER, roles.viewer),
        )
        if "*" in members or user in members
    }
    if found:
        found.add(Role.VIEWER)
    return frozenset(found)


@dataclass(frozen=True, slots=True, kw_only=True)
class Origin:
    """Who asked, where, and how to answer them."""

    user: str
    channel: str | None = None
    response_url: str | None = None
    at: float = 0.0  # time.time() when the response_url was issued


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


class SlackBot:
    """``async with SlackBot(...)``: the bolt app, its jobs, the ops channel and App Home."""

    def __init__(
        self,
        *,
        settings: Settings,
        engine: Engine,
        commands: CommandService,
        bus: LocalEventBus,
        bot_token: str,
        signing_secret: str,
        app_token: str | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.commands = commands
        self.bus = bus
        self._bot_token = bot_token
        self._signing_secret = signing_secret
        self._app_token = app_token
        self._closed = False
        self._gate = asyncio.Semaphore(PARALLEL_COMMANDS)
        self._in_flight = 0
        self._last_request = 0.0
        self._confirm_locks: dict[str, asyncio.Lock] = {}
        self._socket: AsyncSocketModeHandler | None = None
        self._socket_task: asyncio.Task[None] | None = None
        self.ops: OpsChannel | None = None
        self.jobs = Jobs()
        self._stack = AsyncExitStack()

    # -- life cycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        stack = self._stack
        await stack.__aenter__()
        try:
            await self._start(stack)
        except BaseException:
            await stack.aclose()
            raise
        return self

    async def _start(self, stack: AsyncExitStack) -> None:
        slack = self.settings.slack
        self._session = aiohttp.ClientSession()
        stack.push_async_callback(self._session.close)
        self.api = SlackApi(token=self._bot_token, base_url=slack.api_url, session=self._session)
        self.home = await stack.enter_async_context(
            HomeTab(
                api=self.api,
                engine=self.engine,
                fleet=self.commands.kept_status,
                roles_for=self.roles_for,
            )
        )
        stack.push_async_callback(self.jobs.aclose)
        if slack.channel:
            self.ops = OpsChannel(
                api=self.api, store=self.engine.store, channel=slack.channel, jobs=self.jobs
            )
            self.jobs.spawn("slack-ops-outcomes", self.ops.retry_final_updates())
        else:
            log.info("Slack: slack.channel is not set; run progress is not posted")
        self.app = self._build_app()
        self.bus.subscribe("slack", self._on_event)
        self.jobs.spawn("slack-auth-test", self._auth_test())
        if self._app_token:
            self._socket = AsyncSocketModeHandler(
                self.app,
                self._app_token,
                logger=logging.getLogger("bot.slack.socket"),
                web_client=AsyncWebClient(
                    base_url=slack.api_url,
                    session=self._session,
                    retry_handlers=retry_handlers(),
                ),
            )
            stack.push_async_callback(self._close_socket)
            self._socket_task = asyncio.create_task(self._connect(), name="slack-socket-mode")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closed = True
        await self._stack.__aexit__(exc_type, exc, tb)

    async def _close_socket(self) -> None:
        if self._socket_task is not None:
            self._socket_task.cancel()
            await asyncio.gather(self._socket_task, return_exceptions=True)
        if self._socket is not None:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self._socket.close_async()  # type: ignore[no-untyped-call]
            except (TimeoutError, aiohttp.ClientError, OSError) as error:
                log.warning("Slack Socket Mode did not close cleanly: %s", error)

    async def _auth_test(self) -> None:
        """Say once in the log whether the bot token works (the acks never wait for this)."""
        data = await self.api.call("auth.test", "checking the bot token")
        if data is not None:
            log.info("Slack: bot %s of team %s ready", data.get("user_id"), data.get("team") or "?")

    async def _connect(self) -> None:
        assert self._socket is not None
        while True:
            connected = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SOCKET_CONNECT_TIMEOUT):
                    await self._socket.connect_async()  # type: ignore[no-untyped-call]
                    connected = True
            if connected:
                log.info("Slack Socket Mode connected")
                return
            log.error(
                "Slack Socket Mode: no connection within %.0fs; trying again",
                SOCKET_CONNECT_TIMEOUT,
            )

    def routes(self, app: web.Application) -> None:
        app.router.add_post(EVENTS_PATH, self.handle)

    # -- the bolt app --------------------------------------------------------------------

    def _build_app(self) -> AsyncApp:
        bot_token = self._bot_token

        # bolt passes arguments by parameter name (bound methods would get ``self`` twice),
        # so each listener is a plain function handing over to a method
        async def authorize(
            enterprise_id: str | None, team_id: str | None, user_id: str | None
        ) -> AuthorizeResult:
            # single workspace, token from the settings: no auth.test on the ack path
            return AuthorizeResult(
                enterprise_id=enterprise_id, team_id=team_id, user_id=user_id, bot_token=bot_token
            )

        async def on_command(ack: AsyncAck, command: dict[str, Any]) -> None:
            await self._on_command(ack, command)

        async def on_confirm(ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> None:
            await self._on_confirm(ack, body, action)

        async def on_form(ack: AsyncAck, body: dict[str, Any], view: dict[str, Any]) -> None:
            await self._on_form(ack, body, view)

        async def on_home_opened(ack: AsyncAck, event: dict[str, Any]) -> None:
            await self._on_home_opened(ack, event)

        app = AsyncApp(
            name="tgops",
            logger=logging.getLogger("bot.slack.bolt"),
            signing_secret=self._signing_secret,
            client=AsyncWebClient(
                base_url=self.settings.slack.api_url,
                session=self._session,
                retry_handlers=retry_handlers(),
            ),
            authorize=authorize,
            # listeners only acknowledge and hand the work to our own jobs, so bolt can
            # answer Slack when they return (no tasks of bolt's own)
            process_before_response=True,
        )
        app.command("/tg")(on_command)
        app.action(CONFIRM_ACTION)(on_confirm)
        app.view(CALLBACK)(on_form)
        app.event("app_home_opened")(on_home_opened)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        """``POST /slack/events``: bolt checks the signature (401 when bad or stale).

        What bolt cannot judge is answered here first: a timestamp that is not a number of
        seconds (401), a body that is not UTF-8 or neither a form nor a JSON object (400)."""
        stamp = request.headers.get("X-Slack-Request-Timestamp", "")
        if not _TIMESTAMP.match(stamp):
            return web.Response(
                status=401, text="X-Slack-Request-Timestamp must be a number of seconds"
            )
        try:
            body = (await request.read()).decode("utf-8")
        except UnicodeDecodeError:
            return web.Response(status=400, text="the body is not UTF-8")
        try:
            bolt_request = AsyncBoltRequest(
                body=body,
                query=request.query_string,
                headers={k: request.headers.getall(k) for k in request.headers},
            )
        except (ValueError, RecursionError, AttributeError, TypeError, KeyError):
            # bolt reads the payload's fields while it builds the request: a body of the
            # wrong shape (a JSON list, a "payload" that is no object) fails there
            bolt_request = None
        if bolt_request is None or not isinstance(bolt_request.body, dict):
            return web.Response(status=400, text="the body is neither a form nor a JSON object")
        team = self.settings.slack.team_id
        if (
            team is not None
            and bolt_request.context.team_id != team
            and bolt_request.body.get("type") != "url_verification"
        ):
            log.warning(
                "Slack request of team %r refused: slack.team_id is %s",
                str(bolt_request.context.team_id)[:32],
                team,
            )
            return web.Response(status=403, text="this Slack workspace is not served here")
        self._in_flight += 1
        self._last_request = time.monotonic()
        try:
            response = await self.app.async_dispatch(bolt_request)
        finally:
            self._in_flight -= 1
        # bolt's own adapter: its status, body and every header it set (not only the type)
        return await to_aiohttp_response(response)

    def roles_for(self, user: str) -> frozenset[Role]:
        return slack_roles(user, self.settings.roles)

    def actor(self, user: str) -> Actor:
        return Actor(name=user, source="slack", roles=self.roles_for(user))

    # -- listeners: acknowledge, then work in a job --------------------------------------

    async def _on_command(self, ack: AsyncAck, command: dict[str, Any]) -> None:
        await ack()
        origin = Origin(
            user=_str(command.get("user_id")),
            channel=_str(command.get("channel_id")) or None,
            response_url=_str(command.get("response_url")) or None,
            at=time.time(),
        )
        self.jobs.spawn(
            f"slack-command-{origin.user}",
            self._command(_str(command.get("text")), origin, _str(command.get("trigger_id"))),
        )

    async def _on_confirm(
        self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]
    ) -> None:
        await ack()
        origin = Origin(
            user=_str((body.get("user") or {}).get("id")),
            channel=_str((body.get("channel") or {}).get("id")) or None,
            response_url=_str(body.get("response_url")) or None,
            at=time.time(),
        )
        self.jobs.spawn(
            f"slack-confirm-{origin.user}", self._confirmed(_str(action.get("value")), origin)
        )

    async def _on_home_opened(self, ack: AsyncAck, event: dict[str, Any]) -> None:
        await ack()
        user = _str(event.get("user"))
        if user and event.get("tab", "home") == "home":
            self.jobs.spawn(f"slack-home-{user}", self.home.opened(user))

    async def _on_form(self, ack: AsyncAck, body: dict[str, Any], view: dict[str, Any]) -> None:
        user = _str((body.get("user") or {}).get("id"))
        try:
            meta = json.loads(_str(view.get("private_metadata")) or "{}")
        except json.JSONDecodeError:
            meta = {}
        origin = Origin(
            user=user,
            channel=_str(meta.get("channel")) or None,
            response_url=_str(meta.get("url")) or None,
            at=float(meta.get("at") or 0.0),
        )
        form = read_submission(
            (view.get("state") or {}).get("values") or {},
            tz=self.settings.tz,
            now=self.engine.clock.now(),
        )
        if isinstance(form, dict):
            await ack(response_action="errors", errors=form)
            return
        done: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.jobs.spawn(f"slack-form-{user}", self._execute_into(done, form.command(), user))
        try:
            async with asyncio.timeout(FORM_WAIT):
                reply = await asyncio.shield(done)
        except TimeoutError:
            await ack()  # close the form; the answer follows when the command ends
            self.jobs.spawn(f"slack-form-answer-{user}", self._answer_later(done, origin))
            return
        if not reply.ok:
            field = DATE if "in the past" in reply.text else TARGET
            await ack(response_action="errors", errors={field: reply.text[:500]})
            return
        await ack()
        self.jobs.spawn(f"slack-form-answer-{user}", self._answer(reply, origin))

    # -- jobs -------------------------------------------------------------------------------

    async def _settle(self) -> None:
        """Let a burst of requests be acknowledged before the work they ask for starts.

        A command's work shares the event loop (and the GIL) with the acks; started in the
        middle of a burst it would make every further ack of the burst wait. This is a
        debounce bounded by ``ACK_QUIET_MAX``, not a wait for an outcome.
        """
        deadline = time.monotonic() + ACK_QUIET_MAX
        while (now := time.monotonic()) < deadline:
            quiet = now - self._last_request
            if self._in_flight == 0 and quiet >= ACK_QUIET:
                return
            await asyncio.sleep(min(max(ACK_QUIET - quiet, 0.005), deadline - now))

    async def _execute(self, text: str, actor: Actor) -> Reply:
        async with self._gate:
            await self._settle()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(COMMAND_TIMEOUT):
                    return await self.commands.execute(text, actor)
        log.error("Slack command of %s took over %.0fs: %s", actor, COMMAND_TIMEOUT, text)
        return refused(
            f"`{text}` did not finish within {COMMAND_TIMEOUT:.0f}s and was stopped; runs it "
            "had started go on. See `log` and `status`."
        )

    async def _execute_into(self, done: asyncio.Future[Reply], text: str, user: str) -> None:
        try:
            reply = await self._execute(text, self.actor(user))
        except Exception as exc:
            if not done.done():
                done.set_exception(exc)
            raise
        if not done.done():
            done.set_result(reply)

    async def _answer_later(self, done: asyncio.Future[Reply], origin: Origin) -> None:
        await self._answer(await done, origin)

    async def _command(self, text: str, origin: Origin, trigger_id: str) -> None:
        text = text.strip() or "help"
        actor = self.actor(origin.user)
        parsed = parse(text)
        if (
            isinstance(parsed, Command)
            and parsed.name == "maintenance new"
            and allowed(actor.roles, parsed.role)
        ):
            await self._open_form(parsed, actor, origin, trigger_id)
            return
        await self._answer(await self._execute(text, actor), origin)

    async def _open_form(
        self, parsed: Command, actor: Actor, origin: Origin, trigger_id: str
    ) -> None:
        await self.engine.command_received(actor, parsed.text, None)
        today = self.engine.clock.now().astimezone(self.settings.tz).date()
        metadata = {"channel": origin.channel, "url": origin.response_url, "at": origin.at}
        view = maintenance_view(self.settings, metadata=metadata, today=today)
        opened = await self.api.call(
            "views.open", f"maintenance form of {origin.user}", trigger_id=trigger_id, view=view
        )
        if opened is None:
            shown = Shown(
                text="The maintenance form could not be opened. Type instead: "
                "`maintenance schedule T YYYY-MM-DD HH:MM REASON… [--disable-logon]`.",
                ok=False,
                preformatted=False,
            )
            await self._deliver(origin, await self._message(origin.user, shown), ephemeral=True)

    async def _alerts(self) -> list[str] | None:
        try:
            return alert_header(await self.commands.kept_status(), self.settings.tz)
        except Exception:
            log.exception("Slack: fleet alerts not available for the status header")
            return None

    async def _message(self, user: str, shown: Shown) -> dict[str, Any]:
        """A reply with the status header; a user without any role sees no fleet state."""
        if not self.roles_for(user):
            return reply_message(shown, None, header=False)
        return reply_message(shown, await self._alerts())

    async def _answer(self, reply: Reply, origin: Origin) -> None:
        """A command's reply, with the status header, to where the command came from."""
        confirm = reply.data.get("confirm")
        if isinstance(confirm, dict):
            prompt = await self._prompt(reply, confirm, origin, await self._alerts())
            await self._deliver(origin, prompt, True)
            return
        ephemeral = not reply.ok or reply.command is None or reply.command in QUERIES
        shown = Shown(text=reply.text, ok=reply.ok, preformatted=reply.command in TABLES)
        await self._deliver(origin, await self._message(origin.user, shown), ephemeral)

    async def _deliver(
        self,
        origin: Origin,
        message: dict[str, Any],
        ephemeral: bool,
        *,
        replace_original: bool = False,
    ) -> None:
        what = f"reply to {origin.user}"
        body = {**message, "response_type": "ephemeral" if ephemeral else "in_channel"}
        if replace_original:
            body["replace_original"] = True
        fresh = time.time() - origin.at < RESPONSE_URL_TTL
        if (
            origin.response_url
            and fresh
            and await self.api.respond(origin.response_url, body, what)
        ):
            return
        if origin.channel:
            if ephemeral:
                sent = await self.api.call(
                    "chat.postEphemeral", what, channel=origin.channel, user=origin.user, **message
                )
            else:
                sent = await self.api.call(
                    "chat.postMessage", what, channel=origin.channel, **message
                )
            if sent is not None:
                return
        log.error("Slack %s was lost: no way left to deliver it (%s)", what, message.get("text"))

    # -- confirmations ------------------------------------------------------------------------

    async def _prompt(
        self,
        reply: Reply,
        confirm: dict[str, Any],
        origin: Origin,
        alerts: list[str] | None,
    ) -> dict[str, Any]:
        command = _str(confirm.get("text")).strip().removeprefix("/tg ").strip()
        nonce = uuid.uuid4().hex
        await self.engine.store.kv_set(
            KV_CONFIRM,
            nonce,
            {"text": command, "user": origin.user, "at": time.time(), "runs": None},
        )
        sessions = confirm.get("sessions") or {}
        return confirm_message(
            text=reply.text,
            command=command,
            total=int(confirm.get("total") or sum(sessions.values())),
            sessions=await self._session_names(sessions),
            value=nonce,
            alerts=alerts,
        )

    async def _session_names(self, sessions: dict[str, int]) -> list[str]:
        """``tg1: alice, bob`` per node (the counts when a node does not say)."""
        names = []
        for node, count in sorted(sessions.items()):
            driver = self.engine.drivers.get(node)
            users: list[str] = []
            if driver is not None:
                try:
                    async with asyncio.timeout(SESSIONS_TIMEOUT):
                        users = [s.user for s in (await driver.status()).sessions]
                except Exception as error:  # only the names are missing then
                    log.info("node %s: session names not available: %s", node, error)
            names.append(f"{node}: {', '.join(users)}" if users else f"{node}: {count} session(s)")
        return names

    async def _confirmed(self, nonce: str, origin: Origin) -> None:
        lock = self._confirm_locks.setdefault(nonce, asyncio.Lock())
        try:
            async with lock:
                await self._confirm_once(nonce, origin)
        finally:
            if not lock.locked():
                self._confirm_locks.pop(nonce, None)

    async def _confirm_once(self, nonce: str, origin: Origin) -> None:
        record = await self.engine.store.kv_get(KV_CONFIRM, nonce) if nonce else None
        if not isinstance(record, dict):
            text = (
                "This button is no longer valid; nothing was done. "
                "Type the command again to get a new one."
            )
            shown = Shown(text=text, ok=False, preformatted=False)
            await self._deliver(origin, await self._message(origin.user, shown), True)
            return
        if record.get("runs") is not None:
            text = await self._already(record)
            shown = Shown(text=text, ok=True, preformatted=False, mrkdwn=True)
            await self._deliver(origin, await self._message(origin.user, shown), True)
            return
        command = _str(record.get("text"))
        reply = await self._execute(f"{command} --yes", self.actor(origin.user))
        if reply.ok:
            record = {**record, "runs": list(reply.run_ids), "by": origin.user}
            await self.engine.store.kv_set(KV_CONFIRM, nonce, record)
            done = Shown(
                text=f"Confirmed by {who(origin.user)}: `{escape(command)} --yes`.",
                ok=True,
                preformatted=False,
                mrkdwn=True,
            )
            await self._deliver(
                origin,
                await self._message(origin.user, done),
                True,
                replace_original=True,
            )
            await self._answer(reply, origin)
            return
        busy = _BUSY.search(reply.text)
        text = reply.text
        if busy is not None:
            run = await self.engine.store.run(int(busy[2]))
            state = f"at step {run.step}" if run is not None and run.step else "queued"
            text = (
                f"Already running: {busy[1]} is busy with run #{busy[2]} ({state}), "
                "started before this click; nothing new was started. Follow it in the ops "
                "channel or with `status`."
            )
        shown = Shown(text=text, ok=False, preformatted=False)
        await self._deliver(
            origin, await self._message(origin.user, shown), True, replace_original=True
        )

    async def _already(self, record: dict[str, Any]) -> str:
        by = who(_str(record.get("by")) or "someone")
        lines = []
        running = False
        for run_id in record.get("runs") or []:
            run = await self.engine.store.run(int(run_id))
            if run is None:
                continue
            if run.status in {"queued", "running"}:
                running = True
                step = escape(run.step or "queued")
                lines.append(f"run #{run.id} on {escape(run.node)}: running, step {step}")
            else:
                lines.append(f"run #{run.id} on {escape(run.node)}: {escape(run.status)}")
        runs = "; ".join(lines) or "no run was needed"
        if running:
            return (
                f"Already running: this was confirmed before (by {by}); {runs}. "
                "Nothing new was started."
            )
        return (
            f"Already done: this was confirmed before (by {by}); {runs}. "
            "Nothing new was started; type the command again for a new run."
        )

    # -- domain events ------------------------------------------------------------------------

    async def _on_event(self, event: ev.Event) -> None:
        if self._closed:
            if isinstance(event, _OPS_EVENTS):
                log.warning("Slack bot stopped: %s not posted: %s", type(event).__name__, event)
            return
        if isinstance(event, _HOME_EVENTS):
            self.home.changed()
        if self.ops is not None:
            await self.ops.on_event(event)


@asynccontextmanager
async def slack_bot(
    settings: Settings, *, engine: Engine, commands: CommandService, bus: LocalEventBus
) -> AsyncIterator[SlackBot | None]:
    """The Slack component, or ``None`` (one log line) when it is not configured."""
    slack = settings.slack
    missing = [key for key in ("bot_token", "signing_secret") if getattr(slack, key) is None]
    if missing:
        log.info("Slack is disabled: slack.%s not set", " and slack.".join(missing))
        yield None
        return
    assert slack.bot_token is not None
    assert slack.signing_secret is not None
    async with SlackBot(
        settings=settings,
        engine=engine,
        commands=commands,
        bus=bus,
        bot_token=slack.bot_token.get_secret_value(),
        signing_secret=slack.signing_secret.get_secret_value(),
        app_token=slack.app_token.get_secret_value() if slack.app_token else None,
    ) as bot:
        yield bot
