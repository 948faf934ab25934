"""Open an authenticated connection to the receiver on behalf of a source config."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from cdp.config import SourceConfig
from cdp.errors import ProtocolError, RemoteError, TransportError
from cdp.wire.messages import Challenge, Error, GetHashes, Hashes, Message, Welcome
from cdp.wire.source_session import SourceSession
from cdp.wire.transport import Link, client_tls

# An attempt that hangs (a path that still black-holes new connections) must not hold up the
# next one for long: TCP and TLS get CONNECT_TIMEOUT, the two tiny handshake round trips
# HANDSHAKE_TIMEOUT each; then the backoff (at most reconnect_max) and a fresh attempt.
CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 5.0


async def connect(cfg: SourceConfig) -> Link:
    """TCP (and TLS) to the receiver, then the mutual HMAC handshake; a ready Link."""
    host, port = cfg.receiver
    ctx = client_tls(cfg.tls) if cfg.tls else None
    server_hostname = (cfg.tls.server_name or host) if cfg.tls else None
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=ctx, server_hostname=server_hostname, limit=1 << 20)
    except (OSError, TimeoutError) as exc:
        raise TransportError(f"cannot connect to receiver {host}:{port}: {exc}") from None
    session = SourceSession(cfg.name, cfg.token, cfg.max_frame)
    link = Link(session, reader, writer)
    try:
        session.start()
        await link.flush()
        for want in (Challenge, Welcome):
            msg = (await link.receive(HANDSHAKE_TIMEOUT))[0]
            if isinstance(msg, Error):
                raise RemoteError(msg.code, msg.message)
            if not isinstance(msg, want):
                raise ProtocolError(f"expected {want.__name__}, got {type(msg).__name__}")
            if want is Challenge:
                session.auth()
                await link.flush()
    except BaseException:
        await link.close()
        raise
    return link


async def fetch_hashes(link: Link, volume: str, count: int, rehash: bool,
                       next_msg: Callable[[], Awaitable[Message]]) -> bytearray:
    """The replica's hashes of blocks [0, count), in order and complete, or ProtocolError.

    next_msg() returns the next message for this volume and raises on an Error.
    """
    await link.send(GetHashes(volume, 0, count, rehash))
    out = bytearray()
    while len(out) < count * 16:
        msg = await next_msg()
        if not isinstance(msg, Hashes):
            raise ProtocolError(f"{volume}: expected Hashes, got {type(msg).__name__}")
        if msg.start * 16 != len(out):
            raise ProtocolError(f"{volume}: Hashes out of order")
        if not msg.hashes:
            break
        out += msg.hashes
    link.session.hashes_done(volume)  # type: ignore[attr-defined]
    if len(out) != count * 16:
        raise ProtocolError(f"{volume}: receiver sent {len(out) // 16} of {count} hashes")
    return out
