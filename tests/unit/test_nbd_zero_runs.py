"""TRIM and WRITE_ZEROES in the NBD write journal: zero runs (extents), never captured data.

Driven without sockets, like tests/unit/test_nbd_journal.py: the file is
changed the way the NBD server changes it (before_change, the change, then
the hook), and the journal's units are checked against the image.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import tracemalloc
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from cdp.blocks import Geometry
from cdp.durable import write_zeros
from cdp.tracker.capture import Captured, Resync
from cdp.tracker.dirtymap import DirtyMap
from cdp.tracker.extents import BlockRuns
from cdp.tracker.journal import WriteJournal

BS = 64 * 1024
REGION = 4 * BS
GiB = 1 << 30


class Volume:
    def __init__(self, tmp_path: Path, size: int, capture_memory: int = 64 << 20,
                 capture_disk: int = 0) -> None:
        self.path = tmp_path / "disk.raw"
        self.size = size
        with open(self.path, "wb") as fh:
            fh.truncate(size)
        self.fd = os.open(self.path, os.O_RDWR)
        self.dirty = DirtyMap(tmp_path / "dirty", size, REGION)
        self.dirty.open()
        self.dirty.clear(range(self.dirty.regions))
        self.j = WriteJournal("v", Geometry(size, BS), self.fd, self.dirty,
                              capture_memory=capture_memory, epoch_interval=3600,
                              spill_dir=tmp_path / "spill", capture_disk=capture_disk)

    async def write(self, offset: int, data: bytes) -> None:
        await self.j.before_change(offset, len(data))
        os.pwrite(self.fd, data, offset)
        self.j.changed(offset, len(data))

    async def trim(self, offset: int, length: int) -> None:
        await self.j.before_change(offset, length)
        write_zeros(self.fd, offset, length)
        self.j.zeroed(offset, length)

    def block(self, b: int) -> bytes:
        return os.pread(self.fd, BS, b * BS)

    async def to_capture(self) -> None:
        """Close the resync every journal starts with; from then on writes are captured."""
        unit = await self.j.take(0)
        assert isinstance(unit, Resync)
        fin = asyncio.ensure_future(self.j.finish())
        await asyncio.sleep(0)
        self.j.cut()
        await fin
        self.j.unit_done(unit.seq, None)


def run(coro) -> None:
    asyncio.run(coro)


def state(unit: Captured) -> dict[int, bytes | None]:
    """block -> content, None for a block in a zero run."""
    out: dict[int, bytes | None] = {b: c for b, c in unit.items()}
    for start, end in unit.zeros:
        for b in range(start, end):
            assert b not in out, f"block {b} is both data and zero"
            out[b] = None
    return out


def test_a_4gib_trim_is_one_run_and_reads_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        v = Volume(tmp_path, 8 * GiB + 5000)  # sparse; a short last block
        await v.to_capture()
        await v.write(0, b"a" * 3 * BS)
        tracemalloc.start()
        await v.trim(100, 4 * GiB - 100)  # the kernel client's largest request
        _now, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 8 << 20, peak  # no range read, no per-block entries (per region: 16Ki)
        assert list(v.j.open_zeros) == [(1, 4 * GiB // BS)]
        assert list(v.j.open) == [0]  # the partly trimmed edge block: data, read
        assert v.j.open[0] == b"a" * 100 + bytes(BS - 100)
        assert v.j.stats.zeroed_bytes == 4 * GiB - BS
        await v.j.flushed()
        unit = await v.j.take(0)
        assert isinstance(unit, Captured) and unit.nbytes == BS

    run(main())


def test_edges_of_a_trim_are_read_and_the_end_of_the_volume_is_whole(tmp_path: Path) -> None:
    async def main() -> None:
        size = 10 * BS + 1000
        v = Volume(tmp_path, size)
        await v.to_capture()
        await v.write(0, os.urandom(size))
        await v.trim(3 * BS + 10, 2 * BS)  # block 3 from byte 10, block 4 whole, block 5 up to 10
        await v.trim(9 * BS, size - 9 * BS)  # block 9 and the 1000-byte block 10, to the end
        await v.trim(7 * BS + 5, 100)  # inside one block: a write of zeros, read
        await v.j.flushed()
        unit = await v.j.take(0)
        assert isinstance(unit, Captured)
        got = state(unit)
        assert sorted(got) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
        assert [b for b, c in got.items() if c is None] == [4, 9, 10]
        for b, c in got.items():
            if c is not None:
                assert c == os.pread(v.fd, BS, b * BS)

    run(main())


def test_the_latest_change_wins_within_and_across_merged_epochs(tmp_path: Path) -> None:
    async def main() -> None:
        v = Volume(tmp_path, 64 * BS)
        await v.to_capture()
        await v.write(0, b"1" * 8 * BS)  # blocks 0-7
        await v.trim(2 * BS, 4 * BS)  # 2-5 zero: drops their captured data
        await v.write(3 * BS, b"2" * BS)  # 3 data again: leaves the zero run
        assert list(v.j.open_zeros) == [(2, 3), (4, 6)]
        await v.j.flushed()
        await v.trim(0, 2 * BS)  # next epoch: 0-1 zero
        await v.write(5 * BS, b"3" * BS)  # 5 data
        await v.j.flushed()
        await v.trim(3 * BS, BS)  # third epoch: 3 zero
        await v.j.flushed()
        unit = await v.j.take(0)  # the three merged: the state at the last cut
        assert isinstance(unit, Captured) and v.j.stats.merged == 2
        got = state(unit)
        assert sorted(b for b, c in got.items() if c is None) == [0, 1, 2, 3, 4]
        assert {b: c for b, c in got.items() if c is not None} == {
            5: b"3" * BS, 6: b"1" * BS, 7: b"1" * BS}
        assert unit.nbytes == 3 * BS

    run(main())


def test_trims_while_tracking_close_the_resync_as_runs(tmp_path: Path) -> None:
    async def main() -> None:
        v = Volume(tmp_path, 64 * BS)
        unit = await v.j.take(0)
        assert isinstance(unit, Resync)
        fin = asyncio.ensure_future(v.j.finish())
        await asyncio.sleep(0)
        await v.write(0, b"x" * 20 * BS)
        await v.trim(BS + 7, 10 * BS)  # block 1 partly (read at the cut), 2-10 zero, 11 partly
        await v.write(4 * BS, b"y" * BS)  # written after the trim: read, not zero
        assert v.j.mode == "tracking"
        v.j.cut()
        _when, contents, zeros = await fin
        assert list(zeros) == [(2, 4), (5, 11)]
        assert sorted(contents) == [0, 1, 4, 11, 12, 13, 14, 15, 16, 17, 18, 19]
        assert contents[1] == b"x" * 7 + bytes(BS - 7) and contents[4] == b"y" * BS
        assert v.j.mode == "capture"

    run(main())


def test_a_spilled_epoch_keeps_its_zero_runs(tmp_path: Path) -> None:
    async def main() -> None:
        v = Volume(tmp_path, 64 * BS, capture_memory=4 * BS, capture_disk=64 * BS)
        await v.to_capture()
        rng = random.Random(3)
        await v.write(0, rng.randbytes(3 * BS))
        await v.trim(10 * BS, 20 * BS)
        await v.j.flushed()
        for i in range(3):
            await v.write((40 + i) * BS, rng.randbytes(2 * BS))
            await v.j.flushed()
        assert v.j.stats.spills >= 1 and v.j.stats.fallbacks == 0
        first = await v.j.take(0)
        assert isinstance(first, Captured) and first.spill is not None
        assert list(first.zeros) == [(10, 30)]
        assert sorted(b for b, _ in first.items()) == [0, 1, 2]
        v.j.release(first)

    run(main())


def test_many_tiny_runs_are_charged_and_fall_back(tmp_path: Path) -> None:
    """A guest trimming every other block cannot grow the journal past capture_memory."""
    async def main() -> None:
        v = Volume(tmp_path, 100_000 * BS, capture_memory=256 << 10)  # 4096 runs at RUN_COST
        await v.to_capture()
        for b in range(0, 20_000, 2):
            await v.trim(b * BS, BS)
            if v.j.mode == "tracking":
                break
        assert v.j.mode == "tracking" and v.j.stats.fallbacks == 1

    run(main())


RUNS = st.lists(st.tuples(st.booleans(), st.integers(0, 200), st.integers(0, 40)), max_size=60)


@given(RUNS)
def test_block_runs_match_a_set(ops: list[tuple[bool, int, int]]) -> None:
    runs = BlockRuns()
    model: set[int] = set()
    for add, start, count in ops:
        if add:
            runs.add(start, start + count)
            model |= set(range(start, start + count))
        else:
            runs.remove(start, start + count)
            model -= set(range(start, start + count))
        pairs = list(runs)
        assert {b for s, e in pairs for b in range(s, e)} == model
        assert all(s < e for s, e in pairs)
        assert all(a[1] < b[0] for a, b in itertools.pairwise(pairs))  # sorted, apart
        assert runs.blocks() == len(model)
        assert all((b in runs) == (b in model) for b in range(start - 2, start + count + 2))
