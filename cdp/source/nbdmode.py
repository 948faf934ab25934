"""Volumes in nbd mode: the source serves the disk over NBD and replicates every write.

`NbdExport` owns what lives as long as the source process: the NBD server
(in-process, on the source's event loop), the write journal it feeds and
the persistent dirty map under it. The guest keeps its disk whether or not
the receiver is reachable.

`nbd_session` is the per-connection sender: it opens the volume on the
receiver, then asks the journal for work. A resync unit (after a start, a
reconnect, a Need or a pull-ahead) compares the dirty regions with the
replica and is closed at a cut; a captured unit is the content of the
changed blocks at a cut, sent as one epoch, never split, so every epoch the
receiver applies is a state the guest had. Trimmed and zeroed blocks travel as
zero runs (messages.Zero), never as data, and only where the replica does not
hold zeros already.

Every epoch that ends at a cut (a captured unit; the last epoch of a resync) is
followed by a Cut message before its Commit: the cut's instant, and for a member
of a consistency group the group, its members and `since` (the cut through which
the previous epoch's state held). A group member's resync always ends in such an
epoch, even an empty one, so `since` of the next captured unit always refers to
the epoch before it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import ssl
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Protocol, TypeVar

from cdp.blocks import Geometry, runs
from cdp.codec import HASH_LEN, block_hash, zero_hash
from cdp.errors import ConfigError, TrackerError
from cdp.nbd.listen import NbdListenError, NbdServerError, is_loopback
from cdp.nbd.server import NbdServer
from cdp.source.pause import Daemon as PauseDaemon
from cdp.source.pause import Worker as PauseWorker
from cdp.source.pause import compared, held, refetch
from cdp.source.phase import Phase
from cdp.source.scangate import FairGate
from cdp.source.volume import Cancelled, EpochBuilder, VolumeState
from cdp.tracker.capture import Captured, Resync
from cdp.tracker.dirtymap import DirtyMap
from cdp.tracker.extents import BlockRuns
from cdp.tracker.journal import WriteJournal
from cdp.tracker.scan import scan, scan_spans, volume_size
from cdp.units import format_bytes
from cdp.wire.messages import Opened
from cdp.wire.transport import Link, server_tls

log = logging.getLogger(__name__)
IDLE_CURRENT_EVERY = 2.0  # seconds between "the replica is current" notes while the guest is idle
T = TypeVar("T")
# fills the builder; returns True if it stopped before the end on purpose (a pause): the epochs
# sent are not the state as of the capture time
Producer = Callable[[EpochBuilder, Callable[[int], None], Callable[[], bool]], bool | None]


class Worker(PauseWorker, Protocol):
    """What an nbd session uses of its volume's worker (cdp.source.worker.VolumeWorker)."""

    async def open(self, link: Link) -> Opened: ...

    async def send_current(self, link: Link) -> None: ...

    async def stream(self, link: Link, capture: float, produce: Producer, *,
                     split: bool = True, total: int | None = None) -> int | None: ...


class Source(PauseDaemon, Protocol):
    """What an nbd session uses of the source daemon (cdp.source.daemon.Source)."""

    gate: FairGate
    volumes: dict[str, VolumeState]

    @property
    def workers(self) -> Mapping[str, Worker]: ...


class NbdExport:
    """The NBD server, write journal and dirty map of one volume."""

    def __init__(self, vs: VolumeState, state_dir_volume: os.PathLike[str] | str) -> None:
        self.vs = vs
        self.dir = state_dir_volume
        self.server: NbdServer | None = None
        self.journal: WriteJournal | None = None
        self.dirty: DirtyMap | None = None
        self.marked: dict[float, int] = {}  # a marked cut's time -> its epoch (group checkpoints)
        self._fd = -1

    async def start(self) -> None:
        """Open the dirty map and the image, then serve; TrackerError if anything fails."""
        cfg = self.vs.cfg
        size = volume_size(cfg.path)
        geo = Geometry(size, cfg.block_size)
        self.dirty = DirtyMap(self.vs.dir / "dirty", size, cfg.dirty_region)
        try:
            self.dirty.open()
            self._fd = os.open(cfg.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise TrackerError(f"cannot open the dirty map or the image of {cfg.name}: {exc}") from exc
        if not self.dirty.trusted:
            log.info("volume=%s: no dirty map from an earlier run; the first resync compares "
                     "the whole volume with the replica", cfg.name)
        self.journal = WriteJournal(cfg.name, geo, self._fd, self.dirty,
                                    capture_memory=cfg.capture_memory,
                                    epoch_interval=cfg.epoch_interval,
                                    spill_dir=self.vs.dir / "spill", capture_disk=cfg.capture_disk)
        host, port = cfg.nbd_tcp if cfg.nbd_tcp else (None, 0)
        try:
            tls = server_tls(cfg.nbd_tls) if cfg.nbd_tls is not None else None
        except (ConfigError, OSError, ssl.SSLError) as exc:
            raise TrackerError(f"volume {cfg.name}: cannot load the [volume.nbd_tls] certificate "
                               f"or key: {exc}") from exc
        if (host is not None and not is_loopback(host) and cfg.nbd_tls is not None
                and cfg.nbd_tls.client_ca is None and cfg.nbd_any_client):
            log.warning("volume=%s: SECURITY: [volume.nbd_tls] allow_any_client = true: any host "
                        "that reaches %s:%d and completes TLS can read and write this disk, with "
                        "no client certificate; set client_ca to require one", cfg.name, host, port)
        self.server = NbdServer(cfg.path, export=cfg.name, host=host, port=port,
                                unix_path=cfg.nbd_unix, unix_owner=cfg.nbd_socket_owner,
                                unix_group=cfg.nbd_socket_group, unix_mode=cfg.nbd_socket_mode,
                                tracker=self.journal, tls=tls,
                                tls_required=tls is not None, allow_any_client=cfg.nbd_any_client)
        try:
            await self.server.start()
        except NbdListenError:
            raise  # nbd_listen cannot be used: the source stops (exit 2) and says why
        except NbdServerError as exc:
            raise TrackerError(str(exc)) from exc
        self.journal.start()
        self.vs.status_extra = self.status

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
        if self.journal is not None:
            await self.journal.stop()
        if self.dirty is not None:
            self.dirty.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.journal is not None:
            out["nbd"] = self.journal.status()
        if self.server is not None:
            out["nbd"]["listen"] = self.vs.cfg.nbd_listen
        return out


async def nbd_session(src: Source, link: Link, vs: VolumeState, export: NbdExport) -> None:
    """Send the journal's units over one connection, until an error ends it."""
    journal = export.journal
    if journal is None:
        raise TrackerError(f"volume {vs.name} is not being served over NBD (see the log)")
    before = (vs.replica_id, vs.acked)
    opened = await src.workers[vs.name].open(link)
    # resumed at or past what was acknowledged: the replica holds every acked epoch, so regions
    # replicated since (hot) need no second look; otherwise (a fetched map) trust nothing
    resumed = bool(before[0]) and vs.replica_id == before[0] and opened.epoch >= before[1]
    journal.requeue(everything=opened.epoch == 0, trust_hot=resumed)
    journal.in_flight = lambda: bool(vs.pending)  # group commit: see WriteJournal.take
    vs.resync.running = 0  # a resync cut short by a reconnect starts over
    last_current = 0.0
    busy = True  # something was sent since the replica was last said to be current
    while True:
        if (err := src.workers[vs.name].take_error()) is not None:
            raise err
        if vs.paused_since:
            await _hold(src, vs, journal)
        if vs.need is not None:
            vs.undo_from(vs.need, src.index)
            vs.need = None
            journal.requeue()
        if vs.resync.wanted and not vs.resync.running:
            await refetch(src, link, vs)  # `cdp resync`: the replica's image, hashed
            journal.requeue(everything=True)  # then compare every region with it
        # while epochs are in flight, look again soon: idleness is known once they are acked
        unit = await journal.take(timeout=0.02 if vs.pending or busy else 1.0)
        if vs.paused_since:  # paused meanwhile: nothing more goes out (the regions stay dirty)
            if unit is not None:
                journal.release(unit)
            continue
        if unit is None:
            now = time.time()
            if (journal.mode == "capture" and not journal.has_open and not journal.sealed
                    and not vs.pending and (busy or now - last_current >= IDLE_CURRENT_EVERY)):
                vs.phase = Phase.IDLE
                vs.current_as_of = now  # nothing written since the last acknowledged cut
                vs.confirmed_at = now
                last_current = now
                busy = False
                await src.workers[vs.name].send_current(link)
            continue
        busy = True
        try:
            if isinstance(unit, Resync):
                last = await _resync(src, link, vs, journal, unit)
            else:
                last = await _captured(src, link, vs, unit)
                if unit.mark and last is not None:
                    export.marked[unit.time] = last
                    while len(export.marked) > 64:
                        export.marked.pop(next(iter(export.marked)))
        finally:
            journal.release(unit)
        if vs.need is None and vs.name in link.session.volumes:
            journal.unit_done(unit.seq, last)
            if isinstance(unit, Resync):
                compared(src, vs)  # the resync `cdp resync` asked for (if any) ran to its end


async def _hold(src: Source, vs: VolumeState, journal: WriteJournal) -> None:
    """Paused: the guest goes on writing, the journal keeps only the dirty regions (on disk);
    once resumed, they are resynced."""
    journal.pause()
    try:
        await held(src, vs)
    finally:
        journal.resume()


def group_of(src: Source, vs: VolumeState) -> tuple[str, list[str]]:
    """The volume's consistency group and its members ("" and [] for none)."""
    group = vs.cfg.group
    if group is None:
        return "", []
    return group, sorted(n for n, v in src.volumes.items() if v.cfg.group == group)


async def _captured(src: Source, link: Link, vs: VolumeState, unit: Captured) -> int | None:
    vs.phase = Phase.SENDING
    group, members = group_of(src, vs)

    def produce(builder: EpochBuilder, progress: Callable[[int], None],
                cancelled: Callable[[], bool]) -> None:
        assert vs.smap is not None and vs.geo is not None
        smap = vs.smap
        zfull = zero_hash(vs.geo.block_size)
        _add_zero_runs(builder, vs.geo, smap, unit.zeros, cancelled)  # disjoint from the blocks
        for b, content in unit.items():
            if cancelled():
                raise Cancelled
            h = block_hash(content)
            progress(len(content))
            if smap[b * HASH_LEN:(b + 1) * HASH_LEN] != h:
                zero = h == (zfull if len(content) == vs.geo.block_size else zero_hash(len(content)))
                builder.add(b, h, None if zero else memoryview(content))
        builder.mark_cut(unit.time, unit.since if group else 0.0, group, members, force=unit.mark)

    return await src.workers[vs.name].stream(link, unit.time, produce, split=False, total=unit.nbytes)


def _add_zero_runs(builder: EpochBuilder, geo: Geometry, smap: bytearray, zeros: BlockRuns,
                   cancelled: Callable[[], bool]) -> None:
    """Add the blocks of the runs as zero blocks, except those the replica already holds as zeros.

    Stretches already zero in smap are skipped 64Ki blocks at a time (one
    compare), so trimming free space costs next to nothing; runs in a worker
    thread, never on the event loop.
    """
    step = 65536
    zfull = zero_hash(geo.block_size)
    last = geo.blocks - 1
    zlast = zero_hash(geo.length(last))
    pattern = memoryview(zfull * step)
    smv = memoryview(smap)
    for start, end in zeros:
        b = start
        while b < end:
            if cancelled():
                raise Cancelled
            n = min(step, end - b)
            if smv[b * HASH_LEN:(b + n) * HASH_LEN] != pattern[:n * HASH_LEN]:
                for i in range(b, b + n):
                    z = zlast if i == last else zfull
                    if smv[i * HASH_LEN:(i + 1) * HASH_LEN] != z:
                        builder.add(i, z, None)
            b += n


async def _resync(src: Source, link: Link, vs: VolumeState, journal: WriteJournal,
                  unit: Resync) -> int | None:
    async with src.gate.slot(vs, "resync"):  # max_concurrent_scans, first come first served
        return await _resync_now(src, link, vs, journal, unit)


def _on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], Coroutine[Any, Any, T]],
             cancelled: Callable[[], bool]) -> T:
    """From a worker thread: run fn() on the loop and wait for it, unless the work is cancelled."""
    fut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(fn(), loop)
    while True:
        try:
            return fut.result(timeout=0.5)
        except concurrent.futures.TimeoutError:
            if cancelled():
                fut.cancel()
                raise Cancelled from None
        except concurrent.futures.CancelledError:
            raise Cancelled from None


async def _resync_now(src: Source, link: Link, vs: VolumeState, journal: WriteJournal,
                      unit: Resync) -> int | None:
    vs.phase = Phase.RESYNC if vs.seeded else Phase.SEEDING
    group, members = group_of(src, vs)
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    path = vs.cfg.path

    def on_loop(fn: Callable[[], Coroutine[Any, Any, T]], cancelled: Callable[[], bool]) -> T:
        return _on_loop(loop, fn, cancelled)

    async def more() -> list[int] | None:
        return journal.next_pass()

    def produce(builder: EpochBuilder, progress: Callable[[int], None],
                cancelled: Callable[[], bool]) -> None:
        assert vs.geo is not None and vs.smap is not None
        geo, smap = vs.geo, vs.smap
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise TrackerError(f"cannot open volume {path}: {exc.strerror}") from None
        try:
            it = (scan(fd, geo, smap, progress=progress, cancelled=cancelled) if unit.spans is None
                  else scan_spans(fd, geo, smap, unit.spans, progress=progress, cancelled=cancelled))
            for b, h, content in it:
                builder.add(b, h, content)
            while True:  # blocks written while we read: again, until few enough for the cut
                if cancelled():
                    raise Cancelled
                blocks = on_loop(more, cancelled)
                if blocks is None:
                    break
                for b, h, content in scan_spans(fd, geo, smap, list(runs(blocks)), cancelled=cancelled):
                    builder.add(b, h, content)
        finally:
            os.close(fd)
        when, contents, zeros = on_loop(journal.finish, cancelled)
        for b in sorted(contents):
            blk = contents[b]
            h = block_hash(blk)
            if smap[b * HASH_LEN:(b + 1) * HASH_LEN] != h:
                builder.add(b, h, None if h == zero_hash(len(blk)) else memoryview(blk))
        _add_zero_runs(builder, geo, smap, zeros, cancelled)  # the latest change of these blocks
        builder.time = when  # later epochs of this unit carry the closing cut's time
        # the last epoch is the state at that cut (a group member's always exists: see above)
        builder.mark_cut(when, 0.0, group, members, force=bool(group))

    last = await src.workers[vs.name].stream(link, unit.time, produce)
    dt = time.monotonic() - t0
    if vs.need is None:
        log.info("volume=%s %s done in %.1fs (%s compared)", vs.name,
                 "seed" if unit.spans is None and not vs.seeded else "resync", dt,
                 format_bytes(vs.progress[0]))
    return last
