"""One volume on the source: its runtime state and the task that replicates it.

The source daemon keeps one worker per volume and only runs the connection and dispatches
what the receiver sends. VolumeWorker holds what wakes its volume (file events, timers,
`cdp resume`/`resync`/`checkpoint`), what the receiver said to it (answers awaited in order,
a stop, acknowledgements), the cancel switch of its scan or stream thread and the goal that
makes the replica current once acknowledged; its `run` task runs sessions, retrying after
faults, and `stream` turns what a producer finds into epochs on the wire. A volume the
receiver stopped for good ends its task; status shows it failed, with the reason.

Each kind of volume is a subclass with its own `session`: ScanWorker
(cdp/source/scanworker.py) scans on each wake-up; NbdWorker (cdp/source/nbdworker.py)
ships what the NBD export journalled; QemuWorker (cdp/source/qemuworker.py) ships what QEMU's
dirty bitmap marked, read from a point-in-time view.

Producers run in a thread; batches compress in the source's pool (zstd releases the GIL,
so both cores work); a bounded queue between them and the socket keeps memory flat.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from cdp.blocks import Geometry
from cdp.codec import zero_hash
from cdp.config import SourceConfig
from cdp.errors import PERMANENT_CODES, CdpError, ProtocolError, RemoteError, TrackerError
from cdp.ratelimit import TokenBucket
from cdp.source.connect import fetch_hashes
from cdp.source.control import Control
from cdp.source.nbdmode import NbdExport, Producer
from cdp.source.phase import Phase
from cdp.source.scangate import FairGate
from cdp.source.volume import Cancelled as _Cancelled
from cdp.source.volume import DedupIndex, EpochBuilder, VolumeState
from cdp.tracker.hashworker import HashHelpers
from cdp.tracker.scan import volume_size, zero_map
from cdp.wire.messages import Ack, Begin, Commit, Current, Error, GetHashes, Hashes, Message, Open, Opened
from cdp.wire.transport import Backoff, Link

log = logging.getLogger("cdp.source.daemon")  # one logger for the daemon's lines, as before
SAVE_EVERY = 60.0  # seconds between saves of the block map while epochs are acknowledged
PACE_SLICE = 0.1  # under a cap, one Data frame or scan read carries at most this long at the cap
MIN_PACED_BATCH = 256 * 1024  # ...but Data frames no smaller than this (compression, overhead)


class Shared(Protocol):
    """What a worker uses of the source daemon (cdp.source.daemon.Source): the config, the
    resources all volumes share, and the daemon-wide limits and status."""

    cfg: SourceConfig
    index: DedupIndex
    pool: concurrent.futures.ThreadPoolExecutor
    volumes: dict[str, VolumeState]
    nbd: dict[str, NbdExport]
    gate: FairGate
    control: Control
    reads: TokenBucket
    net: TokenBucket
    hashers: HashHelpers
    metrics: Any

    @property
    def workers(self) -> Mapping[str, VolumeWorker]: ...

    async def pace(self, vs: VolumeState, msg: Message) -> None: ...

    async def send(self, link: Link, vs: VolumeState, msg: Message) -> int: ...

    def confirm(self, vs: VolumeState, as_of: float) -> None: ...

    def spawn(self, coro: Any) -> None: ...


class VolumeWorker:
    def __init__(self, vs: VolumeState, src: Shared) -> None:
        self.vs = vs
        self.src = src
        self.wake = asyncio.Event()  # something changed or was asked for: scan/ship now
        self.acked = asyncio.Event()  # an Ack, a Need or an Error came in: recheck the window
        self.cancel = threading.Event()  # stop the scan or stream thread (Need, Error, shutdown)
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()  # answers awaited in order (Opened, Hashes)
        self.goal: tuple[int, float] | None = None  # last epoch of the latest scan, its capture time
        self.remote_error: RemoteError | None = None  # the receiver stopped this volume

    @property
    def name(self) -> str:
        return self.vs.name

    def deliver(self, msg: Message) -> None:
        """An answer for this volume from the connection's reader; an Error also stops
        whatever the volume is doing (its task raises it at the next check)."""
        if isinstance(msg, Error):
            self.remote_error = RemoteError(msg.code, msg.message, self.name)
            self.cancel.set()
            self.acked.set()
        self.inbox.put_nowait(msg)

    def needed(self, epoch: int) -> None:
        """The receiver dropped `epoch` and all later ones: stop, roll back, rescan."""
        self.vs.need = epoch
        self.vs.stats["needs"] += 1
        self.cancel.set()
        self.acked.set()

    def take_error(self) -> RemoteError | None:
        """The receiver's stop, once: the volume's task raises it."""
        err, self.remote_error = self.remote_error, None
        return err

    def reset(self) -> None:
        """A new session of the volume: nothing earlier is answered or raised any more."""
        self.remote_error = None
        self.inbox = asyncio.Queue()

    async def expect(self, kind: type[Message]) -> Message:
        """The next answer for this volume, which must be a `kind` (an Error raises)."""
        msg = await self.inbox.get()
        if isinstance(msg, Error):
            raise RemoteError(msg.code, msg.message, self.name)
        if not isinstance(msg, kind):
            raise ProtocolError(f"{self.name}: expected {kind.__name__}, got {type(msg).__name__}")
        return msg

    def on_ack(self, link: Link, msg: Ack) -> None:
        vs = self.vs
        p = vs.acknowledged(msg.epoch)
        export = self.src.nbd.get(vs.name)
        if export is not None and export.journal is not None:
            export.journal.acked(msg.epoch)
        vs.stats["epochs"] += 1
        w = self
        w.acked.set()
        goal = w.goal
        if p is not None and goal and goal[0] == msg.epoch:
            self.src.confirm(vs, goal[1])
            self.src.spawn(self.send_current(link))
        if not vs.pending and vs.seeded and vs.phase == Phase.SENDING:
            vs.phase = Phase.IDLE  # all acknowledged: not "sending" until the next scan
        if not vs.pending and time.time() - vs.saved_at > SAVE_EVERY:
            vs.saved_at = time.time()  # one save at a time
            self.src.spawn(asyncio.to_thread(_save, vs))


    async def send_current(self, link: Link) -> None:
        vs = self.vs
        with contextlib.suppress(CdpError):
            await self.src.pace(vs, Current(vs.name, vs.acked, vs.current_as_of))
            if vs.name in link.session.volumes and not link.session.volumes[vs.name].in_epoch:
                await link.send(Current(vs.name, vs.acked, vs.current_as_of))

    # -- per volume ----------------------------------------------------------

    async def run(self, link: Link) -> None:
        vs = self.vs
        retry = Backoff(self.src.cfg.reconnect_min, self.src.cfg.retry_max)
        while True:
            started, acked = time.monotonic(), vs.acked
            try:
                await self.session(link)
            except RemoteError as exc:
                self.src.metrics.error(f"remote_{exc.code}")
                vs.phase, vs.error = Phase.FAILED, str(exc)
                log.error("volume=%s stopped by the receiver: %s", vs.name, exc.remote_message)
                if exc.code in PERMANENT_CODES:
                    # e.g. promoted at the DR site: retrying cannot help; the other volumes go
                    # on. The volume's task ends here; status shows it failed, with the reason.
                    log.error("volume=%s: not retrying (%s); fix it and restart the source",
                              vs.name, exc.code)
                    return
            except TrackerError as exc:
                vs.phase, vs.error = Phase.FAILED, str(exc)
                log.error("volume=%s: %s", vs.name, exc)
                with contextlib.suppress(CdpError):
                    await self.src.send(link, vs, Error("tracker", str(exc), vs.name))
            self.reset()
            if vs.acked != acked or time.monotonic() - started >= self.src.cfg.retry_max:
                retry.reset()  # it worked for a while: a new fault starts from the short delay
            delay = retry.next()
            log.info("volume=%s: retrying in %.1fs", vs.name, delay)
            await asyncio.sleep(delay)

    async def open(self, link: Link) -> Opened:
        """Open the volume on the receiver and make smap describe what the replica holds."""
        vs = self.vs
        geo = Geometry(await self.volume_size(), vs.cfg.block_size)
        if vs.geo != geo:
            vs.load(geo)
        vs.phase = Phase.OPENING
        self.reset()
        await self.src.send(link, vs, Open(vs.name, geo.size, geo.block_size))
        opened = await self.expect(Opened)
        assert isinstance(opened, Opened)
        vs.error = ""
        if vs.reconcile(opened.replica_id, opened.epoch):
            log.info("volume=%s resuming at epoch %d", vs.name, opened.epoch)
            if not vs.indexed:
                self._index_map(opened.epoch)
        else:
            await self._fetch_map(link, opened)
        return opened

    async def volume_size(self) -> int:
        """The volume's size in bytes (its file or device; a qemu volume asks QEMU)."""
        return await asyncio.to_thread(volume_size, self.vs.cfg.path)

    async def session(self, link: Link) -> None:
        """One session of the volume on `link`, until an error ends it (per kind)."""
        raise NotImplementedError

    async def _fetch_map(self, link: Link, opened: Opened) -> None:
        vs = self.vs
        assert vs.geo is not None
        n = vs.geo.blocks
        vs.phase = Phase.FETCHING_MAP
        if opened.epoch == 0:
            smap = zero_map(vs.geo)
            log.info("volume=%s: new replica, seeding", vs.name)
        else:
            log.info("volume=%s: fetching the replica's block map (epoch %d, %d blocks)",
                     vs.name, opened.epoch, n)
            await self.src.pace(vs, GetHashes(vs.name, 0, n, False))
            smap = await fetch_hashes(link, vs.name, n, False,
                                      lambda: self.expect(Hashes))
        vs.adopt(opened.replica_id, opened.epoch, smap)
        vs.seeded = opened.epoch > 0
        if opened.epoch > 0:
            self._index_map(opened.epoch)
        else:
            vs.indexed = True  # a new replica holds nothing to refer to

    def _index_map(self, epoch: int) -> None:
        """What the replica holds is available for references from every volume."""
        vs = self.vs
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
                    self.src.index.add(h, vs.name, i, epoch)
        vs.indexed = True

    async def stream(self, link: Link, capture: float, produce: Producer, *,
                     split: bool = True, total: int | None = None,
                     until: Callable[[], float] | None = None) -> int | None:
        """Run `produce` in a thread feeding an EpochBuilder; send what it builds as it comes.

        Returns the last epoch committed (None if nothing changed). Raises
        _Cancelled-free: a Need, an error or a shutdown ends it early (check
        vs.need and the link). With split=False an epoch is never cut in two
        (an NBD epoch must stay one state the guest had). `until()` is called when an
        epoch's reads are done: no write that finished later is in it (None: `capture`).
        """
        vs = self.vs
        q: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        room = threading.Semaphore(self.src.cfg.workers * 2 + 2)  # ops between scan and socket
        self.cancel.clear()
        assert vs.geo is not None
        vs.progress = (0, vs.geo.size if total is None else total)
        # under a cap, frames and reads are small enough to be paced smoothly
        caps = [r for r in (vs.bucket.rate, self.src.net.rate) if r is not None]
        batch = paced(self.src.cfg.batch_bytes, min(caps) if caps else None, MIN_PACED_BATCH)
        last: list[int] = []
        emit = self._emitter(q, room, last, capture, until)
        scan_task = asyncio.ensure_future(asyncio.to_thread(self._produce, produce, emit, capture,
                                                            batch, split))
        sender = asyncio.create_task(self._send_ops(link, q, room, capture))
        await self._join(scan_task, sender)
        return last[-1] if last else None

    def _emitter(self, q: asyncio.Queue[tuple[Any, ...]], room: threading.Semaphore, last: list[int],
                 capture: float, until: Callable[[], float] | None) -> Callable[[tuple[Any, ...]], None]:
        """The producer thread's hand-off of one op to the sender; commits are noted in `last`."""
        loop = asyncio.get_running_loop()
        cancel = self.cancel

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

        return emit

    def _produce(self, produce: Producer, emit: Callable[[tuple[Any, ...]], None], capture: float,
                 batch: int, split: bool) -> None:
        """In a thread: `produce` feeds an EpochBuilder whose ops go to `emit`, then "end"."""
        vs, cfg = self.vs, self.src.cfg
        builder = EpochBuilder(vs, self.src.volumes, self.src.index, self.src.pool, emit,
                               capture_time=capture, batch_bytes=batch,
                               max_epoch_bytes=cfg.max_epoch_bytes if split else 1 << 62,
                               level=cfg.compress_level)
        done = 0

        def progress(n: int, read: bool = True) -> None:
            """`n` more bytes covered: read, or known without reading (holes)."""
            nonlocal done
            done += n
            vs.progress = (done, vs.progress[1])
            vs.stats["scanned" if read else "skipped"] += n

        short = produce(builder, progress, self.cancel.is_set)
        builder.commit()
        emit(("end", bool(short)))

    async def _join(self, scan_task: asyncio.Future[None], sender: asyncio.Task[None]) -> None:
        """Until the producer ended and the sender drained its ops, or either failed; a cancelled
        producer (Need, error, shutdown) ends quietly. Both are stopped and awaited."""
        cancel = self.cancel
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

    async def _send_ops(self, link: Link, q: asyncio.Queue[tuple[Any, ...]],
                        room: threading.Semaphore, capture: float) -> None:
        vs = self.vs
        last_epoch = None
        while True:
            op = await q.get()
            room.release()
            if vs.need is not None or vs.name not in link.session.volumes:
                return  # the epoch was dropped (Need) or the volume stopped (Error)
            kind = op[0]
            if kind == "begin":
                acked = self.acked
                while vs.unacked_committed() >= self.src.cfg.window and vs.need is None:
                    acked.clear()
                    await acked.wait()
                if vs.need is not None:
                    return
                vs.stats["wire"] += await self.src.send(link, vs, Begin(vs.name, op[1], op[2]))
            elif kind == "data":
                msg = await asyncio.wrap_future(op[1])
                vs.stats["compressed"] += len(msg.zdata)
                n = await self.src.send(link, vs, msg)
                vs.stats["wire"] += n
                vs.rate_window.append((time.time(), msg.raw_len))
            elif kind == "msg":
                vs.stats["wire"] += await self.src.send(link, vs, op[1])
            elif kind == "commit":
                commit = Commit(vs.name, op[1], op[2], op[3])
                await self.src.pace(vs, commit)
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
                    self.src.confirm(vs, capture)  # nothing changed: the replica is current
                    await self.send_current(link)
                elif last_epoch is not None:
                    self.goal = (last_epoch, capture)
                    if last_epoch <= vs.acked and not vs.pending:
                        self.src.confirm(vs, capture)
                return


def _save(vs: VolumeState) -> None:
    try:
        vs.save()
    except OSError as exc:
        log.warning("volume=%s: cannot save the block map (%s); a restart will fetch it "
                    "from the receiver instead", vs.name, exc)


def paced(size: int, rate: float | None, floor: int) -> int:
    """`size`, or less under a cap: about PACE_SLICE seconds' worth, not below `floor`."""
    return size if rate is None else min(size, max(floor, int(rate * PACE_SLICE)))
