"""A partial file receiving its body straight from a socket (``PartialFile.receive_from``),
with ``splice`` and without, against a real socket pair."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from core.errors import DownloadError
from core.repository.partial import SPLICE, PartialFile

SIZE = 5 * 1024 * 1024 + 777

MODES = [
    pytest.param(True, id="splice", marks=pytest.mark.skipif(not SPLICE, reason="no splice here")),
    pytest.param(False, id="copy"),
]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)  # as an event loop's transport leaves it
    theirs.setblocking(False)
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[PartialFile]:
    partial = PartialFile(tmp_path / "x.part", SIZE, package="tg-big 1.0")
    await partial.open()
    try:
        yield partial
    finally:
        await partial.aclose()


async def send(sock: socket.socket, data: bytes, pieces: int, pause: float) -> None:
    loop = asyncio.get_running_loop()
    step = -(-len(data) // pieces)
    for start in range(0, len(data), step):
        await loop.sock_sendall(sock, data[start : start + step])
        await asyncio.sleep(pause)


def receivers() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "tgops-download-receive"]


@pytest.mark.parametrize("splice", MODES)
async def test_the_whole_body_lands_hashed_with_progress(
    pair: tuple[socket.socket, socket.socket], sink: PartialFile, splice: bool
) -> None:
    ours, theirs = pair
    data = os.urandom(SIZE)
    seen: list[int] = []

    async def progress(done: int, total: int) -> None:
        assert total == SIZE
        seen.append(done)

    sender = asyncio.create_task(send(theirs, data, pieces=8, pause=0.3))
    async with asyncio.timeout(30):
        await sink.receive_from(ours.fileno(), read_timeout=5, progress=progress, splice=splice)
        await sender
    assert sink.done == SIZE
    assert await sink.finish() == hashlib.sha256(data).hexdigest()
    assert sink.path.read_bytes() == data
    assert seen == sorted(seen)
    assert len(seen) >= 2
    assert seen[-1] == SIZE
    assert receivers() == []


@pytest.mark.parametrize("splice", MODES)
async def test_what_arrives_before_the_peer_closes_is_kept(
    pair: tuple[socket.socket, socket.socket], sink: PartialFile, splice: bool
) -> None:
    ours, theirs = pair
    data = os.urandom(1_234_567)

    async def send_and_close() -> None:
        await send(theirs, data, pieces=3, pause=0.1)
        theirs.shutdown(socket.SHUT_WR)

    sender = asyncio.create_task(send_and_close())
    async with asyncio.timeout(30):
        await sink.receive_from(ours.fileno(), read_timeout=5, splice=splice)
        await sender
    assert sink.done == len(data)  # short: the caller reports the cut and resumes later
    assert await sink.finish() == hashlib.sha256(data).hexdigest()
    assert sink.path.read_bytes() == data


@pytest.mark.parametrize("splice", MODES)
async def test_a_silent_peer_times_out_and_what_arrived_stays(
    pair: tuple[socket.socket, socket.socket], sink: PartialFile, splice: bool
) -> None:
    ours, theirs = pair
    data = os.urandom(100_000)  # fits in the socket's buffer
    await send(theirs, data, pieces=1, pause=0)
    async with asyncio.timeout(30):
        with pytest.raises(TimeoutError, match=r"no data for 0.4s"):
            await sink.receive_from(ours.fileno(), read_timeout=0.4, splice=splice)
    assert sink.done == len(data)
    assert await sink.finish() == hashlib.sha256(data).hexdigest()
    assert receivers() == []


@pytest.mark.parametrize("splice", MODES)
async def test_cancelling_stops_the_receiving_thread(
    pair: tuple[socket.socket, socket.socket], sink: PartialFile, splice: bool
) -> None:
    ours, theirs = pair
    await send(theirs, os.urandom(100_000), pieces=1, pause=0)
    arrived = asyncio.Event()

    async def progress(done: int, _total: int) -> None:
        if done >= 100_000:
            arrived.set()

    receiving = asyncio.create_task(
        sink.receive_from(ours.fileno(), read_timeout=60, progress=progress, splice=splice)
    )
    async with asyncio.timeout(30):
        await arrived.wait()
        receiving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await receiving
    assert receivers() == []  # it ended with the call, not 60 s later
    assert sink.done == 100_000


@pytest.mark.parametrize("splice", MODES)
async def test_a_file_that_cannot_be_written_is_a_clear_error(
    pair: tuple[socket.socket, socket.socket], splice: bool
) -> None:
    # /dev/full takes no splice (the thread falls back to writing) and refuses every write
    ours, theirs = pair
    partial = PartialFile(Path("/dev/full"), SIZE, package="tg-big 1.0")
    await partial.open()
    try:
        await send(theirs, os.urandom(100_000), pieces=1, pause=0)
        async with asyncio.timeout(30):
            with pytest.raises(DownloadError, match="cannot write the cache file") as caught:
                await partial.receive_from(ours.fileno(), read_timeout=5, splice=splice)
        assert not caught.value.transient
    finally:
        await partial.aclose()
