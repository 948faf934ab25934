"""A qemu volume's worker: ships what QEMU's dirty bitmap marked, read from a point-in-time view.

QEMU (qemu-system or qemu-storage-daemon) keeps the disk and tracks every guest write in a
dirty bitmap; cdp is never in the write path. Per epoch (cdp/qemu/fleece.py): one QMP
transaction freezes the bitmap, starts a new one and makes a view of the disk at that
instant; the frozen bitmap's extents, aligned out to the volume's blocks, are read from the
view over NBD, hashed, compared with what the replica holds (the source's block map, as a
scan does) and streamed as an epoch (split at max_epoch_bytes, like a scan). The frozen bitmap
is dropped once the receiver acknowledged the epoch; on any error (link, QMP, NBD, a Need) it
is merged back into the live one, so the next epoch sends its changes again.

Wake-ups: every `epoch_interval` the live bitmap's dirty count is asked (query-named-block-nodes);
a cut is made when it is not zero, so an idle disk costs one small QMP query per interval and
the replica is confirmed current as of each query. `cdp resume`/`resync` wake it at once.

When there is no bitmap of ours to trust (first run, QEMU lost it, a new replica), the first
epoch compares the whole view with the replica's block map: holes (base:allocation) are known
zero without reading, and only blocks that differ are sent. `<state_dir>/<volume>/qemu.json`
records the replica the bitmap chain belongs to; another replica means a whole comparison.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable

from cdp.blocks import Geometry, block_spans
from cdp.durable import atomic_write_json, make_private_dir, read_json
from cdp.qemu.fleece import Fleece, View, qemu_tag
from cdp.qemu.qmp import Qmp
from cdp.source.pause import compared, held, refetch
from cdp.source.phase import Phase
from cdp.source.volume import EpochBuilder, VolumeState
from cdp.source.worker import Shared, VolumeWorker
from cdp.tracker.scan import buffer_changes, zero_changes
from cdp.units import format_bytes
from cdp.wire.transport import Link

log = logging.getLogger("cdp.source.daemon")  # one logger for the daemon's lines, as before
READ_CHUNK = 4 << 20  # bytes per NBD read from the view
READ_AHEAD = 3  # reads in flight
IDLE_CURRENT_EVERY = 2.0  # seconds between "the replica is current" notes while the disk is idle
STATE_FILE = "qemu.json"


class QemuWorker(VolumeWorker):
    def __init__(self, vs: VolumeState, src: Shared) -> None:
        super().__init__(vs, src)
        self._size = 0
        self._told_current = 0.0

    async def volume_size(self) -> int:
        return self._size

    async def session(self, link: Link) -> None:
        """Connect to QEMU, settle its bitmaps, open the volume, then one epoch per wake-up."""
        vs, cfg = self.vs, self.vs.cfg
        assert cfg.qmp is not None and cfg.node is not None
        async with Qmp(cfg.qmp) as qmp:
            fleece = Fleece(qmp, cfg.node, qemu_tag(vs.name), vs.dir / "qemu", nbd_socket=cfg.nbd_socket)
            try:
                tracking = await fleece.open()
                self._size = fleece.size
                if tracking.merged:
                    log.info("volume=%s: QEMU's bitmap of an unfinished epoch merged back (%s)", vs.name,
                             ", ".join(tracking.merged))
                await self.open(link)
                trusted = tracking.tracked and self._chain_replica() == vs.replica_id
                if not trusted:
                    log.info("volume=%s: %s; the first epoch compares the whole disk with the replica",
                             vs.name, "no bitmap of cdp's in QEMU" if not tracking.tracked
                             else "QEMU's bitmap does not belong to this replica")
                await self._epochs(link, fleece, trusted)
            finally:
                with contextlib.suppress(Exception):
                    await fleece.close()

    async def _epochs(self, link: Link, fleece: Fleece, trusted: bool) -> None:
        vs = self.vs
        vs.resync.running = 0  # a resync cut short by a reconnect starts over
        first = True
        while True:
            if (err := self.take_error()) is not None:
                raise err
            if not first and trusted and vs.need is None and not (vs.resync.wanted and not vs.resync.running):
                await self._next(link, fleece)
            first = False
            self.wake.clear()
            await held(self.src, vs)  # `cdp pause`: QEMU keeps tracking; nothing is cut until resumed
            if vs.need is not None:
                vs.undo_from(vs.need, self.src.index)
                vs.need = None
            resync = vs.resync.wanted and not vs.resync.running
            if resync:
                await refetch(self.src, link, vs)  # `cdp resync`: compare with the replica's image
            whole = not trusted or resync
            if await self._epoch(link, fleece, whole=whole) and whole:
                if not trusted:
                    self._record_chain()
                trusted = True
                compared(self.src, vs)

    async def _next(self, link: Link, fleece: Fleece) -> None:
        """Until the live bitmap counts a change (asked every epoch_interval) or a wake-up; an
        idle disk with nothing in flight is current as of each asking."""
        vs = self.vs
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(vs.cfg.epoch_interval):
                    await self.wake.wait()
            if self.wake.is_set():
                return
            if (err := self.take_error()) is not None:
                raise err
            asked = time.time()
            if await fleece.dirty_bytes():
                return
            if not vs.pending and vs.need is None and not vs.paused_since:
                vs.phase = Phase.IDLE
                self.src.confirm(vs, asked)
                if asked - self._told_current >= IDLE_CURRENT_EVERY:
                    self._told_current = asked
                    await self.send_current(link)

    async def _epoch(self, link: Link, fleece: Fleece, *, whole: bool) -> bool:
        """One cut, read, send and acknowledgement; True if the receiver acknowledged all of it."""
        vs = self.vs
        assert vs.geo is not None
        view = await fleece.cut()
        ok = False
        try:
            t0 = time.monotonic()
            if whole:
                zeros = await view.zeros()
                dirty = _complement(zeros, view.size)
            else:
                zeros, dirty = [], await view.dirty()
            spans = block_spans(dirty, vs.geo)
            vs.phase = (Phase.SCANNING if whole else Phase.SENDING) if vs.seeded else Phase.SEEDING
            vs.stats["scans"] += whole
            total = sum(c for _, c in spans) * vs.geo.block_size
            last = await self.stream(link, view.cut_at, self._producer(view, spans, zeros),
                                     total=min(total, vs.geo.size) if not whole else vs.geo.size,
                                     until=lambda: view.until)
            ok = await self._acknowledged(last)
            level = logging.INFO if whole or time.monotonic() - t0 > 5 else logging.DEBUG
            log.log(level, "volume=%s %s epoch %s in %.1fs (%s dirty%s)", vs.name,
                    "whole-disk" if whole else "bitmap", "done" if ok else "not acknowledged",
                    time.monotonic() - t0, format_bytes(total), ", holes skipped" if whole else "")
        finally:
            await view.finish(ok)
        return ok

    async def _acknowledged(self, last: int | None) -> bool:
        """Wait until every epoch sent is acknowledged; False if one was dropped (Need) or the
        receiver stopped the volume."""
        vs = self.vs
        while vs.pending and vs.need is None and self.remote_error is None:
            self.acked.clear()
            await self.acked.wait()  # an Ack, a Need or an Error sets it
        if (err := self.take_error()) is not None:
            raise err
        ok = vs.need is None and (last is None or vs.acked >= last)
        if ok and not vs.pending:
            vs.phase = Phase.IDLE
        return ok

    def _producer(self, view: View, spans: list[tuple[int, int]],
                  zeros: list[tuple[int, int]]) -> Callable[..., bool | None]:
        """The stream's producer (in a thread): zero runs first, then the dirty blocks read from the
        view over NBD (on the event loop, a few reads ahead) and compared with the block map."""
        vs = self.vs
        loop = asyncio.get_running_loop()
        geo = vs.geo
        assert geo is not None
        per = max(1, READ_CHUNK // geo.block_size)
        chunks = [(b, min(first + count, b + per)) for first, count in spans
                  for b in range(first, first + count, per)]

        def produce(builder: EpochBuilder, progress: Callable[..., None],
                    cancelled: Callable[[], bool]) -> bool | None:
            smap = vs.smap
            assert smap is not None
            for start, end in _zero_blocks(zeros, geo):
                for change in zero_changes(geo, smap, start, end):
                    builder.add(*change)
                progress(min(geo.size, end * geo.block_size) - start * geo.block_size, False)
            ahead: collections.deque[tuple[int, concurrent.futures.Future[bytearray]]] = collections.deque()
            todo = iter(chunks)
            try:
                while True:
                    while len(ahead) < READ_AHEAD and (c := next(todo, None)) is not None:
                        off = c[0] * geo.block_size
                        n = min(geo.size, c[1] * geo.block_size) - off
                        ahead.append((c[0], asyncio.run_coroutine_threadsafe(view.read(off, n), loop)))
                    if not ahead:
                        return None
                    if cancelled():
                        return None
                    first, fut = ahead.popleft()
                    data = fut.result()
                    for change in buffer_changes(geo, smap, first, data):
                        builder.add(*change)
                    progress(len(data))
            finally:
                for _, fut in ahead:
                    fut.cancel()

        return produce

    def _chain_replica(self) -> str:
        """The replica QEMU's bitmap chain belongs to ("" if none recorded)."""
        try:
            data = read_json(self.vs.dir / STATE_FILE)
        except (OSError, ValueError):
            return ""
        cfg = self.vs.cfg
        if data.get("qmp") != str(cfg.qmp) or data.get("node") != cfg.node:
            return ""
        return str(data.get("replica_id", ""))

    def _record_chain(self) -> None:
        """The whole disk as of a cut is acknowledged: from now on the bitmap is the truth."""
        vs = self.vs
        try:
            make_private_dir(vs.dir)
            atomic_write_json(vs.dir / STATE_FILE, {"replica_id": vs.replica_id, "qmp": str(vs.cfg.qmp),
                                                    "node": vs.cfg.node, "since_epoch": vs.acked})
        except OSError as exc:
            log.warning("volume=%s: cannot record %s (%s): a restart compares the whole disk again",
                        vs.name, vs.dir / STATE_FILE, exc)


def _complement(runs: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The (offset, length) runs of [0, size) not in `runs` (sorted, disjoint)."""
    out, pos = [], 0
    for off, n in runs:
        if off > pos:
            out.append((pos, off - pos))
        pos = max(pos, off + n)
    if pos < size:
        out.append((pos, size - pos))
    return out


def _zero_blocks(zeros: list[tuple[int, int]], geo: Geometry) -> list[tuple[int, int]]:
    """Block ranges [start, end) lying wholly inside the zero runs."""
    bs, out = geo.block_size, []
    for off, n in zeros:
        start = -(-off // bs)
        end = geo.blocks if off + n >= geo.size else (off + n) // bs
        if end > start:
            out.append((start, end))
    return out
