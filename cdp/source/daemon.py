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
import time
from datetime import datetime
from typing import Any

from cdp.blocks import Geometry
from cdp.config import SourceConfig, load_source, log_reload, reload_source
from cdp.durable import DirLock, atomic_write_json
from cdp.errors import (
    PERMANENT_CODES,
    AuthError,
    CdpError,
    ListenError,
    RemoteError,
    TrackerError,
    TransportError,
)
from cdp.lifecycle import cancel_and_wait, dump_tasks, serve, start_reload
from cdp.metrics import SourceMetrics
from cdp.ratelimit import Caps, Schedule, TokenBucket, format_rate, take
from cdp.source.connect import connect
from cdp.source.control import Control
from cdp.source.filesets import REPLIES as FILE_REPLIES
from cdp.source.filesets import FilesetSync
from cdp.source.nbdmode import NbdExport
from cdp.source.nbdworker import NbdWorker
from cdp.source.phase import Phase
from cdp.source.qemuworker import QemuWorker
from cdp.source.scangate import FairGate
from cdp.source.scanworker import ScanWorker
from cdp.source.volume import DedupIndex, VolumeState
from cdp.source.worker import VolumeWorker
from cdp.status import SourceStatus
from cdp.tracker.hashworker import HashHelpers
from cdp.tracker.scan import volume_size
from cdp.tracker.watch import Watcher
from cdp.units import format_bytes
from cdp.wire.messages import (
    Ack,
    Bye,
    Current,
    Error,
    Labelled,
    LabelTaken,
    Message,
    Need,
    Ping,
    Pong,
    has,
)
from cdp.wire.source_session import SourceSession
from cdp.wire.transport import Backoff, Link

log = logging.getLogger(__name__)
TEARDOWN_GRACE = 15.0  # seconds a failed connection's tasks get to end before that is a bug report
STATUS_SPACING = 0.05  # seconds between two writes of status.json when the replica moves on
SCHEDULE_EVERY = 5.0  # seconds between checks of the time-of-day windows
LINK_PROGRESS = 64 * 1024  # the link took this much since: alive, though the receiver is silent
LOCK_FILE = ".source.lock"  # in state_dir: flock'd by the running source, holds its pid




WORKERS: dict[str, type[VolumeWorker]] = {"scan": ScanWorker, "nbd": NbdWorker, "qemu": QemuWorker}


class Source:
    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg
        self.volumes = {v.name: VolumeState(v, cfg.state_dir) for v in cfg.volumes}
        self.index = DedupIndex(cfg.dedup_index_entries)
        self.pool = concurrent.futures.ThreadPoolExecutor(cfg.workers, thread_name_prefix="cdp-z")
        self.workers: dict[str, VolumeWorker] = {
            name: WORKERS[vs.cfg.mode](vs, self)
            for name, vs in self.volumes.items()}
        self._stop = asyncio.Event()
        self._status_due = asyncio.Event()  # the replica became current as of a newer time
        self.connected = False
        self.link_error = ""  # why the last connection failed or ended ("" while connected)
        self.link_error_since = 0.0  # when the current run of failed connections began
        self.next_connect = 0.0  # when the next attempt is due (0 while connected)
        self.link: Link | None = None
        self.pings = True  # whether the receiver's protocol has Ping (see _watchdog)
        self.net = TokenBucket(None)  # frames sent, all volumes together
        self.reads = TokenBucket(None)  # scan reads, all volumes together
        self.hashers = HashHelpers()  # second processes that hash during rescans
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
        start_reload(self._background, self._reload(), log)

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

    async def pace(self, vs: VolumeState, msg: Message) -> None:
        """Wait until `msg` may go: the volume's cap first, then the source's."""
        n = _wire_estimate(msg)
        await take(vs.bucket, n)
        await take(self.net, n)

    async def send(self, link: Link, vs: VolumeState, msg: Message) -> int:
        await self.pace(vs, msg)
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
        await self._open_volumes(watcher)
        self._link_groups()
        self.files.start(loop)
        watcher.start()
        await self.control.start()
        status = asyncio.create_task(self._status_loop())
        schedule = asyncio.create_task(self._schedule_loop())
        host, port = self.cfg.receiver
        log.info("source started name=%s receiver=%s:%d volumes=%s", self.cfg.name, host, port,
                 ",".join(self.volumes))
        try:
            await self._connect_loop()
        finally:
            await self._shutdown(watcher, status, schedule)

    async def _open_volumes(self, watcher: Watcher) -> None:
        """Watch scan volumes, load each volume's state, start nbd exports; a volume whose
        image cannot be opened is failed (the others go on)."""
        for name, vs in self.volumes.items():
            if vs.cfg.mode == "scan":
                watcher.watch(vs.cfg.path, self.workers[name].wake.set)
            if vs.cfg.mode == "qemu":
                continue  # its size comes from QEMU when its worker connects (cdp/source/qemuworker.py)
            try:
                size = volume_size(vs.cfg.path)
                vs.load(Geometry(size, vs.cfg.block_size))
                if vs.cfg.mode == "nbd":
                    export = self.nbd[name] = NbdExport(vs, vs.dir)
                    await export.start()
            except TrackerError as exc:
                vs.error, vs.phase = str(exc), Phase.FAILED
                log.error("volume=%s: %s", name, exc)

    def _link_groups(self) -> None:
        """Tell each nbd journal of a consistency group who its fellow members are."""
        groups: dict[str, list[NbdExport]] = {}
        for name, export in self.nbd.items():
            group = self.volumes[name].cfg.group
            if group is not None and export.journal is not None:
                groups.setdefault(group, []).append(export)
        for members in groups.values():
            journals = tuple(e.journal for e in members if e.journal is not None)
            for j in journals:
                j.group = journals

    async def _connect_loop(self) -> None:
        """Connect, run the connection until it ends, wait out the backoff; until stop()."""
        backoff = Backoff(self.cfg.reconnect_min, self.cfg.reconnect_max)
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
                async with asyncio.timeout(delay):
                    await self._stop.wait()

    async def _shutdown(self, watcher: Watcher, *tasks: asyncio.Task[None]) -> None:
        """Stop everything _run started, save each volume's map as of its last acknowledged
        epoch, then cancel and await `tasks` and the background ones."""
        watcher.stop()
        self.hashers.close()
        await self.control.stop()
        self.files.stop()
        for export in self.nbd.values():
            await export.stop()
        for name, vs in self.volumes.items():
            self.workers[name].cancel.set()
            if vs.smap is not None:
                vs.undo_from(vs.acked + 1)
                with contextlib.suppress(OSError):
                    vs.save()
        await cancel_and_wait(*tasks, *self._background)
        self._write_status()
        self.pool.shutdown(wait=True, cancel_futures=True)
        await self.metrics.close()
        log.info("source stopped")

    def _log_disconnect(self, err: BaseException) -> None:
        self.metrics.disconnected(err)
        self.link_error = str(err) or type(err).__name__
        self.link_error_since = self.link_error_since or time.time()
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
        assert isinstance(link.session, SourceSession)
        self.pings = has(link.session.version, "ping")  # the version the receiver chose
        self.connected = True
        self.link_error, self.link_error_since, self.next_connect = "", 0.0, 0.0
        self.metrics.connections.inc()
        backoff.reset()
        log.info("connected to receiver %s", link.peer)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._reader(link))
                for vs in self.volumes.values():
                    tg.create_task(self.workers[vs.name].run(link))
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
                if vs.phase is not Phase.FAILED:
                    vs.phase = Phase.DISCONNECTED
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
            self.spawn(self._teardown_watch(link))  # the connection is ending: it must, soon

    async def _teardown_watch(self, link: Link) -> None:
        """A connection whose tasks have not all ended TEARDOWN_GRACE after it began to end
        holds every volume (no reconnect, pending epochs forever): a task ignores its
        cancellation. Never silent: an error, and where every task waits, go to the log."""
        await asyncio.sleep(TEARDOWN_GRACE)
        if self.link is link:
            log.error("the connection to %s began to end %.0fs ago and has not: a task ignores "
                      "its cancellation, so no volume can reconnect (a bug in cdp: please "
                      "report it with the task dump that follows; restarting the source "
                      "recovers)", link.peer, TEARDOWN_GRACE)
            dump_tasks()

    async def _stop_watch(self, link: Link) -> None:
        await self._stop.wait()
        with contextlib.suppress(CdpError, TimeoutError):
            async with asyncio.timeout(5):
                await link.send(Bye("source shutting down"))
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
                    self.workers[vol].on_ack(link, msg)
                elif isinstance(msg, Labelled | LabelTaken):
                    self.control.labelled(msg)
                elif isinstance(msg, Need):
                    self.workers[vol].needed(msg.epoch)
                    log.info("receiver could not resolve references volume=%s epoch=%d; "
                             "re-sending", vol, msg.epoch)
                else:
                    self.workers[vol].deliver(msg)  # an Error: the receiver stopped this volume

    def confirm(self, vs: VolumeState, as_of: float) -> None:
        """The replica is known to hold everything written before `as_of` (source time).
        status.json says so at once, not at its next 1 s tick: `cdp status`, monitoring and
        `cdp bench` see the moment the replica became current, not a later confirmation."""
        vs.current_as_of = as_of
        vs.confirmed_at = time.time()
        vs.seeded = True
        self._status_due.set()

    def spawn(self, coro: Any) -> None:
        """A fire-and-forget task that is kept referenced until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


    # -- status --------------------------------------------------------------

    async def _status_loop(self) -> None:
        last_log = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._status_due.wait()
            self._status_due.clear()
            self._write_status()
            await asyncio.sleep(STATUS_SPACING)  # at most ~20 writes/s under a steady load
            now = time.monotonic()
            if now - last_log >= 10:
                last_log = now
                for vs in self.volumes.values():
                    if vs.phase in (Phase.SEEDING, Phase.SCANNING) and vs.progress[1]:
                        log.info("volume=%s %s %.0f%% (%s of %s)", vs.name, vs.phase,
                                 100 * vs.progress[0] / vs.progress[1],
                                 format_bytes(vs.progress[0]), format_bytes(vs.progress[1]))

    def status(self) -> SourceStatus:
        """The one snapshot of this source that metrics and status.json are made of."""
        return SourceStatus(
            source=self.cfg.name, connected=self.connected, pid=os.getpid(),
            link_error=self.link_error, link_error_since=self.link_error_since,
            next_connect=self.next_connect, updated=time.time(), rate_limit=self.net.rate,
            read_limit=self.reads.rate, window=self.caps.window if self.caps else None,
            volumes=tuple(vs.status() for vs in self.volumes.values()),
            filesets=tuple(self.files.status()))

    def _write_status(self) -> None:
        with contextlib.suppress(OSError):
            atomic_write_json(self.cfg.state_dir / "status.json", self.status().to_dict(),
                              sync=False)


class _Stopped(Exception):
    pass


def _quiet(task: asyncio.Task[Any]) -> None:
    """A fire-and-forget send: its failure shows elsewhere (the link is dropped)."""
    if not task.cancelled():
        task.exception()


def _wire_estimate(msg: Message) -> int:
    """About the size of msg's frame (a little more): what the rate limits count."""
    n = 16
    for v in vars(msg).values():
        n += len(v) + 5 if isinstance(v, bytes | str) else 9
    return n


def run_source(cfg: SourceConfig) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the config. Returns the exit code."""

    async def main() -> None:
        await serve(Source(cfg))

    asyncio.run(main())
    return 0
