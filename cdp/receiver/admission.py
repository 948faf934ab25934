"""Admission: who may hold a connection to the receiver before it has authenticated.

Strangers cannot take the room of configured clients: connections not authenticated yet (TLS
handshake included) are capped per address and in all, and beyond the total cap the one from
the busiest address is dropped to admit the new one, so a flood from other addresses cannot
starve a source. max_connections (authenticated ones) is the daemon's to check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from cdp.config import ReceiverConfig
from cdp.metrics import ReceiverMetrics
from cdp.wire.frames import encode as encode_frame
from cdp.wire.messages import Error

log = logging.getLogger("cdp.receiver")  # one logger for the whole receiver: operators filter on it


class PausedStream(asyncio.StreamReaderProtocol):
    """A stream that reads nothing until its handler resumes it: admission comes first, and
    a TLS handshake started by the handler must see the client's first bytes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]
        super().connection_made(transport)


@dataclass
class Pending:
    """A connection not authenticated yet (TLS handshake included)."""

    ip: str
    since: float
    writer: asyncio.StreamWriter


class Admission:
    """The connections not authenticated yet, by address; admits, evicts and refuses."""

    def __init__(self, metrics: ReceiverMetrics) -> None:
        self.metrics = metrics
        self.unauthenticated: dict[str, int] = {}  # peer address -> connections not yet authenticated
        self.pending: dict[int, Pending] = {}
        self._refusals_logged = 0.0
        self._evictions_logged = 0.0

    async def enter(self, cfg: ReceiverConfig, writer: asyncio.StreamWriter, ip: str,
                    open_conns: int) -> Pending | None:
        """Count a new connection from `ip` as unauthenticated; None if it was refused (told
        why, and closed). `open_conns`: the connections the receiver holds now, of any kind."""
        if open_conns >= cfg.max_connections + cfg.max_unauthenticated:
            await self.refuse(writer, f"the receiver has {open_conns} connections open "
                                      "(max_connections + max_unauthenticated)")
            return None
        if self.unauthenticated.get(ip, 0) >= cfg.max_unauthenticated_per_ip:
            await self.refuse(writer, f"{self.unauthenticated.get(ip, 0)} connections from {ip} are "
                                      "not authenticated yet (max_unauthenticated_per_ip)", ip)
            return None
        if len(self.pending) >= cfg.max_unauthenticated and not self.evict(ip):
            await self.refuse(writer, f"{len(self.pending)} connections are not authenticated "
                                      "yet (max_unauthenticated)", ip)
            return None
        pending = Pending(ip, time.monotonic(), writer)
        self.admit(pending)
        return pending

    def admit(self, p: Pending) -> None:
        self.pending[id(p)] = p
        self.unauthenticated[p.ip] = self.unauthenticated.get(p.ip, 0) + 1

    def authenticated(self, p: Pending) -> None:
        """No longer counted as unauthenticated (authenticated, or gone); idempotent."""
        if self.pending.pop(id(p), None) is None:
            return
        n = self.unauthenticated.get(p.ip, 0) - 1
        if n > 0:
            self.unauthenticated[p.ip] = n
        else:
            self.unauthenticated.pop(p.ip, None)

    def evict(self, ip: str) -> bool:
        """Make room for a connection from `ip`: drop the oldest unauthenticated connection of
        the address holding the most of them, unless that is `ip` itself (then refuse it)."""
        if not self.pending:
            return False
        counts = self.unauthenticated
        busiest = max(counts, key=lambda a: (counts[a], a != ip))
        if busiest == ip or counts.get(busiest, 0) <= counts.get(ip, 0):
            return False
        victim = min((p for p in self.pending.values() if p.ip == busiest), key=lambda p: p.since)
        now = time.monotonic()
        if now - self._evictions_logged >= 10:  # a flood of them: one line per 10 s
            self._evictions_logged = now
            log.warning("dropping an unauthenticated connection from %s (%d not authenticated "
                        "from there) to admit one from %s (max_unauthenticated)", busiest,
                        counts[busiest], ip)
        self.metrics.error("evicted")
        self.authenticated(victim)
        with contextlib.suppress(Exception):
            victim.writer.transport.abort()
        return True

    async def refuse(self, writer: asyncio.StreamWriter, why: str, ip: str = "") -> None:
        """No room: say why in one Error frame (in clear: no TLS yet) and close."""
        self.metrics.error("refused")
        now = time.monotonic()
        if not ip or now - self._refusals_logged >= 10:  # a flood of them: one line per 10 s
            if ip:
                self._refusals_logged = now
            log.warning("refusing a connection from %s: %s", writer.get_extra_info("peername"), why)
        with contextlib.suppress(Exception):
            writer.write(encode_frame(Error("busy", f"{why}; try later", "")))
            async with asyncio.timeout(5):
                await writer.drain()
        writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await writer.wait_closed()
