"""A scan volume's worker: a file or block device read whole on each wake-up.

Scans start on file events and a timer, paced by ScanPacer (cdp/source/scanpace.py); each
scan reads the volume (holes skipped), hashes its blocks, and streams the ones that differ
from what the replica holds as epochs (VolumeWorker.stream). Quiescing hooks or a reflink
copy make a scan one instant (docs/how-it-works.md, "Scans see torn state").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from cdp.errors import TrackerError
from cdp.ratelimit import take_blocking
from cdp.source.pause import compared, held, refetch
from cdp.source.phase import Phase
from cdp.source.scanpace import ScanPacer, cpu_meter, next_scan
from cdp.source.volume import EpochBuilder, VolumeState
from cdp.source.worker import Shared, VolumeWorker, paced
from cdp.tracker.consistency import reflink_snapshot, run_hook
from cdp.tracker.scan import CHUNK as SCAN_CHUNK
from cdp.tracker.scan import scan
from cdp.units import format_bytes
from cdp.wire.transport import Link

log = logging.getLogger("cdp.source.daemon")  # one logger for the daemon's lines, as before


class ScanWorker(VolumeWorker):
    def __init__(self, vs: VolumeState, src: Shared) -> None:
        super().__init__(vs, src)
        self.pacer = ScanPacer(vs.cfg.min_scan_interval)  # when the next scan may start

    async def session(self, link: Link) -> None:
        """Open, reconcile, then scan on each wake-up until an error ends the session."""
        vs = self.vs
        await self.open(link)
        w = self
        wake, pacer = w.wake, w.pacer
        vs.resync.running = 0  # a resync cut short by a reconnect starts over
        first = True
        while True:
            if (err := w.take_error()) is not None:
                raise err
            if not first and vs.need is None and not (vs.resync.wanted and not vs.resync.running):
                vs.phase = Phase.IDLE if vs.seeded else vs.phase
                pacer.min_interval = vs.cfg.min_scan_interval  # SIGHUP may have changed it
                await next_scan(wake, pacer, vs.cfg.scan_interval)
            first = False
            wake.clear()
            await held(self.src, vs)  # `cdp pause`: until resumed
            pacer.started(time.monotonic())
            if vs.need is not None:
                # the receiver dropped epoch `need` and all later ones: roll back and rescan
                vs.undo_from(vs.need, self.src.index)
                vs.need = None
            if vs.resync.wanted and not vs.resync.running:
                await refetch(self.src, link, vs)  # `cdp resync`: compare with the replica's image
            async with self.src.control.checkpoints(vs):  # `cdp checkpoint` requests this scan serves
                whole = await self._scan_once(link)
            if whole:
                compared(self.src, vs)

    async def _scan_once(self, link: Link) -> bool:
        """One scan; True if it covered the whole volume (not cut short by a pause or a Need)."""
        vs = self.vs
        async with self.src.gate.slot(vs, "scan"):  # max_concurrent_scans, first come first served
            if vs.paused_since:
                return False  # paused while queued: no hooks, no reads
            return await self._scan_now(link)

    async def _scan_now(self, link: Link) -> bool:
        """One scan. Its epochs carry two times (docs/how-it-works.md, "Scans see torn state"): `capture`,
        everything that finished before it is in, and `until`, nothing that finished after
        it is. pre_scan quiesces until post_scan: both are the moment the hook returned (a
        write it waited for is in). A reflink copy is one instant inside the copy call.
        Otherwise the scan reads over a period: its start, and the end of each epoch's reads.
        """
        vs = self.vs
        cfg = vs.cfg
        await run_hook(cfg.pre_scan, "pre_scan", vs.name, cfg.path)
        capture = time.time()
        until = capture if cfg.pre_scan else None  # None: read over a period
        path = cfg.path
        snap = vs.dir / "snapshot"
        thawed = False  # post_scan runs exactly once, whatever fails: a guest is never left frozen
        try:
            if cfg.snapshot == "reflink":
                try:
                    capture = time.time()
                    path = await asyncio.to_thread(reflink_snapshot, cfg.path, snap)
                    until = capture if cfg.pre_scan else time.time()
                finally:  # thaw right after the copy, whether it worked or not
                    thawed = True
                    await run_hook(cfg.post_scan, "post_scan", vs.name, cfg.path)
            return await self._stream_scan(link, path, capture, until)
        finally:
            if cfg.snapshot == "reflink":
                with contextlib.suppress(OSError):
                    snap.unlink()
            if not thawed:
                await run_hook(cfg.post_scan, "post_scan", vs.name, cfg.path)

    def _scan_into(self, builder: EpochBuilder, path: Path, chunk: int, seeded: bool, *,
                   progress: Callable[..., None], stop: Callable[[], bool],
                   throttle: Callable[[int], None], hole: Callable[[int], None]) -> None:
        """Scan the volume's file and add what changed to the epoch (on a worker thread).

        A rescan hashes on two cores (hashworker); what it cost, on both, spaces the next
        one (scanpace.DUTY). A seed predicts nothing, and sends as fast as one core
        compresses, so it keeps the other core for that."""
        vs = self.vs
        assert vs.geo is not None and vs.smap is not None
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise TrackerError(f"cannot open volume {path}: {exc.strerror}") from None
        try:
            with contextlib.ExitStack() as stack:
                helper = stack.enter_context(self.src.hashers.lend()) if seeded else None
                if seeded:
                    stack.enter_context(cpu_meter(self.pacer, helper.cpu_seconds if helper else None))
                for block, h, content in scan(fd, vs.geo, vs.smap, progress=progress, chunk=chunk,
                                              cancelled=stop, throttle=throttle, holes=hole,
                                              helper=helper):
                    builder.add(block, h, content)
        finally:
            os.close(fd)

    async def _stream_scan(self, link: Link, path: Path, capture: float,
                           until: float | None) -> bool:
        vs = self.vs
        vs.phase = Phase.RESYNC if vs.resync.running else Phase.SCANNING if vs.seeded else Phase.SEEDING
        vs.stats["scans"] += 1
        assert vs.geo is not None
        t0 = time.monotonic()
        chunk = paced(SCAN_CHUNK, self.src.reads.rate, vs.geo.block_size)
        seeded = vs.seeded

        skipped = 0  # bytes of holes: zero without being read
        short = False  # stopped by a pause before the end

        def produce(builder: EpochBuilder, progress: Callable[..., None],
                    cancelled: Callable[[], bool]) -> bool:
            nonlocal short

            def stop() -> bool:  # `cdp pause`: what was found so far is committed, then no more
                return cancelled() or bool(vs.paused_since)

            def hole(n: int) -> None:
                nonlocal skipped
                skipped += n
                progress(n, read=False)

            def throttle(n: int) -> None:
                take_blocking(self.src.reads, n, stop)

            self._scan_into(builder, path, chunk, seeded, progress=progress, stop=stop,
                            throttle=throttle, hole=hole)
            short = stop() and not cancelled()
            return short

        def read_end() -> float:
            return time.time() if until is None else until  # None: an epoch ends its reads now

        await self.stream(link, capture, produce, until=read_end)
        if vs.need is not None:
            return False
        vs.phase = Phase.SENDING if vs.pending else (Phase.IDLE if vs.seeded else vs.phase)
        dt = time.monotonic() - t0
        whole = not short
        log.log(logging.INFO if vs.stats["scans"] <= 1 or dt > 5 or not whole else logging.DEBUG,
                "volume=%s scan %s in %.1fs (%s read, %s of holes skipped)", vs.name,
                "done" if whole else "stopped (paused)", dt,
                format_bytes(vs.progress[0] - skipped), format_bytes(skipped))
        return whole
