"""E-mail benchmark (issues 8 and 15): 10,000 hotfix e-mails through the outbox vs a bare loop.

Run as ``.venv/bin/python bench/mail.py``. An SMTP sink (aiosmtpd, accepting and
discarding every message: ``python -m tests.smtp_server``) runs in its own process on
127.0.0.1. Each measurement runs in a fresh child process, alternating, ``--runs`` times:

* ``bare``: a bare aiosmtplib loop: ``--count`` messages over ``count / batch``
  connections one after another, ``--batch`` messages per connection, each message
  serialized beforehand (pure SMTP time: the strictest baseline);
* ``bare+compose``: the same loop composing each message with the standard library's
  ``EmailMessage`` (bodies rendered once) right before sending it, as a hand-written
  sender would;
* ``outbox``: the notifier's path: every e-mail written to a fresh SQLite store first
  (``Outbox.put``), then delivered by the outbox worker (claims, one connection per batch
  of ``--batch``, templates filled in per message, outcomes and audit records written as they
  come). Timed from the first ``put`` until the last outcome is recorded; RSS of the
  process at the start, at half and at the end, and its peak (VmHWM). The garbage
  collector is set as `tgops serve` sets it once started (``core.heap``: what exists
  then frozen, the youngest generation collected less often); ``--default-gc`` leaves
  CPython's settings (a diagnostic).

Targets (issue 15): the outbox at >= 0.9 x the bare loop with 1 connection and >= 0.8 x
with 2. The figures go to bench/RESULTS.md under "## E-mail"; other sections are kept.
"""

# ruff: noqa: E402  (the project's imports follow the sys.path entry for its root)
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, formataddr
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiosmtplib

from core import heap
from core.settings import SmtpSettings
from core.store import Store, utcnow
from notify import mime
from notify.email import EmailChannel
from notify.outbox import PUT_CHUNK, Backoff, Notification, Outbox, Outcome
from notify.render import Renderer

HEADING = "## E-mail (issues 8, 15)"
Variant = tuple[str, int, bool, str]
"""What is measured: the path, connections at once, whether the sink offers PIPELINING,
and the outbox's store ("sqlite", "postgresql"; "" for the bare loops)."""
TARGETS = {1: 0.9, 2: 0.8}
"""Least throughput of the outbox against the bare loop, per connections at once."""
NOTE = """- issue 15 (2026-12-05): profiled again (py-spy over all threads of the outbox process,
  4,000-8,000 mails, 250 Hz; CPU per mail of single parts measured apart with
  `time.thread_time` and the aiosqlite thread's CPU from /proc). Before the changes, with
  3,000 mails (`--count 3000`): 1.45 ms CPU (user + system) per mail with 1 connection,
  1.33 ms with 2; the bare loop 0.53 ms. Of the outbox's own share: rendering the two
  templates per recipient 0.34 ms (jinja2's gettext calls and `wordwrap`); the claim
  ~0.1 ms, of which 62 us on the aiosqlite thread (SQLite read and sorted every due item
  for each claim of 100: the condition on both statuses kept it from the index's order);
  writing markers, outcomes and audit records ~0.2-0.3 ms (each statement three round
  trips to the aiosqlite thread, each transaction two more; an empty transaction alone
  costs the event loop ~0.3-0.4 ms here).
- changed: an e-mail's templates are rendered once per language and set of shared
  variables, with a stand-in for the recipient's name, which is filled in per message
  (escaped in the HTML part); only templates that do nothing with the name but show it
  are filled in this way (checked on the template's syntax tree and with two stand-ins
  and the first real name against a full rendering; others are rendered per recipient):
  0.34 -> 0.02 ms. The SQLite claim reads the pending and the expired items each in the
  index's order (10,000 queued: 62 -> 10-13 us per item on the aiosqlite thread; main
  thread 33-47 -> 29 us, the statement built once per channel and size); markers find
  their rows by id (not among every `sending` one); the outcome statements are built
  once. A message whose `transmitting` marker is durable already goes on without a task
  and a timer of its own (markers are still written 20 ahead, 10 per write, in the
  recorder's transactions; crash safety unchanged). Found on the way: on PostgreSQL a
  claim could take more than its limit (the choice ran again per row of the UPDATE); it
  now locks its choice first, then takes it.
- after, same runner, 3,000 mails: 0.87-0.90 ms CPU per mail (1 and 2 connections), the
  bare loop 0.50 ms in the same minutes. That pass's full run (other benchmarks ran
  meanwhile, load average up to 2.7 on the 2 vCPUs): the outbox 0.98 ms with 1 and 0.94 ms
  with 2 connections, the bare loop 0.57 and 0.47 ms (0.33 ms in the 00:20 UTC table of
  a quieter machine: under load every process needs more CPU per mail); ratios 0.78 x and
  0.77 x against 0.64 x and 0.48 x before, with single runs between 0.6 x and 1.3 x.
  Targets not met.
- fifth pass of issue 15 (2026-12-05, a slower runner: the bare loop needs 0.63 ms of CPU
  per mail): each store statement is one trip to the aiosqlite thread (four before:
  `core/store/sqlite.py`), none for the end of a read, and the hot statements are built
  once. 3,000 mails, the code before and after on the same runner in the same minutes:
  1.28 -> 1.11 ms CPU per mail with 1 connection, 1.25 -> 1.02 ms with 2; ratios 0.72 ->
  0.84 x and 0.65 -> 0.71 x. The full run above (10,000 mails): 0.73 x and 0.71 x, the
  outbox 1.21 and 0.98 ms per mail. Targets not met.
- seventh pass of issue 15 (2026-12-05): profiled again (py-spy `--gil`, 6,000 mails, 1
  connection): per mail the outbox held the interpreter 0.64 ms against the bare loop's
  0.27 ms, and its SMTP part alone was 0.25 ms against the bare loop's 0.17 ms (the same
  aiosmtplib calls: `mail`, `rcpt` and `data` each parse and quote the address or run
  two regular expressions over the whole message, and each message was a task of its
  own with a turn of the loop to let MAIL go out before the next was composed). Now the
  sender is quoted once per channel, the recipient's RCPT line and the message's DATA
  content (dot-stuffed with one `bytes.replace`: `mime.compose` already ends every line
  with CRLF) are made when the message is composed, and MAIL, RCPT, DATA and the content
  are written on aiosmtplib's connection directly, the next message composed right after
  MAIL is written, without a task. The same runner, the code before and after
  alternating, 3,000 mails, five runs each: CPU 1.36-1.70 -> 1.03-1.48 s with 1
  connection (about -0.08 ms per mail), 1.19-1.33 -> 0.92-1.13 s with 2; throughput
  against the bare loop run between them 0.71-0.84 -> 0.75-0.93 x (median 0.74 -> 0.89)
  and 0.65-0.79 -> 0.68-0.80 x (0.71 -> 0.79). The full run above (10,000 mails, a faster
  hour of this runner: the bare loop needed 0.23 ms of CPU per mail): **0.80 x and 0.79
  x**. Targets not met. A test sends a body with a lone `.` line and lines starting with
  a dot and compares what the server received byte for byte (it fails without the
  dot-stuffing).
- what still limits the ratios (before the ninth pass, a server without PIPELINING):
  the outbox needs about 0.18 ms more CPU per mail than
  the bare loop (0.41 against 0.23 ms in the run above) and with 1 connection that time
  adds to the wall time one to one: SMTP is a strict exchange of one command and one
  reply, and the outbox's other work comes in pieces longer than the server's turn
  (a recorder write of a marker, outcome and audit record statement through SQLAlchemy,
  ~0.5-1 ms, every ~10 mails; a claim of 100 items per batch; `put`'s transactions of
  1,000 rows, 0.33 s in all, inside the timed window), so it delays the next reply
  instead of filling the wait for it. Of the 0.18 ms: the store about 0.1 ms, composing
  0.04 ms, the outbox's own bookkeeping the rest. Fewer statements would need markers
  written further ahead (more mails left uncertain after a crash): markers 60 ahead and
  outcomes every 0.2 s instead of 20 and 0.05 s saved only 0.01-0.03 ms per mail.
- ninth pass of issue 15 (2026-12-05, evening): **SMTP pipelining** (RFC 2920).
  aiosmtpd, the sink here, does not offer PIPELINING; Postfix, Exim, Exchange and most
  servers a customer's mail goes through do. Where the server offers it, a message's
  content now goes in one write with the next message's MAIL, RCPT and DATA (RFC 2920
  lets the content open a group), and their replies are read together: one exchange per
  message instead of four (`notify/smtp_session.py` takes the connection over from
  aiosmtplib once the session is open: aiosmtplib's reader keeps one reply and drops
  what arrives while that one is not read). DATA joins the group only when that
  message's `transmitting` marker is stored (every message of a batch but the first);
  the replies are checked in order. First built with MAIL, RCPT and DATA of one message
  as the group (two exchanges per message); the figures below marked "two exchanges" are
  that step's.
  The benchmark now runs every variant against both sinks (`python -m tests.smtp_server
  --pipelining` adds the keyword to aiosmtpd's EHLO reply; the bare aiosmtplib loop does
  not pipeline either way), the outbox on SQLite and on PostgreSQL, and reads the CPU of
  the sink and of PostgreSQL's processes from /proc.
- over a round trip of 10 ms (the table above; a sink that holds every reply back 10
  ms), 300 mails, 1 connection: the bare loop and the outbox without PIPELINING need 43
  ms per mail (four exchanges), the outbox with it about 12 (one); with two exchanges per
  message it needed 22.3 ms (6.69 s for the 300 mails, measured once beside 13.0 s and
  3.58 s).
- two exchanges, same runner, the code before and after alternating, 3,000 mails, two
  runs each, on SQLite: against the sink offering PIPELINING 0.85-0.86 -> 1.01-1.06 x with 1
  connection and 0.75-0.76 -> 0.89-0.96 x with 2; against aiosmtpd as it is no change
  beyond the noise (0.81-0.93 -> 0.89-1.04 x, 0.68-0.71 -> 0.69-0.80 x). Two full runs
  of that step (18:10 and 18:31 UTC): with PIPELINING 1.03 and 1.11 / 0.93 and 0.93 x on
  SQLite, 0.94 and 0.98 / 0.75 and 0.79 x on PostgreSQL. One exchange against two, 10,000
  mails, three alternating runs each on a slower hour (medians): SQLite 7.07 -> 7.01 s
  with 1 connection and 6.19 -> 5.08 s with 2, PostgreSQL 8.47 -> 8.21 s and 7.28 ->
  7.02 s: on loopback a round trip costs little, what one exchange saves is mostly the
  server's and the outbox's work per read.
- what limits 2 connections is the SMTP server, a single Python process: the bare loop
  keeps it 93-98 % of a core busy (the table: 5.1-5.2 s of its CPU while the loop sends
  10,000 mails in 5.2-5.3 s), so that baseline runs at the server's own speed, and the
  outbox gets the same server 72-85 % busy. With PostgreSQL three processes share the 2
  cores: the sink 4.8 s, the outbox 3.7 s and PostgreSQL 1.4 s of CPU in 6.6 s (1.5
  cores on average, the rest of the time a process waits for another); at the bare
  loop's rate they would need 1.9 cores.
- tried and dropped: claiming the next batch while every connection is busy, so that a
  connection that frees goes on without the claim's trip to the store (the claims took
  0.4 s on SQLite and 1.0 s on PostgreSQL in 10,000 mails, 3 and 9 ms each at the
  median; the waits for a batch's first marker 0.27 and 0.35 s): four alternating runs
  each with 2 connections, no difference beyond the noise (SQLite 5.0-5.9 s before,
  5.1-6.2 s after; PostgreSQL 6.1-7.3 and 5.8-7.7 s), nor with 1 connection beyond the
  spread of single runs (three runs of 5,000 mails each way and sink; medians on SQLite
  5.79 -> 5.29 s and 6.60 -> 5.69 s, single runs 4.7-7.3 s; on PostgreSQL, whose claims
  take longest, 5.73 -> 6.02 s and 7.36 -> 7.34 s).
- found on the way: when the outbox stopped while a batch held every connection, the
  claim loop, already waiting for a free one, claimed and sent one more batch once it
  got it; it now looks again after the wait (the test of a stop with an envelope under
  way failed without that).
- thirteenth pass of issue 15 (2026-12-06 06:34 UTC): the first full run since the store
  keeps its PostgreSQL connections open (`core/store/base.py`; the fleet benchmarks'
  "Thirteenth pass"), in a slow hour (the bare loop 11.68 s with 1 connection against
  7.95 s the evening before): on PostgreSQL 1.37 / 0.82 x with PIPELINING (1 / 2
  connections) and 0.87 / 0.72 x without; on SQLite 1.47 / 1.18 x and 0.96 / 0.81 x.
- fourteenth pass (the table above, 08:42 UTC, a new machine of the same kind; nothing of
  the outbox changed): PostgreSQL 1.30 /
  0.92 x with PIPELINING and 0.89 / 0.69 x without; SQLite 1.50 / 1.13 x and 0.98 /
  0.79 x. Against a server without PIPELINING the ratios stay at the targets' edge and
  move by a few hundredths from run to run. With 2 connections and PostgreSQL three
  processes share the 2 cores (the outbox 4.2 s, the sink 5.6 s, PostgreSQL 1.6 s of CPU
  in 8.1 s); each message's four exchanges with the sink wait for whichever of them is
  not running.
- fifteenth pass of issue 15 (2026-12-06, the table above at 11:29 UTC, a slow hour: the
  bare loop 12.25 s with 1 connection against 9.95 s at 08:42): on PostgreSQL a claim
  and a batch's sent outcomes, markers and audit records are each one statement that
  commits on its own (one round trip instead of four and five; RESULTS "Fifteenth pass"
  of the fleet section has the profile), queueing is one `INSERT ... ON CONFLICT DO
  NOTHING` per 500 rows, and on SQLite a batch's outcomes go in the commit's trip.
  Alternating with the code before, 5,000 mails, 2 connections, no PIPELINING: PostgreSQL
  4.87 against 5.15 s (median of six), SQLite 5.48 against 5.73 s. Full runs: PostgreSQL
  0.74 x with 2 connections (0.73 at 10:37 with the claim and outcome change alone, 0.69 at
  08:42 without), 0.85 x with 1; SQLite 0.80 x (0.799: missed by a hair) and 0.88 x; with
  PIPELINING all met (1.03 to 1.50 x). In slow hours the outbox loses more than the bare
  loop: it does more per mail in the same lockstep of one command and one reply, and the
  sink, the outbox and PostgreSQL wait for each other's turn on the 2 cores.
- after that run: the SMTP session waited for each reply inside a timer of its own
  (`asyncio.timeout`: set and cancelled four times per message without PIPELINING, 8 us
  each here against 0.4 us for the wait itself); now one timer per session, moved on only
  when it fires, each reply still waited for `smtp.timeout` at most (a test: three replies
  0.25 s apart under a 0.4 s timeout pass, a fourth that never comes times out).
  Alternating, 5,000 mails, 1 connection, SQLite, nine pairs: the outbox's CPU 4.17
  against 4.58 s (medians; lower in 8 of 9 pairs), the time no different beyond the
  noise (8.87 against 8.90 s).
- eighteenth pass of issue 15 (2026-12-06 evening; the fleet section's "Eighteenth pass"
  has the profile): a claim reads its channel's due items through the index on (status,
  channel, next_attempt_at, id) in the order it takes them (PostgreSQL read and sorted
  every due item per claim: 2.5 -> 1.0 ms, 6.4 -> 3.5 ms at the median in the
  benchmark), PostgreSQL queues a call's items in one statement with one array per
  column and writes a batch's outcomes through the statement's driver form. The column
  "s waiting for a CPU" is new: the time the sending process and the sink were runnable
  while both cores were taken (schedstat); `--sink-nice` runs the sinks at a niceness
  (a diagnostic).
- this machine's vCPUs are shared (other benchmarks ran meanwhile): single runs
  vary widely; the table keeps every run, the ratios use medians; user CPU varies far less
  than time.
- twenty-fourth pass of issue 15 (2026-12-07; the fleet section's "Twenty-fourth pass" has
  the measurements): a batch's `transmitting` markers are written again when 5 are left
  (`MARK_AGAIN`), not 10: one recorder write per 15 messages of a connection, still at most
  20 marked ahead. The run after that change (10:55 to 11:07 UTC) gave 0.87 / 0.75 x
  (SQLite) and 0.85 / 0.77 x (PostgreSQL) without PIPELINING; the run before it, from
  09:56 on the same machine, 0.90 / 0.78 x and 0.88 / 0.75 x, and 1.40 / 0.97 x and
  1.32 / 0.92 x with PIPELINING.
- twenty-fifth pass of issue 15 (2026-12-07 afternoon; the fleet section's "Twenty-fifth
  pass" has the census of the event loop's stalls): queueing goes 200 notifications per
  transaction instead of 1,000 and SQLite's INSERT is the driver's own statement, 100 rows
  each. The table above is the run after both changes (13:18 to 13:40 UTC, the machine in
  a slow hour: the bare loop 16.12 s with 1 connection against 6.82 s at 11:07); the runs
  of the same day without PIPELINING, 1 / 2 connections: 12:00 (before) 0.94 / 0.84 x on
  SQLite and 0.97 / 0.76 x on PostgreSQL; 12:42 (200 per transaction) 0.91 / 0.80 x
  (0.797) and 0.95 / 0.86 x; 13:18 0.98 / 0.82 x and 1.01 / 0.72 x.
- twenty-sixth pass of issue 15 (2026-12-07 evening): on SQLite a transaction of one
  statement (a claim, a batch's markers) commits in the trip that runs the statement, one
  trip to SQLite's thread instead of two (`COMMIT_WITH`, `core/store/sqlite.py`). The
  table above is the run after it, in a sequence of every benchmark.
"""
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


def run_queue_seconds(pid: int | str = "self") -> float:
    """Seconds the threads of a process (this one by default) have spent runnable but
    waiting for a CPU (/proc/PID/task/*/schedstat, its second field): on a machine whose
    cores are all taken, the time a process would have run had one been free."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return total / 1e9


def cpu_split(before: resource.struct_rusage) -> dict[str, float]:
    """CPU seconds in user space and in the kernel (system calls) since ``before``."""
    now = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "user_seconds": now.ru_utime - before.ru_utime,
        "sys_seconds": now.ru_stime - before.ru_stime,
    }


def recipient(i: int) -> str:
    return f"contact{i}@customer{i % 97}.example.org"


def compose(i: int, text: str, html: str) -> bytes:
    """The message as the outbox sends it (``notify.mime``)."""
    return mime.compose(
        key=f"bench:{i}",
        sender=SENDER,
        sender_name="tgops",
        recipient=recipient(i),
        name=f"Contact {i}",
        subject=SUBJECT,
        date=utcnow(),
        text=text,
        html=html,
    )


def compose_stdlib(i: int, text: str, html: str) -> bytes:
    """The same message put together with ``EmailMessage``, as a hand-written loop would."""
    message = EmailMessage(policy=SMTP)
    message["Subject"] = SUBJECT
    message["From"] = formataddr(("tgops", SENDER))
    message["To"] = formataddr((f"Contact {i}", recipient(i)))
    message["Date"] = format_datetime(utcnow())
    message["Message-ID"] = mime.message_id(f"bench:{i}", SENDER)
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    return message.as_bytes()


# -- children ------------------------------------------------------------------------------


async def child_bare(
    port: int, count: int, batch: int, parallel: int, *, prebuilt: bool
) -> dict[str, Any]:
    rendered = Renderer().email("hotfix", {"name": "Contact", **VARS})
    data = [compose(i, rendered.text, rendered.html) for i in range(count)] if prebuilt else []
    batches = [range(first, min(count, first + batch)) for first in range(0, count, batch)]
    sent = 0

    async def connection(share: list[range]) -> None:
        nonlocal sent
        for numbers in share:
            client = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=port, start_tls=False, local_hostname="bench", timeout=30
            )
            await client.connect()
            for i in numbers:
                body = data[i] if prebuilt else compose_stdlib(i, rendered.text, rendered.html)
                await client.sendmail(SENDER, [recipient(i)], body)
                sent += 1
            await client.quit()

    start_rss = rss_kib()
    started = time.perf_counter()
    cpu = time.process_time()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    waited = run_queue_seconds()
    async with asyncio.TaskGroup() as group:
        for lane in range(parallel):
            group.create_task(connection(batches[lane::parallel]))
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu,
        **cpu_split(usage),
        "run_queue_seconds": run_queue_seconds() - waited,
        "sent": sent,
        "connections": len(batches),
        "rss_start_kib": start_rss,
        "rss_end_kib": rss_kib(),
        "vm_hwm_kib": rss_kib("VmHWM"),
    }


async def child_outbox(
    port: int, count: int, batch: int, parallel: int, database: str, *, service_gc: bool = True
) -> dict[str, Any]:
    if database.startswith("postgresql"):
        # a fresh schema: every run queues the same keys (imported here: bench.common
        # brings the whole service, which would weigh on the RSS figures of every run)
        from bench.common import reset_postgres  # noqa: PLC0415

        await reset_postgres(database)
    async with Store(database) as store:
        smtp = SmtpSettings(
            host="127.0.0.1", port=port, sender=SENDER, timeout=30.0, connections=parallel
        )
        channel = EmailChannel(
            smtp,
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
        if service_gc:
            # as `tgops serve` runs the notifier (bot.service): what start-up made frozen,
            # the youngest generation collected after core.heap.GC_YOUNG new objects
            thresholds = heap.settle_start_up()
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
        cpu = time.process_time()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        waited = run_queue_seconds()
        worker = asyncio.create_task(outbox.run(), name="bench-outbox")
        queued = len(await outbox.put(*notes))
        put_seconds = time.perf_counter() - started
        async with asyncio.timeout(3600):
            await done.wait()
        seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu
        split = cpu_split(usage)
        waited = run_queue_seconds() - waited
        samples["rss_end_kib"] = rss_kib()
        samples["vm_hwm_kib"] = rss_kib("VmHWM")  # before the checks below read everything
        if service_gc:
            heap.restore(thresholds)
        await outbox.stop(10.0)
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        rows = await store.outbox(statuses=["sent"], limit=count + 1)
        audits = await store.audit_log(limit=count + 1)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        **split,
        "run_queue_seconds": waited,
        "put_seconds": put_seconds,
        "queued": queued,
        "sent": counts["sent"],
        "failed": counts["failed"],
        "rows_sent": len(rows),
        "audit_records": len(audits),
        **samples,
    }


class StallCensus:
    """(diagnostic, ``--stalls``) Every callback of the event loop timed, wall and the
    thread's CPU; those over ``STALL_S`` summed by what they ran for (a task's chain of
    awaited coroutines, or the callback's name) and printed to stderr at the end: what
    held the loop while SMTP replies waited (bench/RESULTS.md, "Twenty-fifth pass")."""

    STALL_S = 0.0002

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}
        self._original = asyncio.events.Handle._run

    def __enter__(self) -> StallCensus:
        original, sums, stall = self._original, self.sums, self.STALL_S

        def timed(handle: asyncio.events.Handle) -> None:
            wall, cpu = time.perf_counter(), time.thread_time()
            original(handle)
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            if wall > stall:
                entry = sums.setdefault(StallCensus.what(handle), [0, 0.0, 0.0, 0, 0.0])
                entry[0] += 1
                entry[1] += wall
                entry[2] += cpu
                if wall > 0.001:
                    entry[3] += 1
                    entry[4] += wall

        asyncio.events.Handle._run = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.events.Handle._run = self._original  # type: ignore[method-assign]

    @staticmethod
    def what(handle: asyncio.events.Handle) -> str:
        callback = handle._callback  # type: ignore[attr-defined]
        task = getattr(callback, "__self__", None)
        if not isinstance(task, asyncio.Task):
            return str(getattr(callback, "__qualname__", repr(callback)))[:80]
        chain: list[str] = []
        awaited: Any = task.get_coro()
        while awaited is not None and len(chain) < 6:
            chain.append(getattr(awaited, "__qualname__", type(awaited).__name__))
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        return f"task {task.get_name()}: {' / '.join(chain)}"

    def report(self) -> str:
        lines = ["steps  wall ms   cpu ms  >1ms  wall ms  what"]
        for what, (steps, wall, cpu, long, long_wall) in sorted(
            self.sums.items(), key=lambda item: -item[1][1]
        )[:25]:
            lines.append(
                f"{steps:5.0f} {wall * 1000:8.1f} {cpu * 1000:8.1f} {long:5.0f} "
                f"{long_wall * 1000:8.1f}  {what}"
            )
        return "\n".join(lines)


def child_main(args: argparse.Namespace) -> None:
    parallel = int(args.parallel)
    census = StallCensus() if args.stalls else contextlib.nullcontext()
    if args.child == "outbox":
        with tempfile.TemporaryDirectory(prefix="tgops-bench-") as tmp:
            database = args.database or f"sqlite+aiosqlite:///{tmp}/bench.db"
            with census:
                result = asyncio.run(
                    child_outbox(
                        args.port,
                        args.count,
                        args.batch,
                        parallel,
                        database,
                        service_gc=not args.default_gc,
                    )
                )
    else:
        bare = child_bare(
            args.port, args.count, args.batch, parallel, prebuilt=args.child == "bare"
        )
        with census:
            result = asyncio.run(bare)
    print(json.dumps(result))
    if isinstance(census, StallCensus):
        print(census.report(), file=sys.stderr)


# -- parent --------------------------------------------------------------------------------


def run_child(
    kind: str, port: int, count: int, batch: int, parallel: int, *, database: str
) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--port", str(port), "--count", str(count),
         "--batch", str(batch), "--parallel", str(parallel)]
        + (["--database", database] if database else []),
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
            skipping = line.strip() == HEADING or line.startswith("## E-mail")
        if not skipping:
            kept.append(line)
    results.write_text("".join(kept).rstrip("\n") + "\n\n" + text)
    return results


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f}"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=100, help="messages per connection")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--parallel", default="1,2", help="connections at once, per variant (comma list)"
    )
    parser.add_argument("--child", choices=["bare", "bare+compose", "outbox"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--database", default="", help="(child) the outbox's store URL")
    parser.add_argument(
        "--servers",
        choices=["plain", "pipelining", "both"],
        default="both",
        help="the sink as aiosmtpd is (no PIPELINING), offering PIPELINING, or each in turn",
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=10.0,
        help="also run bare loop and outbox against sinks this far away (0: not)",
    )
    parser.add_argument("--latency-count", type=int, default=300, help="mails in those runs")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument(
        "--sink-nice",
        type=int,
        default=0,
        help="(diagnostic) run the sinks at this niceness, e.g. -10: the server gets a CPU "
        "first, as a server on a machine of its own would have one (root for < 0)",
    )
    parser.add_argument(
        "--stalls",
        action="store_true",
        help="(child, diagnostic) time every callback of the event loop; print those over "
        "0.2 ms, summed by what they ran for, to stderr",
    )
    parser.add_argument(
        "--default-gc",
        action="store_true",
        help="(child, diagnostic) the outbox with CPython's collector settings, not the service's",
    )
    return parser.parse_args()


def main() -> None:
    args = arguments()
    if args.child:
        child_main(args)
        return
    # the parent only: a child (the measured process) does not load the fleet helpers
    from bench.common import postgres_cpu, process_cpu  # noqa: PLC0415

    lanes = [int(p) for p in args.parallel.split(",")]
    servers = {"plain": [False], "pipelining": [True], "both": [False, True]}[args.servers]
    postgres = os.environ.get("TGOPS_TEST_DATABASE_URL")
    stores = {"sqlite": ""} | ({"postgresql": postgres} if postgres else {})
    variants: list[Variant] = []
    for pipelining in servers:
        for p in lanes:
            variants += [("bare", p, pipelining, "")]
            if p == 1 and not pipelining:
                variants += [("bare+compose", 1, pipelining, "")]
            variants += [("outbox", p, pipelining, store) for store in stores]

    sinks = {pipelining: start_sink(pipelining, nice=args.sink_nice) for pipelining in servers}
    ports = {pipelining: port for pipelining, (_, port) in sinks.items()}
    far = {
        pipelining: start_sink(pipelining, args.latency_ms, nice=args.sink_nice)
        for pipelining in servers
    }
    load = os.getloadavg()
    results: dict[Variant, list[dict[str, Any]]] = {v: [] for v in variants}
    distant: dict[tuple[str, bool], list[float]] = {
        (kind, pipelining): [] for pipelining in servers for kind in ("bare", "outbox")
    }
    try:
        for run in range(args.runs):
            for (kind, lanes_, pipelining, store), found in results.items():
                sink = sinks[pipelining][0]
                sink_before, postgres_before = process_cpu(sink.pid), postgres_cpu()
                sink_waited = run_queue_seconds(sink.pid)
                result = run_child(
                    kind,
                    ports[pipelining],
                    args.count,
                    args.batch,
                    lanes_,
                    database=stores.get(store, ""),
                )
                result["sink_cpu_seconds"] = process_cpu(sink.pid) - sink_before
                result["sink_run_queue_seconds"] = run_queue_seconds(sink.pid) - sink_waited
                result["postgres_cpu_seconds"] = postgres_cpu() - postgres_before
                found.append(result)
                offer = " (server offers PIPELINING)" if pipelining else ""
                print(f"run {run + 1} {kind} {store} x{lanes_}{offer}: {result}", flush=True)
            if not args.latency_ms:
                continue
            for (kind, pipelining), seconds in distant.items():
                port = far[pipelining][1]
                far_run = run_child(kind, port, args.latency_count, args.batch, 1, database="")
                seconds.append(far_run["seconds"])
                print(f"run {run + 1} {kind} {args.latency_ms} ms away: {far_run}", flush=True)
    finally:
        for sink, _ in [*sinks.values(), *far.values()]:
            sink.terminate()
            sink.wait(10)
    text = report(args, results, load, far=far_report(args, distant))
    print(text)
    if not args.no_write:
        print(f"written to {write_results(text)}")


def start_sink(
    pipelining: bool, delay_ms: float = 0.0, *, nice: int = 0
) -> tuple[subprocess.Popen[str], int]:
    """An SMTP sink in its own process and its port: as aiosmtpd is or offering
    PIPELINING, its replies held back ``delay_ms`` (a server that far away), run at
    ``nice`` (negative: before the other processes when they want the same CPU)."""
    sink = subprocess.Popen(
        (["nice", "-n", str(nice)] if nice else [])
        + [sys.executable, "-m", "tests.smtp_server", "0", "--reply-delay", str(delay_ms)]
        + (["--pipelining"] if pipelining else []),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sink.stdout is not None
    return sink, int(sink.stdout.readline())


def far_report(args: argparse.Namespace, distant: dict[tuple[str, bool], list[float]]) -> str:
    """The runs against a server whose replies take ``--latency-ms`` to come back."""
    if not args.latency_ms or not any(distant.values()):
        return ""
    rows = "\n".join(
        f"| {kind} | {'yes' if offer else 'no'} | {statistics.median(seconds):.2f} | "
        f"{statistics.median(seconds) / args.latency_count * 1000:.1f} | "
        f"{', '.join(f'{x:.2f}' for x in seconds)} |"
        for (kind, offer), seconds in distant.items()
    )
    return f"""
Over a round trip of {args.latency_ms:g} ms (the sink holds every reply back that
long, as a server that far away; several replies in flight wait together):
{args.latency_count} mails, batches of {args.batch}, 1 connection, the outbox on SQLite,
{args.runs} runs each.

| path | server offers PIPELINING | seconds (median) | ms per mail | runs |
|---|---|---|---|---|
{rows}

"""


def report(
    args: argparse.Namespace,
    results: dict[Variant, list[dict[str, Any]]],
    load: tuple[float, float, float],
    *,
    far: str,
) -> str:
    def median(variant: Variant, field: str = "seconds") -> float:
        return float(statistics.median(r[field] for r in results[variant]))

    def runs(variant: Variant) -> str:
        return ", ".join(f"{r['seconds']:.2f}" for r in results[variant])

    labels = {
        "bare": "bare aiosmtplib loop, messages serialized beforehand",
        "bare+compose": "bare aiosmtplib loop, composing each with `EmailMessage`",
        "outbox": "outbox (store first, then worker; templates per message)",
    }

    def row(variant: Variant) -> str:
        kind, lanes, offer, store = variant
        cells = [
            f"{labels[kind]}{f' on {store}' if store else ''}",
            "yes" if offer else "no",
            str(lanes),
            f"{median(variant):.2f}",
            f"{args.count / median(variant):.0f}",
            runs(variant),
            f"{median(variant, 'user_seconds'):.2f} + {median(variant, 'sys_seconds'):.2f}",
            f"{median(variant, 'sink_cpu_seconds'):.2f}",
            f"{median(variant, 'postgres_cpu_seconds'):.2f}",
            f"{median(variant, 'run_queue_seconds'):.2f} / "
            f"{median(variant, 'sink_run_queue_seconds'):.2f}",
        ]
        return "| " + " | ".join("-" if cell == "0.00" else cell for cell in cells) + " |"

    table = "\n".join(row(v) for v in results)
    verdicts = []
    for kind, lanes, offer, store in results:
        if kind != "outbox":
            continue
        ratio = median(("bare", lanes, offer, "")) / median(("outbox", lanes, offer, store))
        target = TARGETS.get(lanes, 0.8)
        verdict = "met" if ratio >= target else "NOT met"
        server = "a server offering PIPELINING" if offer else "aiosmtpd as it is (no PIPELINING)"
        verdicts.append(
            f"- throughput outbox on {store} vs bare loop, {lanes} connection(s) at once, "
            f"{server}: **{ratio:.2f} x** (target >= {target}) — {verdict}"
        )
    if ("bare+compose", 1, False, "") in results:
        ratio = median(("bare+compose", 1, False, "")) / median(("outbox", 1, False, "sqlite"))
        verdicts.append(
            f"- throughput outbox vs bare loop composing with `EmailMessage`: {ratio:.2f} x"
        )
    outbox = [v for v in results if v[0] == "outbox"]
    first = outbox[0]
    last = results[first][-1]
    put = median(first, "put_seconds")
    ok = all(r["sent"] == args.count for rs in results.values() for r in rs) and all(
        r["rows_sent"] == args.count and r["audit_records"] >= args.count
        for v in outbox
        for r in results[v]
    )
    size = len(compose(0, "x" * 900, "x" * 1500)) // 100 * 100
    uname = " ".join(platform.uname())
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    verdict_lines = "\n".join(verdicts)
    nice = (
        f"\n- the sinks ran at niceness {args.sink_nice} (`--sink-nice`, a diagnostic): "
        "before the other processes whenever they wanted the same CPU"
        if args.sink_nice
        else ""
    )
    return f"""{HEADING}

`.venv/bin/python bench/mail.py` ({args.runs} runs, medians); {now}

- machine: `{uname}`, nproc {os.cpu_count()}, Python {platform.python_version()};
  load average at the start {load[0]:.2f}, at the end {os.getloadavg()[0]:.2f} (other
  work shared the machine)
- {args.count} hotfix e-mails (text + HTML, ~{size} bytes) to an aiosmtpd sink in its own
  process on 127.0.0.1 (accepts and discards); {math.ceil(args.count / args.batch)}
  connections of {args.batch} messages in every variant, one or more at once; each variant
  in a fresh process; every message accepted and (outbox) recorded: {"yes" if ok else "NO"}{nice}
- waiting for a CPU: the time the sending process (outbox or bare loop) and the sink were
  runnable while both cores were taken (/proc/PID/task/*/schedstat)

| path | server offers PIPELINING | connections at once | seconds (median) | mails/s | runs \
| CPU s, user + system (medians) | CPU s of the SMTP sink | CPU s of PostgreSQL \
| s waiting for a CPU: sender / sink |
|---|---|---|---|---|---|---|---|---|---|
{table}

{verdict_lines}
- of the outbox time ({first[1]} connection), queueing the {args.count} items
  (`Outbox.put`, {PUT_CHUNK} per transaction): {put:.2f} s
- RSS of the outbox process ({first[1]} connection, last run): start
  {mib(last["rss_start_kib"])} MiB, half sent {mib(last["rss_middle_kib"])} MiB, end
  {mib(last["rss_end_kib"])} MiB; peak (VmHWM) {mib(last["vm_hwm_kib"])} MiB (the bare loop
  with all {args.count} messages prebuilt: peak
  {mib(results[("bare", first[1], first[2], "")][-1]["vm_hwm_kib"])} MiB)
{far}{NOTE}"""


if __name__ == "__main__":
    main()
