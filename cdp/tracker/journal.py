"""The NBD tracker's write journal: every write captured, epochs cut where the guest flushed.

The NBD server calls this object around every change (see
cdp.nbd.server.ChangeTracker). It runs on the source's event loop, and it
has two modes:

capture
    After a write reaches the image, the blocks it touched are read back
    (from the page cache) into the *open* epoch; a write the server hands over
    with its payload (`wrote`) gives the blocks it covers whole straight from
    that payload, and only a partly covered block at either edge is read. A TRIM or WRITE_ZEROES is
    never read: the whole blocks it covers become zero runs (extents) of the
    epoch and only a partly covered block at either edge is read, so a 4 GiB
    trim costs a few ints and no copying on the event loop. A block's latest
    change wins: a write removes the block from the zero runs, a trim drops
    captured content, so data and zero runs never overlap. A FLUSH, or the epoch
    interval running out, *cuts*: the open epoch is sealed as the state of
    those blocks at that instant, which is a state the guest really had
    (write-order fidelity). Sealed epochs wait for the sender; when it is
    behind, consecutive sealed epochs are merged (newest content wins), which
    is still the state at the later cut: recovery points get coarser under
    load, never inconsistent. Each unit remembers the cut before its first
    write (`since`): the volume held the previous unit's state through it,
    which is how the receiver knows which cuts of a consistency group this
    volume holds (cdp.replica.groups). A *marked* cut (a group checkpoint) seals
    a unit even with nothing written, and no later unit is merged into it.

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
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdp.blocks import Geometry
from cdp.durable import make_private_dir
from cdp.tracker.capture import (
    RUN_COST,
    Captured,
    Resync,
    blocks_from_payload,
    drop_range,
    in_range,
    merge_units,
    pread_padded,
    read_blocks,
    split_blocks,
    write_spill,
)
from cdp.tracker.dirtymap import DirtyMap
from cdp.tracker.extents import BlockRuns
from cdp.units import format_bytes

log = logging.getLogger(__name__)


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
    zeroed_bytes: int = 0  # whole blocks trimmed or zeroed: kept as runs, never read
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
        # the sender's epochs not yet acknowledged (set by the sender): while some are, an open
        # epoch is not cut by batch_delay alone but grows until they are (group commit)
        self.in_flight: Callable[[], bool] = lambda: False
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
        self.open_bytes = 0  # content bytes in `open`
        self.open_zeros = BlockRuns()  # blocks the open epoch zeroed (never overlaps `open`)
        self.sealed: list[Captured] = []
        self.sealed_bytes = 0  # memory held by sealed units (Captured.memory)
        self.touched: set[int] = set()  # tracking mode: blocks written since the resync began reading
        self.touched_zeros = BlockRuns()  # tracking mode: blocks zeroed since then, not written after
        self.resync_pending = True
        self.paused = False  # `cdp pause`: only the dirty map notes writes (see pause())
        self.region_seq: dict[int, int] = dict.fromkeys(dirty.dirty_regions(), 1)
        self.units: list[_Unit] = []
        self.acked_epoch = 0
        self.last_cut = time.time()
        self.stats = JournalStats()
        self._ready = asyncio.Event()
        self._ready.set()
        self._finish: asyncio.Future[tuple[float, dict[int, bytes], BlockRuns]] | None = None
        self._ticker: asyncio.Task[None] | None = None

    # -- ChangeTracker (called by the NBD server) --------------------------------

    async def before_change(self, offset: int, length: int) -> None:
        await self.dirty.mark(self.dirty.regions_of(offset, length))

    async def before_changes(self, offset: int, length: int,
                             ahead: Iterable[tuple[int, int]]) -> None:
        """before_change; when that has to wait for a sync, the clean regions of the writes
        queued behind (`ahead`) are made dirty by the same sync. One of them that never
        runs (the client went away) leaves a region dirty: compared once, nothing lost."""
        dirty = self.dirty
        first = dirty.regions_of(offset, length)
        if all(dirty.is_set(r) for r in first):
            return
        regions = set(first)
        for off, n in ahead:
            regions.update(dirty.regions_of(off, n))
        await dirty.mark(sorted(regions))

    def changed(self, offset: int, length: int) -> None:
        """A WRITE reached the image: capture the blocks it touched (tracking mode: note them)."""
        if length <= 0:
            return
        self._note(offset, length)
        bs = self.geo.block_size
        self._touch(offset // bs, min(self.geo.blocks - 1, (offset + length - 1) // bs))

    def wrote(self, offset: int, data: bytes) -> None:
        """A WRITE reached the image and nothing changed the range since (the server's word):
        like changed(), but the blocks it covers whole are its payload, not read back."""
        if not data:
            return
        self._note(offset, len(data))
        bs = self.geo.block_size
        self._touch(offset // bs, min(self.geo.blocks - 1, (offset + len(data) - 1) // bs),
                    payload=(offset, data))

    def zeroed(self, offset: int, length: int) -> None:
        """A TRIM or WRITE_ZEROES reached the image: whole blocks become a zero run, never read.

        Only a block the range covers in part is read (at most one at each
        edge): the rest of it still holds data. A range ending at the end of the
        volume covers its short last block whole.
        """
        if length <= 0:
            return
        self._note(offset, length)
        bs, blocks = self.geo.block_size, self.geo.blocks
        end = min(offset + length, self.geo.size)
        lo = -(-offset // bs)  # first block covered whole
        hi = blocks if end >= self.geo.size else end // bs  # past the last one
        if lo >= hi:  # no block covered whole: like a write
            self._touch(offset // bs, min(blocks - 1, (end - 1) // bs))
            return
        self.stats.zeroed_bytes += min(self.geo.size, hi * bs) - lo * bs
        if self.mode == "tracking":
            if not self.paused:
                self.touched.difference_update(in_range(self.touched, lo, hi))  # zero is latest
                self.touched_zeros.add(lo, hi)  # known zero: nothing to read at the cut
        else:
            if not self.has_open:
                self._opened()
            self.open_bytes -= drop_range(self.open, lo, hi)
            self.open_zeros.add(lo, hi)
        if offset < lo * bs:
            self._touch(lo - 1, lo - 1, spill=False)
        if hi < blocks and end > hi * bs:
            self._touch(hi, hi, spill=False)
        if self.mode == "capture" and self._over_budget():
            self._spill()  # after the whole request: a cut never splits it

    def _note(self, offset: int, length: int) -> None:
        self.stats.writes += 1
        for r in self.dirty.regions_of(offset, length):
            self.region_seq[r] = self.seq
            self.cooling.pop(r, None)

    def _touch(self, first: int, last: int, spill: bool = True,
               payload: tuple[int, bytes] | None = None) -> None:
        """Blocks first..last now hold data: capture their content (tracking mode: note them).

        `payload` (offset, data): what was just written there; the blocks it covers whole
        are taken from it (one block: the payload itself; several: one copy each, so a block
        kept alone never holds a larger payload in memory), the rest read back."""
        if self.mode == "tracking":
            if self.paused:
                return  # the dirty map has the region; a resync reads it after resume
            self.touched.update(range(first, last + 1))
            if self.touched_zeros:
                self.touched_zeros.remove(first, last + 1)
            return
        bs = self.geo.block_size
        start = first * bs
        end = min(self.geo.size, (last + 1) * bs)
        if payload is None:
            contents = split_blocks(pread_padded(self.fd, end - start, start), start, first, last, self.geo)
        else:
            contents = blocks_from_payload(self.fd, self.geo, first, last, *payload)
        if not self.has_open:
            self._opened()
        if self.open_zeros:
            self.open_zeros.remove(first, last + 1)
        opened = self.open
        for b, content in zip(range(first, last + 1), contents, strict=True):
            old = opened.get(b)
            self.open_bytes += len(content) - (len(old) if old is not None else 0)
            opened[b] = content
        self.stats.captured_bytes += end - start
        if spill and self._over_budget():
            self._spill()

    def _opened(self) -> None:
        """The first change of an epoch: a free sender cuts it after batch_delay."""
        self.first_write = time.time()
        self._ready.set()

    @property
    def has_open(self) -> bool:
        """The open epoch holds a change (captured blocks or zero runs)."""
        return bool(self.open) or bool(self.open_zeros)

    def _over_budget(self) -> bool:
        return (self.open_bytes + RUN_COST * len(self.open_zeros) + self.sealed_bytes
                > self.capture_memory)

    def flush_started(self) -> None:
        """A FLUSH arrived: every write before it has completed, so cut now and let the
        epoch travel while the server makes the image durable (see cdp.nbd.server)."""
        self.cut()

    async def flushed(self) -> None:
        self.cut()  # writes of other connections that completed during the fdatasync

    # -- cutting ----------------------------------------------------------------

    def cut(self, mark: bool = False) -> float:
        """A point the guest could have crashed at: seal the open epoch (or close a resync).

        In a consistency group every member cuts at the same instant, with the
        same time: the epochs of a multi-disk VM line up across its disks.
        `mark` (a group checkpoint): members in capture mode seal a unit even if
        nothing was written, and it stays an epoch of its own. Returns the instant.
        """
        now = time.time()
        for j in self.group or (self,):
            j._cut_at(now, mark)
        return now

    def _cut_at(self, now: float, mark: bool = False) -> None:
        since, self.last_cut = self.last_cut, now
        if self.mode == "capture":
            if not self.has_open and not mark:
                return
            unit = Captured(self.seq, now, self.open, self.open_bytes, zeros=self.open_zeros,
                            since=since, mark=mark)
            self.sealed.append(unit)
            self.sealed_bytes += unit.memory()
            self.open, self.open_bytes, self.open_zeros = {}, 0, BlockRuns()
            self.seq += 1
            self.stats.cuts += 1
            self._ready.set()
        elif self._finish is not None and not self._finish.done():
            contents = read_blocks(self.fd, self.geo, sorted(self.touched))
            zeros = self.touched_zeros  # disjoint from touched: each block's latest change
            self.touched, self.touched_zeros = set(), BlockRuns()
            self.mode = "capture"
            self._finish.set_result((now, contents, zeros))
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
        if self.has_open:
            self.cut()
        for u in self.sealed:
            if self.sealed_bytes <= self.capture_memory // 2:
                break
            if u.spill is not None or not u.blocks:  # zero runs only: nothing to write out
                continue
            if self.spilled_bytes + u.nbytes > self.capture_disk:
                self._fall_back()
                return
            path = self.spill_dir / f"{u.seq:012d}"
            try:
                make_private_dir(self.spill_dir)
                order = write_spill(path, u)
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
        self.open, self.open_bytes, self.open_zeros = {}, 0, BlockRuns()
        self._drop_sealed()
        self.mode = "tracking"
        self.touched, self.touched_zeros = set(), BlockRuns()
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
        self.open, self.open_bytes, self.open_zeros = {}, 0, BlockRuns()
        self._drop_sealed()
        self.units.clear()
        self.mode = "tracking"
        self.touched, self.touched_zeros = set(), BlockRuns()
        self.resync_pending = True
        self._ready.set()

    def pause(self) -> None:
        """Shipping stops (`cdp pause`), between units: drop what was captured and keep only
        the dirty regions (the guest keeps writing; the persistent map has them); resume()
        resyncs them. Unlike a fall-back this is on purpose: no warning, not counted."""
        if self.paused:
            return
        self.paused = True
        self.open, self.open_bytes, self.open_zeros = {}, 0, BlockRuns()
        self._drop_sealed()
        self.mode = "tracking"
        self.touched, self.touched_zeros = set(), BlockRuns()
        self.resync_pending = True

    def resume(self) -> None:
        if not self.paused:
            return
        self.paused = False
        self.resync_pending = True
        self._ready.set()

    # -- the sender's side --------------------------------------------------------

    async def take(self, timeout: float) -> Captured | Resync | None:
        """The next unit of work, or None after `timeout` seconds with nothing to do.

        A sender that is free does not wait for the guest's next FLUSH: once the
        open epoch is `batch_delay` old it is cut here and taken (any instant
        between completed writes is a state the guest could have crashed in),
        so the RPO is the time to send and apply, not the flush interval.
        While the sender's last epoch is not acknowledged yet (`in_flight`), the
        open epoch keeps growing instead and is cut when the ack comes (or at a
        FLUSH, or epoch_interval): one epoch where the receiver would otherwise
        queue several, each paying its own fsyncs and undo file.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.mode == "tracking" and self.resync_pending:
                self.resync_pending = False
                self.stats.resyncs += 1
                # written or zeroed so far: inside dirty regions, read below anyway
                self.touched, self.touched_zeros = set(), BlockRuns()
                return Resync(self.seq, time.time(), self._dirty_spans())
            if self.mode == "capture" and self.sealed:
                return self._merge_sealed()
            remaining = deadline - loop.time()
            if self.mode == "capture" and self.has_open:
                wait = self.first_write + self.batch_delay - time.time()
                if wait <= 0 and not self.in_flight():
                    self.cut()
                    continue
                if remaining <= 0:
                    return None
                if wait <= 0:
                    wait = remaining  # until an ack, a cut (FLUSH) or the timeout
                # woken early by a cut (a FLUSH): the sealed epoch goes out now, not after
                # the rest of batch_delay
                self._ready.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(wait, remaining)):
                        await self._ready.wait()
                continue
            if remaining <= 0:
                return None
            self._ready.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._ready.wait()

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
        """The oldest spilled unit alone, or every captured unit in memory up to the next spilled
        one (or up to and including a marked one: its cut must stay a point of its own), merged."""
        if self.sealed[0].spill is not None:
            unit = self.sealed.pop(0)
            self.sealed_bytes -= unit.memory()
            return unit
        n = next((i for i, u in enumerate(self.sealed) if u.spill is not None), len(self.sealed))
        n = next((i + 1 for i, u in enumerate(self.sealed[:n]) if u.mark), n)
        units, self.sealed = self.sealed[:n], self.sealed[n:]
        self.sealed_bytes -= sum(u.memory() for u in units)
        if len(units) == 1:
            return units[0]
        self.stats.merged += len(units) - 1
        return merge_units(units)

    def next_pass(self) -> list[int] | None:
        """During a resync: blocks written meanwhile, if too many to read at the closing cut."""
        if len(self.touched) * self.geo.block_size <= self.pass_threshold:
            return None
        blocks = sorted(self.touched)
        self.touched = set()
        return blocks

    async def finish(self) -> tuple[float, dict[int, bytes], BlockRuns]:
        """Wait for the next cut; get its time, the content of blocks written since reading and
        the runs of blocks zeroed since then (disjoint from that content)."""
        fut: asyncio.Future[tuple[float, dict[int, bytes], BlockRuns]] = (
            asyncio.get_running_loop().create_future())
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
        self._ready.set()  # a sender holding the open epoch back (in_flight) may cut it now
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
            if due and (self.has_open or (self._finish is not None and not self._finish.done())):
                self.cut()
            self._cool(now)

    # -- status ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "open_bytes": self.open_bytes, "backlog_bytes": self.sealed_bytes,
            "backlog_epochs": len(self.sealed), "dirty_regions": len(self.region_seq),
            "hot_regions": len(self.cooling), "spilled_bytes": self.spilled_bytes,
            "spills": self.stats.spills,
            "touched_blocks": len(self.touched), "cuts": self.stats.cuts,
            "zero_runs": len(self.open_zeros) + sum(len(u.zeros) for u in self.sealed),
            "zeroed_bytes": self.stats.zeroed_bytes,
            "merged": self.stats.merged, "fallbacks": self.stats.fallbacks,
            "resyncs": self.stats.resyncs, "writes": self.stats.writes,
            "map_syncs": self.dirty.syncs,
        }
