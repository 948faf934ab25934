"""Holding a volume (`cdp pause`) and comparing all of it again (`cdp resync`), per volume.

Pause: the volume's sender ships nothing more, at the next boundary (a scan
stops between chunks and commits what it built; an nbd unit under way, a
resync included, finishes first). Changes are still tracked: a scan volume is
compared with the map on its next scan; an nbd export keeps serving the
guest, and its journal keeps only the dirty regions (on disk) until resumed,
then resyncs them. The lag (RPO) keeps growing honestly: nothing says the
replica is current while paused. The state lives in VolumeState
(``paused.json``), so a restart stays paused.

Resync: with nothing in flight, the receiver rehashes the replica's image
(GetHashes with rehash: what the image holds, not what was recorded) and
that becomes the map; the next scan (nbd: a resync of every region) then
compares every block with it and sends only those that differ. A request is
finished once that comparison ran to its end and its epochs are acknowledged;
one cut short by a reconnect starts over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

from cdp.errors import RemoteError
from cdp.source.connect import fetch_hashes
from cdp.source.phase import Phase
from cdp.source.volume import DedupIndex, VolumeState
from cdp.wire.messages import GetHashes, Hashes, Message
from cdp.wire.transport import Link

log = logging.getLogger(__name__)
POLL = 0.05


class Worker(Protocol):
    """What pausing and resyncing use of a volume's worker (cdp.source.worker.VolumeWorker)."""

    wake: asyncio.Event
    acked: asyncio.Event

    def take_error(self) -> RemoteError | None: ...

    async def expect(self, kind: type[Message]) -> Message: ...


class Daemon(Protocol):
    """What pausing and resyncing use of the source daemon (cdp.source.daemon.Source)."""

    index: DedupIndex

    @property
    def workers(self) -> Mapping[str, Worker]: ...

    async def pace(self, vs: VolumeState, msg: Message) -> None: ...

    def spawn(self, coro: Any) -> None: ...


async def held(src: Daemon, vs: VolumeState) -> None:
    """While the volume is paused: phase "paused", nothing sent; returns once resumed."""
    if not vs.paused_since:
        return
    vs.phase = Phase.PAUSED
    log.info("volume=%s paused (since %s): shipping nothing until `cdp resume`", vs.name,
             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(vs.paused_since)))
    wake = src.workers[vs.name].wake
    while vs.paused_since:
        wake.clear()
        await wake.wait()
    log.info("volume=%s resumed: shipping what changed meanwhile", vs.name)


async def refetch(src: Daemon, link: Link, vs: VolumeState) -> None:
    """Begin the resync asked for: once every epoch in flight is acknowledged (or dropped),
    take the hashes of the replica's image as the map."""
    r = vs.resync
    r.running = r.asked
    while True:
        if (err := src.workers[vs.name].take_error()) is not None:
            raise err
        if vs.need is not None:
            vs.undo_from(vs.need, src.index)
            vs.need = None
        if not vs.pending:
            break
        acked = src.workers[vs.name].acked
        acked.clear()
        await acked.wait()  # an Ack, a Need or an Error sets it
    assert vs.geo is not None
    geo = vs.geo
    vs.phase = Phase.FETCHING_MAP
    vs.progress = (0, geo.size)
    r.changed_before = vs.stats["changed"]
    log.info("volume=%s resync: the receiver rehashes the replica's image (epoch %d, %d blocks)",
             vs.name, vs.acked, geo.blocks)

    async def hashes() -> Message:
        msg = await src.workers[vs.name].expect(Hashes)
        if isinstance(msg, Hashes):
            done = (msg.start + len(msg.hashes) // 16) * geo.block_size
            vs.progress = (min(done, geo.size), geo.size)
        return msg

    await src.pace(vs, GetHashes(vs.name, 0, geo.blocks, True))
    smap = await fetch_hashes(link, vs.name, geo.blocks, True, hashes)
    vs.adopt(vs.replica_id, vs.acked, smap)  # nothing pending: the image at the acked epoch
    vs.progress = (0, geo.size)


def compared(src: Daemon, vs: VolumeState) -> None:
    """A resync's comparison ran to its end: it is finished once its epochs are acknowledged."""
    r = vs.resync
    if not r.running or vs.need is not None:
        return
    with vs.lock:
        target = max([vs.acked, *(e for e, p in vs.pending.items() if p.committed)])
    src.spawn(_finish(src, vs, r.running, target, vs.stats["needs"]))


async def _finish(src: Daemon, vs: VolumeState, run: int, target: int, needs: float) -> None:
    r = vs.resync
    while vs.acked < target:
        if r.running != run or vs.stats["needs"] != needs:
            return  # started over (reconnect), or epochs dropped: the next comparison finishes it
        await asyncio.sleep(POLL)
    if r.running != run:
        return
    r.done, r.running = run, 0
    r.blocks, r.epoch = int(vs.stats["changed"] - r.changed_before), target
    log.info("volume=%s resync done: %d block(s) differed and were sent (epoch %d)", vs.name,
             r.blocks, target)
    if r.wanted:
        src.workers[vs.name].wake.set()  # asked again while this one ran: the next one starts now
