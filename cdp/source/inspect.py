"""One-shot questions to the receiver on behalf of a source config (verify)."""

from __future__ import annotations

import asyncio

from cdp.blocks import Geometry
from cdp.config import SourceConfig
from cdp.errors import ProtocolError, RemoteError, TransportError
from cdp.messages import Challenge, Error, GetHashes, Hashes, Message, Open, Opened, Welcome
from cdp.protocol import SourceSession
from cdp.transport import Link, client_tls


async def _connect(cfg: SourceConfig) -> Link:
    host, port = cfg.receiver
    ctx = client_tls(cfg.tls) if cfg.tls else None
    name = (cfg.tls.server_name or host) if cfg.tls else None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=name, limit=1 << 20), 15)
    except (OSError, TimeoutError) as exc:
        raise TransportError(f"cannot connect to receiver {host}:{port}: {exc}") from None
    session = SourceSession(cfg.name, cfg.token, cfg.max_frame)
    link = Link(session, reader, writer)
    await link.send_raw(session.start())
    for want in (Challenge, Welcome):
        msg = (await link.receive(30))[0]
        if isinstance(msg, Error):
            raise RemoteError(msg.code, msg.message)
        if not isinstance(msg, want):
            raise ProtocolError(f"expected {want.__name__}, got {type(msg).__name__}")
        if want is Challenge:
            await link.send_raw(session.auth())
    return link


async def replica_hashes(cfg: SourceConfig, volumes: dict[str, Geometry],
                         rehash: bool = True) -> dict[str, tuple[int, bytes] | str]:
    """Per volume: (replica epoch, block hashes read from the replica image), or an error text."""
    link = await _connect(cfg)
    out: dict[str, tuple[int, bytes] | str] = {}
    buf: list[Message] = []

    async def _next(link: Link, volume: str) -> Message:
        while not buf:
            msgs = await link.receive(600)
            buf.extend(m for m in msgs if getattr(m, "volume", volume) == volume)
        return buf.pop(0)

    try:
        for name, geo in volumes.items():
            await link.send(Open(name, geo.size, geo.block_size, True))
            msg = await _next(link, name)
            if isinstance(msg, Error):
                out[name] = f"{msg.code}: {msg.message}"
                continue
            assert isinstance(msg, Opened)
            await link.send(GetHashes(name, 0, geo.blocks, rehash))
            blob = bytearray()
            while len(blob) < geo.blocks * 16:
                h = await _next(link, name)
                if isinstance(h, Error):
                    raise RemoteError(h.code, h.message, name)
                if not isinstance(h, Hashes) or not h.hashes:
                    break
                blob += h.hashes
            link.session.hashes_done(name)  # type: ignore[attr-defined]
            out[name] = (msg.epoch, bytes(blob))
    finally:
        await link.close()
    return out
