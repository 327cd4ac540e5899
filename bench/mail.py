"""E-mail benchmark (issue 8): 10,000 hotfix e-mails through the outbox vs a bare loop.

Run as ``.venv/bin/python bench/email.py``. An SMTP sink (aiosmtpd, accepting and
discarding every message: ``python -m tests.smtp_server``) runs in its own process on
127.0.0.1. Each measurement runs in a fresh child process, alternating, ``--runs`` times:

* ``bare``: a bare aiosmtplib loop: ``--count`` messages over ``count / batch``
  connections one after another, ``--batch`` messages per connection, each message
  serialized beforehand (pure SMTP time: the strictest baseline);
* ``bare+compose``: the same loop composing each message (headers, text and HTML part;
  bodies rendered once) right before sending it;
* ``outbox``: the notifier's path: every e-mail written to a fresh SQLite store first
  (``Outbox.put``), then delivered by the outbox worker (claims, one connection per batch
  of ``--batch``, templates rendered per message, outcomes and audit records written as they
  come). Timed from the first ``put`` until the last outcome is recorded; RSS of the
  process at the start, at half and at the end, and its peak (VmHWM).

The figures go to bench/RESULTS.md under "## E-mail (issue 8)"; other sections are kept.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the standard library's ``email`` package; run as a script, its
# directory comes first on sys.path and would shadow it. Drop that entry first.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from email.message import EmailMessage
from email.utils import format_datetime, formataddr
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiosmtplib  # noqa: E402 - after the path is set

from core.settings import SmtpSettings  # noqa: E402
from core.store import Store, utcnow  # noqa: E402
from notify.email import POLICY, EmailChannel, message_id  # noqa: E402
from notify.outbox import Backoff, Notification, Outbox, Outcome  # noqa: E402
from notify.render import Renderer  # noqa: E402

HEADING = "## E-mail (issue 8)"
SENDER = "tgops@bench.example.org"
SUBJECT = "[tgops] URGENT hotfix HF-2026-001 for tg-vnc 2.0-1: Fixes a VNC crash"
VARS: dict[str, Any] = {
    "hotfix": {
        "id": "HF-2026-001",
        "package": "tg-vnc",
        "version": "2.0-1",
        "urgency": "urgent",
        "summary": "Fixes a crash of the VNC server when a session ends",
    },
    "urgent": True,
    "channel": "stable",
    "nodes": ["tg1", "tg2", "tg3", "solo1"],
}


def rss_kib(field: str = "VmRSS") -> int:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(field))


def recipient(i: int) -> str:
    return f"contact{i}@customer{i % 97}.example.org"


def compose(i: int, text: str, html: str) -> bytes:
    message = EmailMessage(policy=POLICY)
    message["Subject"] = SUBJECT
    message["From"] = formataddr(("tgops", SENDER))
    message["To"] = formataddr((f"Contact {i}", recipient(i)))
    message["Date"] = format_datetime(utcnow())
    message["Message-ID"] = message_id(f"bench:{i}", SENDER)
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    return message.as_bytes(policy=POLICY)


# -- children ------------------------------------------------------------------------------


async def child_bare(port: int, count: int, batch: int, *, prebuilt: bool) -> dict[str, Any]:
    rendered = Renderer().email("hotfix", {"name": "Contact", **VARS})
    data = [compose(i, rendered.text, rendered.html) for i in range(count)] if prebuilt else []
    start_rss = rss_kib()
    started = time.perf_counter()
    sent = 0
    for first in range(0, count, batch):
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=port, start_tls=False, local_hostname="bench", timeout=30
        )
        await client.connect()
        for i in range(first, min(count, first + batch)):
            body = data[i] if prebuilt else compose(i, rendered.text, rendered.html)
            await client.sendmail(SENDER, [recipient(i)], body)
            sent += 1
        await client.quit()
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "sent": sent,
        "connections": math.ceil(count / batch),
        "rss_start_kib": start_rss,
        "rss_end_kib": rss_kib(),
        "vm_hwm_kib": rss_kib("VmHWM"),
    }


async def child_outbox(port: int, count: int, batch: int, directory: Path) -> dict[str, Any]:
    async with Store(f"sqlite+aiosqlite:///{directory}/bench.db") as store:
        channel = EmailChannel(
            SmtpSettings(host="127.0.0.1", port=port, sender=SENDER, timeout=30.0),
            renderer=Renderer(),
            batch_size=batch,
        )
        channel._local_hostname = "bench"  # as the aiosmtplib loop: no DNS lookup
        outbox = Outbox(store, [channel], Backoff(base=1.0, cap=5.0, max_attempts=3))
        done = asyncio.Event()
        counts = {"sent": 0, "failed": 0}
        samples: dict[str, int] = {}

        async def listener(outcome: Outcome) -> None:
            counts["sent" if outcome.sent else "failed"] += 1
            if "rss_middle_kib" not in samples and counts["sent"] >= count // 2:
                samples["rss_middle_kib"] = rss_kib()
            if counts["sent"] + counts["failed"] >= count:
                done.set()

        outbox.listen(listener)
        notes = [
            Notification(
                key=f"hotfix:stable:HF-2026-001:email:{recipient(i)}",
                channel="email",
                recipient=recipient(i),
                subject=SUBJECT,
                payload={
                    "template": "hotfix",
                    "vars": {"name": f"Contact {i}", **VARS},
                    "name": f"Contact {i}",
                    "target": "HF-2026-001",
                },
            )
            for i in range(count)
        ]
        samples["rss_start_kib"] = rss_kib()
        started = time.perf_counter()
        worker = asyncio.create_task(outbox.run(), name="bench-outbox")
        queued = len(await outbox.put(*notes))
        put_seconds = time.perf_counter() - started
        async with asyncio.timeout(3600):
            await done.wait()
        seconds = time.perf_counter() - started
        samples["rss_end_kib"] = rss_kib()
        await outbox.stop(10.0)
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        rows = await store.outbox(statuses=["sent"], limit=count + 1)
        audits = await store.audit_log(limit=count + 1)
    return {
        "seconds": seconds,
        "put_seconds": put_seconds,
        "queued": queued,
        "sent": counts["sent"],
        "failed": counts["failed"],
        "rows_sent": len(rows),
        "audit_records": len(audits),
        "vm_hwm_kib": rss_kib("VmHWM"),
        **samples,
    }


def child_main(args: argparse.Namespace) -> None:
    if args.child == "outbox":
        with tempfile.TemporaryDirectory(prefix="tgops-bench-") as tmp:
            result = asyncio.run(child_outbox(args.port, args.count, args.batch, Path(tmp)))
    else:
        result = asyncio.run(
            child_bare(args.port, args.count, args.batch, prebuilt=args.child == "bare")
        )
    print(json.dumps(result))


# -- parent --------------------------------------------------------------------------------


def run_child(kind: str, port: int, count: int, batch: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--port", str(port), "--count", str(count),
         "--batch", str(batch)],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def write_results(text: str) -> Path:
    results = ROOT / "bench" / "RESULTS.md"
    old = results.read_text() if results.exists() else "# Benchmark results\n"
    kept: list[str] = []
    skipping = False
    for line in old.splitlines(keepends=True):
        if line.startswith("## "):
            skipping = line.strip() == HEADING
        if not skipping:
            kept.append(line)
    results.write_text("".join(kept).rstrip("\n") + "\n\n" + text)
    return results


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=100, help="messages per connection")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", choices=["bare", "bare+compose", "outbox"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return

    sink = subprocess.Popen(
        [sys.executable, "-m", "tests.smtp_server", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert sink.stdout is not None
    port = int(sink.stdout.readline())
    results: dict[str, list[dict[str, Any]]] = {"bare": [], "bare+compose": [], "outbox": []}
    try:
        for run in range(args.runs):
            for kind in results:
                result = run_child(kind, port, args.count, args.batch)
                results[kind].append(result)
                print(f"run {run + 1} {kind}: {result}", flush=True)
    finally:
        sink.terminate()
        sink.wait(10)

    def median(kind: str) -> float:
        return statistics.median(r["seconds"] for r in results[kind])

    bare, composing, outbox = median("bare"), median("bare+compose"), median("outbox")
    ratio = bare / outbox
    ratio_compose = composing / outbox
    last = results["outbox"][-1]
    put = statistics.median(r["put_seconds"] for r in results["outbox"])
    delivery_only = args.count / (outbox - put)
    uname = " ".join(platform.uname())
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")

    def runs(kind: str) -> str:
        return ", ".join(f"{r['seconds']:.2f}" for r in results[kind])

    ok = all(r["sent"] == args.count for rs in results.values() for r in rs) and all(
        r["rows_sent"] == args.count and r["audit_records"] >= args.count
        for r in results["outbox"]
    )
    text = f"""{HEADING}

`.venv/bin/python bench/email.py` ({args.runs} runs, medians); {now}

- machine: `{uname}`, nproc {os.cpu_count()}, Python {platform.python_version()}
- {args.count} hotfix e-mails (text + HTML, ~{len(compose(0, "x" * 900, "x" * 1500)) // 100 * 100} bytes) to an aiosmtpd sink
  in its own process on 127.0.0.1 (accepts and discards); {math.ceil(args.count / args.batch)}
  connections of {args.batch} messages, one after another, in every variant; each variant
  in a fresh process; every message accepted: {"yes" if ok else "NO"}

| path | seconds (median) | mails/s | runs |
|---|---|---|---|
| bare aiosmtplib loop, messages serialized beforehand | {bare:.2f} | {args.count / bare:.0f} | {runs("bare")} |
| bare aiosmtplib loop, composing each message | {composing:.2f} | {args.count / composing:.0f} | {runs("bare+compose")} |
| outbox (store first, then worker; templates per message) | {outbox:.2f} | {args.count / outbox:.0f} | {runs("outbox")} |

- throughput outbox vs bare loop: **{ratio:.2f} x** (target >= 0.8) — {"met" if ratio >= 0.8 else "NOT met"}
- throughput outbox vs bare loop composing its messages: {ratio_compose:.2f} x
- of the outbox time, queueing the {args.count} items (`Outbox.put`, one transaction):
  {put:.2f} s; delivery alone: {delivery_only:.0f} mails/s
- RSS of the outbox process (last run): start {mib(last["rss_start_kib"])} MiB, half sent
  {mib(last["rss_middle_kib"])} MiB, end {mib(last["rss_end_kib"])} MiB; peak (VmHWM)
  {mib(last["vm_hwm_kib"])} MiB (the bare loop with all messages prebuilt: peak
  {mib(results["bare"][-1]["vm_hwm_kib"])} MiB)
"""
    print(text)
    if not args.no_write:
        print(f"written to {write_results(text)}")


if __name__ == "__main__":
    main()
