"""Load balancers of clusters: take a node out of load distribution and back in.

- ``CommandLoadBalancer``: the cluster's ``lb_drain``/``lb_undrain`` command templates,
  run on the controller with ``/bin/sh -c`` and a timeout. Placeholders: ``{node}``,
  ``{cluster}`` (shell-quoted).
- ``HAProxyLoadBalancer``: the HAProxy runtime API (``stats socket ... level admin``) over a
  unix socket path or ``tcp:HOST:PORT``: ``set server BACKEND/NODE state drain|ready``.
  The server in the backend must be named like the node; the backend defaults to the
  cluster's name (``haproxy_backend`` overrides it).

A single system has no load balancer: its drivers treat drain/undrain as no-ops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from datetime import UTC, datetime
from typing import Protocol

from core.drivers.shell import run_shell
from core.errors import ConfigError, DriverError
from core.interfaces import LoadBalancer, OutputSink
from core.model import CommandOutput, LbState
from core.settings import ClusterSettings
from core.templates import fill, unknown_placeholders

log = logging.getLogger(__name__)

_PLACEHOLDERS = ("cluster", "node")
_HAPROXY_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")
_MAX_ANSWER = 1 << 20


class NodeBalancer(LoadBalancer, Protocol):
    """A ``LoadBalancer`` that may also tell a node's state."""

    async def state(self, node: str) -> LbState | None:
        """``"in"`` or ``"drained"`` as the balancer sees it; None when it cannot tell."""


async def _record(
    output: OutputSink | None,
    *,
    operation: str,
    command: str,
    status: int,
    out: str,
    err: str,
) -> None:
    if output is not None:
        await output(
            CommandOutput(
                operation=operation,
                command=command,
                exit_status=status,
                stdout=out,
                stderr=err,
                at=datetime.now(UTC),
            )
        )


class CommandLoadBalancer:
    """Drains and undrains with the cluster's command templates, run on the controller."""

    def __init__(
        self,
        cluster: str,
        *,
        drain: str | None,
        undrain: str | None,
        timeout: float,
        output: OutputSink | None = None,
    ) -> None:
        problems = []
        for key, template in (("lb_drain", drain), ("lb_undrain", undrain)):
            bad = unknown_placeholders(template or "", _PLACEHOLDERS)
            if bad:
                problems.append(
                    f"clusters.{cluster}.{key}: unknown placeholder "
                    + ", ".join("{" + b + "}" for b in bad)
                    + "; accepted: {node}, {cluster}"
                )
        if problems:
            raise ConfigError(problems)
        self.cluster = cluster
        self._templates = {"drain": drain, "undrain": undrain}
        self._timeout = timeout
        self._output = output

    async def _run(self, operation: str, node: str) -> None:
        template = self._templates[operation]
        if not template or not template.strip():
            raise DriverError(
                node,
                operation,
                f"cluster {self.cluster} has no lb_{operation} command; set "
                f"clusters.{self.cluster}.lb_{operation} (a command template with {{node}})",
            )
        command = fill(template, {"node": node, "cluster": self.cluster})
        log.debug("node %s: %s: running %s", node, operation, command)
        result = await run_shell(command, node=node, operation=operation, limit=self._timeout)
        await _record(
            self._output,
            operation=operation,
            command=command,
            status=result.exit_status,
            out=result.stdout,
            err=result.stderr,
        )
        if result.exit_status != 0:
            lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
            raise DriverError(
                node,
                operation,
                f"lb_{operation} exit {result.exit_status}: "
                + (lines[-1] if lines else "no output"),
            )
        log.info("node %s: %s: done via lb_%s", node, operation, operation)

    async def drain(self, node: str) -> None:
        await self._run("drain", node)

    async def undrain(self, node: str) -> None:
        await self._run("undrain", node)

    async def state(self, node: str) -> LbState | None:
        return None


class HAProxyLoadBalancer:
    """Drains and undrains through the HAProxy runtime API (``level admin`` needed)."""

    def __init__(
        self,
        socket: str,
        backend: str,
        *,
        timeout: float = 10.0,
        output: OutputSink | None = None,
    ) -> None:
        if not _HAPROXY_NAME.match(backend):
            raise ConfigError([f"haproxy_backend: {backend!r} is not a HAProxy backend name"])
        self.socket = socket
        self.backend = backend
        self._timeout = timeout
        self._output = output
        self._tcp: tuple[str, int] | None = None
        if socket.startswith("tcp:"):
            host, _, port = socket.removeprefix("tcp:").rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(
                    [f"haproxy_socket: {socket!r}: write tcp:HOST:PORT or a unix socket path"]
                )
            self._tcp = (host.strip("[]"), int(port))

    async def ask(self, node: str, operation: str, command: str) -> str:
        """Send one runtime API command and return HAProxy's answer."""
        try:
            async with asyncio.timeout(self._timeout):
                if self._tcp is not None:
                    reader, writer = await asyncio.open_connection(*self._tcp)
                else:
                    reader, writer = await asyncio.open_unix_connection(self.socket)
                try:
                    writer.write(command.encode() + b"\n")
                    await writer.drain()
                    answer = (await reader.read(_MAX_ANSWER)).decode("utf-8", "replace")
                    # Non-interactive mode: HAProxy closes after the answer; read the rest.
                    while chunk := await reader.read(_MAX_ANSWER):
                        answer += chunk.decode("utf-8", "replace")
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except TimeoutError:
            raise DriverError(
                node,
                operation,
                f"HAProxy runtime API at {self.socket} did not answer within "
                f"{self._timeout:g}s; check that haproxy runs and haproxy_socket is right",
            ) from None
        except OSError as exc:
            raise DriverError(
                node,
                operation,
                f"HAProxy runtime API at {self.socket} not reachable: {exc.strerror or exc}; "
                "check haproxy_socket and that haproxy has `stats socket ... level admin`",
            ) from exc
        await _record(
            self._output,
            operation=operation,
            command=f"haproxy: {command}",
            status=0,
            out=answer,
            err="",
        )
        return answer

    async def _set(self, operation: str, node: str, state: str) -> None:
        command = f"set server {self.backend}/{node} state {state}"
        answer = (await self.ask(node, operation, command)).strip()
        if answer:
            raise DriverError(
                node,
                operation,
                f"HAProxy answered {answer!r} to {command!r}; the backend {self.backend} "
                f"needs a server named {node} (set haproxy_backend, or rename the server)",
            )
        log.info("node %s: %s: HAProxy %s/%s is %s", node, operation, self.backend, node, state)

    async def drain(self, node: str) -> None:
        await self._set("drain", node, "drain")

    async def undrain(self, node: str) -> None:
        await self._set("undrain", node, "ready")

    async def state(self, node: str) -> LbState | None:
        answer = await self.ask(node, "status", f"show servers state {self.backend}")
        for line in answer.splitlines():
            fields = line.split()
            if len(fields) < 7 or line.startswith("#"):
                continue
            if fields[1] == self.backend and fields[3] == node:
                if not fields[6].isdigit():
                    break
                # srv_admin_state: any administrative flag (drain, maintenance) keeps
                # new users away from the server.
                return "in" if int(fields[6]) == 0 else "drained"
        raise DriverError(
            node,
            "status",
            f"HAProxy backend {self.backend} has no server {node} (answer: "
            f"{answer.strip()[:200]!r}); set haproxy_backend, or name the server like the node",
        )


def make_load_balancer(
    cluster_name: str,
    cluster: ClusterSettings,
    *,
    timeout: float,
    output: OutputSink | None = None,
) -> NodeBalancer | None:
    """The cluster's load balancer: HAProxy when ``haproxy_socket`` is set, else the
    ``lb_drain``/``lb_undrain`` commands, else None (drain/undrain then raise)."""
    if cluster.haproxy_socket:
        return HAProxyLoadBalancer(
            cluster.haproxy_socket,
            cluster.haproxy_backend or cluster_name,
            timeout=min(timeout, 30.0),
            output=output,
        )
    if cluster.lb_drain or cluster.lb_undrain:
        return CommandLoadBalancer(
            cluster_name,
            drain=cluster.lb_drain,
            undrain=cluster.lb_undrain,
            timeout=timeout,
            output=output,
        )
    return None
