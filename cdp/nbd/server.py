"""Asyncio NBD server for one raw image file: pumps bytes through NbdServerSession.

The session decides what is valid; this module only moves bytes, runs the TLS
upgrade and does the file I/O. Each connection is an `asyncio.BufferedProtocol`
that receives straight into the session's buffer (the payload of a WRITE is
copied once, out of that buffer) plus one task that executes the decoded
requests one after the other, in order, which keeps "write, then changed()"
and "flush covers every completed write" trivially true. Reads and writes up to
`inline_max` bytes run right on the event loop thread: a pread/pwrite that hits
the page cache costs microseconds, far less than a hop to a worker thread
(bench/NBD-FIGURES.md). Larger ones, FUA writes, fdatasync and zeroing go
through `asyncio.to_thread`. The replies to everything one socket read
delivered go out in one write.

A `ChangeTracker` is where the CDP source plugs in. `before_change(offset,
length)` is awaited before a WRITE, TRIM or WRITE_ZEROES touches the file (the
source makes the range dirty in its persistent map first, so a crash between
the write and the capture can never lose track of it); `changed(offset,
length)` runs after the change reached the file and before the client hears
success (the source captures the blocks for the open epoch). A tracker that
also has `wrote(offset, data)` hears a WRITE there instead, with its payload,
when nothing else can have touched the range between the pwrite and the call
(a write run on the loop thread, no await between the two): it can take the
blocks the write covers whole from the payload instead of reading them back
from the image. `flushed()` is
awaited after a FLUSH made the image durable and before the client hears
success (the source cuts an epoch there). A tracker that also has
`zeroed(offset, length)` hears TRIM and WRITE_ZEROES there instead of in
`changed`, so it can keep them as extents without reading what they cleared
(a kernel client trims up to 4 GiB at once). A tracker that also has
`flush_started()` hears of a FLUSH before the fdatasync: every write before
it has completed by then (requests run in order), so the source cuts the
epoch there and replication overlaps the source's own flush. A hook that raises turns the
request into an EIO reply: the client must not believe in a write that cdp did
not track.

Listening sockets and who may connect are cdp.nbd.listen; the file I/O,
holes included, is cdp.nbd.image.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

from cdp.nbd.events import (
    BlockStatus,
    Disconnect,
    Event,
    Flush,
    Negotiated,
    Read,
    Request,
    StartTls,
    Trim,
    Write,
    WriteZeroes,
)
from cdp.nbd.image import allocation_extents, is_hole, pread_exact, pwrite_all, write_at, zero_range
from cdp.nbd.listen import NbdListenError, NbdServerError, bind_unix, check_reach
from cdp.nbd.protocol import NbdServerSession
from cdp.nbd.spec import NbdProtocolError

log = logging.getLogger(__name__)

QUEUE_BYTES = 8 * 1024 * 1024  # WRITE payload received but not executed: stop reading above this
QUEUE_EVENTS = 1024  # requests received but not executed: stop reading above this
INLINE_MAX = 1024 * 1024  # reads/writes up to this size run on the loop thread
TLS_HANDSHAKE_TIMEOUT = 30.0


class ChangeTracker(Protocol):
    """What the server tells the CDP source about changes; see the module docstring."""

    async def before_change(self, offset: int, length: int) -> None: ...

    def changed(self, offset: int, length: int) -> None: ...

    async def flushed(self) -> None: ...


@runtime_checkable
class ZeroTracker(ChangeTracker, Protocol):
    """A ChangeTracker that takes TRIM and WRITE_ZEROES as ranges (see the module docstring)."""

    def zeroed(self, offset: int, length: int) -> None: ...


@runtime_checkable
class WriteTracker(ChangeTracker, Protocol):
    """A ChangeTracker that takes a WRITE with its payload (see the module docstring)."""

    def wrote(self, offset: int, data: bytes) -> None: ...


@runtime_checkable
class AheadTracker(ChangeTracker, Protocol):
    """A ChangeTracker that, when a WRITE has to wait (a clean region made dirty durably),
    prepares the writes queued behind it in the same wait: one sync for a queue of random
    writes instead of one per request (the server runs a connection's requests in order)."""

    async def before_changes(self, offset: int, length: int,
                             ahead: Iterable[tuple[int, int]]) -> None: ...


@runtime_checkable
class FlushTracker(ChangeTracker, Protocol):
    """A ChangeTracker that hears of a FLUSH before the image is made durable."""

    def flush_started(self) -> None: ...


class NbdServer:
    """Serve one raw image file as one NBD export on TCP and/or a Unix socket.

    Use `await start()`, then `await close()` (or `async with`). Connections
    share the file descriptor; pread/pwrite at explicit offsets need no lock.
    tls offers NBD_OPT_STARTTLS with this server-side context; tls_required
    refuses to serve anything before it (the spec's FORCEDTLS mode). A host
    beyond loopback needs tls_required with a context that requires client
    certificates, or allow_any_client (any client that completes TLS may then
    read and write the disk). unix_owner, unix_group (ids; None: ours) and
    unix_mode say who may open the Unix socket.
    """

    def __init__(
        self,
        image: Path | str,
        *,
        export: str = "",
        host: str | None = "127.0.0.1",
        port: int = 0,
        unix_path: Path | str | None = None,
        unix_owner: int | None = None,
        unix_group: int | None = None,
        unix_mode: int = 0o600,
        tracker: ChangeTracker | None = None,
        tls: ssl.SSLContext | None = None,
        tls_required: bool = False,
        allow_any_client: bool = False,
        inline_max: int = INLINE_MAX,
    ) -> None:
        if tls_required and tls is None:
            raise NbdServerError("NBD server told to require TLS but given no TLS context")
        self.image = Path(image)
        self.export = export
        self.host = host
        self.port = port
        self.unix_path = Path(unix_path) if unix_path is not None else None
        self.unix_access = (unix_owner, unix_group, unix_mode)
        self.tracker = tracker
        self.tls = tls
        self.tls_required = tls_required
        self.allow_any_client = allow_any_client
        self.inline_max = inline_max
        self._zeroed: Callable[[int, int], None] | None = (
            tracker.zeroed if isinstance(tracker, ZeroTracker)
            else tracker.changed if tracker is not None else None)
        self._wrote: Callable[[int, bytes], None] | None = (
            tracker.wrote if isinstance(tracker, WriteTracker)
            else None if tracker is None else lambda offset, data: tracker.changed(offset, len(data)))
        self._flush_started: Callable[[], None] | None = (
            tracker.flush_started if isinstance(tracker, FlushTracker) else None)
        self._before_ahead = tracker.before_changes if isinstance(tracker, AheadTracker) else None
        self._unix_id: tuple[int, int] | None = None  # (dev, inode) of the socket we created
        self.size = 0
        self._fd = -1
        self._servers: list[asyncio.Server] = []
        self._connections: set[_Connection] = set()

    async def __aenter__(self) -> NbdServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def tcp_port(self) -> int | None:
        """The bound TCP port (useful with port=0), or None without TCP."""
        for server in self._servers:
            for sock in server.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    return int(sock.getsockname()[1])
        return None

    async def start(self) -> None:
        """Open the image and start listening; NbdServerError if either fails."""
        if self.host is None and self.unix_path is None:
            raise NbdServerError("NBD server needs a TCP host or a Unix socket path")
        check_reach(self.host, self.tls, self.tls_required, self.allow_any_client)
        try:
            self._fd = os.open(self.image, os.O_RDWR | os.O_CLOEXEC)
            self.size = os.fstat(self._fd).st_size
            loop = asyncio.get_running_loop()
            if self.host is not None:
                try:
                    self._servers.append(await loop.create_server(
                        lambda: _Connection(self), self.host, self.port))
                except OSError as exc:
                    why = os.strerror(exc.errno) if exc.errno else str(exc)
                    raise NbdListenError(f"cannot serve NBD export {self.export!r} on "
                                         f"{self.host}:{self.port}: {why}; stop what holds the "
                                         "port or choose another in nbd_listen") from None
            if self.unix_path is not None:
                sock, self._unix_id = bind_unix(self.unix_path, *self.unix_access)
                self._servers.append(await loop.create_unix_server(lambda: _Connection(self), sock=sock))
        except NbdServerError:
            await self.close()
            raise
        except OSError as exc:
            await self.close()
            raise NbdServerError(f"cannot serve {self.image} over NBD: {exc}") from exc
        log.info("serving %s (%d bytes) as NBD export %r on %s%s%s", self.image, self.size, self.export,
                 f"{self.host}:{self.tcp_port}" if self.host is not None else "",
                 f" {self.unix_path}" if self.unix_path is not None else "",
                 " (TLS required)" if self.tls_required else " (TLS offered)" if self.tls else "")

    async def close(self) -> None:
        """Stop accepting, close connections, wait for their handlers, then close the image."""
        for server in self._servers:
            server.close()
        for conn in list(self._connections):
            conn.close()
        for server in self._servers:
            await server.wait_closed()
        if self._connections:
            await asyncio.gather(*(c.task for c in list(self._connections) if c.task is not None),
                                 return_exceptions=True)
        self._servers.clear()
        if self.unix_path is not None and self._unix_id is not None:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(self.unix_path)
                if (st.st_dev, st.st_ino) == self._unix_id:  # still ours: not another server's
                    self.unix_path.unlink()
            self._unix_id = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _blocks(self, event: Request) -> bool:
        """The request will wait on a worker thread (so replies so far should go out first)."""
        if isinstance(event, Write):
            return event.fua or len(event.data) > self.inline_max
        if isinstance(event, Read):
            return event.length > self.inline_max
        return True

    async def _execute(self, session: NbdServerSession, event: Request,
                       queued: Iterable[object] = ()) -> None:
        """Run one request and answer it; OSError becomes its errno, a failing hook EIO.
        `queued`: the requests read behind it (for AheadTracker)."""
        fd = self._fd
        small = self.inline_max
        try:
            if isinstance(event, Write):
                tracker = self.tracker
                if self._before_ahead is not None:
                    await self._before_ahead(event.offset, len(event.data), (
                        (w.offset, len(w.data)) for w in queued if isinstance(w, Write)))
                elif tracker is not None:
                    await tracker.before_change(event.offset, len(event.data))
                if len(event.data) <= small and not event.fua:
                    pwrite_all(fd, event.data, event.offset)
                    if self._wrote is not None:  # no await since the pwrite: the payload is the image
                        self._wrote(event.offset, event.data)
                else:
                    await asyncio.to_thread(write_at, fd, event.data, event.offset, event.fua)
                    if tracker is not None:  # another write may have landed meanwhile: read back
                        tracker.changed(event.offset, len(event.data))
            elif isinstance(event, Read):
                if is_hole(fd, event.offset, event.length):
                    session.reply_hole(event.cookie)
                    return
                if event.length <= small:
                    data = pread_exact(fd, event.length, event.offset)
                else:
                    data = await asyncio.to_thread(pread_exact, fd, event.length, event.offset)
                session.reply(event.cookie, data=data)
                return
            elif isinstance(event, BlockStatus):
                # Up to MAX_EXTENTS lseek pairs on a fragmented file: not for the loop thread.
                extents = await asyncio.to_thread(allocation_extents, fd, event.offset, event.length)
                session.reply_block_status(event.cookie, extents)
                return
            elif isinstance(event, WriteZeroes | Trim):
                tracker = self.tracker
                if tracker is not None:
                    await tracker.before_change(event.offset, event.length)
                # Trimmed contents are unspecified; zeroing them keeps source and replica equal.
                no_hole = isinstance(event, WriteZeroes) and event.no_hole
                await asyncio.to_thread(zero_range, fd, event.offset, event.length, no_hole, event.fua)
                if self._zeroed is not None:
                    self._zeroed(event.offset, event.length)
            elif isinstance(event, Flush):
                if self._flush_started is not None:
                    self._flush_started()
                await asyncio.to_thread(os.fdatasync, fd)
                if self.tracker is not None:
                    await self.tracker.flushed()
            session.reply(event.cookie)
        except OSError as exc:
            log.warning("NBD %s failed: %s", type(event).__name__, exc)
            session.reply(event.cookie, exc.errno or errno.EIO, message=f"{type(event).__name__}: {exc}")
        except Exception as exc:
            log.exception("NBD hook failed for %s", type(event).__name__)
            session.reply(event.cookie, errno.EIO, message=f"change tracking failed: {exc}")


class _Connection(asyncio.BufferedProtocol):
    """One client. The transport receives straight into the session's buffer; one task per
    connection executes the decoded requests in order and writes the replies.

    Reading stops while too much is queued (QUEUE_BYTES, QUEUE_EVENTS) and
    resumes when the queue is empty, so a slow disk pushes back on the client.
    """

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.session = NbdServerSession({server.export: server.size}, tls=server.tls is not None,
                                        tls_required=server.tls_required)
        self.transport: asyncio.Transport | None = None
        self.peer: object = "unix"
        self.task: asyncio.Task[None] | None = None
        self.events: deque[Event] = deque()
        self.queued_bytes = 0
        self.violation: NbdProtocolError | None = None
        self.finished = False  # EOF or connection lost: nothing more will arrive
        self.reading_paused = False
        self.wakeup = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()

    # --- transport callbacks (no awaiting here) -------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = transport.get_extra_info("peername") or "unix"
        transport.write(self.session.data_to_send())
        self.server._connections.add(self)
        self.task = asyncio.get_running_loop().create_task(self._run())

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.session.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            events = self.session.buffer_updated(nbytes)
        except NbdProtocolError as exc:
            self.violation = exc
            self._pause_reading()
            events = []
        for event in events:
            if isinstance(event, Write):
                self.queued_bytes += len(event.data)
            elif isinstance(event, StartTls):
                self._pause_reading()  # the client waits for our ACK; start_tls resumes
        self.events.extend(events)
        if self.queued_bytes > QUEUE_BYTES or len(self.events) > QUEUE_EVENTS:
            self._pause_reading()
        self.wakeup.set()

    def eof_received(self) -> bool | None:
        self.finished = True
        self.wakeup.set()
        # Stay half-open so requests already received still get their replies; the request
        # loop closes. (asyncio's TLS transport cannot stay half-open and warns if asked.)
        return not self.session.tls_active

    def connection_lost(self, exc: Exception | None) -> None:
        self.finished = True
        self.wakeup.set()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
            self.reading_paused = True

    # --- the request loop -----------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._serve()
        except (ssl.SSLError, TimeoutError) as exc:
            log.warning("NBD client %s failed the TLS handshake: %s", self.peer, exc)
        except OSError as exc:
            log.info("NBD connection with %s failed: %s", self.peer, exc)
        except Exception:
            log.exception("NBD connection with %s failed", self.peer)
        finally:
            self.close()
            self.server._connections.discard(self)

    def _send(self) -> None:
        out = self.session.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    async def _drain(self) -> None:
        if not self.writable.is_set():
            await self.writable.wait()

    async def _serve(self) -> None:
        session, server = self.session, self.server
        while True:
            while not self.events:
                if self.violation is not None:
                    log.warning("NBD client %s broke the protocol: %s", self.peer, self.violation)
                    self._send()  # e.g. the EOVERFLOW answer to an oversized write
                    return
                if self.finished:
                    return
                self._send()  # option replies and in-band refusals come with no event
                self.wakeup.clear()
                if self.reading_paused and self.transport is not None:
                    self.reading_paused = False
                    self.transport.resume_reading()
                await self.wakeup.wait()
            event = self.events.popleft()
            if isinstance(event, Write):
                self.queued_bytes -= len(event.data)
            if isinstance(event, Negotiated):
                log.debug("NBD client %s negotiated export %r (structured replies %s, contexts %s)",
                          self.peer, event.export, session.structured, session.meta_contexts)
            elif isinstance(event, StartTls):
                assert server.tls is not None and self.transport is not None  # session checked
                self._send()
                loop = asyncio.get_running_loop()
                transport = await loop.start_tls(self.transport, self, server.tls, server_side=True,
                                                 ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
                assert transport is not None
                self.transport = transport
                self.reading_paused = False  # start_tls resumes reading on the new transport
            elif isinstance(event, Disconnect):
                self._send()
                await self._drain()
                return
            else:
                if server._blocks(event):
                    self._send()
                await server._execute(session, event, self.events)
            if not self.events:
                self._send()
                await self._drain()
