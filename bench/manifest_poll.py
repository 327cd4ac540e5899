"""What a conditional manifest request saves per poll (issue 15).

A channel manifest of realistic size (2,000 entries by default, signed like ``tgops
publish`` signs) is served by ``tests/repo_server.py`` in its own process on 127.0.0.1.
Two ways of polling it are timed, each ``--polls`` times:

- *full*: a client that keeps nothing (what every look, command and poll did before):
  manifest and signature downloaded, the signature verified, the JSON parsed and validated;
- *conditional*: the client keeps the verified manifest with its ETag: the manifest is asked
  for with ``If-None-Match`` and answered ``304 Not Modified``; the signature (some 90 bytes)
  is fetched and compared; freshness (expiry, rollback) is checked as always.

Per poll: wall time and this process's CPU time (medians), and the bytes received (status
lines, headers and bodies, as aiohttp delivered them). Results go to bench/RESULTS.md,
section "Conditional manifest requests (issue 15)".

    .venv/bin/python bench/manifest_poll.py [--entries 2000] [--polls 40]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine_line, now_text, repo_server, write_section
from core.repository.cache import Downloader
from core.repository.client import HttpRepository
from core.repository.freshness import Freshness
from core.repository.manifest import PackageEntry, load_public_key
from core.repository.publish import keygen, load_signing_key, public_key_path

HEADING = "## Conditional manifest requests (issue 15)"


def write_repository(root: Path, key: Path, entries: int) -> int:
    """A signed ``stable`` manifest of ``entries`` packages; returns its size in bytes."""
    packages = []
    for i in range(entries):
        name = f"tg-pkg{i:04d}"
        version = f"2.{i % 50}.{i % 7}-1"
        hotfix = i % 40 == 0
        packages.append(
            PackageEntry(
                name=name,
                version=version,
                kind="hotfix" if hotfix else "regular",
                id=f"HF-{i:04d}" if hotfix else None,
                urgency="normal" if hotfix else None,
                summary=f"{name}: fixes and updates for the TightGate-Pro component {i}",
                size=100_000 + i * 37,
                sha256=hashlib.sha256(name.encode()).hexdigest(),
                path=f"pool/{name}_{version}_all.deb",
                arch="all",
            ).model_dump(mode="json")
        )
    now = datetime.now(UTC)
    document = {
        "channel": "stable",
        "generated_at": now.isoformat(),
        "expires": (now + timedelta(days=30)).isoformat(),
        "packages": packages,
    }
    body = json.dumps(document, indent=2, ensure_ascii=False).encode() + b"\n"
    channels = root / "channels"
    channels.mkdir(parents=True)
    (channels / "stable.json").write_bytes(body)
    signature = base64.b64encode(load_signing_key(key).sign(body)) + b"\n"
    (channels / "stable.json.sig").write_bytes(signature)
    return len(body)


@dataclass
class Received:
    """Status lines and headers aiohttp delivered (bodies: the server's own count)."""

    total: int = 0
    statuses: list[int] = field(default_factory=list)

    def tracer(self) -> aiohttp.TraceConfig:
        config = aiohttp.TraceConfig()
        config.on_request_end.append(self._end)
        return config

    async def _end(
        self, _s: aiohttp.ClientSession, _c: SimpleNamespace, params: aiohttp.TraceRequestEndParams
    ) -> None:
        response = params.response
        self.statuses.append(response.status)
        self.total += len(f"HTTP/1.1 {response.status} {response.reason}\r\n") + 2
        self.total += sum(len(k) + len(v) + 4 for k, v in response.raw_headers)


async def body_bytes(url: str) -> int:
    """Body bytes the repository server has sent so far (its ``/__stats__``)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(url + "__stats__", timeout=aiohttp.ClientTimeout(total=10)) as response,
    ):
        stats = await response.json()
    return sum(int(n) for n in stats["bytes_sent"].values())


@dataclass(frozen=True, slots=True)
class Figures:
    wall_ms: float
    cpu_ms: float
    bytes: float
    statuses: str


async def measure(url: str, public_key: str, cache: Path, polls: int, keep: bool) -> Figures:
    key = load_public_key(public_key)
    received = Received()
    walls: list[float] = []
    cpus: list[float] = []
    async with (
        aiohttp.ClientSession(auto_decompress=False, trace_configs=[received.tracer()]) as session,
        Downloader(cache, session=session) as downloader,
    ):
        kept = HttpRepository(url, key, downloader, freshness=Freshness())
        if keep:
            await kept.manifest("stable")  # the first look of the run downloads it
        received.total = 0
        received.statuses.clear()
        before = await body_bytes(url)
        for _ in range(polls):
            repo = kept if keep else HttpRepository(url, key, downloader, freshness=Freshness())
            wall, cpu = time.perf_counter(), time.process_time()
            manifest = await repo.manifest("stable")
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            assert manifest.packages
        if keep:
            assert kept.not_modified == polls, (kept.downloaded, kept.not_modified)
        received.total += await body_bytes(url) - before
    counted = {s: received.statuses.count(s) for s in sorted(set(received.statuses))}
    return Figures(
        wall_ms=statistics.median(walls) * 1000,
        cpu_ms=statistics.median(cpus) * 1000,
        bytes=received.total / polls,
        statuses=", ".join(f"{n} x {s}" for s, n in counted.items()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--polls", type=int, default=40)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tgops-bench-manifest-") as tmp:
        work = Path(tmp)
        key = work / "repo.key"
        keygen(key)
        size = write_repository(work / "repo", key, args.entries)
        public = public_key_path(key).read_text().strip()
        with repo_server(work / "repo") as (url, _server):
            full = asyncio.run(measure(url, public, work / "cache", args.polls, keep=False))
            cond = asyncio.run(measure(url, public, work / "cache", args.polls, keep=True))
    lines = [
        HEADING,
        "",
        f"{now_text()}; {machine_line()}",
        "",
        f"- A `stable` manifest of {args.entries} entries ({size / 1024:.0f} KiB, signed as "
        "`tgops publish` signs) served by `tests/repo_server.py` in its own process over "
        f"127.0.0.1; {args.polls} polls each; medians per poll; bytes = status lines, "
        "headers and bodies received (`bench/manifest_poll.py`).",
        "",
        "| per poll | full download (before) | conditional (kept with its ETag) | ratio |",
        "|---|---|---|---|",
        f"| wall time | {full.wall_ms:.1f} ms | {cond.wall_ms:.1f} ms "
        f"| {cond.wall_ms / full.wall_ms:.3f} |",
        f"| client CPU | {full.cpu_ms:.1f} ms | {cond.cpu_ms:.1f} ms "
        f"| {cond.cpu_ms / full.cpu_ms:.3f} |",
        f"| bytes received | {full.bytes:,.0f} | {cond.bytes:,.0f} "
        f"| {cond.bytes / full.bytes:.4f} |",
        f"| answers | {full.statuses} | {cond.statuses} | |",
        "",
        "The conditional poll still fetches the signature file (to compare it with the one "
        "the kept manifest was verified with) and checks expiry and rollback; it skips the "
        "manifest's body, the signature check and the JSON parsing and validation.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(HEADING, text)


if __name__ == "__main__":
    main()
