"""A partial transfer in the content cache: written and hashed by worker threads.

``<sha256>.part`` grows in one of two ways. Either the event loop receives the body and
hands it over chunk by chunk (``append``), and worker threads hash, write and flush the
chunks in order; or a worker thread moves the body from the connection's socket into the
file inside the kernel (``receive_from``: Linux ``splice`` through a pipe, the bytes never
copied into the process), and the hashing thread reads each piece back from the page cache
right behind it. Either way SHA-256 costs no throughput where a second core is free.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import queue
import select
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from core.errors import DownloadError

CHUNK_SIZE = 1 << 20
"""Bytes per read from the network and per write to the file."""

PIPE_SIZE = 1 << 20
"""Bytes the kernel moves per ``splice`` (the pipe between socket and file is this large
where the system allows; 64 KiB otherwise)."""

HASH_READ = 256 << 10
"""Bytes the hashing thread reads back from the page cache at a time (small enough to stay
in the CPU's cache between the read and the hash)."""

POLL_SLICE = 0.25
"""Seconds the receiving thread waits for data at a time before it looks whether it should
stop; also how often ``receive_from`` reports progress."""

SPLICE = hasattr(os, "splice")
"""Whether this system can move a socket's data into a file inside the kernel."""

_Piece = bytes | tuple[int, int]
"""What the worker threads are handed: data, or (offset, length) of bytes already in the
file (received by ``receive_from``; hashed only)."""
_Item = _Piece | None
"""A piece, or None to stop."""


_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
"""What ``splice`` answers for a socket or file system it cannot serve."""


class _NoSplice(Exception):
    """``splice`` cannot serve this socket or file; ``moved`` bytes went through anyway."""

    def __init__(self, moved: int) -> None:
        super().__init__(moved)
        self.moved = moved


class _FileError(Exception):
    """Writing the partial file failed inside the receiving thread (not the network)."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(cause)
        self.cause = cause


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
        self.received = 0
        """Bytes that came straight from a socket (``receive_from``), for the log."""
        self._package = package
        self._limit = buffer
        self._flush_every = flush_every
        self._digest = hashlib.sha256()
        self._fd = -1
        self._lock = threading.Lock()
        self._queues: tuple[queue.SimpleQueue[_Item], ...] = ()
        self._readback: bytearray | None = None
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

    def _hash(self, data: _Piece) -> None:
        if isinstance(data, bytes):
            self._digest.update(data)
            return
        offset, length = data  # received into the file already: read it back and hash it
        if self._readback is None:
            self._readback = bytearray(HASH_READ)
        view = memoryview(self._readback)
        while length > 0:
            got = os.preadv(self._fd, [view[: min(length, HASH_READ)]], offset)
            if got <= 0:
                raise OSError(errno.EIO, f"{self.path} is shorter than what was received")
            self._digest.update(view[:got])
            offset += got
            length -= got

    def _write(self, data: _Piece) -> None:
        assert isinstance(data, bytes)  # received pieces are queued for hashing only
        _write_all(self._fd, memoryview(data))
        self._unflushed += len(data)
        if self._unflushed >= self._flush_every:
            self._unflushed = 0
            self._flush.set()

    def _work(self, index: int, process: Callable[[_Piece], None]) -> None:
        source = self._queues[index]
        while (data := source.get()) is not None:
            if self._error is None:
                try:
                    process(data)
                except OSError as exc:
                    self._error = exc
            with self._lock:
                self._queued[index] -= len(data) if isinstance(data, bytes) else 0
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

    async def receive_from(
        self,
        sock: int,
        *,
        read_timeout: float,
        progress: Callable[[int, int], Awaitable[None]] | None = None,
        splice: bool = SPLICE,
    ) -> None:
        """Receive the rest of the file from the socket ``sock`` (a connection whose body is
        raw bytes, the headers already read) in a worker thread, the event loop free.

        With ``splice`` the kernel moves the bytes from the socket into the file through a
        pipe; where the file system cannot take them that way (or without ``splice``) the
        thread reads and writes them itself. The hashing thread reads each piece back from
        the page cache. Returns when the file is complete or the server closed the
        connection early (``done`` says how far it got). Raises ``TimeoutError`` after
        ``read_timeout`` seconds without data, ``OSError`` for a broken connection and
        ``DownloadError`` when the file cannot be written. ``progress(done, size)`` is
        awaited every ``POLL_SLICE`` seconds while bytes arrive. Cancelling stops the
        thread within ``POLL_SLICE``; what was received stays in the file.
        """
        await self.flush()  # the writer is idle and the file's position is at ``done``
        if self.done >= self.size:
            return
        loop = asyncio.get_running_loop()
        finished = asyncio.Event()
        stop = threading.Event()
        failure: list[BaseException] = []
        fd = os.dup(sock)  # closing the connection cannot hand the number to another file

        def run() -> None:
            try:
                self._move(fd, read_timeout, stop, splice)
            except BaseException as exc:  # handed to the event loop below
                failure.append(exc)
            finally:
                os.close(fd)
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                    loop.call_soon_threadsafe(finished.set)

        thread = threading.Thread(target=run, name="tgops-download-receive", daemon=True)
        thread.start()
        try:
            reported = -1
            while not finished.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_SLICE):
                        await finished.wait()
                if progress is not None and self.done != reported:
                    reported = self.done
                    await progress(self.done, self.size)
        finally:
            stop.set()
            if thread.is_alive():
                await asyncio.shield(asyncio.to_thread(thread.join))
        if failure:
            if isinstance(failure[0], _FileError):
                self._error = failure[0].cause
            else:
                raise failure[0]
        self._check()

    def _move(self, sock: int, read_timeout: float, stop: threading.Event, splice: bool) -> None:
        """The receiving thread: socket to file until ``size``, end of stream, or ``stop``."""
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        pipe = os.pipe() if splice else None
        if pipe is not None:
            with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep 64 KiB
                fcntl.fcntl(pipe[1], fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        buffer = memoryview(bytearray(PIPE_SIZE))
        quiet = 0.0
        try:
            while self.done < self.size and not stop.is_set():
                want = min(self.size - self.done, PIPE_SIZE)
                try:
                    if pipe is not None:
                        try:
                            moved = _splice_once(sock, pipe, self._fd, want, buffer)
                        except _NoSplice as refused:  # copy from now on
                            moved = refused.moved
                            for end in pipe:
                                os.close(end)
                            pipe = None
                            if not moved:
                                continue
                    else:
                        moved = _copy_once(sock, self._fd, buffer[:want])
                except BlockingIOError:
                    if quiet >= read_timeout:
                        raise TimeoutError(f"no data for {read_timeout:g}s") from None
                    started = time.monotonic()
                    poller.poll(max(1, int(min(POLL_SLICE, read_timeout - quiet) * 1000)))
                    quiet += time.monotonic() - started
                    continue
                if moved == 0:
                    return  # the server closed the connection: cut off, resumable
                quiet = 0.0
                with self._lock:
                    self._pending[0] += 1
                    self._queues[0].put((self.done, moved))
                self.done += moved
                self.received += moved
                self._unflushed += moved
                if self._unflushed >= self._flush_every:
                    self._unflushed = 0
                    self._flush.set()
        finally:
            if pipe is not None:
                for end in pipe:
                    os.close(end)

    async def restart(self) -> None:
        """Start over from byte 0 (the server sent the whole file)."""
        await self.flush()
        await asyncio.to_thread(self._truncate)
        self.done = 0
        self.received = 0
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


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _to_file(fd: int, data: memoryview) -> None:
    """``_write_all`` in the receiving thread: a failure is the file's, not the network's."""
    try:
        _write_all(fd, data)
    except OSError as exc:
        raise _FileError(exc) from exc


def _copy_once(sock: int, fd: int, buffer: memoryview) -> int:
    """Read what the socket has (up to ``len(buffer)``) and write it to ``fd``."""
    got = os.readv(sock, [buffer])  # BlockingIOError when nothing is there
    _to_file(fd, buffer[:got])
    return got


def _splice_once(sock: int, pipe: tuple[int, int], fd: int, want: int, buffer: memoryview) -> int:
    """Move what the socket has (up to ``want``) into ``fd`` through ``pipe``, in the kernel;
    returns the bytes moved (0 at the end of the stream).

    Raises ``_NoSplice`` when the socket or the file system does not take ``splice`` (bytes
    already in the pipe are then written through ``buffer``).
    """
    try:
        moved = os.splice(sock, pipe[1], want, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            raise _NoSplice(0) from exc
        raise
    left = moved
    while left:
        try:
            left -= os.splice(pipe[0], fd, left, flags=os.SPLICE_F_MOVE)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise _FileError(exc) from exc
            while left:  # what is in the pipe goes into the file by hand
                got = os.readv(pipe[0], [buffer[:left]])
                _to_file(fd, buffer[:got])
                left -= got
            raise _NoSplice(moved) from exc
    return moved
