"""One-shot questions to the receiver on behalf of a source config (verify)."""

from __future__ import annotations

from cdp.blocks import Geometry
from cdp.config import SourceConfig
from cdp.errors import RemoteError
from cdp.messages import Error, GetHashes, Hashes, Message, Open, Opened
from cdp.source.connect import connect
from cdp.transport import Link


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
