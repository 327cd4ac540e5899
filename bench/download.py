"""Download benchmark (issue 3): our Downloader against curl on a 1 GiB file over loopback.

Run as ``.venv/bin/python bench/download.py``. It creates a 1 GiB file in a temporary
directory under /tmp (deleted afterwards), serves it with ``tests/repo_server.py`` in a
separate process, and measures in one run:

* throughput of ``curl -o FILE`` and ``curl -o /dev/null`` vs the Downloader (which hashes
  and writes into its cache), each in its own process, alternating, median of ``--runs``;
* peak RSS of the downloading process (``os.wait4`` rusage of that child);
* resume: the download is SIGKILLed when its partial file passes half the size, then run
  again; the bytes the server sent for the resume are compared with the remainder.

The figures are written to bench/RESULTS.md under "## Download (issue 3)"; other sections
of that file are kept.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZE = 1 << 30
BLOCK = 16 << 20
HEADING = "## Download (issue 3)"


def make_file(path: Path) -> str:
    """A 1 GiB file of random blocks; returns its SHA-256."""
    digest = hashlib.sha256()
    block = os.urandom(BLOCK)
    with path.open("wb") as handle:
        for i in range(SIZE // BLOCK):
            data = block[i:] + block[:i]  # every block differs
            digest.update(data)
            handle.write(data)
    return digest.hexdigest()


def stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "__stats__", timeout=10) as response:  # noqa: S310 - loopback
        data: dict[str, Any] = json.load(response)
    return data


def wait_idle(url: str) -> dict[str, Any]:
    """The server's counters once no request is being answered any more."""
    deadline = time.monotonic() + 30
    while True:
        data = stats(url)
        if data["active"] == 0 or time.monotonic() > deadline:
            return data
        time.sleep(0.05)


def run_curl(url: str, out: str) -> float:
    result = subprocess.run(
        ["curl", "-s", "-S", "-f", "-o", out, "-w", "%{time_total}", url],  # noqa: S607
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return float(result.stdout)


def child_command(url: str, sha256: str, cache: Path) -> list[str]:
    return [sys.executable, __file__, "--child", url, sha256, str(SIZE), str(cache)]


def run_downloader(url: str, sha256: str, cache: Path) -> tuple[float, float]:
    """Seconds of the fetch (measured inside the child) and the child's peak RSS in MiB."""
    proc = subprocess.Popen(child_command(url, sha256, cache), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"downloader child failed (exit {proc.returncode})")
    return float(json.loads(output)["seconds"]), usage.ru_maxrss / 1024


def kill_at_half(url: str, sha256: str, cache: Path) -> int:
    """Start a download, SIGKILL it once the partial file passes half; returns its size."""
    part = cache / f"{sha256}.part"
    proc = subprocess.Popen(child_command(url, sha256, cache), stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if part.exists() and part.stat().st_size >= SIZE // 2:
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    return part.stat().st_size


async def child(url: str, sha256: str, size: int, cache: Path) -> None:
    from core.download import Downloader

    start = time.perf_counter()
    async with Downloader(cache, max_parallel=1) as downloader:
        await downloader.fetch(url, package="bench 1", sha256=sha256, size=size)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def write_results(text: str) -> Path:
    results = ROOT / "bench" / "RESULTS.md"
    old = results.read_text() if results.exists() else "# Benchmark results\n"
    lines = old.splitlines(keepends=True)
    kept: list[str] = []
    skipping = False
    for line in lines:
        if line.startswith("## "):
            skipping = line.strip() == HEADING
        if not skipping:
            kept.append(line)
    body = "".join(kept).rstrip("\n") + "\n\n" + text
    results.write_text(body)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", nargs=4, metavar=("URL", "SHA256", "SIZE", "CACHE"))
    args = parser.parse_args()
    if args.child:
        url, sha256, size, cache = args.child
        asyncio.run(child(url, sha256, int(size), Path(cache)))
        return
    work = Path(tempfile.mkdtemp(prefix="tgops-bench-", dir="/tmp"))
    server: subprocess.Popen[str] | None = None
    try:
        (work / "repo" / "pool").mkdir(parents=True)
        print("creating the 1 GiB file ...", flush=True)
        sha256 = make_file(work / "repo" / "pool" / "big.deb")
        server = subprocess.Popen(
            [sys.executable, "-m", "tests.repo_server", str(work / "repo")],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None
        base = server.stdout.readline().strip()
        url = base + "pool/big.deb"
        curl_file, curl_null, ours, rss = [], [], [], []
        for run in range(args.runs):
            for path in (work / "curl.out", work / "cache"):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(
                    missing_ok=True
                )
            os.sync()
            curl_null.append(run_curl(url, "/dev/null"))
            os.sync()
            curl_file.append(run_curl(url, str(work / "curl.out")))
            (work / "curl.out").unlink()
            os.sync()
            seconds, peak = run_downloader(url, sha256, work / "cache")
            ours.append(seconds)
            rss.append(peak)
            print(
                f"run {run + 1}: curl -o /dev/null {curl_null[-1]:.2f}s, curl -o file "
                f"{curl_file[-1]:.2f}s, Downloader {seconds:.2f}s (peak RSS {peak:.0f} MiB)",
                flush=True,
            )

        shutil.rmtree(work / "cache")
        os.sync()
        partial = kill_at_half(url, sha256, work / "cache")
        before = wait_idle(base)["bytes_sent"].get("pool/big.deb", 0)
        resume_seconds, resume_rss = run_downloader(url, sha256, work / "cache")
        after = wait_idle(base)
        resume_bytes = after["bytes_sent"]["pool/big.deb"] - before
        remainder = SIZE - partial
        extra = resume_bytes - remainder
        ranges = after["ranges"]["pool/big.deb"]
        print(f"resume: partial {partial} bytes, resume sent {resume_bytes}, remainder {remainder}")
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)

    def mbps(seconds: float) -> float:
        return SIZE / seconds / 1e6

    m_file, m_null, m_ours = (statistics.median(x) for x in (curl_file, curl_null, ours))
    ratio_file = m_file / m_ours
    ratio_null = m_null / m_ours
    peak_rss = max([*rss, resume_rss])
    uname = " ".join(platform.uname())
    text = f"""{HEADING}

`.venv/bin/python bench/download.py` (runs: {args.runs}, medians); {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC}

- machine: `{uname}`, nproc {os.cpu_count()}, Python {platform.python_version()}
- file: 1 GiB of random data, served over 127.0.0.1 by `tests/repo_server.py` (aiohttp,
  separate process); every client in its own process, page cache warm, `sync` before each run

| client | seconds (median) | MB/s | runs |
|---|---|---|---|
| curl -o /dev/null (no disk write) | {m_null:.2f} | {mbps(m_null):.0f} | {", ".join(f"{x:.2f}" for x in curl_null)} |
| curl -o FILE | {m_file:.2f} | {mbps(m_file):.0f} | {", ".join(f"{x:.2f}" for x in curl_file)} |
| Downloader (write + SHA-256 + fsync + rename) | {m_ours:.2f} | {mbps(m_ours):.0f} | {", ".join(f"{x:.2f}" for x in ours)} |

- throughput vs `curl -o FILE`: **{ratio_file:.2f} x** (target >= 0.8) — {"met" if ratio_file >= 0.8 else "NOT met"}
- throughput vs `curl -o /dev/null`: {ratio_null:.2f} x (curl writes nothing there; for reference)
- peak RSS of the downloading process: **{peak_rss:.0f} MiB** (target < 100 MB) — {"met" if peak_rss * 1.048576 < 100 else "NOT met"}
- kill at 50 % and resume: partial file {partial} bytes at SIGKILL; the resume request was
  `{ranges[-1]}`; the server sent {resume_bytes} bytes for it, the remainder was {remainder}
  bytes: **{extra} extra bytes ({100 * extra / remainder:.3f} %)** (target < 1 %) — {"met" if extra < remainder / 100 else "NOT met"}; resume took {resume_seconds:.2f}s
  including hashing the {partial}-byte prefix
"""
    print(text)
    print(f"written to {write_results(text)}")


if __name__ == "__main__":
    main()
