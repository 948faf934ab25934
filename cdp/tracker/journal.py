"""The NBD tracker's write journal: every write captured, epochs cut where the guest flushed.

The NBD server calls this object around every change (see
cdp.nbd.server.ChangeTracker). It runs on the source's event loop, and it
has two modes:

capture
    After a write reaches the image, the blocks it touched are read back
    (from the page cache) into the *open* epoch. A FLUSH, or the epoch
    interval running out, *cuts*: the open epoch is sealed as the state of
    those blocks at that instant, which is a state the guest really had
    (write-order fidelity). Sealed epochs wait for the sender; when it is
    behind, consecutive sealed epochs are merged (newest content wins), which
    is still the state at the later cut: recovery points get coarser under
    load, never inconsistent.

tracking
    When captured data outgrows its memory budget, or after a restart or a
    reconnect, the content is dropped and only *which* blocks changed is kept
    (pull-ahead: the guest never waits for the link). The sender then runs a
    resync: it reads the dirty regions live and sends blocks that differ from
    the replica, while new writes only note their blocks. When the reading is
    done, the next cut reads the blocks written meanwhile and closes the
    resync epoch with them; every block then holds its content at that cut,
    so the epoch is again a state the guest had. Back to capture mode.

Underneath both, the persistent DirtyMap says which regions may differ from
the replica; a region is cleared only when the receiver acknowledged an epoch
that holds everything written there. That map is what a crash leaves, and all
a restart needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdp.blocks import Geometry
from cdp.tracker.dirtymap import DirtyMap
from cdp.units import format_bytes

log = logging.getLogger(__name__)


@dataclass
class Captured:
    """Blocks as they were at one cut (several consecutive cuts, once merged).

    A spilled unit keeps its blocks in a file instead (`spill`, with `order`
    listing (block, length) in file order); read it with items().
    """

    seq: int
    time: float
    blocks: dict[int, bytes]
    nbytes: int
    spill: Path | None = None
    order: list[tuple[int, int]] = field(default_factory=list)

    def items(self) -> Iterator[tuple[int, bytes]]:
        """(block, content) in block order; reads a spilled unit from its file (worker thread)."""
        if self.spill is None:
            for b in sorted(self.blocks):
                yield b, self.blocks[b]
            return
        with open(self.spill, "rb") as fh:
            for b, length in self.order:
                yield b, fh.read(length)


@dataclass
class Resync:
    """Regions to read live and compare with the replica; closed at a later cut.

    `spans` are (first block, count) runs covering the dirty regions, or None
    when every region is dirty (read the whole volume, skipping holes).
    """

    seq: int
    time: float
    spans: list[tuple[int, int]] | None


@dataclass
class _Unit:
    seq: int
    last_epoch: int | None


@dataclass
class JournalStats:
    cuts: int = 0
    merged: int = 0
    spills: int = 0
    fallbacks: int = 0
    resyncs: int = 0
    captured_bytes: int = 0
    writes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class WriteJournal:
    """Captures writes of one NBD-served volume and hands the sender consistent epochs."""

    def __init__(self, name: str, geo: Geometry, read_fd: int, dirty: DirtyMap, *,
                 capture_memory: int, epoch_interval: float, pass_threshold: int = 32 << 20,
                 batch_delay: float = 0.02, hot_seconds: float = 10.0, hot_max: int = 1024,
                 spill_dir: Path | None = None, capture_disk: int = 0) -> None:
        if dirty.region % geo.block_size:
            raise ValueError("the dirty region size must be a multiple of the block size")
        self.name = name
        self.geo = geo
        self.fd = read_fd
        self.dirty = dirty
        self.capture_memory = capture_memory
        self.epoch_interval = epoch_interval
        self.pass_threshold = pass_threshold
        self.batch_delay = min(batch_delay, epoch_interval)
        self.first_write = 0.0  # when the open epoch got its first write
        self.group: tuple[WriteJournal, ...] = ()  # consistency group members (self included)
        self.cooling: dict[int, float] = {}  # replicated regions still marked on disk: since when
        self._skip_hot = False  # the next resync may skip hot regions (see requeue)
        self.hot_seconds = hot_seconds
        self.spill_dir = spill_dir
        self.capture_disk = capture_disk if spill_dir is not None else 0
        self.spilled_bytes = 0  # on disk: spilled units waiting or being sent
        if spill_dir is not None:  # what a previous run spilled is covered by the dirty map
            for old in spill_dir.glob("*"):
                old.unlink(missing_ok=True)
        self.hot_max = hot_max
        self.mode = "tracking"  # until the first resync closes: after a start nothing is captured
        self.seq = 1  # the unit the next write belongs to
        self.open: dict[int, bytes] = {}
        self.open_bytes = 0
        self.sealed: list[Captured] = []
        self.sealed_bytes = 0
        self.touched: set[int] = set()  # tracking mode: blocks written since the resync began reading
        self.resync_pending = True
        self.region_seq: dict[int, int] = dict.fromkeys(dirty.dirty_regions(), 1)
        self.units: list[_Unit] = []
        self.acked_epoch = 0
        self.last_cut = time.time()
        self.stats = JournalStats()
        self._ready = asyncio.Event()
        self._ready.set()
        self._finish: asyncio.Future[tuple[float, dict[int, bytes]]] | None = None
        self._ticker: asyncio.Task[None] | None = None

    # -- ChangeTracker (called by the NBD server) --------------------------------

    async def before_change(self, offset: int, length: int) -> None:
        await self.dirty.mark(self.dirty.regions_of(offset, length))

    def changed(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        self.stats.writes += 1
        for r in self.dirty.regions_of(offset, length):
            self.region_seq[r] = self.seq
            self.cooling.pop(r, None)
        bs = self.geo.block_size
        first, last = offset // bs, min(self.geo.blocks - 1, (offset + length - 1) // bs)
        if self.mode == "tracking":
            self.touched.update(range(first, last + 1))
            return
        start = first * bs
        end = min(self.geo.size, (last + 1) * bs)
        data = _pread(self.fd, end - start, start)
        if not self.open:
            self.first_write = time.time()
            self._ready.set()  # a free sender cuts this epoch after batch_delay
        for b in range(first, last + 1):
            lo = b * bs - start
            content = data[lo:lo + self.geo.length(b)]
            old = self.open.get(b)
            self.open_bytes += len(content) - (len(old) if old is not None else 0)
            self.open[b] = content
        self.stats.captured_bytes += end - start
        if self.open_bytes + self.sealed_bytes > self.capture_memory:
            self._spill()

    async def flushed(self) -> None:
        self.cut()

    # -- cutting ----------------------------------------------------------------

    def cut(self) -> None:
        """A point the guest could have crashed at: seal the open epoch (or close a resync).

        In a consistency group every member cuts at the same instant, with the
        same time: the epochs of a multi-disk VM line up across its disks.
        """
        now = time.time()
        for j in self.group or (self,):
            j._cut_at(now)

    def _cut_at(self, now: float) -> None:
        self.last_cut = now
        if self.mode == "capture":
            if not self.open:
                return
            self.sealed.append(Captured(self.seq, now, self.open, self.open_bytes))
            self.sealed_bytes += self.open_bytes
            self.open, self.open_bytes = {}, 0
            self.seq += 1
            self.stats.cuts += 1
            self._ready.set()
        elif self._finish is not None and not self._finish.done():
            contents = self._read_blocks(sorted(self.touched))
            self.touched = set()
            self.mode = "capture"
            self._finish.set_result((now, contents))
            self._finish = None
            self.seq += 1  # later writes belong to the next unit
            self.stats.cuts += 1

    def _spill(self) -> None:
        """Over the memory budget: cut, then move the oldest captured epochs to the local log.

        Only when the log is full too does the journal fall back to tracking
        dirty blocks. The write happens here, on the loop (page cache, at most
        `capture_memory` at once): the one guest write that crossed the budget
        waits for it; nothing is fsync'd (after a crash the dirty map rules).
        """
        if self.capture_disk <= 0 or self.spill_dir is None:
            self._fall_back()
            return
        if self.open:
            self.cut()
        for u in self.sealed:
            if self.sealed_bytes <= self.capture_memory // 2:
                break
            if u.spill is not None:
                continue
            if self.spilled_bytes + u.nbytes > self.capture_disk:
                self._fall_back()
                return
            path = self.spill_dir / f"{u.seq:012d}"
            try:
                self.spill_dir.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as fh:
                    order = []
                    for b in sorted(u.blocks):
                        fh.write(u.blocks[b])
                        order.append((b, len(u.blocks[b])))
            except OSError as exc:
                log.warning("volume=%s: cannot spill to %s (%s)", self.name, path, exc)
                path.unlink(missing_ok=True)
                self._fall_back()
                return
            u.spill, u.order, u.blocks = path, order, {}
            self.sealed_bytes -= u.nbytes
            self.spilled_bytes += u.nbytes
            self.stats.spills += 1
        if self.sealed_bytes > self.capture_memory:
            self._fall_back()

    def release(self, unit: Captured | Resync) -> None:
        """The sender is done with a unit: remove its spill file."""
        if isinstance(unit, Captured) and unit.spill is not None:
            unit.spill.unlink(missing_ok=True)
            self.spilled_bytes -= unit.nbytes
            unit.spill = None

    def _drop_sealed(self) -> None:
        for u in self.sealed:
            self.release(u)
        self.sealed, self.sealed_bytes = [], 0

    def _fall_back(self) -> None:
        """Drop captured content; the dirty map already says where to look (pull-ahead)."""
        self.stats.fallbacks += 1
        log.warning("volume=%s: the sender is %s behind; tracking dirty blocks instead of "
                    "capturing until it catches up", self.name,
                    format_bytes(self.open_bytes + self.sealed_bytes + self.spilled_bytes))
        self.open, self.open_bytes = {}, 0
        self._drop_sealed()
        self.mode = "tracking"
        self.touched = set()
        self.resync_pending = True
        self._ready.set()

    def requeue(self, everything: bool = False, trust_hot: bool = False) -> None:
        """Forget what was captured or sent and not acknowledged: resync the dirty regions.

        Used after a (re)connect and when the receiver dropped epochs. With
        `everything` the whole volume is compared (a new replica). With
        `trust_hot` the replica is known to hold every acknowledged epoch (the
        connection resumed where it left off), so hot regions, replicated and
        not written since, are not read again.
        """
        self._skip_hot = trust_hot and not everything
        if everything:
            self.dirty.set_all()
            for r in range(self.dirty.regions):
                self.region_seq[r] = self.seq
        if self._finish is not None and not self._finish.done():
            self._finish.cancel()
        self._finish = None
        self.open, self.open_bytes = {}, 0
        self._drop_sealed()
        self.units.clear()
        self.mode = "tracking"
        self.touched = set()
        self.resync_pending = True
        self._ready.set()

    # -- the sender's side --------------------------------------------------------

    async def take(self, timeout: float) -> Captured | Resync | None:
        """The next unit of work, or None after `timeout` seconds with nothing to do.

        A sender that is free does not wait for the guest's next FLUSH: once the
        open epoch is `batch_delay` old it is cut here and taken (any instant
        between completed writes is a state the guest could have crashed in),
        so the RPO is the time to send and apply, not the flush interval.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.mode == "tracking" and self.resync_pending:
                self.resync_pending = False
                self.stats.resyncs += 1
                self.touched = set()  # written so far: inside dirty regions, read below anyway
                return Resync(self.seq, time.time(), self._dirty_spans())
            if self.mode == "capture" and self.sealed:
                return self._merge_sealed()
            remaining = deadline - loop.time()
            if self.mode == "capture" and self.open:
                wait = self.first_write + self.batch_delay - time.time()
                if wait <= 0:
                    self.cut()
                    continue
                if remaining <= 0:
                    return None
                await asyncio.sleep(min(wait, remaining))
                continue
            if remaining <= 0:
                return None
            self._ready.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), remaining)

    def _dirty_spans(self) -> list[tuple[int, int]] | None:
        regions = self.dirty.dirty_regions()
        if self._skip_hot:
            regions = [r for r in regions if r not in self.cooling]
        elif len(regions) == self.dirty.regions:
            return None
        bpr = self.dirty.region // self.geo.block_size
        spans: list[tuple[int, int]] = []
        for r in regions:
            first = r * bpr
            count = min(self.geo.blocks, first + bpr) - first
            if spans and spans[-1][0] + spans[-1][1] == first:
                spans[-1] = (spans[-1][0], spans[-1][1] + count)
            else:
                spans.append((first, count))
        return spans

    def _merge_sealed(self) -> Captured:
        """The oldest spilled unit alone, or every captured unit in memory up to the next spilled one."""
        if self.sealed[0].spill is not None:
            return self.sealed.pop(0)
        n = next((i for i, u in enumerate(self.sealed) if u.spill is not None), len(self.sealed))
        units, self.sealed = self.sealed[:n], self.sealed[n:]
        self.sealed_bytes -= sum(u.nbytes for u in units)
        if len(units) == 1:
            return units[0]
        merged: dict[int, bytes] = {}
        for u in units:
            merged.update(u.blocks)
        self.stats.merged += len(units) - 1
        return Captured(units[-1].seq, units[-1].time, merged,
                        sum(len(v) for v in merged.values()))

    def next_pass(self) -> list[int] | None:
        """During a resync: blocks written meanwhile, if too many to read at the closing cut."""
        if len(self.touched) * self.geo.block_size <= self.pass_threshold:
            return None
        blocks = sorted(self.touched)
        self.touched = set()
        return blocks

    async def finish(self) -> tuple[float, dict[int, bytes]]:
        """Wait for the next cut; get its time and the content of blocks written since reading."""
        fut: asyncio.Future[tuple[float, dict[int, bytes]]] = asyncio.get_running_loop().create_future()
        self._finish = fut
        if time.time() - self.last_cut >= self.epoch_interval:
            self.cut()  # resolves fut (and forgets it) right away
        return await fut

    def unit_done(self, seq: int, last_epoch: int | None) -> None:
        """The sender committed a unit as epochs up to `last_epoch` (None: nothing differed)."""
        self.units.append(_Unit(seq, last_epoch))
        self._settle()

    def acked(self, epoch: int) -> None:
        self.acked_epoch = max(self.acked_epoch, epoch)
        self._settle()

    def _settle(self) -> None:
        """Clear the regions that every acknowledged unit covers."""
        done = 0
        while self.units and (self.units[0].last_epoch is None
                              or self.units[0].last_epoch <= self.acked_epoch):
            done = self.units.pop(0).seq
        if not done:
            return
        now = time.time()
        for r in [r for r, s in self.region_seq.items() if s <= done]:
            del self.region_seq[r]
            self.cooling[r] = now  # replicated: cleared on disk once it stays quiet a while

    def _cool(self, now: float) -> None:
        """Clear regions that stayed replicated and quiet for `hot_seconds` (or are too many).

        Like DRBD's activity log: a region written again soon after it was
        replicated is still marked on disk, so that write costs no fdatasync.
        """
        if not self.cooling:
            return
        old = [r for r, t in self.cooling.items() if now - t >= self.hot_seconds]
        excess = len(self.cooling) - len(old) - self.hot_max
        if excess > 0:
            young = sorted((t, r) for r, t in self.cooling.items() if now - t < self.hot_seconds)
            old += [r for _, r in young[:excess]]
        for r in old:
            del self.cooling[r]
        self.dirty.clear(old)

    # -- interval cuts -------------------------------------------------------------

    def start(self) -> None:
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._finish is not None and not self._finish.done():
            self._finish.cancel()
        self.dirty.clear(list(self.cooling))  # a clean stop leaves only what is not replicated
        self.cooling.clear()

    async def _tick(self) -> None:
        step = max(0.01, self.epoch_interval / 4)
        while True:
            await asyncio.sleep(step)
            now = time.time()
            due = now - self.last_cut >= self.epoch_interval
            if due and (self.open or (self._finish is not None and not self._finish.done())):
                self.cut()
            self._cool(now)

    # -- helpers ------------------------------------------------------------------

    def _read_blocks(self, blocks: list[int]) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        bs = self.geo.block_size
        i = 0
        while i < len(blocks):
            j = i
            while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1 and j - i < 63:
                j += 1
            start = blocks[i] * bs
            end = min(self.geo.size, (blocks[j] + 1) * bs)
            data = _pread(self.fd, end - start, start)
            for b in blocks[i:j + 1]:
                lo = b * bs - start
                out[b] = data[lo:lo + self.geo.length(b)]
            i = j + 1
        return out

    def status(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "open_bytes": self.open_bytes, "backlog_bytes": self.sealed_bytes,
            "backlog_epochs": len(self.sealed), "dirty_regions": len(self.region_seq),
            "hot_regions": len(self.cooling), "spilled_bytes": self.spilled_bytes,
            "spills": self.stats.spills,
            "touched_blocks": len(self.touched), "cuts": self.stats.cuts,
            "merged": self.stats.merged, "fallbacks": self.stats.fallbacks,
            "resyncs": self.stats.resyncs, "writes": self.stats.writes,
            "map_syncs": self.dirty.syncs,
        }


def _pread(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) < length:  # past the end of a shrunk file: zeros, as the server reads it
        data += bytes(length - len(data))
    return data
