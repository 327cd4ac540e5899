"""Node drivers: ``sandbox`` (a SIMULATED node in a directory, for the demo and tests),
``local`` (this Debian host) and ``ssh`` (a Debian host over SSH), built by ``make_driver``.

``commands`` is the command-template driver ``local`` and ``ssh`` share (``shell`` runs a
command, ``staging`` names staged files, ``checkurl`` the post-update URL check);
``loadbalancer`` takes cluster nodes out of load balancing and back.

May import: the vocabulary at the top of ``core`` only (no other room of ``core``).
"""

from __future__ import annotations

from datetime import UTC, tzinfo
from pathlib import Path

from core.drivers.commands import DEFAULT_STAGING_DIR, CommandDriver
from core.drivers.local import LocalDriver
from core.drivers.sandbox import SandboxDriver
from core.drivers.ssh import SshDriver
from core.errors import ConfigError
from core.interfaces import NodeDriver, OutputSink
from core.settings import ClusterSettings, NodeSettings
from core.templates import TEMPLATES

__all__ = [
    "DEFAULT_STAGING_DIR",
    "TEMPLATES",
    "CommandDriver",
    "LocalDriver",
    "SandboxDriver",
    "SshDriver",
    "make_driver",
]


def make_driver(
    node: NodeSettings,
    cluster: ClusterSettings | None,
    *,
    output: OutputSink | None = None,
    staging_dir: Path | None = None,
    tz: tzinfo = UTC,
) -> NodeDriver:
    """The driver of ``node``; ``cluster`` is the settings of its cluster (None: single system).

    Raises ``ConfigError`` for settings that cannot work (unknown command keys, a cluster
    node without its cluster's settings). ``staging_dir`` is where ``local``/``ssh`` stage
    packages on the node (default ``/var/cache/tgops/staged``).
    """
    # core.drivers.loadbalancer imports core.drivers.shell; importing it here keeps either import
    # order working.
    from core.drivers.loadbalancer import make_load_balancer  # noqa: PLC0415

    if node.cluster is not None and cluster is None:
        raise ConfigError(
            [f"nodes.{node.name}: cluster {node.cluster!r} has no [clusters.{node.cluster}]"]
        )
    if node.driver == "sandbox":
        if node.root is None:
            raise ConfigError([f"nodes.{node.name}.root: the sandbox driver needs a directory"])
        return SandboxDriver(
            node.name,
            node.root,
            clustered=node.cluster is not None,
            output=output,
            command_timeout=node.command_timeout,
            check_url=node.check_url,
            tz=tz,
        )
    lb = None
    if node.cluster is not None and cluster is not None:
        lb = make_load_balancer(node.cluster, cluster, timeout=node.command_timeout, output=output)
    staging = str(staging_dir) if staging_dir is not None else DEFAULT_STAGING_DIR
    if node.driver == "local":
        return LocalDriver(node, lb=lb, output=output, staging_dir=staging)
    return SshDriver(node, lb=lb, output=output, staging_dir=staging)
