"""The receiver daemon: listens, admits and authenticates sources, opens their replicas,
reloads its config, reports status.

One task per connection (cdp.receiver.connection). Blocking work (decompress, verify, WAL
writes, apply) runs in worker threads so one busy volume never stalls the others.
A volume is written by one connection at a time; the replica's flock keeps
other processes out. SIGHUP reloads the config file and applies what can
change live (see Receiver._reload).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
import ssl
import time
from collections.abc import Callable
from typing import Any, TypeVar

from cdp.blocks import Geometry
from cdp.config import ReceiverConfig, load_receiver, log_reload, reload_receiver
from cdp.durable import DirLock, atomic_write_json, read_json
from cdp.errors import (
    AuthError,
    CdpError,
    ListenError,
    PeerClosed,
    ProtocolError,
    TransportError,
    VolumeError,
)
from cdp.lifecycle import cancel_and_wait, serve, start_reload
from cdp.limits import valid_block_size
from cdp.metrics import ReceiverMetrics
from cdp.receiver.admission import Admission, PausedStream, Pending
from cdp.receiver.connection import Connection
from cdp.receiver.live import VolumeLive
from cdp.replica import Replica
from cdp.replica.files import FileSets
from cdp.replica.journal import Retention
from cdp.replica.store import PROMOTED, promoted_message
from cdp.status import LiveFacts, PointsFacts, ReceiverStatus, ReplicaFacts, VolumeStatus, volume_status
from cdp.statuspage import StatusPage
from cdp.wire.messages import Bye, Error, Open
from cdp.wire.receiver_session import ReceiverSession
from cdp.wire.session import State
from cdp.wire.transport import Link, server_tls

log = logging.getLogger("cdp.receiver")  # one logger for the whole receiver: operators filter on it
STATUS_INTERVAL = 1.0
PRUNE_INTERVAL = 60.0
WORK_THREADS = 16
PER_CLIENT_WORK = 4
T = TypeVar("T")
OPEN_ATTEMPTS = 50  # an Open waits this many rounds for earlier connections' epochs to land
LOCK_FILE = ".receiver.lock"  # in data_dir: flock'd by the running receiver, holds its pid


class Receiver:
    def __init__(self, cfg: ReceiverConfig) -> None:
        self.cfg = cfg
        self.replicas: dict[str, Replica] = {}
        self.owners: dict[str, int] = {}
        self.live: dict[str, VolumeLive] = {}
        self._stop = asyncio.Event()
        self._conns: set[asyncio.Task[None]] = set()
        self._open_lock = asyncio.Lock()
        self._by_id: dict[int, Connection] = {}
        self._tls: ssl.SSLContext | None = None
        self.port = 0
        self.metrics = ReceiverMetrics(self)  # served when cfg.metrics_listen is set
        self.admission = Admission(self.metrics)  # connections not authenticated yet
        self.page = StatusPage(self)  # served when cfg.status_listen is set
        self.files = FileSets(cfg.data_dir)
        # Blocking work of connections (decompress, verify, WAL, apply) runs here, at most
        # PER_CLIENT_WORK jobs of one client at a time: a client flooding work (many volumes,
        # huge epochs) queues behind itself, not in front of the other clients.
        self.pool = concurrent.futures.ThreadPoolExecutor(WORK_THREADS, thread_name_prefix="cdp-rx")
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self.archiver: Any = None  # cdp.archive.scheduler.ArchiveScheduler once archives exist
        self._archives: asyncio.Task[None] | None = None

    def filesets(self, name: str) -> tuple[str, ...]:
        c = self.cfg.client(name)
        return c.filesets if c else ()

    def _lookup(self, name: str) -> tuple[bytes, tuple[str, ...]] | None:
        c = self.cfg.client(name)
        return (c.token, c.volumes) if c else None

    def stop(self) -> None:
        self._stop.set()

    async def work(self, client: str, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking `fn(*args)` in the pool within `client`'s share of it."""
        slot = self._slots.get(client)
        if slot is None:
            slot = self._slots[client] = asyncio.Semaphore(PER_CLIENT_WORK)
        async with slot:
            return await asyncio.get_running_loop().run_in_executor(
                self.pool, functools.partial(fn, *args))

    def retention(self, volume: str) -> Retention:
        keep = self.cfg.keep_for(volume)
        return Retention(keep.max_age, keep.max_bytes)

    def promoted(self, volume: str) -> VolumeError | None:
        """The error to answer with if `cdp failover promote` took this volume over."""
        path = self.cfg.data_dir / volume
        if (path / PROMOTED).exists():
            return VolumeError(promoted_message(volume, path), code="promoted", volume=volume)
        return None

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Serve until stop(); InUseError if another receiver has the data_dir."""
        lock = DirLock(self.cfg.data_dir, LOCK_FILE, "receiver", "data_dir")
        try:
            from cdp.drills.workdirs import remove_leftovers

            remove_leftovers(self.cfg.data_dir)  # of failback runs that were killed
            await self._run(ready)
        finally:
            lock.close()

    async def _run(self, ready: asyncio.Event | None) -> None:
        await self.metrics.start(self.cfg.metrics_listen)
        await self.page.start(self.cfg.status_listen)
        ctx = self._tls = server_tls(self.cfg.tls) if self.cfg.tls else None
        host, port = self.cfg.listen
        try:  # TLS starts in _handle, so that handshakes count as unauthenticated connections
            loop = asyncio.get_running_loop()
            server = await loop.create_server(
                lambda: PausedStream(asyncio.StreamReader(limit=1 << 20), self._handle), host, port)
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)  # not asyncio's wrapping
            raise ListenError(f"{self.cfg.path}: receiver.listen: cannot listen on {host}:{port}: "
                              f"{why}; is another receiver running, or is the address wrong?") from None
        self.port = server.sockets[0].getsockname()[1]
        log.info("receiver listening addr=%s:%d tls=%s data_dir=%s", host, self.port,
                 "on" if ctx else "off", self.cfg.data_dir)
        if ready:
            ready.set()
        status = asyncio.create_task(self._status_loop())
        self._start_archives()
        try:
            await self._stop.wait()
        finally:
            log.info("receiver stopping: closing %d connection(s)", len(self._conns))
            server.close()
            for task in list(self._conns):
                task.cancel()
            if self._conns:
                await asyncio.gather(*self._conns, return_exceptions=True)
            await server.wait_closed()
            await cancel_and_wait(status, self._archives, *self._background)
            self._write_status()
            for rep in self.replicas.values():
                rep.close()
            self.pool.shutdown(wait=False, cancel_futures=True)
            await self.metrics.close()
            await self.page.close()
            log.info("receiver stopped")

    def _start_archives(self) -> None:
        """[[archive]] schedules: at most max_concurrent_archives jobs at once, queued fairly."""
        if self._archives is not None or not self.cfg.archives:
            return
        from cdp.archive.scheduler import ArchiveScheduler

        self.archiver = ArchiveScheduler(self.cfg)
        self._archives = asyncio.create_task(self.archiver.run())

    # -- reloading (SIGHUP) ----------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: reload the config file in the background."""
        start_reload(self._background, self._reload(), log)

    async def _reload(self) -> None:
        """Load the file again; an invalid one changes nothing. Then apply what changed:

        - clients: added ones may connect; removed ones, and those whose token changed, are
          disconnected (a rotated token is no longer trusted) and must authenticate again;
        - a client's volumes: one taken away stops at once on its connection (the epoch being
          received is dropped, sealed ones still apply) and the source is told `unauthorized`;
          file sets taken away are refused at the next file sent;
        - retention: open replicas take the new keep_points* and prune now (turning the
          journal on or off, keep_points = 0, waits for a restart);
        - archives: the scheduler takes the new list, schedules and limit;
        - metrics_listen, status_listen: served on the new address (the old one stays if that
          fails);
        - timeouts and connection limits: from their next use;
        - listen, data_dir, tls, max_frame: logged as needing a restart; the running value stays.
        """
        async with self._reload_lock:
            log.info("reloading %s (SIGHUP)", self.cfg.path)
            try:
                new = await asyncio.to_thread(load_receiver, self.cfg.path)
            except CdpError as exc:
                log.error("config reload failed, still running with the previous config: %s", exc)
                return
            plan = reload_receiver(self.cfg, new)
            log_reload(log, plan.applied, plan.restart)
            old, self.cfg = self.cfg, plan.cfg
            await self._apply_clients(set(plan.dropped))
            await self._apply_retention()
            if self.archiver is not None:
                self.archiver.configure(self.cfg)
            self._start_archives()
            self.cfg = await self._move_listeners(old, self.cfg)
            await asyncio.to_thread(self._write_status)

    async def _apply_clients(self, dropped: set[str]) -> None:
        """Connections of removed clients and rotated tokens end; volumes taken away stop (an
        Open taken but not handled yet is refused when handled: see Connection.serve)."""
        for conn in list(self._by_id.values()):
            s = conn.session
            if s.state is not State.READY:
                continue  # not authenticated yet: Auth looks the client up in the new config
            c = self.cfg.client(s.client)
            if c is None or s.client in dropped:
                why = (f"client {s.client} was removed from the receiver config" if c is None
                       else f"the token of client {s.client} changed; connect with the new one")
                log.warning("closing the connection of client=%s peer=%s: %s", s.client,
                            conn.link.peer, why)
                conn.fence(why, code="auth")
                continue
            s.allowed = c.volumes
            async with conn.turn:  # between two messages: none is half handled
                for vol in sorted((conn.volumes | set(s.volumes)) - set(c.volumes)):
                    with contextlib.suppress(CdpError):
                        await conn.volume_failed(
                            vol, "unauthorized", f"client {s.client!r} may no longer write "
                            f"volume {vol!r} (removed from its volumes in the receiver config)")

    async def _apply_retention(self) -> None:
        """Open replicas take their new retention and drop what it no longer keeps."""
        for vol, rep in list(self.replicas.items()):
            want, have = self.retention(vol), rep.journal.retention
            if want == have:
                continue
            if want.enabled != have.enabled:
                log.warning("config reload: volume %s: keep_points 0 turns its journal %s: needs "
                            "a restart; the running retention stays", vol,
                            "on" if want.enabled else "off")
                continue
            rep.journal.retention = want
            try:
                await asyncio.to_thread(rep.journal.prune)
            except (OSError, ValueError) as exc:
                log.warning("volume %s: pruning after the reload failed (%s); it is retried "
                            "after the next epoch", vol, exc)

    async def _move_listeners(self, old: ReceiverConfig, cfg: ReceiverConfig) -> ReceiverConfig:
        """Serve metrics and the status page where `cfg` says; returns the config in force
        (with the old address where the new one could not be served)."""
        for key, endpoint in (("metrics_listen", self.metrics), ("status_listen", self.page)):
            was, now = getattr(old, key), getattr(cfg, key)
            if was == now:
                continue
            try:
                await endpoint.move(now)
            except CdpError as exc:
                log.error("config reload: %s: %s; still served as before", key, exc)
                cfg = dataclasses.replace(cfg, **{key: was})
        return cfg

    # -- status --------------------------------------------------------------

    async def _status_loop(self) -> None:
        last_prune = time.monotonic()
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            await self._release_promoted()
            await asyncio.to_thread(self._write_status)
            if time.monotonic() - last_prune >= PRUNE_INTERVAL:
                last_prune = time.monotonic()  # age-based retention also while nothing arrives
                for rep in list(self.replicas.values()):
                    with contextlib.suppress(OSError, ValueError):
                        await asyncio.to_thread(rep.journal.prune)

    async def _release_promoted(self) -> None:
        """Let go of volumes that `cdp failover promote` asked for: stop their source, let
        sealed epochs finish, close the replica (promote waits for its lock)."""
        for vol in list(self.replicas):
            err = self.promoted(vol)
            if err is None:
                continue
            if any(c.queued(vol) for c in self._by_id.values()):
                continue  # sealed epochs are still applying: close after them
            owner = self.owners.get(vol)
            conn = self._by_id.get(owner) if owner is not None else None
            if conn is not None:
                if conn.receiving(vol):
                    continue  # an epoch is arriving: the next Begin is refused
                with contextlib.suppress(CdpError):
                    await conn.volume_failed(vol, err.wire_code, str(err))
                await conn.settle(vol)
            rep = self.replicas.pop(vol, None)
            if rep is not None:
                log.warning("volume promoted: replica closed, no more epochs volume=%s", vol)
                await asyncio.to_thread(rep.close)

    def status(self, now: float | None = None) -> ReceiverStatus:
        """The one snapshot of this receiver that metrics, the status page and the per-volume
        status.json are made of; built on the event loop (it reads the connections)."""
        now = time.time() if now is None else now
        conns = list(self._by_id.values())
        vols = [v for name in sorted(set(self.replicas) | set(self.live))
                if (v := self._volume_status(name, conns, now)) is not None]
        return ReceiverStatus(generated=now, data_dir=str(self.cfg.data_dir),
                              listen=f"{self.cfg.listen[0]}:{self.port}",
                              connections=len(self._conns), volumes=tuple(vols))

    def _volume_status(self, name: str, conns: list[Connection], now: float) -> VolumeStatus | None:
        rep = self.replicas.get(name)
        if rep is not None:
            st = rep.state
            state = ReplicaFacts(st.epoch, st.epoch_time, st.applied_at, st.size, st.block_size,
                                 dict(st.counters))
            undo, first, base, jbytes = rep.journal.kept()
            # undo file e restores the point before epoch e; none kept: the current state only
            points = (PointsFacts(undo + 1, first - 1, base, jbytes) if first is not None
                      else PointsFacts(1, st.epoch, st.epoch_time, 0))
        else:  # closed after an error: what is on disk
            try:
                state = ReplicaFacts.from_dict(read_json(self.cfg.data_dir / name / "state.json"))
            except (OSError, ValueError):
                return None
            points = PointsFacts(1, state.epoch, state.epoch_time, 0)
        return volume_status(name, state, self._live_facts(name, now), points,
                             promoted=self.promoted(name) is not None, now=now,
                             pending_epochs=sum(c.queued(name) for c in conns),
                             receiving=any(c.receiving(name) for c in conns))

    def _live_facts(self, name: str, now: float) -> LiveFacts:
        live = self.live.get(name)
        if live is None:
            return LiveFacts(connected=name in self.owners)
        rate, wire = live.rate(now)
        return LiveFacts(live.client, name in self.owners, live.current_as_of, rate, wire,
                         live.error)

    def _write_status(self) -> None:
        """<data_dir>/<volume>/status.json: what `cdp status` and promote cannot read from the
        replica's own files."""
        now = time.time()
        for name in list(self.live):
            try:
                atomic_write_json(self.cfg.data_dir / name / "status.json", {
                    **self._live_facts(name, now).to_dict(), "updated": now, "pid": os.getpid(),
                }, sync=False)
            except OSError:
                pass

    # -- connections ---------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection (asyncio.start_server's task for it). Cancelled on the way out, it
        ends quietly: Python 3.11's start_server asks a cancelled handler task for its
        exception, which raises inside a callback and logs an error for a clean stop."""
        try:
            await self._connection(reader, writer)
        except asyncio.CancelledError:
            if not self._stop.is_set():  # only a stop cancels it; anything else is a bug
                raise

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Admission (cdp.receiver.admission), TLS, authentication, then its messages.
        max_connections counts authenticated ones (may_authenticate)."""
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        cfg = self.cfg
        pending = await self.admission.enter(cfg, writer, ip, len(self._conns))
        if pending is None:
            return
        self._conns.add(task)
        try:
            if self._tls is None:
                writer.transport.resume_reading()  # type: ignore[attr-defined]
            else:  # the client's first bytes are still unread: they go to the handshake
                try:
                    async with asyncio.timeout(cfg.auth_timeout):
                        await writer.start_tls(self._tls)
                except (TimeoutError, ssl.SSLError, ConnectionError, OSError) as exc:
                    self.metrics.error("tls")
                    log.info("TLS handshake failed peer=%s: %s", ip, exc or type(exc).__name__)
                    writer.transport.abort()
                    return
            await self._serve(reader, writer, pending)
        finally:
            self.admission.authenticated(pending)
            self._conns.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     pending: Pending) -> None:
        session = ReceiverSession(self._lookup, self.cfg.max_frame, filesets=self.filesets)
        link = Link(session, reader, writer)
        conn = Connection(self, link, pending)
        self._by_id[id(conn)] = conn
        try:
            await conn.serve()
        except asyncio.CancelledError:
            await conn.say(Bye("receiver shutting down"))
        except (ProtocolError, AuthError) as exc:
            self.metrics.error(exc.wire_code)
            log.warning("closing connection peer=%s client=%s: %s", link.peer,
                        session.client or "?", exc)
            await conn.say(Error(exc.wire_code, str(exc), ""))
        except TransportError as exc:
            # a peer that closes between frames holding nothing to write (`cdp verify`, a port
            # probe) ended normally; a writer gone without Bye, a timeout or a reset did not
            if not (isinstance(exc, PeerClosed) and not conn.volumes and not conn.receiving()):
                self.metrics.error(exc.wire_code)
            log.info("connection ended peer=%s client=%s: %s", link.peer, session.client or "?",
                     exc)
        except Exception:
            self.metrics.error("internal")
            log.exception("internal error on connection peer=%s", link.peer)
            await conn.say(Error("internal", "internal error in the receiver; see its log", ""))
        finally:
            self.admission.authenticated(pending)
            conn.drop_writers()  # unsealed epochs are discarded
            await conn.settle_all()  # sealed ones finish applying, still under this connection
            conn.disown()  # only now may another connection open its volumes
            await link.close()
            self._by_id.pop(id(conn), None)
            if conn.volumes_seen:  # tell `cdp status` and promote at once, not within a second
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._write_status)

    def may_authenticate(self, p: Pending) -> bool:
        """Room for one more authenticated connection (max_connections)?"""
        return len(self._conns) - len(self.admission.pending) < self.cfg.max_connections

    async def open_replica(self, conn: Connection, msg: Open) -> Replica:
        if (err := self.promoted(msg.volume)) is not None:
            raise err
        if msg.readonly:
            rep = self.replicas.get(msg.volume)
            if rep is None:
                if not (self.cfg.data_dir / msg.volume / "state.json").exists():
                    raise VolumeError(f"no replica of volume {msg.volume!r} yet", code="volume",
                                      volume=msg.volume)
                async with self._open_lock:
                    rep = self.replicas.get(msg.volume)
                    if rep is None:
                        rep = await asyncio.to_thread(Replica.open, self.cfg.data_dir, msg.volume,
                                                      None, False, self.retention(msg.volume))
                        self.replicas[msg.volume] = rep
            return rep
        for attempt in range(OPEN_ATTEMPTS):
            takeover: Connection | None = None
            async with self._open_lock:
                owner = self.owners.get(msg.volume)
                old = self._by_id.get(owner) if owner is not None and owner != id(conn) else None
                if old is None:
                    if owner is not None and owner != id(conn):
                        del self.owners[msg.volume]  # a connection that is gone
                    rep = await self._open_writable(msg)
                    if rep.writers_idle():
                        self.owners[msg.volume] = id(conn)
                        self.live.setdefault(msg.volume, VolumeLive())
                        return rep
                elif old.session.client != conn.session.client:
                    raise VolumeError(f"volume {msg.volume!r} is already being written by another "
                                      f"client ({old.session.client})", code="busy",
                                      volume=msg.volume)
                else:
                    takeover = old
            if takeover is not None:
                # Session takeover, outside the lock (the old connection may be waiting on it):
                # the same client reconnected, so its old connection is dead or about to be.
                log.warning("session takeover client=%s volume=%s old_peer=%s new_peer=%s: the "
                            "client reconnected; its old connection is closed and its sealed "
                            "epochs finish first (if this keeps happening, two sources may be "
                            "running with the same name)", conn.session.client, msg.volume,
                            takeover.link.peer, conn.link.peer)
                self.metrics.takeovers.inc()
                await conn.await_fence(takeover, f"superseded by a newer connection of "
                                       f"client {conn.session.client} from {conn.link.peer}")
            else:
                # epochs sealed by an earlier connection (or this one, before a volume error)
                # are still applying: the replica's epoch is not final until they land
                for other in list(self._by_id.values()):
                    await other.settle(msg.volume)
                if attempt:
                    await asyncio.sleep(0.01 * attempt)
        raise VolumeError(f"volume {msg.volume!r} still has an epoch in flight from an earlier "
                          "connection; the source retries", code="busy", volume=msg.volume)

    async def _open_writable(self, msg: Open) -> Replica:
        """The replica to write `msg.volume` to, opened or created; under _open_lock."""
        rep = self.replicas.get(msg.volume)
        geo = Geometry(msg.size, msg.block_size)
        if rep is not None and (rep.geometry != geo):
            raise VolumeError(
                f"volume {msg.volume!r} is {msg.size} bytes in {msg.block_size}-byte blocks at "
                f"the source but the replica is {rep.geometry.size} bytes in "
                f"{rep.geometry.block_size}-byte blocks; if the volume really changed, move "
                "the old replica away first", code="geometry", volume=msg.volume)
        if rep is None:
            if not valid_block_size(msg.block_size) or msg.size == 0:
                raise VolumeError(f"volume {msg.volume!r}: unusable geometry size={msg.size} "
                                  f"block_size={msg.block_size}", code="geometry",
                                  volume=msg.volume)
            rep = await asyncio.to_thread(Replica.open, self.cfg.data_dir, msg.volume, geo,
                                          True, self.retention(msg.volume))
            self.replicas[msg.volume] = rep
        return rep


def run_receiver(cfg: ReceiverConfig) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the config. Returns the exit code."""

    async def main() -> None:
        await serve(Receiver(cfg))

    asyncio.run(main())
    return 0

