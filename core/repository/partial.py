"""A partial transfer in the content cache: written and hashed by worker threads.

``<sha256>.part`` grows while the event loop receives; a thread pool hashes, writes and
flushes the chunks in order, so SHA-256 costs no throughput where a second core is free.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import DownloadError

if TYPE_CHECKING:
    pass

CHUNK_SIZE = 1 << 20
"""Bytes per read from the network and per write to the file."""


class PartialFile:
    """``<sha256>.part`` being written, fed by the event loop one network chunk at a time.

    Three worker threads keep the loop free for the network: one hashes, one writes, and
    one ``fdatasync``s every ``flush_every`` bytes so that the final fsync is short and
    dirty pages never pile up. At most ``buffer`` bytes wait for the hasher or the writer
    (bounded memory); the loop is woken only when a full queue has drained to half.
    """

    def __init__(
        self,
        path: Path,
        size: int,
        *,
        package: str,
        buffer: int = 8 << 20,
        flush_every: int = 64 << 20,
    ) -> None:
        self.path = path
        self.size = size
        self.done = 0
        self._package = package
        self._limit = buffer
        self._flush_every = flush_every
        self._digest = hashlib.sha256()
        self._fd = -1
        self._lock = threading.Lock()
        self._queues: tuple[queue.SimpleQueue[bytes | None], ...] = ()
        self._queued = [0, 0]
        self._pending = [0, 0]
        self._waiting = False
        self._space = asyncio.Event()
        self._error: OSError | None = None
        self._unflushed = 0
        self._flush = threading.Event()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def open(self) -> int:
        """Open (or create) the partial file and hash what it holds; returns its length."""
        self._loop = asyncio.get_running_loop()
        self._fd, self._digest, self.done = await asyncio.to_thread(self._open)
        self._queues = (queue.SimpleQueue(), queue.SimpleQueue())
        self._threads = [
            threading.Thread(
                target=self._work, args=(0, self._hash), name="tgops-download-hash", daemon=True
            ),
            threading.Thread(
                target=self._work, args=(1, self._write), name="tgops-download-write", daemon=True
            ),
            threading.Thread(target=self._flusher, name="tgops-download-flush", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self.done

    def _open(self) -> tuple[int, Any, int]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            length = os.fstat(fd).st_size
            if length > self.size:
                os.ftruncate(fd, 0)
                length = 0
            digest = hashlib.sha256()
            done = 0
            while done < length:
                data = os.pread(fd, min(CHUNK_SIZE, length - done), done)
                if not data:
                    break
                digest.update(data)
                done += len(data)
            if done != length:
                os.ftruncate(fd, done)
            os.lseek(fd, done, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return fd, digest, done

    # -- worker threads ------------------------------------------------------------------

    def _hash(self, data: bytes) -> None:
        self._digest.update(data)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self._unflushed += len(data)
        if self._unflushed >= self._flush_every:
            self._unflushed = 0
            self._flush.set()

    def _work(self, index: int, process: Callable[[bytes], None]) -> None:
        source = self._queues[index]
        while (data := source.get()) is not None:
            if self._error is None:
                try:
                    process(data)
                except OSError as exc:
                    self._error = exc
            with self._lock:
                self._queued[index] -= len(data)
                self._pending[index] -= 1
                wake = self._waiting and (
                    self._error is not None
                    or not any(self._pending)
                    or max(self._queued) <= self._limit // 2
                )
                if wake:
                    self._waiting = False
            if wake:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._space.set)

    def _flusher(self) -> None:
        while True:
            self._flush.wait()
            self._flush.clear()
            if self._stopping:
                return
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                self._error = exc

    # -- the event loop's side -----------------------------------------------------------

    def _check(self) -> None:
        if self._error is not None:
            raise DownloadError(
                self._package,
                f"cannot write the cache file {self.path} ({self._error.strerror}); "
                "check free space and permissions in updates.cache_dir",
                transient=False,
            ) from self._error

    async def append(self, data: bytes) -> None:
        """Queue ``data`` for hashing and writing; waits while the queues are full."""
        while True:
            self._check()
            with self._lock:
                if max(self._queued) < self._limit:
                    for index, target in enumerate(self._queues):
                        self._queued[index] += len(data)
                        self._pending[index] += 1
                        target.put(data)
                    self.done += len(data)
                    return
                self._waiting = True
                self._space.clear()
            await self._space.wait()

    async def flush(self) -> None:
        """Wait until everything queued is hashed and written."""
        while True:
            self._check()
            with self._lock:
                if not any(self._pending):
                    return
                self._waiting = True
                self._space.clear()
            await self._space.wait()

    async def restart(self) -> None:
        """Start over from byte 0 (the server sent the whole file)."""
        await self.flush()
        await asyncio.to_thread(self._truncate)
        self.done = 0
        self._digest = hashlib.sha256()

    def _truncate(self) -> None:
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)

    async def finish(self) -> str:
        """Write everything queued, fsync, and return the SHA-256 of the whole file."""
        await self.flush()
        try:
            await asyncio.to_thread(os.fsync, self._fd)
        except OSError as exc:
            self._error = exc
            self._check()
        return self._digest.hexdigest()

    async def aclose(self) -> None:
        """Stop the workers after what is queued and close the file, even when cancelled."""
        if self._closed:
            return
        self._closed = True
        for target in self._queues:
            target.put(None)
        await asyncio.shield(asyncio.to_thread(self._join_and_close))

    def _join_and_close(self) -> None:
        for thread in self._threads[:2]:
            thread.join()
        self._stopping = True
        self._flush.set()
        for thread in self._threads[2:]:
            thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
