"""The receiver's side of one connection: its serve loop, and the handling of each message
(authentication, volumes opened, epochs received and sealed, labels, file sets), and the
fencing that ends it from outside (a session takeover, a reload)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from cdp.blocks import pack_u64, unpack_u64
from cdp.codec import HASH_LEN
from cdp.config import ReceiverConfig
from cdp.errors import CdpError, LabelTakenError, ReplicaError, TransportError, VolumeError
from cdp.metrics import ReceiverMetrics
from cdp.receiver.admission import Admission, Pending
from cdp.receiver.live import VolumeLive
from cdp.receiver.sink import VolumeSink
from cdp.replica import EpochWriter, Replica
from cdp.replica.files import FileSets
from cdp.replica.points import note_held, set_label
from cdp.wire.messages import (
    Ack,
    Auth,
    Begin,
    Bye,
    Commit,
    Current,
    Cut,
    Data,
    Error,
    FileAck,
    FileDelete,
    FileError,
    FileOpen,
    FileOpened,
    FilePut,
    GetHashes,
    Hashes,
    Hello,
    Label,
    Labelled,
    LabelTaken,
    Message,
    Need,
    Open,
    Opened,
    Ping,
    Pong,
    Ref,
    Zero,
)
from cdp.wire.receiver_session import ReceiverSession
from cdp.wire.session import LABEL_MOVE_VERSION, FilesetError, State
from cdp.wire.transport import Link

log = logging.getLogger("cdp.receiver")  # one logger for the whole receiver: operators filter on it
HASHES_PER_FRAME = 65536
T = TypeVar("T")


class Host(Protocol):
    """What a connection uses of its receiver (cdp.receiver.daemon.Receiver), named here so
    that connections do not import the daemon that makes them."""

    cfg: ReceiverConfig
    metrics: ReceiverMetrics
    admission: Admission
    files: FileSets
    replicas: dict[str, Replica]
    owners: dict[str, int]  # volume -> id() of the connection writing it
    live: dict[str, VolumeLive]

    def filesets(self, name: str) -> tuple[str, ...]: ...

    def promoted(self, volume: str) -> VolumeError | None: ...

    def may_authenticate(self, p: Pending) -> bool: ...

    async def open_replica(self, conn: Connection, msg: Open) -> Replica: ...

    async def work(self, client: str, fn: Callable[..., T], *args: Any) -> T: ...


class Connection:
    """The receiver's side of one connection.

    Each volume written on it has a VolumeSink: the epoch being received and the sealed
    epochs being applied and answered, in order.
    """

    def __init__(self, rx: Host, link: Link, pending: Pending) -> None:
        self.rx = rx
        self.link = link
        self.session: ReceiverSession = link.session  # type: ignore[assignment]
        self.sinks: dict[str, VolumeSink] = {}
        self.volumes: set[str] = set()
        self.volumes_seen = False
        self.pending = pending  # counted by the receiver as unauthenticated until Auth
        self.turn = asyncio.Lock()  # held while one message is handled
        self.fenced = asyncio.Event()  # superseded by a newer connection of the same client
        self.fence_reason = ""
        self._fencing: asyncio.Task[None] | None = None
        self._gave_up: dict[str, str] = {}  # volume -> the source's last Error for it

    def sink(self, volume: str) -> VolumeSink:
        if (s := self.sinks.get(volume)) is None:
            s = self.sinks[volume] = VolumeSink(volume)
        return s

    def queued(self, volume: str) -> int:
        """This volume's epochs sealed here and not yet answered."""
        s = self.sinks.get(volume)
        return s.queued if s is not None else 0

    def receiving(self, volume: str | None = None) -> bool:
        """An epoch of `volume` (None: of any volume) is being received."""
        return any(s.writer is not None for v, s in self.sinks.items() if volume in (None, v))

    async def settle(self, volume: str, before: int | None = None) -> None:
        """Wait until answers for this volume's epochs (those < `before`) are done."""
        if (s := self.sinks.get(volume)) is not None:
            await s.settle(before)

    async def settle_all(self) -> None:
        """Every sealed epoch answered; the sinks' consumers stopped."""
        for s in list(self.sinks.values()):
            await s.close()

    async def say(self, msg: Message) -> None:
        try:
            async with asyncio.timeout(5):
                await self.link.send(msg)
        except (CdpError, TimeoutError, OSError):
            pass

    def drop_writers(self) -> None:
        """Abort the epochs being received (not sealed: nothing of them reached the image)."""
        for s in self.sinks.values():
            s.abort()

    def disown(self) -> None:
        for v in self.volumes:
            if self.rx.owners.get(v) == id(self):
                del self.rx.owners[v]

    async def work(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.rx.work(self.session.client, fn, *args)

    def fence(self, why: str, code: str = "superseded") -> asyncio.Task[None]:
        """End this connection from outside (a session takeover; a reload that removed its
        client or changed its token); the task ends once it holds nothing: closed, its
        unsealed epochs discarded, its sealed ones applied, its volumes released."""
        if self._fencing is None:
            self.fence_reason = why
            self._fencing = asyncio.create_task(self._fence(why, code))
        return self._fencing

    async def _fence(self, why: str, code: str) -> None:
        self.fenced.set()
        with contextlib.suppress(asyncio.TimeoutError, CdpError, OSError):
            async with asyncio.timeout(1):
                await self.link.send(Error(code, why, ""))
        self.link.abort()  # a send or read in progress fails at once
        async with self.turn:  # the message being handled finishes (e.g. a seal in a thread)
            self.drop_writers()
        await self.settle_all()
        self.disown()

    async def await_fence(self, old: Connection, why: str) -> None:
        """Wait until `old` is fenced; give up if this connection is fenced meanwhile (two
        connections of one client superseding each other must not wait on each other)."""
        task = old.fence(why)
        mine = asyncio.ensure_future(self.fenced.wait())
        try:
            await asyncio.wait({task, mine}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            mine.cancel()
        if self.fenced.is_set():
            raise TransportError(f"{self.link.peer}: superseded while taking over {old.link.peer}")

    async def serve(self) -> None:
        auth_deadline = self.pending.since + self.rx.cfg.auth_timeout  # TLS handshake included
        while True:
            if self.session.state is State.READY:
                await self.link.fill(self.rx.cfg.idle_timeout)
            else:  # before authentication: auth_timeout from the start, whatever arrives
                await self._fill_before(auth_deadline)
            # one message at a time: a decision on one (fail a volume, reject an
            # epoch) governs how the session judges the next
            while (item := self.session.next_event()) is not None:
                msg, size = item
                async with self.turn:
                    if self.fenced.is_set():
                        raise TransportError(f"{self.link.peer}: {self.fence_reason}")
                    if self._stale(msg):
                        continue
                    if isinstance(msg, Open) and msg.volume not in self.session.allowed:
                        msg = VolumeError(  # a reload took it away after the Open was taken
                            f"client {self.session.client!r} may not write volume {msg.volume!r} "
                            "(add it to the client's volumes in the receiver config)",
                            code="unauthorized", volume=msg.volume)
                    if await self._handle_event(msg, size):
                        return

    def _stale(self, msg: Message | VolumeError) -> bool:
        """A message taken before its volume was stopped (an error, a reload) and handled after:
        dropped, like the session drops the frames that follow it."""
        vol = getattr(msg, "volume", None)
        return (isinstance(vol, str) and vol in self.session.failed
                and not isinstance(msg, Open | Error))

    async def _handle_event(self, msg: Message | VolumeError, size: int) -> bool:
        """One message; True when the connection should end."""
        if isinstance(msg, FilesetError):  # a set it may not write, a path trick
            log.error("file refused client=%s fileset=%s path=%r code=%s: %s",
                      self.session.client, msg.fileset, msg.path, msg.wire_code, msg)
            await self.link.send(FileError(msg.fileset, msg.path, msg.wire_code, str(msg)))
            return False
        if isinstance(msg, VolumeError):  # e.g. an Open it may not make
            await self.volume_failed(msg.volume, msg.wire_code, str(msg))
            return False
        if isinstance(msg, Bye):
            log.info("client said goodbye client=%s reason=%s", self.session.client, msg.reason)
            return True
        if isinstance(msg, Error) and not msg.volume:
            log.warning("client reported error client=%s code=%s: %s",
                        self.session.client, msg.code, msg.message)
            return True
        vol = getattr(msg, "volume", "")
        try:
            await self.dispatch(msg, size)
        except VolumeError as exc:
            await self.volume_failed(exc.volume or vol, exc.wire_code, str(exc))
        except ReplicaError as exc:
            await self.volume_failed(vol, exc.wire_code, str(exc))
        return False

    async def _fill_before(self, deadline: float) -> None:
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self.link.fill(None)
        except TimeoutError:
            why = (f"not authenticated within {self.rx.cfg.auth_timeout:g}s (auth_timeout), "
                   "closing")
            await self.say(Error("auth_timeout", why, ""))
            raise TransportError(f"{self.link.peer}: {why}") from None

    async def volume_failed(self, vol: str, code: str, message: str) -> None:
        log.error("volume stopped client=%s volume=%s code=%s: %s", self.session.client, vol,
                  code, message)
        self.rx.metrics.error(code)
        if (sink := self.sinks.get(vol)) is not None:
            sink.abort()
        if vol in self.rx.live:
            self.rx.live[vol].error = f"{code}: {message}"
        if self.rx.owners.get(vol) == id(self):
            del self.rx.owners[vol]
        self.volumes.discard(vol)
        await self.link.send(Error(code, message, vol))

    async def dispatch(self, msg: Message, size: int) -> None:
        """Hand one checked message to its handler (the session already refused what is out
        of order); messages without one (Bye) need nothing here."""
        handler = _HANDLERS.get(type(msg))
        if handler is not None:
            await handler(self, msg, size)

    async def _on_hello(self, msg: Hello, size: int) -> None:
        self.session.challenge()
        await self.link.flush()

    async def _on_auth(self, msg: Auth, size: int) -> None:
        s = self.session
        if not self.rx.may_authenticate(self.pending):
            why = (f"client {s.client} authenticated but {self.rx.cfg.max_connections} "
                   "authenticated connections are open (max_connections)")
            self.rx.metrics.error("refused")
            await self.say(Error("busy", f"{why}; try later", ""))
            raise TransportError(f"{self.link.peer}: {why}")
        log.info("client authenticated client=%s peer=%s", s.client, self.link.peer)
        s.welcome()
        await self.link.flush()
        self.rx.admission.authenticated(self.pending)
        self.rx.metrics.connections.inc()  # sessions: not port probes or strangers

    async def _on_ping(self, msg: Ping, size: int) -> None:
        await self.link.send(Pong(msg.nonce))

    async def _on_open(self, msg: Open, size: int) -> None:
        rep = await self.rx.open_replica(self, msg)
        if not msg.readonly:
            self.volumes.add(msg.volume)
            self.volumes_seen = True
            self.rx.live[msg.volume].client = self.session.client
            self.rx.live[msg.volume].error = ""
        st = rep.state
        log.info("volume opened client=%s volume=%s epoch=%d", self.session.client, msg.volume, st.epoch)
        await self.link.send(Opened(msg.volume, st.replica_id, st.epoch, st.epoch_time))

    async def _on_get_hashes(self, msg: GetHashes, size: int) -> None:
        await self.send_hashes(msg)

    async def _on_file(self, msg: FileOpen | FilePut | FileDelete, size: int) -> None:
        await self.file_message(msg)

    async def _on_begin(self, msg: Begin, size: int) -> None:
        # epoch e reuses the WAL file of e-2: that one must be applied first
        await self.settle(msg.volume, msg.epoch - 1)
        if (err := self.rx.promoted(msg.volume)) is not None:
            raise err
        current = self.rx.replicas.get(msg.volume)
        if current is None:
            raise VolumeError(f"replica {msg.volume!r} was closed after an error; reopen it",
                              code="replica", volume=msg.volume)
        self.sink(msg.volume).begin(await self.work(current.begin, msg.epoch, msg.time))

    async def _on_data(self, msg: Data, size: int) -> None:
        w = self.sink(msg.volume).receiving()
        await self.work(w.add_data, msg.indices, msg.hashes, msg.raw_len, msg.zdata)
        w.add_wire(size)

    async def _on_zero(self, msg: Zero, size: int) -> None:
        w = self.sink(msg.volume).receiving()
        await self.work(w.add_zero, msg.runs)
        w.add_wire(size)

    async def _on_ref(self, msg: Ref, size: int) -> None:
        await self.add_refs(msg, size)

    async def _on_cut(self, msg: Cut, size: int) -> None:
        self.sink(msg.volume).receiving().mark_cut(msg.time, msg.since, msg.group, msg.members)

    async def _on_commit(self, msg: Commit, size: int) -> None:
        await self.commit(msg)

    async def _on_label(self, msg: Label, size: int) -> None:
        await self.label(msg)

    async def _on_current(self, msg: Current, size: int) -> None:
        cur = self.rx.replicas.get(msg.volume)
        live = self.rx.live.get(msg.volume)
        if cur is not None and live is not None and msg.epoch == cur.state.epoch:
            live.current_as_of = min(msg.time, time.time() + 60)  # not in the future
            if cur.state.seeding:  # whole at last: no more data placed at receipt
                await self.work(cur.seeded, msg.epoch)
            if cur.state.group and (cur.state.cut or {}).get("group"):
                # a group cut held through then: later group cuts are this volume's too
                await self.work(note_held, cur.path, msg.epoch, live.current_as_of)

    async def _on_error(self, msg: Error, size: int) -> None:
        # a source retrying a volume that keeps failing the same way (its image gone, QEMU
        # down) says so on each retry: warned once, the repeats at info
        again = self._gave_up.get(msg.volume) == f"{msg.code}: {msg.message}"
        self._gave_up[msg.volume] = f"{msg.code}: {msg.message}"
        log.log(logging.INFO if again else logging.WARNING,
                "source gave up on a volume%s client=%s volume=%s code=%s: %s",
                " again" if again else "", self.session.client, msg.volume, msg.code, msg.message)
        if (sink := self.sinks.get(msg.volume)) is not None:
            sink.abort()
        if self.rx.owners.get(msg.volume) == id(self):
            del self.rx.owners[msg.volume]
        self.volumes.discard(msg.volume)

    async def file_message(self, msg: FileOpen | FilePut | FileDelete) -> None:
        """File sets: answer with the manifest, or store a version durably, then FileAck."""
        if not isinstance(msg, FileOpen) and msg.fileset not in self.rx.filesets(
                self.session.client):  # a reload took it away: the set closes (no path)
            why = (f"client {self.session.client!r} may no longer write file set {msg.fileset!r} "
                   "(removed from its filesets in the receiver config)")
            log.error("file set stopped client=%s fileset=%s: %s", self.session.client,
                      msg.fileset, why)
            await self.link.send(FileError(msg.fileset, "", "unauthorized", why))
            return
        store = self.rx.files.open(msg.fileset)
        if isinstance(msg, FileOpen):
            live = [v for v in (await self.work(store.latest)).values() if not v.deleted]
            if len(live) > 60000 or sum(len(v.path) + 32 for v in live) > self.rx.cfg.max_frame // 2:
                why = (f"file set {msg.fileset!r} holds {len(live)} files: too many to list in "
                        "one frame; split it into smaller sets")
                log.error("file set refused client=%s: %s", self.session.client, why)
                await self.link.send(FileError(msg.fileset, "", "too_many", why))
                return
            log.info("file set opened client=%s fileset=%s files=%d", self.session.client,
                     msg.fileset, len(live))
            await self.link.send(FileOpened(msg.fileset, [v.path for v in live],
                                            b"".join(bytes.fromhex(v.hash) for v in live),
                                            pack_u64(v.mode for v in live)))
            return
        try:
            if isinstance(msg, FilePut):
                n = await self.work(store.put, msg.path, msg.hash, msg.size, msg.mtime,
                                            msg.mode, msg.time, msg.zdata, self.rx.cfg.max_frame)
            else:
                n = await self.work(store.delete, msg.path, msg.time)
        except CdpError as exc:
            log.error("file refused client=%s fileset=%s path=%r: %s", self.session.client,
                      msg.fileset, msg.path, exc)
            await self.link.send(FileError(msg.fileset, msg.path, exc.wire_code, str(exc)))
            return
        log.info("file %s client=%s fileset=%s path=%s version=%d",
                 "stored" if isinstance(msg, FilePut) else "deleted", self.session.client,
                 msg.fileset, msg.path, n)
        await self.link.send(FileAck(msg.fileset, msg.path, n))

    async def label(self, msg: Label) -> None:
        """`cdp checkpoint`: name an applied epoch's point durably, then say so."""
        await self.settle(msg.volume)
        rep = self.rx.replicas.get(msg.volume)
        if rep is None or msg.epoch > rep.state.epoch:
            raise VolumeError(f"{msg.volume}: cannot label epoch {msg.epoch}: not applied here",
                              code="label", volume=msg.volume)
        client = self.session.client
        try:
            moved = await self.work(functools.partial(set_label, move=msg.move), rep.path,
                                     msg.epoch, msg.label)
        except LabelTakenError as exc:
            if self.session.version >= LABEL_MOVE_VERSION:
                log.warning("label refused client=%s volume=%s epoch=%d: %s", client,
                            msg.volume, msg.epoch, exc)
                await self.link.send(LabelTaken(msg.volume, msg.epoch, msg.label, exc.epoch,
                                                exc.time))
            else:  # it cannot be told: its checkpoint times out; this line says why
                log.warning("label refused client=%s volume=%s epoch=%d: %s; the source "
                            "(protocol %d) cannot be told nor move it: upgrade it", client,
                            msg.volume, msg.epoch, exc, self.session.version)
                self.session.unanswered(msg.volume, msg.epoch, msg.label)
            return
        if moved is None:
            log.info("point labelled client=%s volume=%s epoch=%d label=%r", client,
                     msg.volume, msg.epoch, msg.label)
            await self.link.send(Labelled(msg.volume, msg.epoch, msg.label))
            return
        log.info("label moved client=%s volume=%s label=%r from epoch %d to epoch %d", client,
                 msg.volume, msg.label, moved[0], msg.epoch)
        await self.link.send(Labelled(msg.volume, msg.epoch, msg.label, *moved))

    async def add_refs(self, msg: Ref, size: int) -> None:
        sink = self.sink(msg.volume)
        w = sink.receiving()
        w.add_wire(size)
        rest = (msg.indices, msg.hashes, msg.from_indices)
        if msg.from_volume == msg.volume:
            rest = await self.work(w.resolve_local, *rest)
            if not rest[0]:
                return
        src: Replica | None = None
        if msg.from_volume in self.session.allowed:
            src = self.rx.replicas.get(msg.from_volume)
        # Every candidate is rehashed before use, so reading the image while an earlier epoch
        # applies is safe; only what it did not find waits for that epoch (which may be
        # bringing the content) and is looked up again. Waiting up front would stop this
        # connection's reads, and its Pongs, for as long as the apply takes.
        missing = await self.work(w.add_refs, rest[0], rest[1], src, rest[2])
        if missing and src is not None and self.queued(msg.from_volume):
            await self.settle(msg.from_volume)
            again = set(missing)
            idx, fidx = unpack_u64(rest[0]).tolist(), unpack_u64(rest[2]).tolist()
            ks = [k for k, i in enumerate(idx) if i in again]
            missing = await self.work(
                w.add_refs, pack_u64(idx[k] for k in ks),
                b"".join(rest[1][k * HASH_LEN:(k + 1) * HASH_LEN] for k in ks), src,
                pack_u64(fidx[k] for k in ks))
        if missing:
            sink.missing.extend(missing)

    async def commit(self, msg: Commit) -> None:
        vol = msg.volume
        sink = self.sink(vol)
        w, missing = sink.take()
        if missing:
            w.abort()
            self.session.reject(vol, msg.epoch)
            log.info("references not resolvable, asking again volume=%s epoch=%d blocks=%d",
                     vol, msg.epoch, len(missing))
            sink.answer(msg.epoch, self._answer_need(vol, msg.epoch, missing))
        else:
            await self.work(w.seal, msg.blocks, msg.until)
            sink.answer(msg.epoch, self._apply_and_ack(vol, msg, w))

    async def _answer_need(self, vol: str, epoch: int, missing: list[int]) -> None:
        with contextlib.suppress(CdpError):
            await self.link.send(Need(vol, epoch, pack_u64(missing)))

    async def _apply_and_ack(self, vol: str, msg: Commit, w: EpochWriter) -> None:
        if self.rx.replicas.get(vol) is not w.replica:
            return  # an earlier epoch failed and the replica was closed: reopening replays this
        t0 = time.monotonic()
        try:
            # shielded: once sealed, an epoch is applied even if the connection goes away
            st = await asyncio.shield(self.work(w.apply))
        except ReplicaError as exc:
            rep = self.rx.replicas.pop(vol, None)
            if rep is not None:  # reopening replays the sealed epoch from the WAL
                rep.close()
            with contextlib.suppress(CdpError):
                await self.volume_failed(vol, exc.wire_code, str(exc))
            return
        self.rx.metrics.applied(vol, time.monotonic() - t0)
        live = self.rx.live[vol]
        live.current_as_of = max(live.current_as_of, st.epoch_time)
        live.window.append((time.time(), w.counters["logical"], w.counters["wire"]))
        log.debug("epoch applied volume=%s epoch=%d blocks=%d apply_s=%.3f", vol,
                  msg.epoch, msg.blocks, time.monotonic() - t0)
        self._gave_up.pop(vol, None)  # it works again: a new failure is news
        with contextlib.suppress(CdpError):
            await self.link.send(Ack(vol, msg.epoch, st.applied_at))

    async def send_hashes(self, msg: GetHashes) -> None:
        rep = self.rx.replicas[msg.volume]
        end = min(rep.geometry.blocks, msg.start + msg.count)
        pos = msg.start
        while True:
            n = min(HASHES_PER_FRAME, end - pos)
            fn = rep.rehash if msg.rehash else rep.stored_hashes
            blob = await self.work(fn, pos, max(n, 0))
            await self.link.send(Hashes(msg.volume, pos, blob))
            pos += max(n, 0)
            if pos >= end:
                break


# What each message from a source does (dispatch): one handler per message type.
_HANDLERS: dict[type, Callable[[Any, Any, int], Awaitable[None]]] = {
    Hello: Connection._on_hello, Auth: Connection._on_auth, Ping: Connection._on_ping,
    Open: Connection._on_open, GetHashes: Connection._on_get_hashes, FileOpen: Connection._on_file,
    FilePut: Connection._on_file, FileDelete: Connection._on_file, Begin: Connection._on_begin,
    Data: Connection._on_data, Zero: Connection._on_zero, Ref: Connection._on_ref,
    Cut: Connection._on_cut, Commit: Connection._on_commit, Label: Connection._on_label,
    Current: Connection._on_current, Error: Connection._on_error,
}
