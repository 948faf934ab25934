"""Checkpoints: cut an epoch at once and label its recovery point on the receiver.

A label names one point. The receiver refuses one that names another point
(message LabelTaken) unless the request says "move"; a moved label's answer
says where it was. Labels are sent as message Label, answered by Labelled
once recorded durably.

Scan volumes: the request wakes the volume; the next scan (pre_scan hook
included) starts after the request, and the last epoch it commits (or the
acknowledged epoch, if it found nothing changed) is labelled once
acknowledged. NBD volumes: the journal cuts at once; the first epoch whose
capture time is at or after the cut is labelled once acknowledged (the
open epoch at the cut, possibly merged with later writes when the sender
is behind: still a state the guest had).

A group checkpoint (nbd volumes of one consistency group) waits until every
member captures writes, then makes one *marked* cut (tracker/journal.py): each
member seals a unit at that instant, even an empty one, never merged with later
writes, so each member gets an epoch whose time is the cut's; each is labelled
once acknowledged. A member that drops what it captured before then (it fell
behind, a reconnect) fails the request: run it again.

The requests come from the control channel (cdp/source/control.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from cdp.errors import CdpError, LabelTakenError, PeerTooOldError
from cdp.source.phase import Phase
from cdp.source.volume import VolumeState
from cdp.wire.messages import Label, Labelled, LabelTaken
from cdp.wire.transport import Link

log = logging.getLogger("cdp.source.control")  # the logger these lines always had
POLL = 0.05


class Woken(Protocol):
    wake: asyncio.Event  # set: the volume's task runs now (a scan, or a paused one rechecks)


class Daemon(Protocol):
    """What checkpoints use of the source daemon (cdp.source.daemon.Source)."""

    volumes: dict[str, VolumeState]

    @property
    def workers(self) -> Mapping[str, Woken]: ...
    link: Link | None
    nbd: dict[str, Any]


@dataclass
class Request:
    """One volume's checkpoint request; `done` gets the labelled epoch or the failure."""

    volume: str
    label: str
    asked: float
    done: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    move: bool = False  # take the label off the point it names now
    moved: tuple[int, float] | None = None  # (point, capture time) it was taken off


GroupResult = tuple[float, dict[str, int], dict[str, tuple[int, float]]]  # cut time, epochs, moved


class Checkpoints:
    """The cutting and labelling that follows a checkpoint request, per volume or per group."""

    def __init__(self, src: Daemon) -> None:
        self.src = src
        self._queued: dict[str, list[Request]] = {}
        self._labelled: dict[tuple[str, int, str], asyncio.Future[Labelled | LabelTaken]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()

    def request(self, r: Request) -> None:
        vs = self.src.volumes[r.volume]
        if vs.paused_since:
            r.done.set_exception(CdpError(f"volume {r.volume} is paused: nothing would reach the "
                                          "replica; `cdp resume` it first"))
            return
        if vs.cfg.mode == "nbd":
            self.spawn(self._nbd_checkpoint(r))
        else:
            self._queued.setdefault(r.volume, []).append(r)
            self.src.workers[r.volume].wake.set()

    @contextlib.asynccontextmanager
    async def around_scan(self, vs: VolumeState) -> AsyncIterator[None]:
        """Around one scan: it serves the requests that arrived before it started; when it
        ends, its last epoch is labelled once acknowledged. A scan cut short (a Need, an
        error, a disconnect) leaves them to the next scan."""
        reqs = self._queued.pop(vs.name, [])
        try:
            yield
        except BaseException:
            self._requeue(vs.name, reqs)
            raise
        self._after_scan(vs, reqs)

    def _requeue(self, volume: str, reqs: list[Request]) -> None:
        if reqs:
            self._queued.setdefault(volume, [])[:0] = reqs

    def _after_scan(self, vs: VolumeState, reqs: list[Request]) -> None:
        if not reqs:
            return
        if vs.need is not None:
            self._requeue(vs.name, reqs)
            return
        with vs.lock:
            target = max([vs.acked, *(e for e, p in vs.pending.items() if p.committed)])
        self.spawn(self._label(vs, target, reqs, scan=True))

    async def _nbd_checkpoint(self, r: Request) -> None:
        vs = self.src.volumes[r.volume]
        export = self.src.nbd.get(r.volume)
        journal = getattr(export, "journal", None)
        if journal is None:
            r.done.set_exception(CdpError(f"volume {r.volume} is not being served over NBD"))
            return
        idle = (journal.mode == "capture" and not getattr(journal, "open", None)
                and not getattr(journal, "sealed", None) and not vs.pending and vs.phase == Phase.IDLE)
        journal.cut()
        if idle:
            await self._label(vs, vs.acked, [r])
            return
        cut = journal.last_cut
        chosen: tuple[int, float] | None = None
        while True:
            with vs.lock:
                pend = sorted((e, p.time) for e, p in vs.pending.items())
            if chosen is None:
                chosen = next(((e, t) for e, t in pend if t >= cut), None)
            if chosen is not None:
                # the last epoch carrying that capture time (a split resync): its end is the state
                same = [e for e, t in pend if t == chosen[1]]
                if not same and vs.acked >= chosen[0]:
                    break
                if same:
                    chosen = (max(chosen[0], *same), chosen[1])
            await asyncio.sleep(POLL)
        await self._label(vs, chosen[0], [r])

    async def _label(self, vs: VolumeState, epoch: int, reqs: list[Request],
                     scan: bool = False) -> None:
        try:
            while vs.acked < epoch:
                if scan and vs.need is not None:
                    # the receiver dropped epochs of that scan: the next scan serves them
                    self._requeue(vs.name, reqs)
                    return
                await asyncio.sleep(POLL)
            if epoch <= 0:
                raise CdpError(f"volume {vs.name} has no acknowledged epoch to label yet")
            for r in reqs:
                try:
                    ans = await self._send_label(vs, epoch, r.label, r.move)
                except LabelTakenError as exc:  # this request only: the others go on
                    log.info("checkpoint refused volume=%s epoch=%d: %s", vs.name, epoch, exc)
                    if not r.done.done():
                        r.done.set_exception(exc)
                    continue
                log.info("checkpoint labelled volume=%s epoch=%d label=%r%s", vs.name, epoch,
                         r.label, _moved_text(ans))
                r.moved = (ans.moved_from, ans.moved_time) if ans.moved_from else None
                if not r.done.done():
                    r.done.set_result(epoch)
        except Exception as exc:
            for r in reqs:
                if not r.done.done():
                    r.done.set_exception(exc)

    # -- a consistency group --------------------------------------------------------

    async def group(self, group: str, names: list[str], label: str, move: bool) -> GroupResult:
        """One marked cut of the whole group, each member's epoch at it labelled. A member
        whose label names another point stops it (LabelTakenError, saying which members
        were labelled already)."""
        if paused := [n for n in names if self.src.volumes[n].paused_since]:
            raise CdpError(f"{', '.join(paused)} of group {group} paused: `cdp resume` first")
        exports: dict[str, Any] = {n: self.src.nbd.get(n) for n in names}
        bad = [n for n, e in exports.items() if getattr(e, "journal", None) is None]
        if bad:
            raise CdpError(f"{', '.join(bad)} of group {group} is not being served over NBD")
        journals: dict[str, Any] = {n: e.journal for n, e in exports.items()}
        while not all(j.mode == "capture" for j in journals.values()):
            await asyncio.sleep(POLL)  # a member catching up (resync) has no state at a new cut
        before = {n: (j.stats.resyncs, j.stats.fallbacks) for n, j in journals.items()}
        when = next(iter(journals.values())).cut(mark=True)  # every member, one instant
        log.info("checkpoint cut group=%s time=%.6f", group, when)

        def lost(n: str) -> bool:
            j = journals[n]
            return (j.stats.resyncs, j.stats.fallbacks) != before[n]

        epochs = await self._marked_epochs(exports, names, when, lost)
        await self._group_acked(names, epochs, lost)
        moved = await self._label_group(group, names, epochs, label, move)
        return when, epochs, moved

    async def _marked_epochs(self, exports: dict[str, Any], names: list[str], when: float,
                             lost: Callable[[str], bool]) -> dict[str, int]:
        """Each member's epoch sealed at the marked cut `when`."""
        epochs: dict[str, int] = {}
        for n in names:
            while (e := exports[n].marked.pop(when, None)) is None:
                if lost(n):
                    break
                await asyncio.sleep(POLL)
            if e is None:
                raise CdpError(f"{n} dropped what it captured before the checkpoint was sent "
                               "(it fell behind or reconnected); run the checkpoint again")
            epochs[n] = e
        return epochs

    async def _group_acked(self, names: list[str], epochs: dict[str, int],
                           lost: Callable[[str], bool]) -> None:
        """Until the receiver acknowledged every member's epoch at the cut."""
        for n in names:
            vs = self.src.volumes[n]
            while vs.acked < epochs[n]:
                if lost(n):
                    raise CdpError(f"{n}: the checkpoint's epoch was not kept by the receiver "
                                   "(a resync followed); run the checkpoint again")
                await asyncio.sleep(POLL)

    async def _label_group(self, group: str, names: list[str], epochs: dict[str, int], label: str,
                           move: bool) -> dict[str, tuple[int, float]]:
        """Label each member's epoch; where each label was moved from."""
        moved: dict[str, tuple[int, float]] = {}
        done: list[str] = []
        for n in names:
            try:
                ans = await self._send_label(self.src.volumes[n], epochs[n], label, move)
            except LabelTakenError as exc:
                if not done:
                    raise
                now_on = ", ".join(f"{d} epoch {epochs[d]}" for d in done)
                raise LabelTakenError(exc.volume, label, exc.epoch, exc.time,
                                      f" (the new cut's points of {now_on} have it now)") from None
            done.append(n)
            if ans.moved_from:
                moved[n] = (ans.moved_from, ans.moved_time)
            log.info("checkpoint labelled group=%s volume=%s epoch=%d label=%r%s", group, n,
                     epochs[n], label, _moved_text(ans))
        return moved

    # -- the receiver's side of a label ----------------------------------------------

    async def _send_label(self, vs: VolumeState, epoch: int, label: str,
                          move: bool = False) -> Labelled:
        """Label point `epoch` on the receiver; its answer, or LabelTakenError (refused)."""
        while True:  # a reconnect in between: send again on the new connection
            link = self.src.link
            if link is None or vs.name not in link.session.volumes:
                await asyncio.sleep(POLL)
                continue
            key = (vs.name, epoch, label)
            fut = self._labelled[key] = asyncio.get_running_loop().create_future()
            try:
                await link.send(Label(vs.name, epoch, label, move))
                while not fut.done():
                    if self.src.link is not link:
                        break
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):
                            await asyncio.shield(fut)
                if fut.done():
                    ans = fut.result()
                    if isinstance(ans, LabelTaken):
                        raise LabelTakenError(vs.name, label, ans.other, ans.other_time)
                    return ans
            except (LabelTakenError, PeerTooOldError):
                raise  # the receiver's answer, or what its protocol lacks: sending again won't do
            except CdpError as exc:
                log.info("volume=%s: label not sent (%s); trying again", vs.name, exc)
                await asyncio.sleep(POLL)
            finally:
                self._labelled.pop(key, None)

    def labelled(self, msg: Labelled | LabelTaken) -> None:
        """The receiver recorded a label, or refused it (called by the daemon's reader)."""
        fut = self._labelled.get((msg.volume, msg.epoch, msg.label))
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run `coro` as a task that stop() cancels."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _moved_text(ans: Labelled) -> str:
    return f" moved_from={ans.moved_from}" if ans.moved_from else ""
