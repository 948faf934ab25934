"""asyncio adapter: drives a protocol session over TCP (optionally TLS) streams.

It only pumps bytes: framing, validation and state live in cdp.protocol.
Also here: TLS contexts from the config, and reconnect backoff.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl

from cdp.config import TlsClient, TlsServer
from cdp.errors import ConfigError, TransportError
from cdp.messages import Message
from cdp.protocol import _Session

log = logging.getLogger(__name__)
READ_SIZE = 1 << 20
# Sockets keep at most this much unsent before drain() waits: bounded memory per link.
WRITE_HIGH_WATER = 8 << 20


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


class Link:
    """One connection: a session plus the streams it talks over."""

    def __init__(self, session: _Session, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.session = session
        self.reader = reader
        self.writer = writer
        self.sent_bytes = 0
        self._lock = asyncio.Lock()
        transport = writer.transport
        if transport is not None:
            transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    async def send(self, msg: Message) -> int:
        """Encode and write one message, waiting while the socket buffer is full."""
        frame = self.session.send(msg)
        return await self.send_raw(frame)

    async def send_raw(self, frame: bytes) -> int:
        async with self._lock:
            try:
                self.writer.write(frame)
                await self.writer.drain()
            except (ConnectionError, OSError) as exc:
                raise TransportError(f"connection to {self.peer} lost: {exc}") from None
        self.sent_bytes += len(frame)
        return len(frame)

    async def receive(self, timeout: float | None = None) -> list[Message]:
        """The next messages; [] never means closed: TransportError does."""
        while True:
            await self.fill(timeout)
            events = self.session.receive_data(b"")
            if events:
                return events

    async def fill(self, timeout: float | None = None) -> None:
        """Read what has arrived into the session; take messages with session.events()."""
        try:
            data = await asyncio.wait_for(self.reader.read(READ_SIZE), timeout)
        except TimeoutError:
            raise TransportError(f"{self.peer}: idle for {timeout:.0f}s, closing") from None
        except (ConnectionError, OSError) as exc:
            raise TransportError(f"connection to {self.peer} lost: {exc}") from None
        if not data:
            raise TransportError(f"{self.peer} closed the connection")
        self.session.feed(data)

    async def close(self) -> None:
        self.session.close()
        try:
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        except (ConnectionError, OSError, TimeoutError, ssl.SSLError):
            pass


class Backoff:
    """Exponential backoff with jitter between reconnect attempts."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high
        self.delay = low

    def next(self) -> float:
        d = self.delay * random.uniform(0.8, 1.2)
        self.delay = min(self.high, self.delay * 2)
        return d

    def reset(self) -> None:
        self.delay = self.low
