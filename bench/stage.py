"""Staging benchmark (issue 15): a 512 MiB package downloaded and staged, against curl and scp.

Run as ``.venv/bin/python bench/stage.py``. In a temporary directory under /tmp (deleted
afterwards) it builds a real .deb holding 512 MiB of random data (``dpkg-deb -Znone``),
publishes it into a signed repository served by ``tests/repo_server.py`` (a separate
process), and measures in a child process of its own:

* **sandbox, through the API**: the real ``Service`` (in-process, INFO logging into a
  file) with one sandbox node; ``download n1`` goes to ``POST /api/v1/command`` over
  127.0.0.1 and the time runs until the run's ``RunFinished`` event (the package is then
  downloaded, verified and staged on the node). Before each run the cache and the staged
  file are removed. Against ``curl -o FILE`` of the same URL (its ``time_total``), and
  the same download with the body through the event loop (``Downloader.splice`` off);
  the three take turns, median of ``--runs``, each turn after ``sync`` and ``--settle``
  seconds of rest. The CPU of each side is recorded too: curl's from its resource usage,
  the service process's (all its threads) from ``os.times``.
* **ssh**: ``SshDriver.stage`` (a fresh connection, the file copied by OpenSSH's client into
  ``cat`` as the driver does from ``OPENSSH_FROM`` bytes on, the ``checksum`` template on
  the node, rename) to a real sshd on 127.0.0.1 (``tests/sshd.py``), against ``scp`` of the
  same file to the same directory (OpenSSH's default cipher) and against the same
  ``stage`` with the file streamed over the driver's own asyncssh channel
  (``openssh_from`` off); the three take turns as above, median of ``--runs``.

The figures go to bench/RESULTS.md under "## Staging (issue 15)" (other sections are kept).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `python bench/stage.py` puts bench/ first on sys.path, where a sibling script could
# shadow the standard library; use the project root.
sys.path[:] = [str(ROOT), *(p for p in sys.path if p and Path(p).resolve() != ROOT / "bench")]

import argparse  # noqa: E402 - after the path is fixed
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import aiohttp  # noqa: E402

from bench.common import (  # noqa: E402
    SETTLE,
    fleet_toml,
    log_to,
    machine_line,
    now_text,
    repo_server,
    run_child,
    scratch,
    verdict,
    write_section,
)
from bot.service import Service  # noqa: E402
from core.drivers.ssh import SshDriver  # noqa: E402
from core.drivers.staging import sha256_file  # noqa: E402
from core.model import PackageKind, StagedPackage  # noqa: E402
from core.repository.publish import keygen, public_key_path, publish  # noqa: E402
from core.settings import NodeSettings, load_settings  # noqa: E402
from tests.fleet import run_ids  # noqa: E402
from tests.service import ADMIN_TOKEN  # noqa: E402
from tests.sshd import FakeNode, start_sshd  # noqa: E402

HEADING = "## Staging (issue 15)"
SIZE = int(os.environ.get("TGOPS_BENCH_MIB", "512")) << 20
"""512 MiB; smaller with ``TGOPS_BENCH_MIB`` while iterating."""
BLOCK = 16 << 20
TARGET = 0.8
RUN_LIMIT = 120.0
TURNS = ["curl", "ours", "loop"]
"""The sandbox's three sides, taking turns: ``curl -o``; ``download n1`` as the service
runs it (the body from the socket into the file in the kernel); the same with
``Downloader.splice`` off (the body through the event loop, as before 2026-12-06)."""


def build_big_deb(work: Path, size: int) -> Path:
    """A real .deb whose one file is ``size`` bytes of random data, not compressed."""
    tree = work / "tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        "Package: tg-big\nVersion: 1.0\nArchitecture: all\nMaintainer: bench <b@example.org>\n"
        "Description: a large package for the staging benchmark\n"
    )
    data = tree / "usr" / "share" / "tg-big"
    data.mkdir(parents=True)
    with (data / "blob").open("wb") as handle:
        left = size
        while left > 0:
            handle.write(os.urandom(min(BLOCK, left)))
            left -= BLOCK
    out = work / "tg-big_1.0_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Znone", "--build", str(tree), str(out)],  # noqa: S607
        check=True,
        capture_output=True,
        timeout=300,
    )
    shutil.rmtree(tree)
    return out


async def settle(seconds: float) -> None:
    """Flush written data, then rest (``SETTLE`` by default, ``--settle``). The event loop
    is free meanwhile: what the service does after a run happens now, not in the next
    turn."""
    await asyncio.to_thread(os.sync)
    await asyncio.sleep(seconds)


def curl_seconds(url: str, out: Path) -> tuple[float, float]:
    """``curl -o``: its ``time_total`` and the CPU seconds it used (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(
        ["curl", "-sS", "-f", "-o", str(out), "-w", "%{time_total}", url],  # noqa: S607
        capture_output=True,
        text=True,
        timeout=RUN_LIMIT,
        check=True,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out.unlink()
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return float(result.stdout), cpu


def own_cpu() -> float:
    """CPU seconds this process (the service, all its threads) has used so far."""
    times = os.times()
    return times.user + times.system


async def _command(session: aiohttp.ClientSession, base: str, text: str) -> dict[str, Any]:
    async with session.post(
        f"{base}/api/v1/command",
        json={"text": text},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as response:
        reply: dict[str, Any] = json.loads(await response.text())
        if response.status != 200 or not reply.get("ok"):
            raise SystemExit(f"{text!r}: HTTP {response.status}: {reply}")
        return reply


async def sandbox(work: Path, runs: int, rest: float = SETTLE) -> dict[str, Any]:
    """``download n1`` through the API until staged, both ways of receiving the body,
    against ``curl -o``."""
    repo = work / "repo"
    keys = work / "keys"
    keys.mkdir()
    keygen(keys / "repo")
    deb = build_big_deb(work, SIZE)
    publish(repo, "stable", keys / "repo", [deb], kind=PackageKind.REGULAR)
    public = public_key_path(keys / "repo").read_text().strip()
    deb.unlink()
    (work / "nodes" / "n1").mkdir(parents=True)
    log_to(work / "service.log")
    seconds: dict[str, list[float]] = {turn: [] for turn in TURNS}
    cpu: dict[str, list[float]] = {turn: [] for turn in TURNS}
    linked = False
    with repo_server(repo) as (url, _server):
        pool = next((repo / "pool").iterdir()).name
        package_url = f"{url.rstrip('/')}/pool/{pool}"
        config = work / "tgops.toml"
        config.write_text(
            fleet_toml(
                work,
                clusters={"c1": (["n1"], 1)},
                database_url=f"sqlite+aiosqlite:///{work}/state.db",
                repository_url=url,
                public_key=public,
            )
        )
        settings = load_settings(config, {})
        cache = settings.updates.cache_dir
        staged = work / "nodes" / "n1" / "staged"
        async with Service(settings) as service, aiohttp.ClientSession() as session:
            assert service.repository is not None
            downloader = service.repository.downloader
            base = f"http://127.0.0.1:{service.port}"
            for index in range(runs + 1):  # the first of each is a warm-up, not counted
                turns = TURNS[index % len(TURNS) :] + TURNS[: index % len(TURNS)]
                for turn in turns:
                    for path in [*cache.glob("*"), *staged.glob("*")]:
                        path.unlink()
                    await settle(rest)
                    if turn == "curl":
                        took, used = curl_seconds(package_url, work / "curl.out")
                    else:
                        downloader.splice = turn == "ours"
                        started, cpu_before = time.perf_counter(), own_cpu()
                        reply = await _command(session, base, "download n1")
                        [run] = await service.lifecycle.wait(run_ids(reply["text"]), RUN_LIMIT)
                        took, used = time.perf_counter() - started, own_cpu() - cpu_before
                        if run.status != "succeeded":
                            raise SystemExit(f"download failed: {run.status} {run.error}")
                        [file] = list(staged.iterdir())
                        linked = file.stat().st_nlink == 2
                    if index:
                        seconds[turn].append(took)
                        cpu[turn].append(used)
    return {**seconds, "cpu": cpu, "linked": linked}


async def ssh(work: Path, runs: int, rest: float = SETTLE) -> dict[str, Any]:
    """``SshDriver.stage`` to a real sshd on 127.0.0.1 (OpenSSH client, asyncssh channel),
    against ``scp``."""
    deb = build_big_deb(work, SIZE)
    digest = sha256_file(deb)
    package = StagedPackage(
        name="tg-big", version="1.0", kind=PackageKind.REGULAR, sha256=digest, path=deb
    )
    seconds: dict[str, list[float]] = {"scp": [], "ours": [], "channel": []}
    with start_sshd(work / "sshd") as server:
        node = FakeNode.create(work / "node")
        known = server.known_hosts(work / "known_hosts")
        settings = NodeSettings(
            name="n-ssh",
            driver="ssh",
            host=server.host,
            port=server.port,
            user=server.user,
            key_file=server.key_file,
            known_hosts=known,
            command_timeout=RUN_LIMIT,
            commands=node.commands(),
        )
        node.staging.mkdir(parents=True, exist_ok=True)
        scp = [
            "scp",
            "-q",
            "-i",
            str(server.key_file),
            "-o",
            f"UserKnownHostsFile={known}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-P",
            str(server.port),
            str(deb),
            f"{server.user}@{server.host}:{node.staging}/scp.deb",
        ]
        for index in range(runs + 1):
            turns = ["scp", "ours", "channel"]
            turns = turns[index % 3 :] + turns[: index % 3]
            for turn in turns:
                # every side starts from an empty directory: with the files of the turns
                # before left there, the third turn of each round took about 1 s longer,
                # whichever side it was
                for path in node.staging.glob("*"):
                    path.unlink()
                await settle(rest)
                started = time.perf_counter()
                if turn == "scp":
                    # nothing else runs meanwhile: blocking the loop is what we want
                    subprocess.run(scp, check=True, timeout=RUN_LIMIT)  # noqa: ASYNC221
                else:
                    driver = SshDriver(settings, staging_dir=str(node.staging))
                    if turn == "channel":
                        driver.runner.openssh_from = None
                    try:
                        await driver.stage([package])
                    finally:
                        await driver.aclose()
                took = time.perf_counter() - started
                if index:
                    seconds[turn].append(took)
    return dict(seconds)


def child(part: str, runs: int, rest: float) -> None:
    work = scratch("tgops-bench-stage-")
    try:
        load = os.getloadavg()[0]
        measure = sandbox if part == "sandbox" else ssh
        result = asyncio.run(measure(work, runs, rest))
        result["load"] = [load, os.getloadavg()[0]]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


def render(runs: int, rest: float, box: dict[str, Any], remote: dict[str, Any]) -> str:
    def row(label: str, values: list[float], cpu: list[float] | None = None) -> str:
        median = statistics.median(values)
        shown = ", ".join(f"{v:.2f}" for v in values)
        used = f"{statistics.median(cpu):.2f}" if cpu else "-"
        return f"| {label} | {median:.2f} | {SIZE / median / 1e6:.0f} | {used} | {shown} |"

    curl = statistics.median(box["curl"])
    box_ratio = curl / statistics.median(box["ours"])
    loop_ratio = curl / statistics.median(box["loop"])
    ssh_ratio = statistics.median(remote["scp"]) / statistics.median(remote["ours"])
    channel_ratio = statistics.median(remote["scp"]) / statistics.median(remote["channel"])
    cpu = box["cpu"]
    return "\n".join(
        [
            HEADING,
            "",
            f"`.venv/bin/python bench/stage.py` on {now_text()} ({runs} runs each, medians)",
            "",
            f"- machine: {machine_line()}",
            f"- one .deb of {SIZE >> 20} MiB (random data, not compressed) served over 127.0.0.1",
            "  by `tests/repo_server.py` (a separate process); every measurement in a child",
            "  process of its own; the sides of a comparison take turns, each after `sync`",
            f"  and {rest:g} s of rest (the kernel's work left by the turn before is not charged)",
            "- CPU: of `curl` (user + system), of the service's whole process during the run",
            "  (every thread; the repository server's not counted on either side)",
            "",
            "| what | seconds (median) | MB/s | CPU s (median) | runs |",
            "|---|---|---|---|---|",
            row("`curl -o FILE` of the package", box["curl"], cpu["curl"]),
            row(
                "`download n1` through the API until staged on a sandbox node",
                box["ours"],
                cpu["ours"],
            ),
            row(
                "the same, the body through the event loop (`Downloader.splice` off)",
                box["loop"],
                cpu["loop"],
            ),
            row("`scp` to a real sshd on 127.0.0.1", remote["scp"]),
            row(
                "ssh driver `stage` (connect, OpenSSH's client into `cat`, `checksum` on the node)",
                remote["ours"],
            ),
            row(
                "the same, streamed over the driver's asyncssh channel (`openssh_from` off)",
                remote["channel"],
            ),
            "",
            f"- sandbox: **{box_ratio:.2f} x** `curl -o` (target >= {TARGET}): "
            f"{verdict(box_ratio >= TARGET)}; with the body through the event loop "
            f"{loop_ratio:.2f} x; the staged file is "
            + ("a hard link to the cache's verified copy" if box["linked"] else "a copy")
            + f"; load average {box['load'][0]:.2f} at the start, {box['load'][1]:.2f} at the end",
            f"- ssh: **{ssh_ratio:.2f} x** `scp` (target >= {TARGET}): "
            f"{verdict(ssh_ratio >= TARGET)}; over the asyncssh channel {channel_ratio:.2f} x; "
            f"load average {remote['load'][0]:.2f} at the "
            f"start, {remote['load'][1]:.2f} at the end",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--child", choices=["sandbox", "ssh"])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument(
        "--settle", type=float, default=SETTLE, help="seconds of rest after sync before each turn"
    )
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.runs, args.settle)
        return
    limit = RUN_LIMIT * 6 * (args.runs + 1) + 300
    argv = [str(Path(__file__)), "--runs", str(args.runs), "--settle", str(args.settle), "--child"]
    box = run_child([*argv, "sandbox"], timeout=limit).data
    print(f"sandbox: ours {box['ours']}, loop {box['loop']}, curl {box['curl']}", flush=True)
    remote = run_child([*argv, "ssh"], timeout=limit).data
    print(
        f"ssh: ours {remote['ours']}, channel {remote['channel']}, scp {remote['scp']}", flush=True
    )
    text = render(args.runs, args.settle, box, remote)
    print(text)
    if not args.no_write:
        print(f"written to {write_section(HEADING, text)}")


if __name__ == "__main__":
    main()
