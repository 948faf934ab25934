"""Open an authenticated connection to the receiver on behalf of a source config."""

from __future__ import annotations

import asyncio

from cdp.config import SourceConfig
from cdp.errors import ProtocolError, RemoteError, TransportError
from cdp.messages import Challenge, Error, Welcome
from cdp.protocol import SourceSession
from cdp.transport import Link, client_tls

HANDSHAKE_TIMEOUT = 30.0
CONNECT_TIMEOUT = 15.0


async def connect(cfg: SourceConfig) -> Link:
    """TCP (and TLS) to the receiver, then the mutual HMAC handshake; a ready Link."""
    host, port = cfg.receiver
    ctx = client_tls(cfg.tls) if cfg.tls else None
    server_hostname = (cfg.tls.server_name or host) if cfg.tls else None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=ctx, server_hostname=server_hostname, limit=1 << 20),
            CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise TransportError(f"cannot connect to receiver {host}:{port}: {exc}") from None
    session = SourceSession(cfg.name, cfg.token, cfg.max_frame)
    link = Link(session, reader, writer)
    try:
        await link.send_raw(session.start())
        for want in (Challenge, Welcome):
            msg = (await link.receive(HANDSHAKE_TIMEOUT))[0]
            if isinstance(msg, Error):
                raise RemoteError(msg.code, msg.message)
            if not isinstance(msg, want):
                raise ProtocolError(f"expected {want.__name__}, got {type(msg).__name__}")
            if want is Challenge:
                await link.send_raw(session.auth())
    except BaseException:
        await link.close()
        raise
    return link
