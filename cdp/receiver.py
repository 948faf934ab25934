"""The receiver daemon: accepts sources, authenticates them, applies their epochs.

One task per connection. Blocking work (decompress, verify, WAL writes,
apply) runs in worker threads so one busy volume never stalls the others.
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
import signal
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cdp.blocks import Geometry, pack_u64, unpack_u64
from cdp.codec import HASH_LEN
from cdp.config import ReceiverConfig, load_receiver, log_reload, reload_receiver
from cdp.durable import DirLock, atomic_write_json
from cdp.errors import (
    AuthError,
    CdpError,
    LabelTakenError,
    ListenError,
    PeerClosed,
    ProtocolError,
    ReplicaError,
    TransportError,
    VolumeError,
)
from cdp.frames import encode as encode_frame
from cdp.messages import (
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
from cdp.metrics import ReceiverMetrics
from cdp.protocol import LABEL_MOVE_VERSION, FilesetError, ReceiverSession, State
from cdp.replica import EpochWriter, Replica
from cdp.replica.files import FileSets
from cdp.replica.journal import Retention, note_held, set_label
from cdp.replica.store import PROMOTED, promoted_message
from cdp.statuspage import StatusPage
from cdp.transport import Link, server_tls

log = logging.getLogger(__name__)
HASHES_PER_FRAME = 65536
STATUS_INTERVAL = 1.0
PRUNE_INTERVAL = 60.0
WORK_THREADS = 16
PER_CLIENT_WORK = 4
T = TypeVar("T")
OPEN_ATTEMPTS = 50  # an Open waits this many rounds for earlier connections' epochs to land
LOCK_FILE = ".receiver.lock"  # in data_dir: flock'd by the running receiver, holds its pid


@dataclass
class VolumeLive:
    """Runtime facts about a volume that are not part of its durable state."""

    client: str = ""
    current_as_of: float = 0.0
    window: list[tuple[float, int, int]] = field(default_factory=list)  # (time, logical, wire)
    error: str = ""

    def rate(self, now: float, span: float = 10.0) -> tuple[float, float]:
        self.window = [w for w in self.window if now - w[0] <= span]
        if not self.window:
            return 0.0, 0.0
        first = min(w[0] for w in self.window)
        dt = max(now - first, 1.0)
        return sum(w[1] for w in self.window) / dt, sum(w[2] for w in self.window) / dt


class _PausedStream(asyncio.StreamReaderProtocol):
    """A stream that reads nothing until its handler resumes it: admission comes first, and
    a TLS handshake started by the handler must see the client's first bytes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]
        super().connection_made(transport)


@dataclass
class _Pending:
    """A connection not authenticated yet (TLS handshake included)."""

    ip: str
    since: float
    writer: asyncio.StreamWriter


class Receiver:
    def __init__(self, cfg: ReceiverConfig) -> None:
        self.cfg = cfg
        self.replicas: dict[str, Replica] = {}
        self.owners: dict[str, int] = {}
        self.live: dict[str, VolumeLive] = {}
        self._stop = asyncio.Event()
        self._conns: set[asyncio.Task[None]] = set()
        self._open_lock = asyncio.Lock()
        self._by_id: dict[int, _Conn] = {}
        self.unauthenticated: dict[str, int] = {}  # peer address -> connections not yet authenticated
        self._pending: dict[int, _Pending] = {}
        self._tls: ssl.SSLContext | None = None
        self._refusals_logged = 0.0
        self._evictions_logged = 0.0
        self.port = 0
        self.metrics = ReceiverMetrics(self)  # served when cfg.metrics_listen is set
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

    def _filesets(self, name: str) -> tuple[str, ...]:
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
                lambda: _PausedStream(asyncio.StreamReader(limit=1 << 20), self._handle), host, port)
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
            status.cancel()
            if self._archives is not None:
                self._archives.cancel()
            for task in list(self._background):
                task.cancel()
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
        task = asyncio.get_running_loop().create_task(self._reload())
        self._background.add(task)
        task.add_done_callback(self._reloaded)

    def _reloaded(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("config reload failed (internal error), still running with the previous "
                      "config: %s: %s", type(exc).__name__, exc, exc_info=exc)

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
        Open taken but not handled yet is refused when handled: see _Conn.serve)."""
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
            if any(c.chain.get(vol) for c in self._by_id.values()):
                continue  # sealed epochs are still applying: close after them
            owner = self.owners.get(vol)
            conn = self._by_id.get(owner) if owner is not None else None
            if conn is not None:
                if vol in conn.writers:
                    continue  # an epoch is arriving: the next Begin is refused
                with contextlib.suppress(CdpError):
                    await conn.volume_failed(vol, err.wire_code, str(err))
                await conn.settle(vol)
            rep = self.replicas.pop(vol, None)
            if rep is not None:
                log.warning("volume promoted: replica closed, no more epochs volume=%s", vol)
                await asyncio.to_thread(rep.close)

    def _write_status(self) -> None:
        now = time.time()
        for name, live in list(self.live.items()):
            rate, wire = live.rate(now)
            try:
                atomic_write_json(self.cfg.data_dir / name / "status.json", {
                    "client": live.client, "connected": name in self.owners,
                    "current_as_of": live.current_as_of, "rate": rate, "wire_rate": wire,
                    "error": live.error, "updated": now, "pid": os.getpid(),
                }, sync=False)
            except OSError:
                pass

    # -- connections ---------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: admission, TLS, authentication, then its messages.

        Strangers cannot take the room of configured clients: connections not authenticated
        yet (TLS handshake included) are capped per address and in all, and beyond the total
        cap the one from the busiest address is dropped to admit the new one, so a flood from
        other addresses cannot starve a source. max_connections counts authenticated ones."""
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        cfg = self.cfg
        if len(self._conns) >= cfg.max_connections + cfg.max_unauthenticated:
            await self._refuse(writer, f"the receiver has {len(self._conns)} connections open "
                                       "(max_connections + max_unauthenticated)")
            return
        if self.unauthenticated.get(ip, 0) >= cfg.max_unauthenticated_per_ip:
            await self._refuse(writer, f"{self.unauthenticated.get(ip, 0)} connections from {ip} are "
                                       "not authenticated yet (max_unauthenticated_per_ip)", ip)
            return
        if len(self._pending) >= cfg.max_unauthenticated and not self._evict_unauthenticated(ip):
            await self._refuse(writer, f"{len(self._pending)} connections are not authenticated "
                                       "yet (max_unauthenticated)", ip)
            return
        self._conns.add(task)
        pending = _Pending(ip, time.monotonic(), writer)
        self._admit(pending)
        try:
            if self._tls is None:
                writer.transport.resume_reading()  # type: ignore[attr-defined]
            else:  # the client's first bytes are still unread: they go to the handshake
                try:
                    await asyncio.wait_for(writer.start_tls(self._tls), cfg.auth_timeout)
                except (TimeoutError, ssl.SSLError, ConnectionError, OSError) as exc:
                    self.metrics.error("tls")
                    log.info("TLS handshake failed peer=%s: %s", ip, exc or type(exc).__name__)
                    writer.transport.abort()
                    return
            await self._serve(reader, writer, pending)
        finally:
            self._authenticated(pending)
            self._conns.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     pending: _Pending) -> None:
        session = ReceiverSession(self._lookup, self.cfg.max_frame, filesets=self._filesets)
        link = Link(session, reader, writer)
        conn = _Conn(self, link, pending)
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
            if not (isinstance(exc, PeerClosed) and not conn.volumes and not conn.writers):
                self.metrics.error(exc.wire_code)
            log.info("connection ended peer=%s client=%s: %s", link.peer, session.client or "?",
                     exc)
        except Exception:
            self.metrics.error("internal")
            log.exception("internal error on connection peer=%s", link.peer)
            await conn.say(Error("internal", "internal error in the receiver; see its log", ""))
        finally:
            self._authenticated(pending)
            conn.drop_writers()  # unsealed epochs are discarded
            await conn.settle_all()  # sealed ones finish applying, still under this connection
            conn.disown()  # only now may another connection open its volumes
            await link.close()
            self._by_id.pop(id(conn), None)
            if conn.volumes_seen:  # tell `cdp status` and promote at once, not within a second
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._write_status)

    def _admit(self, p: _Pending) -> None:
        self._pending[id(p)] = p
        self.unauthenticated[p.ip] = self.unauthenticated.get(p.ip, 0) + 1

    def _authenticated(self, p: _Pending) -> None:
        """No longer counted as unauthenticated (authenticated, or gone); idempotent."""
        if self._pending.pop(id(p), None) is None:
            return
        n = self.unauthenticated.get(p.ip, 0) - 1
        if n > 0:
            self.unauthenticated[p.ip] = n
        else:
            self.unauthenticated.pop(p.ip, None)

    def may_authenticate(self, p: _Pending) -> bool:
        """Room for one more authenticated connection (max_connections)?"""
        return len(self._conns) - len(self._pending) < self.cfg.max_connections

    def _evict_unauthenticated(self, ip: str) -> bool:
        """Make room for a connection from `ip`: drop the oldest unauthenticated connection of
        the address holding the most of them, unless that is `ip` itself (then refuse it)."""
        if not self._pending:
            return False
        counts = self.unauthenticated
        busiest = max(counts, key=lambda a: (counts[a], a != ip))
        if busiest == ip or counts.get(busiest, 0) <= counts.get(ip, 0):
            return False
        victim = min((p for p in self._pending.values() if p.ip == busiest), key=lambda p: p.since)
        now = time.monotonic()
        if now - self._evictions_logged >= 10:  # a flood of them: one line per 10 s
            self._evictions_logged = now
            log.warning("dropping an unauthenticated connection from %s (%d not authenticated "
                        "from there) to admit one from %s (max_unauthenticated)", busiest,
                        counts[busiest], ip)
        self.metrics.error("evicted")
        self._authenticated(victim)
        with contextlib.suppress(Exception):
            victim.writer.transport.abort()
        return True

    async def _refuse(self, writer: asyncio.StreamWriter, why: str, ip: str = "") -> None:
        """No room: say why in one Error frame (in clear: no TLS yet) and close."""
        self.metrics.error("refused")
        now = time.monotonic()
        if not ip or now - self._refusals_logged >= 10:  # a flood of them: one line per 10 s
            if ip:
                self._refusals_logged = now
            log.warning("refusing a connection from %s: %s", writer.get_extra_info("peername"), why)
        with contextlib.suppress(Exception):
            writer.write(encode_frame(Error("busy", f"{why}; try later", "")))
            await asyncio.wait_for(writer.drain(), 5)
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 5)

    async def open_replica(self, conn: _Conn, msg: Open) -> Replica:
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
            takeover: _Conn | None = None
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
            if msg.block_size < 4096 or msg.block_size > 4 << 20 or (
                    msg.block_size & (msg.block_size - 1)) or msg.size == 0:
                raise VolumeError(f"volume {msg.volume!r}: unusable geometry size={msg.size} "
                                  f"block_size={msg.block_size}", code="geometry",
                                  volume=msg.volume)
            rep = await asyncio.to_thread(Replica.open, self.cfg.data_dir, msg.volume, geo,
                                          True, self.retention(msg.volume))
            self.replicas[msg.volume] = rep
        return rep


class _Conn:
    """The receiver's side of one connection.

    Commits are answered through a per-volume chain of tasks: epoch e applies
    (in a thread) while epoch e+1 is being received, and Ack/Need go out in
    epoch order.
    """

    def __init__(self, rx: Receiver, link: Link, pending: _Pending) -> None:
        self.rx = rx
        self.link = link
        self.session: ReceiverSession = link.session  # type: ignore[assignment]
        self.writers: dict[str, EpochWriter] = {}
        self.missing: dict[str, list[int]] = {}
        self.volumes: set[str] = set()
        self.volumes_seen = False
        self.chain: dict[str, list[tuple[int, asyncio.Task[None]]]] = {}
        self.pending = pending  # counted by the receiver as unauthenticated until Auth
        self.turn = asyncio.Lock()  # held while one message is handled
        self.fenced = asyncio.Event()  # superseded by a newer connection of the same client
        self.fence_reason = ""
        self._fencing: asyncio.Task[None] | None = None

    async def settle(self, volume: str, before: int | None = None) -> None:
        """Wait until answers for this volume's epochs (those < `before`) are done."""
        for epoch, task in list(self.chain.get(volume, [])):
            if before is None or epoch < before:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.shield(task)

    async def settle_all(self) -> None:
        for vol in list(self.chain):
            await self.settle(vol)

    async def say(self, msg: Message) -> None:
        try:
            await asyncio.wait_for(self.link.send(msg), 5)
        except (CdpError, TimeoutError, OSError):
            pass

    def drop_writers(self) -> None:
        """Abort the epochs being received (not sealed: nothing of them reached the image)."""
        for w in self.writers.values():
            w.abort()
        self.writers.clear()
        self.missing.clear()

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
            await asyncio.wait_for(self.link.send(Error(code, why, "")), 1)
        self.link.abort()  # a send or read in progress fails at once
        async with self.turn:  # the message being handled finishes (e.g. a seal in a thread)
            self.drop_writers()
        await self.settle_all()
        self.disown()

    async def await_fence(self, old: _Conn, why: str) -> None:
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
            for msg, size in self.session.events():
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
            await asyncio.wait_for(self.link.fill(None), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            why = (f"not authenticated within {self.rx.cfg.auth_timeout:g}s (auth_timeout), "
                   "closing")
            await self.say(Error("auth_timeout", why, ""))
            raise TransportError(f"{self.link.peer}: {why}") from None

    async def volume_failed(self, vol: str, code: str, message: str) -> None:
        log.error("volume stopped client=%s volume=%s code=%s: %s", self.session.client, vol,
                  code, message)
        self.rx.metrics.error(code)
        w = self.writers.pop(vol, None)
        if w:
            w.abort()
        self.missing.pop(vol, None)
        if vol in self.rx.live:
            self.rx.live[vol].error = f"{code}: {message}"
        if self.rx.owners.get(vol) == id(self):
            del self.rx.owners[vol]
        self.volumes.discard(vol)
        await self.link.send(Error(code, message, vol))

    async def dispatch(self, msg: Message, size: int) -> None:
        s = self.session
        if isinstance(msg, Hello):
            await self.link.send_raw(s.challenge())
        elif isinstance(msg, Auth):
            if not self.rx.may_authenticate(self.pending):
                why = (f"client {s.client} authenticated but {self.rx.cfg.max_connections} "
                       "authenticated connections are open (max_connections)")
                self.rx.metrics.error("refused")
                await self.say(Error("busy", f"{why}; try later", ""))
                raise TransportError(f"{self.link.peer}: {why}")
            log.info("client authenticated client=%s peer=%s", s.client, self.link.peer)
            await self.link.send_raw(s.welcome())
            self.rx._authenticated(self.pending)
            self.rx.metrics.connections.inc()  # sessions: not port probes or strangers
        elif isinstance(msg, Ping):
            await self.link.send(Pong(msg.nonce))
        elif isinstance(msg, Open):
            rep = await self.rx.open_replica(self, msg)
            if not msg.readonly:
                self.volumes.add(msg.volume)
                self.volumes_seen = True
                self.rx.live[msg.volume].client = s.client
                self.rx.live[msg.volume].error = ""
            st = rep.state
            log.info("volume opened client=%s volume=%s epoch=%d", s.client, msg.volume, st.epoch)
            await self.link.send(Opened(msg.volume, st.replica_id, st.epoch, st.epoch_time))
        elif isinstance(msg, GetHashes):
            await self.send_hashes(msg)
        elif isinstance(msg, FileOpen | FilePut | FileDelete):
            await self.file_message(msg)
        elif isinstance(msg, Begin):
            # epoch e reuses the WAL file of e-2: that one must be applied first
            await self.settle(msg.volume, msg.epoch - 1)
            if (err := self.rx.promoted(msg.volume)) is not None:
                raise err
            current = self.rx.replicas.get(msg.volume)
            if current is None:
                raise VolumeError(f"replica {msg.volume!r} was closed after an error; reopen it",
                                  code="replica", volume=msg.volume)
            self.writers[msg.volume] = await self.work(current.begin, msg.epoch, msg.time)
            self.missing[msg.volume] = []
        elif isinstance(msg, Data):
            w = self.writers[msg.volume]
            await self.work(w.add_data, msg.indices, msg.hashes, msg.raw_len, msg.zdata)
            w.add_wire(size)
        elif isinstance(msg, Zero):
            w = self.writers[msg.volume]
            await self.work(w.add_zero, msg.runs)
            w.add_wire(size)
        elif isinstance(msg, Ref):
            await self.add_refs(msg, size)
        elif isinstance(msg, Cut):
            self.writers[msg.volume].mark_cut(msg.time, msg.since, msg.group, msg.members)
        elif isinstance(msg, Commit):
            await self.commit(msg)
        elif isinstance(msg, Label):
            await self.label(msg)
        elif isinstance(msg, Current):
            cur = self.rx.replicas.get(msg.volume)
            live = self.rx.live.get(msg.volume)
            if cur is not None and live is not None and msg.epoch == cur.state.epoch:
                live.current_as_of = min(msg.time, time.time() + 60)  # not in the future
                if cur.state.group and (cur.state.cut or {}).get("group"):
                    # a group cut held through then: later group cuts are this volume's too
                    await self.work(note_held, cur.path, msg.epoch, live.current_as_of)
        elif isinstance(msg, Error):
            log.warning("source gave up on a volume client=%s volume=%s code=%s: %s", s.client,
                        msg.volume, msg.code, msg.message)
            gone = self.writers.pop(msg.volume, None)
            if gone:
                gone.abort()
            self.missing.pop(msg.volume, None)
            if self.rx.owners.get(msg.volume) == id(self):
                del self.rx.owners[msg.volume]
            self.volumes.discard(msg.volume)

    async def file_message(self, msg: FileOpen | FilePut | FileDelete) -> None:
        """File sets: answer with the manifest, or store a version durably, then FileAck."""
        if not isinstance(msg, FileOpen) and msg.fileset not in self.rx._filesets(
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
        w = self.writers[msg.volume]
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
        if missing and src is not None and self.chain.get(msg.from_volume):
            await self.settle(msg.from_volume)
            again = set(missing)
            idx, fidx = unpack_u64(rest[0]).tolist(), unpack_u64(rest[2]).tolist()
            ks = [k for k, i in enumerate(idx) if i in again]
            missing = await self.work(
                w.add_refs, pack_u64(idx[k] for k in ks),
                b"".join(rest[1][k * HASH_LEN:(k + 1) * HASH_LEN] for k in ks), src,
                pack_u64(fidx[k] for k in ks))
        if missing:
            self.missing[msg.volume].extend(missing)

    async def commit(self, msg: Commit) -> None:
        vol = msg.volume
        w = self.writers.pop(vol)
        missing = self.missing.pop(vol, [])
        prev = [t for _, t in self.chain.get(vol, [])]
        if missing:
            w.abort()
            self.session.reject(vol, msg.epoch)
            log.info("references not resolvable, asking again volume=%s epoch=%d blocks=%d",
                     vol, msg.epoch, len(missing))
            answer = self._answer_need(vol, msg.epoch, missing, prev)
        else:
            await self.work(w.seal, msg.blocks, msg.until)
            answer = self._apply_and_ack(vol, msg, w, prev)
        task = asyncio.create_task(answer)
        chain = self.chain.setdefault(vol, [])
        chain.append((msg.epoch, task))
        task.add_done_callback(lambda t: chain.remove(next(c for c in chain if c[1] is t)))

    async def _answer_need(self, vol: str, epoch: int, missing: list[int],
                           prev: list[asyncio.Task[None]]) -> None:
        for t in prev:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await t
        with contextlib.suppress(CdpError):
            await self.link.send(Need(vol, epoch, pack_u64(missing)))

    async def _apply_and_ack(self, vol: str, msg: Commit, w: EpochWriter,
                             prev: list[asyncio.Task[None]]) -> None:
        for t in prev:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await t
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


def run_receiver(cfg: ReceiverConfig) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the config. Returns the exit code."""

    async def main() -> None:
        rx = Receiver(cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, rx.stop)
        loop.add_signal_handler(signal.SIGHUP, rx.reload)
        await rx.run()

    asyncio.run(main())
    return 0


def read_status(data_dir: Path) -> list[dict[str, Any]]:
    """Per-volume state and live status from a receiver's data_dir (for `cdp status`)."""
    from cdp.durable import read_json

    out: list[dict[str, Any]] = []
    if not data_dir.is_dir():
        return out
    for d in sorted(data_dir.iterdir()):
        if not d.is_dir() or d.name.startswith(".") or not (d / "state.json").exists():
            continue
        try:
            st = read_json(d / "state.json")
        except (OSError, ValueError):
            continue
        try:
            live = read_json(d / "status.json")
        except (OSError, ValueError):
            live = {}
        out.append({"state": st, "live": live})
    return out
