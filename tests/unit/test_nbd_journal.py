"""The NBD tracker's persistent dirty map and write journal, driven without sockets."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import pytest

from cdp.blocks import Geometry
from cdp.tracker.capture import Captured, Resync
from cdp.tracker.dirtymap import DirtyMap
from cdp.tracker.journal import WriteJournal

BS = 64 * 1024
REGION = 4 * BS


def run(coro):
    return asyncio.run(coro)


# -- dirty map -------------------------------------------------------------------


def test_dirty_map_starts_all_dirty_without_a_file(tmp_path: Path) -> None:
    m = DirtyMap(tmp_path / "dirty", 10 * REGION, REGION)
    m.open()
    assert not m.trusted
    assert m.dirty_regions() == list(range(10))
    m.close()


def test_marks_are_durable_and_clears_persist(tmp_path: Path) -> None:
    path = tmp_path / "dirty"
    m = DirtyMap(path, 20 * REGION + 5, REGION)  # a partial last region
    m.open()
    m.clear(range(m.regions))
    run(m.mark([3, 7]))
    run(m.mark([3]))  # already set: no second sync
    assert m.syncs == 1
    m.close()
    again = DirtyMap(path, 20 * REGION + 5, REGION)
    again.open()
    assert again.trusted
    assert again.dirty_regions() == [3, 7]
    again.clear([3])
    again.close()
    third = DirtyMap(path, 20 * REGION + 5, REGION)
    third.open()
    assert third.dirty_regions() == [7]
    assert third.regions == 21


@pytest.mark.parametrize("size,region", [(20 * REGION, 2 * REGION), (21 * REGION, REGION)])
def test_a_map_of_other_geometry_is_not_trusted(tmp_path: Path, size: int, region: int) -> None:
    m = DirtyMap(tmp_path / "dirty", 20 * REGION, REGION)
    m.open()
    m.clear(range(m.regions))
    m.close()
    other = DirtyMap(tmp_path / "dirty", size, region)
    other.open()
    assert not other.trusted
    assert len(other.dirty_regions()) == other.regions


def test_regions_of_a_range(tmp_path: Path) -> None:
    m = DirtyMap(tmp_path / "dirty", 10 * REGION, REGION)
    assert list(m.regions_of(0, 1)) == [0]
    assert list(m.regions_of(REGION - 1, 2)) == [0, 1]
    assert list(m.regions_of(3 * REGION, 2 * REGION)) == [3, 4]
    assert list(m.regions_of(5, 0)) == []


def test_concurrent_marks_share_syncs(tmp_path: Path) -> None:
    m = DirtyMap(tmp_path / "dirty", 64 * REGION, REGION)
    m.open()
    m.clear(range(m.regions))

    async def main() -> None:
        await asyncio.gather(*(m.mark([r % 4]) for r in range(40)))

    run(main())
    assert m.dirty_regions() == [0, 1, 2, 3]
    assert m.syncs <= 2  # the first writer's sync, then one for everyone who waited


def test_writers_into_distinct_clean_regions_share_one_sync(tmp_path: Path) -> None:
    """Random writes: each of 16 requests in flight lands in its own clean region; the ones
    that arrive during a sync are made durable together by the next one."""
    m = DirtyMap(tmp_path / "dirty", 64 * REGION, REGION)
    m.open()
    m.clear(range(m.regions))

    async def main() -> None:
        await asyncio.gather(*(m.mark([r]) for r in range(16)))

    run(main())
    assert m.dirty_regions() == list(range(16))
    assert m.syncs <= 2


def test_a_mark_waits_for_the_sync_of_a_region_another_writer_is_marking(
        tmp_path: Path) -> None:
    """Two writers into one clean region: the second must not write (mark() must not return)
    before the first one's fdatasync made the bit durable; a crash in between would leave
    its write in a region the map on disk calls clean, never compared again."""
    import threading

    m = DirtyMap(tmp_path / "dirty", 8 * REGION, REGION)
    m.open()
    m.clear(range(m.regions))
    release = threading.Event()
    real = m._write_sync

    def slow_sync(chunk: bytes, offset: int) -> None:
        assert release.wait(10)
        real(chunk, offset)

    m._write_sync = slow_sync  # type: ignore[method-assign]

    async def main() -> None:
        first = asyncio.ensure_future(m.mark([3]))
        await asyncio.sleep(0.01)  # first is in its sync
        second = asyncio.ensure_future(m.mark([3]))
        await asyncio.sleep(0.05)
        assert not second.done(), "returned before the region was durable"
        assert not m.is_set(3)
        release.set()
        await asyncio.gather(first, second)
        assert m.is_set(3)

    run(main())
    m.close()
    again = DirtyMap(tmp_path / "dirty", 8 * REGION, REGION)
    again.open()
    assert again.dirty_regions() == [3]


# -- journal ---------------------------------------------------------------------


class Volume:
    """A file written the way the NBD server writes it: before_change, pwrite, changed."""

    def __init__(self, tmp_path: Path, blocks: int = 32, capture_memory: int = 64 << 20,
                 clean: bool = True, capture_disk: int = 0) -> None:
        self.path = tmp_path / "disk.raw"
        self.size = blocks * BS
        with open(self.path, "wb") as fh:
            fh.truncate(self.size)
        self.fd = os.open(self.path, os.O_RDWR)
        self.dirty = DirtyMap(tmp_path / "dirty", self.size, REGION)
        self.dirty.open()
        if clean:
            self.dirty.clear(range(self.dirty.regions))
        self.j = WriteJournal("v", Geometry(self.size, BS), self.fd, self.dirty,
                              capture_memory=capture_memory, epoch_interval=3600,
                              spill_dir=tmp_path / "spill", capture_disk=capture_disk)

    async def write(self, offset: int, data: bytes) -> None:
        await self.j.before_change(offset, len(data))
        os.pwrite(self.fd, data, offset)
        self.j.changed(offset, len(data))

    async def write_payload(self, offset: int, data: bytes) -> None:
        """As the server writes on its loop thread: the tracker gets the payload (wrote)."""
        await self.j.before_change(offset, len(data))
        os.pwrite(self.fd, data, offset)
        self.j.wrote(offset, data)

    def image(self) -> bytes:
        return os.pread(self.fd, self.size, 0)

    def blocks_of(self, image: bytes, blocks: list[int]) -> dict[int, bytes]:
        return {b: image[b * BS:(b + 1) * BS] for b in blocks}


async def _close_initial_resync(v: Volume) -> None:
    unit = await v.j.take(0)
    assert isinstance(unit, Resync)
    fin = asyncio.ensure_future(v.j.finish())
    await asyncio.sleep(0)
    v.j.cut()
    await fin
    v.j.unit_done(unit.seq, None)


def test_after_start_the_journal_resyncs_dirty_regions_then_captures(tmp_path: Path) -> None:
    async def main() -> None:
        v = Volume(tmp_path, clean=False)
        unit = await v.j.take(0)
        assert isinstance(unit, Resync) and unit.spans is None  # every region dirty: whole volume
        fin = asyncio.ensure_future(v.j.finish())
        await asyncio.sleep(0)
        await v.write(3 * BS + 100, b"x" * 10)  # while the resync reads: only noted
        assert v.j.mode == "tracking" and v.j.touched == {3}
        v.j.cut()
        _when, contents, _zeros = await fin
        assert contents == v.blocks_of(v.image(), [3])
        assert v.j.mode == "capture"

    run(main())


def test_a_cut_captures_the_state_at_that_instant(tmp_path: Path) -> None:
    async def main() -> None:
        v = Volume(tmp_path)
        await _close_initial_resync(v)
        await v.write(0, b"a" * BS)
        await v.write(BS + 10, b"b" * 100)  # a partial block: the whole block is captured
        await v.j.flushed()
        at_cut = v.image()
        await v.write(0, b"c" * BS)  # after the cut: must not leak into the sealed epoch
        unit = await v.j.take(0)
        assert isinstance(unit, Captured)
        assert unit.blocks == v.blocks_of(at_cut, [0, 1])
        assert unit.nbytes == 2 * BS
        assert v.j.open == v.blocks_of(v.image(), [0])

    run(main())


def test_a_write_with_its_payload_is_captured_from_it_and_only_its_edges_read_back(
        tmp_path: Path) -> None:
    async def main() -> None:
        v = Volume(tmp_path)
        await _close_initial_resync(v)
        one = bytes(range(256)) * (BS // 256)
        await v.write_payload(2 * BS, one)  # exactly one block
        assert v.j.open[2] is one  # kept as it came: no read, no copy
        # whole blocks 5..7, partial edges in blocks 4 and 8
        span = random.Random(5).randbytes(4 * BS)
        await v.j.before_change(4 * BS + 100, len(span))
        os.pwrite(v.fd, span, 4 * BS + 100)
        os.pwrite(v.fd, b"edge" * 8, 4 * BS)  # the edges are read from the image...
        os.pwrite(v.fd, b"late" * 8, 6 * BS)  # ...the whole blocks never are
        v.j.wrote(4 * BS + 100, span)
        img = v.image()
        assert v.j.open[4] == img[4 * BS:5 * BS] and v.j.open[4].startswith(b"edge")
        assert v.j.open[8] == img[8 * BS:9 * BS]
        for b in (5, 6, 7):
            assert v.j.open[b] == span[b * BS - 4 * BS - 100:(b + 1) * BS - 4 * BS - 100]
        assert v.j.open_bytes == 6 * BS
        # the last block, written whole up to the end of the volume; then a cut
        last = v.size // BS - 1
        await v.write_payload(last * BS - BS // 2, b"z" * (BS + BS // 2))
        await v.j.flushed()
        unit = await v.j.take(0)
        assert isinstance(unit, Captured)
        img = v.image()
        assert unit.blocks[last] == b"z" * BS
        assert unit.blocks[last - 1] == img[(last - 1) * BS:last * BS]
        assert unit.nbytes == 8 * BS

    run(main())


def test_sealed_epochs_merge_into_the_later_state(tmp_path: Path) -> None:
    async def main() -> None:
        v = Volume(tmp_path)
        await _close_initial_resync(v)
        rng = random.Random(5)
        for _ in range(5):
            for _ in range(4):
                await v.write(rng.randrange(v.size - 4096), rng.randbytes(4096))
            await v.j.flushed()
        at_last_cut = v.image()
        unit = await v.j.take(0)
        assert isinstance(unit, Captured)
        assert v.j.stats.merged == 4
        assert unit.blocks == v.blocks_of(at_last_cut, sorted(unit.blocks))
        assert await v.j.take(0) is None

    run(main())


def test_empty_flushes_cut_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        v = Volume(tmp_path)
        await _close_initial_resync(v)
        await v.j.flushed()
        await v.j.flushed()
        assert await v.j.take(0) is None

    run(main())


def test_over_budget_falls_back_to_tracking_dirty_regions(tmp_path: Path) -> None:
    async def main() -> None:
        v = Volume(tmp_path, blocks=64, capture_memory=3 * BS)
        await _close_initial_resync(v)
        await v.write(0, b"a" * BS)
        await v.j.flushed()
        await v.write(40 * BS, b"b" * 3 * BS)  # over budget: captured content is dropped
        assert v.j.mode == "tracking" and v.j.stats.fallbacks == 1
        assert v.j.sealed == [] and v.j.open == {}
        unit = await v.j.take(0)
        assert isinstance(unit, Resync)
        bpr = REGION // BS
        assert unit.spans == [(0, bpr), (40, bpr)]  # regions 0 and 10: where the writes went

    run(main())


def test_regions_clear_only_when_every_unit_over_them_is_acknowledged(tmp_path: Path) -> None:
    async def main() -> None:
        v = Volume(tmp_path)
        await _close_initial_resync(v)
        await v.write(0, b"a" * 10)  # region 0, unit A
        await v.j.flushed()
        a = await v.j.take(0)
        await v.write(REGION, b"b" * 10)  # region 1, unit B
        await v.j.flushed()
        b = await v.j.take(0)
        assert isinstance(a, Captured) and isinstance(b, Captured)
        await v.write(5, b"c")  # region 0 written again, in the open unit
        v.j.unit_done(a.seq, 7)
        v.j.unit_done(b.seq, 8)
        v.j.acked(8)
        assert set(v.j.cooling) == {1}  # region 1 is replicated; region 0 has newer writes
        v.j._cool(time.time() + v.j.hot_seconds)
        assert v.dirty.dirty_regions() == [0]
        await v.j.flushed()
        c = await v.j.take(0)
        assert isinstance(c, Captured)
        v.j.unit_done(c.seq, None)  # nothing differed from the replica
        v.j._cool(time.time() + v.j.hot_seconds)
        assert v.dirty.dirty_regions() == []

    run(main())


def test_requeue_forgets_captures_and_resyncs_dirty_regions(tmp_path: Path) -> None:
    async def main() -> None:
        v = Volume(tmp_path)
        await _close_initial_resync(v)
        await v.write(9 * BS, b"z" * 10)
        await v.j.flushed()
        v.j.requeue()
        unit = await v.j.take(0)
        assert isinstance(unit, Resync)
        assert unit.spans == [(8, 4)]
        v.j.requeue(everything=True)
        unit = await v.j.take(0)
        assert isinstance(unit, Resync) and unit.spans is None

    run(main())


def test_many_writes_during_a_resync_ask_for_another_pass(tmp_path: Path) -> None:
    async def main() -> None:
        v = Volume(tmp_path)
        v.j.pass_threshold = 2 * BS
        unit = await v.j.take(0)
        assert isinstance(unit, Resync)
        for b in (1, 2, 3):
            await v.write(b * BS, b"w")
        assert v.j.next_pass() == [1, 2, 3]
        assert v.j.next_pass() is None

    run(main())


def test_finish_after_a_quiet_interval_closes_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        v = Volume(tmp_path)
        v.j.epoch_interval = 0.0  # the last cut is older than the interval: cut right away
        unit = await v.j.take(0)
        assert isinstance(unit, Resync)
        async with asyncio.timeout(5):
            _when, contents, _zeros = await v.j.finish()
        assert contents == {} and v.j.mode == "capture"

    run(main())


def test_a_free_sender_cuts_the_open_epoch_without_waiting_for_a_flush(tmp_path: Path) -> None:
    async def main() -> None:
        v = Volume(tmp_path)
        await _close_initial_resync(v)
        assert await v.j.take(0.05) is None  # nothing written: nothing to take
        await v.write(2 * BS, b"q" * 512)
        async with asyncio.timeout(10):
            unit = await v.j.take(5)
        assert isinstance(unit, Captured)
        assert unit.blocks == v.blocks_of(v.image(), [2])
        assert v.j.open == {}

    run(main())


def test_a_flush_wakes_a_sender_waiting_out_the_batch_delay(tmp_path: Path) -> None:
    """The sender waits batch_delay after the first write before it cuts by itself; a FLUSH
    cut meanwhile hands it the sealed epoch at once (here batch_delay is an hour)."""
    async def main() -> None:
        v = Volume(tmp_path)
        v.j.batch_delay = 3600.0
        await _close_initial_resync(v)
        await v.write(2 * BS, b"q" * 512)
        taker = asyncio.ensure_future(v.j.take(3600))
        await asyncio.sleep(0.05)
        assert not taker.done()  # waiting for more writes to batch
        await v.write(5 * BS, b"r" * 512)
        v.j.flush_started()
        async with asyncio.timeout(30):
            unit = await taker
        assert isinstance(unit, Captured)
        assert unit.blocks == v.blocks_of(v.image(), [2, 5])
        await v.j.flushed()  # nothing written since: no second epoch
        assert v.j.sealed == [] and v.j.open == {}

    run(main())


def test_while_an_epoch_is_unacknowledged_the_open_epoch_grows_until_the_ack(tmp_path: Path) -> None:
    """Group commit: batch_delay alone does not cut while the sender's last epoch is in flight;
    the ack (or a FLUSH) does, and everything written meanwhile travels as one epoch."""
    async def main() -> None:
        v = Volume(tmp_path)
        v.j.batch_delay = 0.0
        await _close_initial_resync(v)
        unacked = [True]
        v.j.in_flight = lambda: unacked[0]
        await v.write(1 * BS, b"a" * 512)
        taker = asyncio.ensure_future(v.j.take(3600))
        await asyncio.sleep(0.05)
        await v.write(4 * BS, b"b" * 512)
        await asyncio.sleep(0.05)
        assert not taker.done() and v.j.stats.cuts == 1  # only the resync's closing cut
        unacked[0] = False
        v.j.acked(1)
        async with asyncio.timeout(30):
            unit = await taker
        assert isinstance(unit, Captured)
        assert unit.blocks == v.blocks_of(v.image(), [1, 4])
        # in flight again: a FLUSH still cuts at once
        unacked[0] = True
        await v.write(7 * BS, b"c" * 512)
        taker = asyncio.ensure_future(v.j.take(3600))
        await asyncio.sleep(0.05)
        assert not taker.done()
        v.j.flush_started()
        async with asyncio.timeout(30):
            unit = await taker
        assert isinstance(unit, Captured) and list(unit.blocks) == [7]

    run(main())


def test_a_consistency_group_cuts_every_member_at_one_instant(tmp_path: Path) -> None:
    async def main() -> None:
        a, b = Volume(tmp_path / "a"), Volume(tmp_path / "b")
        a.j.group = b.j.group = (a.j, b.j)
        for v in (a, b):
            await _close_initial_resync(v)
        await a.write(0, b"log record 1")
        await b.write(BS, b"data it points at")
        await a.j.flushed()  # the guest flushed disk a: disk b is cut at the same instant
        ua, ub = await a.j.take(0), await b.j.take(0)
        assert isinstance(ua, Captured) and isinstance(ub, Captured)
        assert ua.time == ub.time
        assert set(ub.blocks) == {1}

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run(main())


def test_a_hot_region_written_again_costs_no_sync(tmp_path: Path) -> None:
    async def main() -> None:
        v = Volume(tmp_path)
        await _close_initial_resync(v)
        await v.write(0, b"a")
        await v.j.flushed()
        u = await v.j.take(0)
        assert isinstance(u, Captured)
        v.j.unit_done(u.seq, 1)
        v.j.acked(1)
        syncs = v.dirty.syncs
        await v.write(10, b"b")  # replicated but still marked: no fdatasync on this write
        assert v.dirty.syncs == syncs and 0 not in v.j.cooling
        v.j.hot_max = 0
        await v.j.flushed()
        u = await v.j.take(0)
        assert isinstance(u, Captured)
        v.j.unit_done(u.seq, 2)
        v.j.acked(2)
        v.j._cool(time.time())  # over hot_max: cleared at once
        assert v.dirty.dirty_regions() == []

    run(main())


def test_over_memory_epochs_spill_to_the_local_log_and_come_back_in_order(tmp_path: Path) -> None:
    async def main() -> None:
        v = Volume(tmp_path, blocks=64, capture_memory=4 * BS, capture_disk=64 * BS)
        await _close_initial_resync(v)
        states = []
        rng = random.Random(3)
        for i in range(6):  # six cuts of three blocks each: 18 blocks, over 4 in memory
            for k in range(3):
                await v.write((i * 3 + k) * BS + rng.randrange(BS - 10), rng.randbytes(10))
            await v.j.flushed()
            states.append(v.image())
        assert v.j.mode == "capture" and v.j.stats.fallbacks == 0
        assert v.j.stats.spills >= 3 and v.j.spilled_bytes > 0
        assert any((tmp_path / "spill").iterdir())
        seen = []
        while (unit := await v.j.take(0)) is not None:
            assert isinstance(unit, Captured)
            got = dict(unit.items())
            # each unit holds its blocks exactly as they were at its own cut
            cut = next(st for st in states if all(st[b * BS:(b + 1) * BS] == c for b, c in got.items()))
            seen.append(states.index(cut))
            v.j.release(unit)
        assert seen == sorted(seen) and seen[-1] == 5
        assert v.j.spilled_bytes == 0 and not any((tmp_path / "spill").iterdir())

    run(main())


def test_a_full_local_log_falls_back_to_tracking_and_drops_its_files(tmp_path: Path) -> None:
    async def main() -> None:
        v = Volume(tmp_path, blocks=64, capture_memory=2 * BS, capture_disk=3 * BS)
        await _close_initial_resync(v)
        for i in range(12):
            await v.write(i * BS, b"x" * 100)
            await v.j.flushed()
        assert v.j.mode == "tracking" and v.j.stats.fallbacks == 1
        assert v.j.spilled_bytes == 0 and not any((tmp_path / "spill").iterdir())
        assert isinstance(await v.j.take(0), Resync)

    run(main())


def test_a_resumed_connection_does_not_reread_hot_regions(tmp_path: Path) -> None:
    async def main() -> None:
        v = Volume(tmp_path)
        await _close_initial_resync(v)
        await v.write(0, b"a")  # region 0: replicated, then hot
        await v.write(REGION, b"b")  # region 1: sent, not acknowledged
        await v.j.flushed()
        u = await v.j.take(0)
        assert isinstance(u, Captured)
        v.j.unit_done(u.seq, 1)
        await v.write(10, b"c")  # region 0 again... then replicated again
        await v.j.flushed()
        u2 = await v.j.take(0)
        assert isinstance(u2, Captured)
        v.j.unit_done(u2.seq, 2)
        v.j.acked(2)
        await v.write(REGION + 10, b"d")  # region 1 written again, not yet sent
        assert 0 in v.j.cooling and 1 not in v.j.cooling
        bpr = REGION // BS
        v.j.requeue(trust_hot=True)
        r = await v.j.take(0)
        assert isinstance(r, Resync) and r.spans == [(bpr, bpr)]
        v.j.requeue()  # a fetched map: hot regions are compared too
        r = await v.j.take(0)
        assert isinstance(r, Resync) and r.spans == [(0, 2 * bpr)]

    run(main())


def test_group_units_say_since_when_the_previous_state_held_and_a_marked_cut_stays_apart(
        tmp_path: Path) -> None:
    """`since` is the cut before a unit's first write (the receiver learns from it which group
    cuts the volume holds); a marked cut (cdp checkpoint --group) seals even an idle member and
    is never merged with later units, though earlier ones merge into it."""
    async def main() -> None:
        a, b = Volume(tmp_path / "a"), Volume(tmp_path / "b")
        a.j.group = b.j.group = (a.j, b.j)
        for v in (a, b):
            await _close_initial_resync(v)
        await a.write(0, b"one")
        t1 = a.j.cut()
        await b.write(0, b"only b")
        t2 = a.j.cut()  # a has nothing open: no unit, but its state held through t2
        await a.write(BS, b"two")
        t3 = a.j.cut(mark=True)  # b is idle: it seals an empty marked unit
        await a.write(2 * BS, b"three")
        t4 = a.j.cut()
        first = await a.j.take(0)  # units 1 and 2 merge (the marked one ends the merge)
        assert isinstance(first, Captured) and first.mark
        assert (first.time, first.since) == (t3, first.since) and first.since < t1
        assert set(first.blocks) == {0, 1}
        second = await a.j.take(0)
        assert isinstance(second, Captured) and not second.mark
        assert (second.time, second.since) == (t4, t3) and set(second.blocks) == {2}
        ub = await b.j.take(0)  # b's unit at t2 merges into its empty marked one
        assert isinstance(ub, Captured) and ub.mark and set(ub.blocks) == {0}
        assert (ub.time, ub.since) == (t3, t1) and t1 < t2
        assert await b.j.take(0) is None
        t5 = a.j.cut(mark=True)  # an idle member still gets a point at a marked cut
        empty = await b.j.take(0)
        assert isinstance(empty, Captured) and empty.mark and not empty.blocks
        assert (empty.time, empty.since) == (t5, t4)

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run(main())


def test_a_paused_journal_keeps_only_the_dirty_regions_and_resyncs_them_on_resume(
        tmp_path: Path) -> None:
    async def main() -> None:
        v = Volume(tmp_path)
        await _close_initial_resync(v)
        await v.write(0, b"a" * BS)  # captured, then dropped by the pause: region 0 stays dirty
        v.j.pause()
        assert v.j.mode == "tracking" and v.j.open == {} and v.j.stats.fallbacks == 0
        await v.write(22 * BS, b"b" * 3 * BS)  # the guest goes on: regions 5 and 6
        await v.j.flushed()
        assert v.j.touched == set() and v.j.sealed == []  # no content, no block list kept
        assert v.dirty.dirty_regions() == [0, 5, 6]  # on disk: a crash forgets nothing
        v.j.resume()
        unit = await v.j.take(0)
        assert isinstance(unit, Resync)
        bpr = REGION // BS
        assert unit.spans == [(0, bpr), (5 * bpr, 2 * bpr)]

    run(main())


def test_a_sender_cancelled_as_a_write_lands_is_cancelled(tmp_path: Path) -> None:
    """A connection that ends cancels its volume's sender while it waits in take(). If the
    cancel and a guest write land together, the sender must still end: a take() that
    swallowed the cancel (asyncio.wait_for on 3.11) went on to send into a dead link and
    held the source's connection open forever, never reconnecting."""
    async def main() -> None:
        v = Volume(tmp_path)
        await _close_initial_resync(v)
        taker = asyncio.ensure_future(v.j.take(30))
        for _ in range(3):
            await asyncio.sleep(0)  # waiting for work
        await v.j.before_change(0, BS)
        os.pwrite(v.fd, b"w" * BS, 0)
        v.j.changed(0, BS)  # wakes the taker ...
        taker.cancel()  # ... in the same instant as its connection ends
        done, _ = await asyncio.wait({taker}, timeout=5)
        assert done and taker.cancelled(), "take() swallowed its cancellation"

    run(main())
