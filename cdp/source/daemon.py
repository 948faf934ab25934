"""The source daemon: scans volumes and streams their changes to the receiver.

One connection carries every volume. Per volume a task opens it, reconciles
what the replica holds (resume, roll back, or fetch its hash map), then scans
on each wake-up (file event or timer) and streams the changed blocks as
epochs. The scan runs in a thread; batches compress in a small pool (zstd
releases the GIL, so both cores work); a bounded queue between them and the
socket keeps memory flat whatever the change rate.

Rate limits: every frame sent for a volume waits for that volume's token
bucket, then for the source's (all volumes together); scan reads wait for
the source's read bucket. A schedule of time-of-day windows sets the source
caps; SIGHUP reloads the config file and applies what can change live.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from cdp.blocks import Geometry
from cdp.codec import zero_hash
from cdp.config import SourceConfig, load_source, log_reload, reload_source
from cdp.durable import DirLock, atomic_write_json
from cdp.errors import (
    PERMANENT_CODES,
    AuthError,
    CdpError,
    ListenError,
    ProtocolError,
    RemoteError,
    TrackerError,
    TransportError,
)
from cdp.messages import (
    Ack,
    Begin,
    Bye,
    Commit,
    Current,
    Error,
    GetHashes,
    Hashes,
    Labelled,
    LabelTaken,
    Message,
    Need,
    Open,
    Opened,
    Ping,
    Pong,
)
from cdp.metrics import SourceMetrics
from cdp.protocol import SourceSession
from cdp.ratelimit import Caps, Schedule, TokenBucket, format_rate, take, take_blocking
from cdp.source.connect import connect, fetch_hashes
from cdp.source.control import Control, FairGate
from cdp.source.filesets import REPLIES as FILE_REPLIES
from cdp.source.filesets import FilesetSync
from cdp.source.nbdmode import NbdExport, Producer, nbd_session
from cdp.source.pause import compared, held, refetch
from cdp.source.scanpace import ScanPacer, cpu_meter, next_scan
from cdp.source.volume import Cancelled as _Cancelled
from cdp.source.volume import DedupIndex, EpochBuilder, VolumeState
from cdp.tracker.consistency import reflink_snapshot, run_hook
from cdp.tracker.scan import CHUNK as SCAN_CHUNK
from cdp.tracker.scan import scan, volume_size, zero_map
from cdp.tracker.watch import Watcher
from cdp.transport import Backoff, Link
from cdp.units import format_bytes

log = logging.getLogger(__name__)
SAVE_EVERY = 60.0
SCHEDULE_EVERY = 5.0  # seconds between checks of the time-of-day windows
PACE_SLICE = 0.1  # under a cap, one Data frame or scan read carries at most this long at the cap
MIN_PACED_BATCH = 256 * 1024  # ...but Data frames no smaller than this (compression, overhead)
LINK_PROGRESS = 64 * 1024  # the link took this much since: alive, though the receiver is silent
LOCK_FILE = ".source.lock"  # in state_dir: flock'd by the running source, holds its pid




class Source:
    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg
        self.volumes = {v.name: VolumeState(v, cfg.state_dir) for v in cfg.volumes}
        self.index = DedupIndex(cfg.dedup_index_entries)
        self.pool = concurrent.futures.ThreadPoolExecutor(cfg.workers, thread_name_prefix="cdp-z")
        self.wake: dict[str, asyncio.Event] = {}
        self.pacers: dict[str, ScanPacer] = {}  # scan volumes: when the next scan may start
        self.inbox: dict[str, asyncio.Queue[Message]] = {}
        self.acked_event: dict[str, asyncio.Event] = {}
        self.scan_cancel: dict[str, threading.Event] = {}
        self.scan_goal: dict[str, tuple[int, float]] = {}  # last epoch of a scan, its capture time
        self.remote_errors: dict[str, RemoteError] = {}
        self._stop = asyncio.Event()
        self.connected = False
        self.link_error = ""  # why the last connection failed or ended ("" while connected)
        self.link_error_since = 0.0  # when the current run of failed connections began
        self.next_connect = 0.0  # when the next attempt is due (0 while connected)
        self.link: Link | None = None
        self.pings = True  # False once an older receiver refused a Ping
        self.net = TokenBucket(None)  # frames sent, all volumes together
        self.reads = TokenBucket(None)  # scan reads, all volumes together
        self.caps: Caps | None = None
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self.nbd: dict[str, NbdExport] = {}  # nbd-mode volumes: server, journal, dirty map
        self.gate = FairGate(cfg.max_concurrent_scans)  # full scans and resyncs at once
        self.control = Control(self, cfg.state_dir)  # `cdp checkpoint`
        self.metrics = SourceMetrics(self)  # served when cfg.metrics_listen is set
        self.files = FilesetSync(cfg.filesets)
        self._apply_schedule()

    def stop(self) -> None:
        self._stop.set()

    # -- rate limits and reloading ---------------------------------------------

    def _apply_schedule(self, now: datetime | None = None) -> None:
        """Set the source caps from the window in force now; log when they change."""
        cfg = self.cfg
        caps = Schedule(cfg.rate_limit, cfg.read_limit, cfg.schedule).active(now or datetime.now())
        if caps == self.caps:
            return
        first = self.caps is None
        self.caps = caps
        self.net.set_rate(caps.rate_limit)
        self.reads.set_rate(caps.read_limit)
        if first and caps == Caps(None, None, None):
            return
        log.info("rate limits now: network %s, scan reads %s (%s)", format_rate(caps.rate_limit),
                 format_rate(caps.read_limit),
                 f"window {caps.window}" if caps.window else "no window active")

    async def _schedule_loop(self) -> None:
        while True:
            await asyncio.sleep(SCHEDULE_EVERY)
            self._apply_schedule()

    def reload(self) -> None:
        """SIGHUP: reload the config file in the background."""
        task = asyncio.get_running_loop().create_task(self._reload())
        self._background.add(task)
        task.add_done_callback(self._reloaded)

    def _reloaded(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("config reload failed (internal error), still running with the previous "
                      "config: %s: %s", type(exc).__name__, exc, exc_info=exc)

    async def _reload(self) -> None:
        async with self._reload_lock:
            log.info("reloading %s (SIGHUP)", self.cfg.path)
            try:
                new = await asyncio.to_thread(load_source, self.cfg.path)
            except CdpError as exc:
                log.error("config reload failed, still running with the previous config: %s", exc)
                return
            plan = reload_source(self.cfg, new)
            log_reload(log, plan.applied, plan.restart)
            self.cfg = plan.cfg
            for vs in self.volumes.values():
                vc = plan.cfg.volume(vs.name)
                if vc is not None:
                    vs.configure(vc)
            self._apply_schedule()
            self._write_status()

    async def _pace(self, vs: VolumeState, msg: Message) -> None:
        """Wait until `msg` may go: the volume's cap first, then the source's."""
        n = _wire_estimate(msg)
        await take(vs.bucket, n)
        await take(self.net, n)

    async def _send(self, link: Link, vs: VolumeState, msg: Message) -> int:
        await self._pace(vs, msg)
        return await link.send(msg)

    # -- main loop -----------------------------------------------------------

    async def run(self) -> None:
        """Run until stop(); InUseError if another source has the state_dir, ListenError if an
        address (metrics_listen, an nbd_listen) is taken."""
        lock = DirLock(self.cfg.state_dir, LOCK_FILE, "source", "state_dir")
        try:
            await self._run()
        except ListenError:
            for export in self.nbd.values():  # those started before the one that failed
                await export.stop()
            await self.metrics.close()
            raise
        finally:
            lock.close()

    async def _run(self) -> None:
        await self.metrics.start(self.cfg.metrics_listen)
        loop = asyncio.get_running_loop()
        watcher = Watcher(loop)
        for name, vs in self.volumes.items():
            self.wake[name] = asyncio.Event()
            self.acked_event[name] = asyncio.Event()
            self.scan_cancel[name] = threading.Event()
            if vs.cfg.mode == "scan":
                watcher.watch(vs.cfg.path, self.wake[name].set)
            try:
                size = volume_size(vs.cfg.path)
                vs.load(Geometry(size, vs.cfg.block_size))
                if vs.cfg.mode == "nbd":
                    export = self.nbd[name] = NbdExport(vs, vs.dir)
                    await export.start()
            except TrackerError as exc:
                vs.error, vs.phase = str(exc), "failed"
                log.error("volume=%s: %s", name, exc)
        groups: dict[str, list[NbdExport]] = {}
        for name, export in self.nbd.items():
            group = self.volumes[name].cfg.group
            if group is not None and export.journal is not None:
                groups.setdefault(group, []).append(export)
        for members in groups.values():
            journals = tuple(e.journal for e in members if e.journal is not None)
            for j in journals:
                j.group = journals
        self.files.start(loop)
        watcher.start()
        await self.control.start()
        status = asyncio.create_task(self._status_loop())
        schedule = asyncio.create_task(self._schedule_loop())
        backoff = Backoff(self.cfg.reconnect_min, self.cfg.reconnect_max)
        host, port = self.cfg.receiver
        log.info("source started name=%s receiver=%s:%d volumes=%s", self.cfg.name, host, port,
                 ",".join(self.volumes))
        try:
            while not self._stop.is_set():
                conn = asyncio.create_task(self._connection(backoff))
                stop = asyncio.create_task(self._stop.wait())
                await asyncio.wait({conn, stop}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if not conn.done():
                    conn.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    results = await asyncio.gather(conn, return_exceptions=True)
                    err = results[0] if results else None
                    if isinstance(err, BaseException) and not isinstance(
                            err, asyncio.CancelledError):
                        self._log_disconnect(err)
                if self._stop.is_set():
                    break
                delay = backoff.next()
                self.next_connect = time.time() + delay
                self._write_status()  # `cdp status` shows why, since when, and the next try
                log.info("reconnecting in %.1fs", delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
        finally:
            watcher.stop()
            await self.control.stop()
            self.files.stop()
            for export in self.nbd.values():
                await export.stop()
            for name, vs in self.volumes.items():
                self.scan_cancel[name].set()
                if vs.smap is not None:
                    vs.undo_from(vs.acked + 1)
                    with contextlib.suppress(OSError):
                        vs.save()
            status.cancel()
            schedule.cancel()
            self._write_status()
            self.pool.shutdown(wait=True, cancel_futures=True)
            await self.metrics.close()
            log.info("source stopped")

    def _log_disconnect(self, err: BaseException) -> None:
        self.metrics.disconnected(err)
        self.link_error = str(err) or type(err).__name__
        self.link_error_since = self.link_error_since or time.time()
        if isinstance(err, RemoteError) and f"unknown message type {Ping.TYPE}" in err.remote_message:
            self.pings = False  # mixed versions while upgrading: go on without Ping
            log.warning("the receiver does not know Ping (an older cdp): from now on a dead link "
                        "is noticed only while epochs await acknowledgement; upgrade the receiver")
            return
        if isinstance(err, RemoteError) and err.code == "superseded":
            log.warning("the receiver closed this connection: a newer connection named %r took "
                        "over its volumes (normal after a link fault; if it keeps happening, "
                        "another source runs with the same name)", self.cfg.name)
            return
        if isinstance(err, AuthError | RemoteError) and (
                isinstance(err, AuthError) or err.code in PERMANENT_CODES):
            log.error("receiver refused us: %s", err)
        elif isinstance(err, TransportError | OSError | TimeoutError):
            log.warning("receiver unreachable or connection lost: %s", err)
        elif isinstance(err, CdpError):
            log.error("connection failed: %s", err)
        else:
            log.error("internal error: %r", err, exc_info=err)

    async def _connection(self, backoff: Backoff) -> None:
        link = await connect(self.cfg)
        self.link = link
        self.connected = True
        self.link_error, self.link_error_since, self.next_connect = "", 0.0, 0.0
        self.metrics.connections.inc()
        backoff.reset()
        log.info("connected to receiver %s", link.peer)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._reader(link))
                for vs in self.volumes.values():
                    tg.create_task(self._volume(link, vs))
                tg.create_task(self._stop_watch(link))
                tg.create_task(self._keepalive(link))
                tg.create_task(self._watchdog(link))
                tg.create_task(self.files.run(link, self.net))
        except* asyncio.CancelledError:
            raise
        except* _Stopped:
            pass
        except* Exception as eg:
            raise eg.exceptions[0] from None
        finally:
            self.connected = False
            self.link = None
            for vs in self.volumes.values():
                if vs.phase not in ("failed",):
                    vs.phase = "disconnected"
            await link.close()

    async def _keepalive(self, link: Link) -> None:
        """When nothing else went out for a while, say Current for an idle volume.

        Only for a receiver that does not know Ping (an older cdp, see _watchdog): keeps it
        from dropping a quiet connection (its idle_timeout) when scans are rare; the
        receiver only records it if the epoch matches.
        """
        last = link.sent_bytes
        while True:
            await asyncio.sleep(self.cfg.keepalive)
            if self.pings or link.sent_bytes != last:
                last = link.sent_bytes
                continue
            for vs in self.volumes.values():
                open_vs = link.session.volumes.get(vs.name)
                if open_vs is not None and not open_vs.in_epoch and vs.current_as_of:
                    with contextlib.suppress(CdpError):
                        await link.send(Current(vs.name, vs.acked, vs.current_as_of))
                    break
            last = link.sent_bytes

    async def _watchdog(self, link: Link) -> None:
        """Dead links: after `keepalive` with nothing received or nothing sent, ask the
        receiver for an answer (Ping: it also tells the receiver we are alive); after
        `dead_after` with nothing received while an answer is awaited (a Pong, or
        the acknowledgement of a pending epoch), drop the connection: the reconnect and the
        resume take over. A half-open connection (a NAT that forgot it, a peer gone without a
        RST) would otherwise hold pending epochs as long as TCP keeps retrying.

        A link still taking data is not dead: while the peer keeps acknowledging our bytes at
        the TCP level (a slow link; a Pong stuck behind megabytes of buffered data) the clock
        does not run. Keepalives alone do not count (a few small frames)."""
        session = link.session
        assert isinstance(session, SourceSession)
        nonce = 0
        ping: asyncio.Task[int] | None = None
        mark, moved_at = link.written - link.unacked(), time.monotonic()
        written, wrote_at = link.written, time.monotonic()
        try:
            while True:
                keepalive, dead_after = self.cfg.keepalive, self.cfg.dead_after  # SIGHUP may change
                await asyncio.sleep(max(0.05, min(keepalive, dead_after - keepalive) / 4))
                now = time.monotonic()
                taken = link.written - link.unacked()  # acknowledged by the peer's TCP
                if taken - mark >= LINK_PROGRESS:
                    mark, moved_at = taken, now  # the link is taking our data
                if link.written != written:
                    written, wrote_at = link.written, now
                heard = now - link.received_at
                silent = min(heard, now - moved_at)
                awaiting = bool(session.pings) or any(vs.pending for vs in self.volumes.values())
                if silent >= dead_after and awaiting:
                    log.warning("dead link: nothing received from the receiver %s for %.0fs "
                                "(dead_after %gs) while awaiting its answer; dropping the "
                                "connection to reconnect", link.peer, heard, dead_after)
                    link.abort()  # what is unsent cannot leave: do not wait for it
                    raise TransportError(f"no answer from {link.peer} for {heard:.0f}s "
                                         "(dead_after)")
                quiet = max(heard, now - wrote_at)  # the receiver's idle_timeout needs our bytes
                if (quiet >= keepalive and self.pings and not session.pings
                        and (ping is None or ping.done())):
                    nonce += 1
                    ping = asyncio.create_task(link.send(Ping(nonce)))  # it may block: not here
                    ping.add_done_callback(_quiet)
        finally:
            if ping is not None:
                ping.cancel()

    async def _stop_watch(self, link: Link) -> None:
        await self._stop.wait()
        with contextlib.suppress(CdpError, TimeoutError):
            await asyncio.wait_for(link.send(Bye("source shutting down")), 5)
        raise _Stopped

    async def _reader(self, link: Link) -> None:
        while True:
            for msg in await link.receive(None):
                if isinstance(msg, Error) and not msg.volume:
                    raise RemoteError(msg.code, msg.message)
                if isinstance(msg, Bye):
                    raise TransportError(f"receiver closed the connection: {msg.reason}")
                if isinstance(msg, FILE_REPLIES):
                    self.files.deliver(msg)
                    continue
                if isinstance(msg, Pong):
                    continue  # the link is alive: link.received_at says so
                vol = getattr(msg, "volume", "")
                vs = self.volumes.get(vol)
                if vs is None:
                    continue
                if isinstance(msg, Ack):
                    self._on_ack(link, vs, msg)
                elif isinstance(msg, Labelled | LabelTaken):
                    self.control.labelled(msg)
                elif isinstance(msg, Need):
                    vs.need = msg.epoch
                    vs.stats["needs"] += 1
                    self.scan_cancel[vol].set()
                    self.acked_event[vol].set()
                    log.info("receiver could not resolve references volume=%s epoch=%d; "
                             "re-sending", vol, msg.epoch)
                else:
                    if isinstance(msg, Error):  # the receiver stopped this volume
                        self.remote_errors[vol] = RemoteError(msg.code, msg.message, vol)
                        self.scan_cancel[vol].set()
                        self.acked_event[vol].set()
                    self.inbox.setdefault(vol, asyncio.Queue()).put_nowait(msg)

    def _on_ack(self, link: Link, vs: VolumeState, msg: Ack) -> None:
        p = vs.acknowledged(msg.epoch)
        export = self.nbd.get(vs.name)
        if export is not None and export.journal is not None:
            export.journal.acked(msg.epoch)
        vs.stats["epochs"] += 1
        self.acked_event[vs.name].set()
        goal = self.scan_goal.get(vs.name)
        if p is not None and goal and goal[0] == msg.epoch:
            vs.current_as_of = goal[1]
            vs.confirmed_at = time.time()
            vs.seeded = True
            self._spawn(self._send_current(link, vs))
        if not vs.pending and vs.seeded and vs.phase == "sending":
            vs.phase = "idle"  # all acknowledged: not "sending" until the next scan
        if not vs.pending and time.time() - vs.saved_at > SAVE_EVERY:
            vs.saved_at = time.time()  # one save at a time
            self._spawn(asyncio.to_thread(self._save, vs))

    def _spawn(self, coro: Any) -> None:
        """A fire-and-forget task that is kept referenced until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    def _save(vs: VolumeState) -> None:
        try:
            vs.save()
        except OSError as exc:
            log.warning("volume=%s: cannot save the block map (%s); a restart will fetch it "
                        "from the receiver instead", vs.name, exc)

    async def _send_current(self, link: Link, vs: VolumeState) -> None:
        with contextlib.suppress(CdpError):
            await self._pace(vs, Current(vs.name, vs.acked, vs.current_as_of))
            if vs.name in link.session.volumes and not link.session.volumes[vs.name].in_epoch:
                await link.send(Current(vs.name, vs.acked, vs.current_as_of))

    async def _expect(self, vs: VolumeState, kind: type[Message]) -> Message:
        msg = await self.inbox.setdefault(vs.name, asyncio.Queue()).get()
        if isinstance(msg, Error):
            raise RemoteError(msg.code, msg.message, vs.name)
        if not isinstance(msg, kind):
            raise ProtocolError(f"{vs.name}: expected {kind.__name__}, got {type(msg).__name__}")
        return msg

    # -- per volume ----------------------------------------------------------

    async def _volume(self, link: Link, vs: VolumeState) -> None:
        retry = Backoff(self.cfg.reconnect_min, self.cfg.retry_max)
        while True:
            started, acked = time.monotonic(), vs.acked
            try:
                await self._volume_session(link, vs)
            except RemoteError as exc:
                self.metrics.error(f"remote_{exc.code}")
                vs.phase, vs.error = "failed", str(exc)
                log.error("volume=%s stopped by the receiver: %s", vs.name, exc.remote_message)
                if exc.code in PERMANENT_CODES:
                    # e.g. promoted at the DR site: retrying cannot help; the other volumes go on
                    log.error("volume=%s: not retrying (%s); fix it and restart the source",
                              vs.name, exc.code)
                    await asyncio.Event().wait()
            except TrackerError as exc:
                vs.phase, vs.error = "failed", str(exc)
                log.error("volume=%s: %s", vs.name, exc)
                with contextlib.suppress(CdpError):
                    await self._send(link, vs, Error("tracker", str(exc), vs.name))
            self.inbox.pop(vs.name, None)
            if vs.acked != acked or time.monotonic() - started >= self.cfg.retry_max:
                retry.reset()  # it worked for a while: a new fault starts from the short delay
            delay = retry.next()
            log.info("volume=%s: retrying in %.1fs", vs.name, delay)
            await asyncio.sleep(delay)

    async def _open(self, link: Link, vs: VolumeState) -> Opened:
        """Open the volume on the receiver and make smap describe what the replica holds."""
        size = await asyncio.to_thread(volume_size, vs.cfg.path)
        geo = Geometry(size, vs.cfg.block_size)
        if vs.geo != geo:
            vs.load(geo)
        vs.phase = "opening"
        self.remote_errors.pop(vs.name, None)
        self.inbox.pop(vs.name, None)
        await self._send(link, vs, Open(vs.name, geo.size, geo.block_size))
        opened = await self._expect(vs, Opened)
        assert isinstance(opened, Opened)
        vs.error = ""
        if vs.reconcile(opened.replica_id, opened.epoch):
            log.info("volume=%s resuming at epoch %d", vs.name, opened.epoch)
            if not vs.indexed:
                self._index_map(vs, opened.epoch)
        else:
            await self._fetch_map(link, vs, opened)
        return opened

    async def _volume_session(self, link: Link, vs: VolumeState) -> None:
        if vs.cfg.mode == "nbd":
            export = self.nbd.get(vs.name)
            if export is None:
                raise TrackerError(f"volume {vs.name} is not served over NBD: {vs.error or 'see the log'}")
            await nbd_session(self, link, vs, export)
            return
        await self._open(link, vs)
        wake = self.wake[vs.name]
        pacer = self.pacers.setdefault(vs.name, ScanPacer(vs.cfg.min_scan_interval))
        vs.resync.running = 0  # a resync cut short by a reconnect starts over
        first = True
        while True:
            if (err := self.remote_errors.pop(vs.name, None)) is not None:
                raise err
            if not first and vs.need is None and not (vs.resync.wanted and not vs.resync.running):
                vs.phase = "idle" if vs.seeded else vs.phase
                pacer.min_interval = vs.cfg.min_scan_interval  # SIGHUP may have changed it
                await next_scan(wake, pacer, vs.cfg.scan_interval)
            first = False
            wake.clear()
            await held(self, vs)  # `cdp pause`: until resumed
            pacer.started(time.monotonic())
            if vs.need is not None:
                # the receiver dropped epoch `need` and all later ones: roll back and rescan
                vs.undo_from(vs.need, self.index)
                vs.need = None
            if vs.resync.wanted and not vs.resync.running:
                await refetch(self, link, vs)  # `cdp resync`: compare with the replica's image
            async with self.control.checkpoints(vs):  # `cdp checkpoint` requests this scan serves
                whole = await self._scan_once(link, vs)
            if whole:
                compared(self, vs)

    async def _fetch_map(self, link: Link, vs: VolumeState, opened: Opened) -> None:
        assert vs.geo is not None
        n = vs.geo.blocks
        vs.phase = "fetching map"
        if opened.epoch == 0:
            smap = zero_map(vs.geo)
            log.info("volume=%s: new replica, seeding", vs.name)
        else:
            log.info("volume=%s: fetching the replica's block map (epoch %d, %d blocks)",
                     vs.name, opened.epoch, n)
            await self._pace(vs, GetHashes(vs.name, 0, n, False))
            smap = await fetch_hashes(link, vs.name, n, False,
                                      lambda: self._expect(vs, Hashes))
        vs.adopt(opened.replica_id, opened.epoch, smap)
        vs.seeded = opened.epoch > 0
        if opened.epoch > 0:
            self._index_map(vs, opened.epoch)
        else:
            vs.indexed = True  # a new replica holds nothing to refer to

    def _index_map(self, vs: VolumeState, epoch: int) -> None:
        """What the replica holds is available for references from every volume."""
        assert vs.geo is not None and vs.smap is not None
        smap, zero = memoryview(vs.smap), zero_hash(vs.geo.block_size)
        step = 4096
        zeros = zero * step
        for first in range(0, vs.geo.blocks, step):
            n = min(step, vs.geo.blocks - first)
            if smap[first * 16:(first + n) * 16] == zeros[:n * 16]:
                continue  # a stretch of zero blocks (most of a sparse volume): nothing to index
            for i in range(first, first + n):
                h = bytes(smap[i * 16:(i + 1) * 16])
                if h != zero and h != zero_hash(vs.geo.length(i)):
                    self.index.add(h, vs.name, i, epoch)
        vs.indexed = True

    async def _scan_once(self, link: Link, vs: VolumeState) -> bool:
        """One scan; True if it covered the whole volume (not cut short by a pause or a Need)."""
        async with self.gate.slot(vs, "scan"):  # max_concurrent_scans, first come first served
            if vs.paused_since:
                return False  # paused while queued: no hooks, no reads
            return await self._scan_now(link, vs)

    async def _scan_now(self, link: Link, vs: VolumeState) -> bool:
        """One scan. Its epochs carry two times (docs/how-it-works.md, "Scans see torn state"): `capture`,
        everything that finished before it is in, and `until`, nothing that finished after
        it is. pre_scan quiesces until post_scan: both are the moment the hook returned (a
        write it waited for is in). A reflink copy is one instant inside the copy call.
        Otherwise the scan reads over a period: its start, and the end of each epoch's reads.
        """
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
            return await self._stream_scan(link, vs, path, capture, until)
        finally:
            if cfg.snapshot == "reflink":
                with contextlib.suppress(OSError):
                    snap.unlink()
            if not thawed:
                await run_hook(cfg.post_scan, "post_scan", vs.name, cfg.path)

    async def _stream_scan(self, link: Link, vs: VolumeState, path: Path, capture: float,
                           until: float | None) -> bool:
        vs.phase = "resync" if vs.resync.running else "scanning" if vs.seeded else "seeding"
        vs.stats["scans"] += 1
        assert vs.geo is not None
        t0 = time.monotonic()
        chunk = _paced(SCAN_CHUNK, self.reads.rate, vs.geo.block_size)
        pacer = self.pacers.setdefault(vs.name, ScanPacer(vs.cfg.min_scan_interval))
        seeded = vs.seeded

        skipped = 0  # bytes of holes: zero without being read
        short = False  # stopped by a pause before the end

        def produce(builder: EpochBuilder, progress: Callable[..., None],
                    cancelled: Callable[[], bool]) -> bool:
            nonlocal short
            assert vs.geo is not None and vs.smap is not None

            def stop() -> bool:  # `cdp pause`: what was found so far is committed, then no more
                return cancelled() or bool(vs.paused_since)

            def hole(n: int) -> None:
                nonlocal skipped
                skipped += n
                progress(n, read=False)

            def throttle(n: int) -> None:
                take_blocking(self.reads, n, stop)

            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise TrackerError(f"cannot open volume {path}: {exc.strerror}") from None
            try:
                # what a rescan cost spaces the next one (scanpace.DUTY); a seed predicts nothing
                with cpu_meter(pacer) if seeded else contextlib.nullcontext():
                    for block, h, content in scan(fd, vs.geo, vs.smap, progress=progress, chunk=chunk,
                                                  cancelled=stop, throttle=throttle, holes=hole):
                        builder.add(block, h, content)
            finally:
                os.close(fd)
            short = stop() and not cancelled()
            return short

        def read_end() -> float:
            return time.time() if until is None else until  # None: an epoch ends its reads now

        await self.stream(link, vs, capture, produce, until=read_end)
        if vs.need is not None:
            return False
        vs.phase = "sending" if vs.pending else ("idle" if vs.seeded else vs.phase)
        dt = time.monotonic() - t0
        whole = not short
        log.log(logging.INFO if vs.stats["scans"] <= 1 or dt > 5 or not whole else logging.DEBUG,
                "volume=%s scan %s in %.1fs (%s read, %s of holes skipped)", vs.name,
                "done" if whole else "stopped (paused)", dt,
                format_bytes(vs.progress[0] - skipped), format_bytes(skipped))
        return whole

    async def stream(self, link: Link, vs: VolumeState, capture: float, produce: Producer, *,
                     split: bool = True, total: int | None = None,
                     until: Callable[[], float] | None = None) -> int | None:
        """Run `produce` in a thread feeding an EpochBuilder; send what it builds as it comes.

        Returns the last epoch committed (None if nothing changed). Raises
        _Cancelled-free: a Need, an error or a shutdown ends it early (check
        vs.need and the link). With split=False an epoch is never cut in two
        (an NBD epoch must stay one state the guest had). `until()` is called when an
        epoch's reads are done: no write that finished later is in it (None: `capture`).
        """
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        room = threading.Semaphore(self.cfg.workers * 2 + 2)  # ops between scan and socket
        cancel = self.scan_cancel[vs.name]
        cancel.clear()
        assert vs.geo is not None
        vs.progress = (0, vs.geo.size if total is None else total)
        # under a cap, frames and reads are small enough to be paced smoothly
        caps = [r for r in (vs.bucket.rate, self.net.rate) if r is not None]
        batch = _paced(self.cfg.batch_bytes, min(caps) if caps else None, MIN_PACED_BATCH)
        last: list[int] = []

        def emit(op: tuple[Any, ...]) -> None:
            # room first (bounded memory), then a fire-once hand-off: an op is never queued twice
            while not room.acquire(timeout=0.5):
                if cancel.is_set():
                    raise _Cancelled
            if cancel.is_set():
                raise _Cancelled
            if op[0] == "commit":
                last.append(op[1])
                op = (*op, capture if until is None else until())
            loop.call_soon_threadsafe(q.put_nowait, op)

        def work() -> None:
            builder = EpochBuilder(vs, self.volumes, self.index, self.pool, emit,
                                   capture_time=capture, batch_bytes=batch,
                                   max_epoch_bytes=self.cfg.max_epoch_bytes if split else 1 << 62,
                                   level=self.cfg.compress_level)
            done = 0

            def progress(n: int, read: bool = True) -> None:
                """`n` more bytes covered: read, or known without reading (holes)."""
                nonlocal done
                done += n
                vs.progress = (done, vs.progress[1])
                vs.stats["scanned" if read else "skipped"] += n

            short = produce(builder, progress, cancel.is_set)
            builder.commit()
            emit(("end", bool(short)))

        scan_task = asyncio.ensure_future(asyncio.to_thread(work))
        sender = asyncio.create_task(self._send_ops(link, vs, q, room, capture))
        try:
            await asyncio.wait({scan_task, sender}, return_when=asyncio.FIRST_EXCEPTION)
            if sender.done() and sender.exception() is not None:
                raise sender.exception()  # type: ignore[misc]
            if scan_task.done():
                exc = scan_task.exception()
                if exc is not None:
                    # cancelled (Need, error, shutdown) or failed: "end" will never come
                    sender.cancel()
                    if not isinstance(exc, _Cancelled):
                        raise exc
                else:
                    await sender  # it drains the queue up to "end"
        finally:
            cancel.set()
            sender.cancel()
            with contextlib.suppress(BaseException):
                await scan_task
            with contextlib.suppress(BaseException):
                await sender
        return last[-1] if last else None

    async def _send_ops(self, link: Link, vs: VolumeState, q: asyncio.Queue[tuple[Any, ...]],
                        room: threading.Semaphore, capture: float) -> None:
        last_epoch = None
        while True:
            op = await q.get()
            room.release()
            if vs.need is not None or vs.name not in link.session.volumes:
                return  # the epoch was dropped (Need) or the volume stopped (Error)
            kind = op[0]
            if kind == "begin":
                while vs.unacked_committed() >= self.cfg.window and vs.need is None:
                    self.acked_event[vs.name].clear()
                    await self.acked_event[vs.name].wait()
                if vs.need is not None:
                    return
                vs.stats["wire"] += await self._send(link, vs, Begin(vs.name, op[1], op[2]))
            elif kind == "data":
                msg = await asyncio.wrap_future(op[1])
                vs.stats["compressed"] += len(msg.zdata)
                n = await self._send(link, vs, msg)
                vs.stats["wire"] += n
                vs.rate_window.append((time.time(), msg.raw_len))
            elif kind == "msg":
                vs.stats["wire"] += await self._send(link, vs, op[1])
            elif kind == "commit":
                commit = Commit(vs.name, op[1], op[2], op[3])
                await self._pace(vs, commit)
                with vs.lock:
                    p = vs.pending.get(op[1])
                    if p is not None:
                        p.committed = True
                vs.stats["wire"] += await link.send(commit)
                last_epoch = op[1]
            elif kind == "end":
                if op[1]:
                    return  # cut short (paused): the replica is not current as of `capture`
                if last_epoch is None and not vs.pending:
                    vs.current_as_of = capture  # nothing changed: the replica is current
                    vs.confirmed_at = time.time()
                    vs.seeded = True
                    await self._send_current(link, vs)
                elif last_epoch is not None:
                    self.scan_goal[vs.name] = (last_epoch, capture)
                    if last_epoch <= vs.acked and not vs.pending:
                        vs.current_as_of = capture
                        vs.confirmed_at = time.time()
                        vs.seeded = True
                return

    # -- status --------------------------------------------------------------

    async def _status_loop(self) -> None:
        last_log = 0.0
        while True:
            await asyncio.sleep(1.0)
            self._write_status()
            now = time.monotonic()
            if now - last_log >= 10:
                last_log = now
                for vs in self.volumes.values():
                    if vs.phase in ("seeding", "scanning") and vs.progress[1]:
                        log.info("volume=%s %s %.0f%% (%s of %s)", vs.name, vs.phase,
                                 100 * vs.progress[0] / vs.progress[1],
                                 format_bytes(vs.progress[0]), format_bytes(vs.progress[1]))

    def _write_status(self) -> None:
        with contextlib.suppress(OSError):
            atomic_write_json(self.cfg.state_dir / "status.json", {
                "source": self.cfg.name, "connected": self.connected, "pid": os.getpid(),
                "link_error": self.link_error, "link_error_since": self.link_error_since,
                "next_connect": self.next_connect,
                "updated": time.time(), "rate_limit": self.net.rate, "read_limit": self.reads.rate,
                "window": self.caps.window if self.caps else None,
                "volumes": [vs.status() for vs in self.volumes.values()],
                "filesets": self.files.status(),
            }, sync=False)


class _Stopped(Exception):
    pass


def _quiet(task: asyncio.Task[Any]) -> None:
    """A fire-and-forget send: its failure shows elsewhere (the link is dropped)."""
    if not task.cancelled():
        task.exception()


def _paced(size: int, rate: float | None, floor: int) -> int:
    """`size`, or less under a cap: about PACE_SLICE seconds' worth, not below `floor`."""
    return size if rate is None else min(size, max(floor, int(rate * PACE_SLICE)))


def _wire_estimate(msg: Message) -> int:
    """About the size of msg's frame (a little more): what the rate limits count."""
    n = 16
    for v in vars(msg).values():
        n += len(v) + 5 if isinstance(v, bytes | str) else 9
    return n


def run_source(cfg: SourceConfig) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the config. Returns the exit code."""

    async def main() -> None:
        src = Source(cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, src.stop)
        loop.add_signal_handler(signal.SIGHUP, src.reload)
        await src.run()

    asyncio.run(main())
    return 0
