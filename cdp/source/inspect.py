"""One-shot questions to the receiver on behalf of a source config (verify)."""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial

from cdp.blocks import Geometry
from cdp.config import SourceConfig
from cdp.errors import CdpError, RemoteError
from cdp.source.connect import connect, fetch_hashes
from cdp.wire.messages import Bye, Error, Message, Open, Opened
from cdp.wire.transport import Link


async def replica_hashes(cfg: SourceConfig, volumes: dict[str, Geometry],
                         rehash: bool = True) -> dict[str, tuple[int, bytes] | str]:
    """Per volume: (replica epoch, block hashes read from the replica image), or an error text."""
    link = await connect(cfg)
    out: dict[str, tuple[int, bytes] | str] = {}
    buf: list[Message] = []

    async def _next(link: Link, volume: str) -> Message:
        while not buf:
            msgs = await link.receive(600)
            buf.extend(m for m in msgs if getattr(m, "volume", volume) == volume)
        return buf.pop(0)

    async def _hashes(volume: str) -> Message:
        msg = await _next(link, volume)
        if isinstance(msg, Error):
            raise RemoteError(msg.code, msg.message, volume)
        return msg

    try:
        for name, geo in volumes.items():
            await link.send(Open(name, geo.size, geo.block_size, True))
            msg = await _next(link, name)
            if isinstance(msg, Error):
                out[name] = f"{msg.code}: {msg.message}"
                continue
            assert isinstance(msg, Opened)
            blob = await fetch_hashes(link, name, geo.blocks, rehash, partial(_hashes, name))
            out[name] = (msg.epoch, bytes(blob))
    finally:
        with contextlib.suppress(CdpError, TimeoutError):  # a clean end, not a lost connection
            async with asyncio.timeout(5):
                await link.send(Bye("verify done"))
        await link.close()
    return out
