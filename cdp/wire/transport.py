"""asyncio adapter: drives a protocol session over TCP (optionally TLS) streams.

It only pumps bytes: framing, validation and state live in the sessions (cdp.wire.session).
Also here: TLS contexts from the config, and reconnect backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import random
import socket
import ssl
import struct
import termios
import time

from cdp.config import TlsClient, TlsServer
from cdp.errors import ConfigError, PeerClosed, TransportError
from cdp.wire.messages import Message
from cdp.wire.session import Session

log = logging.getLogger(__name__)
READ_SIZE = 1 << 20
# Sockets keep at most this much unsent before drain() waits: bounded memory per link.
WRITE_HIGH_WATER = 8 << 20
# TCP keepalive on every link: the first probe after 30 s idle, then every 10 s; after 3
# unanswered probes the kernel resets the connection (a peer gone without RST, a NAT that forgot
# us). The source's dead_after (Ping/Pong) also covers what the kernel cannot see.
TCP_KEEPALIVE = (30, 10, 3)  # TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT
_OUTQ = getattr(termios, "TIOCOUTQ", None)  # Linux: SIOCOUTQ, bytes not yet acknowledged by the peer


def tcp_keepalive(sock: socket.socket | None, idle: int = TCP_KEEPALIVE[0],
                  interval: int = TCP_KEEPALIVE[1], count: int = TCP_KEEPALIVE[2]) -> bool:
    """SO_KEEPALIVE on a TCP socket, with the timings where the platform has them."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        return False
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
        opt = getattr(socket, name, None)
        if opt is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, opt, value)
    return True


def server_tls(cfg: TlsServer) -> ssl.SSLContext:
    """TLS for the receiver; with client_ca set, clients must show a certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.cert, cfg.key)
        if cfg.client_ca:
            ctx.load_verify_locations(cfg.client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"receiver.tls: cannot load certificate or key: {exc}") from None
    return ctx


def client_tls(cfg: TlsClient) -> ssl.SSLContext:
    """TLS for the source: verifies the receiver against `ca` (or the system store)."""
    ctx = ssl.create_default_context(cafile=str(cfg.ca) if cfg.ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if cfg.cert and cfg.key:
            ctx.load_cert_chain(cfg.cert, cfg.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"source.tls: cannot load client certificate or key: {exc}") from None
    return ctx


class _Reads(asyncio.BufferedProtocol):
    """Reads a link's socket straight into its session's frame buffer (Session.receive_buffer):
    no copy through a StreamReader, its bytes objects, or a second frame buffer. Everything
    else (flow control of writes, close, EOF) goes to the stream protocol it replaced, so the
    StreamWriter's drain() and wait_closed() work as before.

    Reading pauses while a whole frame waits untaken and half a buffer is held (memory stays
    bounded by max_frame plus one read, as with a StreamReader) and resumes when the link is
    asked for more."""

    def __init__(self, session: Session, inner: asyncio.StreamReaderProtocol,
                 transport: asyncio.Transport) -> None:
        self.session = session
        self.inner = inner
        self.transport = transport
        self.reads = 0  # buffer_updated calls so far: Link.fill waits for this to move
        self.eof = False
        self.lost: BaseException | None = None
        self.error: Exception | None = None  # the session refused what arrived
        self.received_at = time.monotonic()
        self._waiter: asyncio.Future[None] | None = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.session.receive_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.reads += 1
        self.received_at = time.monotonic()
        try:
            self.session.received_into(nbytes)
        except Exception as exc:  # refused: raised to the reader, never into the event loop
            self.error = exc
        if self.error is not None or (self.session.frame_ready()
                                      and self.session.pending >= FRAME_BUFFER_HELD):
            with contextlib.suppress(Exception):
                self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        self.eof = True
        self._wake()
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.lost = exc
        self._wake()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, seen: int) -> None:
        """Until a read after `seen`, EOF or a refusal; reading resumes first."""
        if self.reads != seen or self.eof or self.error is not None:
            return
        with contextlib.suppress(Exception):
            if not self.transport.is_reading():
                self.transport.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


FRAME_BUFFER_HELD = 128 * 1024  # untaken bytes (a whole frame among them) that pause reading


def _read_into_session(session: Session, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> _Reads | None:
    """Switch the connection's reads to _Reads, moving what the StreamReader already holds;
    None (streams kept) where the transport or Python does not allow it."""
    transport = writer.transport
    inner = transport.get_protocol() if transport is not None else None
    buffered = getattr(reader, "_buffer", None)
    if (not isinstance(transport, asyncio.Transport) or reader.exception() is not None
            or not isinstance(inner, asyncio.StreamReaderProtocol)
            or not isinstance(buffered, bytearray)):
        return None
    reads = _Reads(session, inner, transport)
    if buffered:
        session.receive_data(bytes(buffered))
        buffered.clear()
        reads.reads += 1
    reads.eof = reader.at_eof() or getattr(reader, "_eof", False)
    transport.set_protocol(reads)
    with contextlib.suppress(Exception):  # a StreamReader that had paused stays paused
        if not transport.is_reading():
            transport.resume_reading()
    return reads


class Link:
    """One connection: a session plus the streams it talks over."""

    def __init__(self, session: Session, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.session = session
        self.reader = reader
        self.writer = writer
        self.sent_bytes = 0
        self.written = 0  # bytes handed to the transport (sent_bytes: once drained)
        self._received_at = time.monotonic()  # when bytes last arrived (the source's dead_after)
        self._lock = asyncio.Lock()
        self._reads = _read_into_session(session, reader, writer)
        self._seen = 0  # _reads.reads when fill() last returned
        transport = writer.transport
        if transport is not None:
            transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        tcp_keepalive(writer.get_extra_info("socket"))
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    @property
    def received_at(self) -> float:
        """When bytes last arrived (the source's dead_after)."""
        return self._reads.received_at if self._reads is not None else self._received_at

    async def send(self, msg: Message) -> int:
        """Check and write one message, waiting while the socket buffer is full."""
        self.session.send(msg)
        return await self.flush()

    async def flush(self) -> int:
        """Write what the session has to send (e.g. after start()), waiting while the socket
        buffer is full; the bytes written.

        Taken from the session before the first await, so frames reach the socket in the
        order the session accepted them, each one uncopied."""
        frame = self.session.data_to_send()
        async with self._lock:
            try:
                self.writer.write(frame)
                self.written += len(frame)
                await self.writer.drain()
            except (ConnectionError, OSError) as exc:
                raise TransportError(f"connection to {self.peer} lost: {exc}") from None
        self.sent_bytes += len(frame)
        return len(frame)

    async def receive(self, timeout: float | None = None) -> list[Message]:
        """The next messages; [] never means closed: TransportError does."""
        while True:
            await self.fill(timeout)
            events = self.session.events_received()
            if events:
                return events

    async def fill(self, timeout: float | None = None) -> None:
        """Read what has arrived into the session; take messages with session.next_event()."""
        if self._reads is not None:
            await self._fill_direct(timeout)
            return
        try:
            async with asyncio.timeout(timeout):
                data = await self.reader.read(READ_SIZE)
        except TimeoutError:
            raise TransportError(f"{self.peer}: idle for {timeout:.0f}s, closing") from None
        except (ConnectionError, OSError) as exc:
            raise TransportError(f"connection to {self.peer} lost: {exc}") from None
        if not data:
            raise PeerClosed(f"{self.peer} closed the connection")
        self._received_at = time.monotonic()
        self.session.receive_data(data)

    async def _fill_direct(self, timeout: float | None) -> None:
        r = self._reads
        assert r is not None
        try:
            async with asyncio.timeout(timeout):
                await r.wait(self._seen)
        except TimeoutError:
            raise TransportError(f"{self.peer}: idle for {timeout:.0f}s, closing") from None
        if r.error is not None:
            raise r.error
        if r.reads == self._seen:  # nothing new: the peer is gone
            if r.lost is not None:
                raise TransportError(f"connection to {self.peer} lost: {r.lost}")
            raise PeerClosed(f"{self.peer} closed the connection")
        self._seen = r.reads

    def unacked(self) -> int:
        """Of `written`, the bytes the peer has not acknowledged yet: still in our buffer, or in
        the kernel's send queue (Linux; elsewhere only our buffer is known)."""
        transport = self.writer.transport
        n = transport.get_write_buffer_size() if transport is not None else 0
        sock = self.writer.get_extra_info("socket")
        if sock is None or _OUTQ is None:
            return n
        try:
            return n + int(struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, bytes(4)))[0])
        except (OSError, ValueError):
            return n

    async def close(self) -> None:
        self.session.close()
        try:
            self.writer.close()
            async with asyncio.timeout(5):
                await self.writer.wait_closed()
        except (ConnectionError, OSError, TimeoutError, ssl.SSLError):
            self.abort()  # unsent data that cannot leave (a dead link): do not keep the socket

    def abort(self) -> None:
        """Close at once, dropping whatever is still unsent (a dead link)."""
        transport = self.writer.transport
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.abort()


class Backoff:
    """Exponential backoff with jitter between reconnect attempts.

    The delay doubles from `low` up to `high` and each wait is drawn from [delay/2, delay]:
    never above `high` (a healed link is retried within `high`), and many sources that lost
    the same receiver do not come back in lockstep. reset() after a success."""

    def __init__(self, low: float, high: float, rng: random.Random | None = None) -> None:
        self.low, self.high = low, max(low, high)
        self.delay = self.low
        self._rng = rng or random.Random()

    def next(self) -> float:
        d = self.delay * self._rng.uniform(0.5, 1.0)
        self.delay = min(self.high, self.delay * 2)
        return d

    def reset(self) -> None:
        self.delay = self.low
