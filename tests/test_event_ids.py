"""Event ids: the outbox's idempotency root, unique within a process and across processes."""

from __future__ import annotations

import os
import subprocess
import sys

from core.events import NodeStateChanged


def test_ids_differ_within_a_process_and_look_like_uuids() -> None:
    ids = [NodeStateChanged(node="n1", change="drained").id for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_another_process_and_a_forked_child_draw_other_ids() -> None:
    mine = NodeStateChanged(node="n1", change="drained").id
    code = "from core.events import NodeStateChanged as E; print(E(node='n', change='c').id)"
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert other[:16] != mine[:16]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one event, its id to the parent
        os.write(write, NodeStateChanged(node="n1", change="drained").id.encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    after = NodeStateChanged(node="n1", change="drained").id
    assert child[:16] != mine[:16]
    assert after[:16] == mine[:16] and after != mine
