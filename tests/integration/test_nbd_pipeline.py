"""The server under a pipelining client: order, back-pressure, violations, shutdown.

A small raw NBD client on 127.0.0.1 sends thousands of requests without
waiting, so the server receives many per read, pauses reading when its queue
is full and must still execute them, and call the tracker, strictly in order.
"""

from __future__ import annotations

import asyncio
import errno
import random
import struct
from pathlib import Path

import pytest
from helpers import scaled

from cdp.nbd import spec as p
from cdp.nbd.server import QUEUE_BYTES, NbdServer

SIZE = 4 * 1024 * 1024


class OrderTracker:
    """Records every hook call; yields to the loop (and sometimes sleeps) to shake the order."""

    def __init__(self, image: Path) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.image = image
        self.rng = random.Random(3)

    async def before_change(self, offset: int, length: int) -> None:
        self.calls.append(("before", offset, length))
        if self.rng.random() < 0.05:
            await asyncio.sleep(0.001)

    def changed(self, offset: int, length: int) -> None:
        self.calls.append(("changed", offset, length))

    async def flushed(self) -> None:
        self.calls.append(("flushed", 0, 0))


async def handshake(port: int, structured: bool = False) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await reader.readexactly(18) == b"NBDMAGICIHAVEOPT\x00\x03"
    out = struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES)
    if structured:
        out += struct.pack(">QII", p.IHAVEOPT, p.OPT_STRUCTURED_REPLY, 0)
    out += struct.pack(">QIII", p.IHAVEOPT, p.OPT_EXPORT_NAME, 0, 0)[:16]  # EXPORT_NAME "" (empty)
    writer.write(out)
    if structured:
        await reader.readexactly(20)
    size, _ = struct.unpack(">QH", await reader.readexactly(10))
    assert size == SIZE
    return reader, writer



async def _within(coro, seconds: float):  # type: ignore[no-untyped-def]
    async with asyncio.timeout(seconds):
        return await coro


def request(cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, cmd, cookie, offset, length)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as fh:
        fh.truncate(SIZE)
    return path


def test_pipelined_writes_run_in_order_with_back_pressure(image: Path) -> None:
    rng = random.Random(42)
    count = 1500
    writes = []
    for i in range(count):
        length = rng.choice([512, 4096, 8192, 65536])
        offset = rng.randrange(0, SIZE - length, 512) if i % 3 else rng.choice([0, 4096])  # overlaps
        writes.append((offset, bytes([i % 251 + 1]) * length))
    assert sum(len(d) for _, d in writes) > 2 * QUEUE_BYTES  # enough to make the server pause reading
    tracker = OrderTracker(image)

    async def main() -> list[tuple[int, int]]:
        async with NbdServer(image, export="", tracker=tracker, inline_max=8192) as server:
            assert server.tcp_port is not None
            reader, writer = await handshake(server.tcp_port)
            for i, (offset, data) in enumerate(writes):
                writer.write(request(p.CMD_WRITE, i, offset, len(data)) + data)
            writer.write(request(p.CMD_FLUSH, count) + request(p.CMD_DISC, count + 1))
            replies = []
            for _ in range(count + 1):
                magic, err, cookie = struct.unpack(">IIQ", await reader.readexactly(16))
                assert magic == p.SIMPLE_REPLY_MAGIC
                replies.append((cookie, err))
            assert await reader.read() == b""  # DISC: the server closed
            writer.close()
            return replies

    replies = asyncio.run(_within(main(), scaled(60)))
    assert sorted(replies) == [(i, 0) for i in range(count + 1)]
    assert replies[-1] == (count, 0)  # the flush came last: everything before it was answered
    expected_calls = []
    for offset, data in writes:
        expected_calls += [("before", offset, len(data)), ("changed", offset, len(data))]
    assert tracker.calls == [*expected_calls, ("flushed", 0, 0)]
    model = bytearray(SIZE)
    for offset, data in writes:
        model[offset:offset + len(data)] = data
    assert image.read_bytes() == bytes(model)


class PayloadTracker(OrderTracker):
    """Also takes a WRITE with its payload (WriteTracker)."""

    def wrote(self, offset: int, data: bytes) -> None:
        self.calls.append(("wrote", offset, len(data)))


def test_writes_run_on_the_loop_hand_over_their_payload_the_others_are_read_back(
        image: Path) -> None:
    """Only a write with no await between its pwrite and the hook may hand over its payload:
    one run in a worker thread (large, or FUA) could have been overtaken by another
    connection's write to the same blocks, so the tracker must read the image instead."""
    writes = [(0, 4096, 0), (8192, 65536, 0), (4096, 4096, p.CMD_FLAG_FUA), (0, 8192, 0)]
    tracker = PayloadTracker(image)

    async def main() -> None:
        async with NbdServer(image, export="", tracker=tracker, inline_max=8192) as server:
            assert server.tcp_port is not None
            reader, writer = await handshake(server.tcp_port)
            for i, (offset, length, flags) in enumerate(writes):
                writer.write(request(p.CMD_WRITE, i, offset, length, flags) + bytes([i + 1]) * length)
            for _ in writes:
                assert struct.unpack(">IIQ", await reader.readexactly(16))[1] == 0
            writer.close()

    asyncio.run(_within(main(), scaled(30)))
    assert [c for c in tracker.calls if c[0] != "before"] == [
        ("wrote", 0, 4096), ("changed", 8192, 65536), ("changed", 4096, 4096), ("wrote", 0, 8192)]


def test_oversized_write_is_answered_then_the_connection_closes(image: Path) -> None:
    async def main() -> None:
        async with NbdServer(image, export="") as server:
            assert server.tcp_port is not None
            reader, writer = await handshake(server.tcp_port, structured=True)
            writer.write(request(p.CMD_WRITE, 77, 0, p.MAX_REQUEST + 1))
            magic, flags, rtype, cookie, length = struct.unpack(">IHHQI", await reader.readexactly(20))
            assert (magic, flags, rtype, cookie) == (p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                                     p.REPLY_TYPE_ERROR, 77)
            err, _ = struct.unpack(">IH", (await reader.readexactly(length))[:6])
            assert err == errno.EOVERFLOW
            assert await reader.read() == b""
            writer.close()
            # The server is fine: a new client works.
            reader, writer = await handshake(server.tcp_port)
            writer.write(request(p.CMD_READ, 1, 0, 4096))
            assert struct.unpack(">IIQ", await reader.readexactly(16)) == (p.SIMPLE_REPLY_MAGIC, 0, 1)
            assert await reader.readexactly(4096) == bytes(4096)
            writer.close()

    asyncio.run(_within(main(), scaled(30)))


def test_close_with_idle_and_half_sent_clients(image: Path) -> None:
    async def main() -> None:
        server = NbdServer(image, export="")
        await server.start()
        assert server.tcp_port is not None
        _, idle = await handshake(server.tcp_port)
        reader, half = await handshake(server.tcp_port)
        half.write(request(p.CMD_WRITE, 5, 0, 65536) + bytes(1000))  # payload cut short
        await half.drain()
        await asyncio.sleep(0.05)
        async with asyncio.timeout(scaled(10)):
            await server.close()
        assert await reader.read() == b""
        for w in (idle, half):
            w.close()
        assert image.read_bytes() == bytes(SIZE)  # the half-sent write never ran

    asyncio.run(_within(main(), scaled(30)))


def test_structured_reads_of_holes_and_data(image: Path) -> None:
    with open(image, "r+b") as fh:
        fh.seek(1 << 20)
        fh.write(b"\x5a" * 8192)

    async def main() -> None:
        async with NbdServer(image, export="") as server:
            assert server.tcp_port is not None
            reader, writer = await handshake(server.tcp_port, structured=True)
            writer.write(request(p.CMD_READ, 1, 0, 65536) + request(p.CMD_READ, 2, (1 << 20) + 4096, 4096,
                                                                     p.CMD_FLAG_DF))
            magic, flags, rtype, cookie, length = struct.unpack(">IHHQI", await reader.readexactly(20))
            assert (magic, flags, rtype, cookie, length) == (p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                                             p.REPLY_TYPE_OFFSET_HOLE, 1, 12)
            assert struct.unpack(">QI", await reader.readexactly(12)) == (0, 65536)
            magic, flags, rtype, cookie, length = struct.unpack(">IHHQI", await reader.readexactly(20))
            assert (rtype, cookie, length) == (p.REPLY_TYPE_OFFSET_DATA, 2, 8 + 4096)
            payload = await reader.readexactly(length)
            assert payload == struct.pack(">Q", (1 << 20) + 4096) + b"\x5a" * 4096
            writer.close()

    asyncio.run(_within(main(), scaled(30)))


def test_failing_hook_is_an_error_chunk_and_the_write_does_not_happen(image: Path) -> None:
    class Refusing:
        async def before_change(self, offset: int, length: int) -> None:
            if offset == 8192:
                raise OSError(errno.ENOSPC, "dirty map is full")

        def changed(self, offset: int, length: int) -> None:
            if offset == 16384:
                raise RuntimeError("capture failed")

        async def flushed(self) -> None:
            pass

    async def main() -> None:
        async with NbdServer(image, export="", tracker=Refusing()) as server:
            assert server.tcp_port is not None
            reader, writer = await handshake(server.tcp_port, structured=True)
            for cookie, offset in enumerate([0, 8192, 16384]):
                writer.write(request(p.CMD_WRITE, cookie, offset, 4096) + b"\x77" * 4096)
            # Success: a simple reply. Failures: ERROR chunks with the errno and a message.
            assert struct.unpack(">IIQ", await reader.readexactly(16)) == (p.SIMPLE_REPLY_MAGIC, 0, 0)
            for cookie, err, text in [(1, errno.ENOSPC, "dirty map is full"),
                                      (2, errno.EIO, "capture failed")]:
                magic, flags, rtype, got, length = struct.unpack(">IHHQI", await reader.readexactly(20))
                assert (magic, flags, rtype, got) == (p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                                      p.REPLY_TYPE_ERROR, cookie)
                payload = await reader.readexactly(length)
                code, mlen = struct.unpack_from(">IH", payload)
                assert code == err and text in payload[6:6 + mlen].decode()
            writer.close()

    asyncio.run(_within(main(), scaled(30)))
    data = image.read_bytes()
    assert data[:4096] == b"\x77" * 4096
    assert data[8192:12288] == bytes(4096)  # before_change refused: the file was not touched


class EarlyCutTracker(OrderTracker):
    """Also hears of a FLUSH before the fdatasync; notes whether the image was synced yet."""

    def flush_started(self) -> None:
        self.calls.append(("flush_started", 0, 0))


def test_a_flush_is_announced_after_every_earlier_write_and_before_flushed(image: Path) -> None:
    writes = [(i * 8192, bytes([i + 1]) * 4096) for i in range(40)]
    tracker = EarlyCutTracker(image)

    async def main() -> None:
        async with NbdServer(image, export="", tracker=tracker, inline_max=8192) as server:
            assert server.tcp_port is not None
            reader, writer = await handshake(server.tcp_port)
            for i, (offset, data) in enumerate(writes):
                writer.write(request(p.CMD_WRITE, i, offset, len(data)) + data)
            writer.write(request(p.CMD_FLUSH, 100))
            writer.write(request(p.CMD_WRITE, 101, 0, 512) + b"z" * 512)  # after the flush
            writer.write(request(p.CMD_DISC, 102))
            for _ in range(len(writes) + 2):
                _magic, err, _cookie = struct.unpack(">IIQ", await reader.readexactly(16))
                assert err == 0
            writer.close()

    asyncio.run(_within(main(), scaled(30)))
    expected = []
    for offset, data in writes:
        expected += [("before", offset, len(data)), ("changed", offset, len(data))]
    # every write before the FLUSH completed before it is announced; the one after comes after
    assert tracker.calls == [*expected, ("flush_started", 0, 0), ("flushed", 0, 0),
                             ("before", 0, 512), ("changed", 0, 512)]


class AheadRecorder(OrderTracker):
    """An AheadTracker: records which queued writes each write was offered to prepare."""

    def __init__(self, image: Path) -> None:
        super().__init__(image)
        self.ahead: list[tuple[tuple[int, int], list[tuple[int, int]]]] = []

    async def before_changes(self, offset: int, length: int, ahead) -> None:  # type: ignore[no-untyped-def]
        self.ahead.append(((offset, length), list(ahead)))
        await self.before_change(offset, length)


def test_a_write_offers_the_writes_queued_behind_it_to_the_tracker(image: Path) -> None:
    """Random writes sent back to back: each write's before_changes sees the writes read
    behind it (in order, none already done), so a tracker can make all their regions dirty
    in one sync; the writes still run, and reach the tracker, strictly in order."""
    rng = random.Random(8)
    writes = [(rng.randrange(0, SIZE - 65536, 4096), bytes([i + 1]) * 65536) for i in range(48)]
    tracker = AheadRecorder(image)

    async def main() -> None:
        async with NbdServer(image, export="", tracker=tracker, inline_max=8192) as server:
            assert server.tcp_port is not None
            reader, writer = await handshake(server.tcp_port)
            writer.write(b"".join(request(p.CMD_WRITE, i, off, len(d)) + d
                                  for i, (off, d) in enumerate(writes)))
            writer.write(request(p.CMD_DISC, 99))
            for _ in writes:
                assert struct.unpack(">IIQ", await reader.readexactly(16))[1] == 0
            writer.close()

    asyncio.run(_within(main(), scaled(30)))
    ranges = [(off, len(d)) for off, d in writes]
    assert [own for own, _ in tracker.ahead] == ranges
    for k, (_, ahead) in enumerate(tracker.ahead):
        assert ahead == ranges[k + 1:k + 1 + len(ahead)]  # the next writes, in order
    assert max(len(a) for _, a in tracker.ahead) >= 4, "no write ever saw the queue behind it"
