"""The source's control channel and its scan queue.

Control channel: a Unix socket ``<state_dir>/control.sock`` (mode 0600; only
the source's own user or root may talk to it, checked with SO_PEERCRED).
One request per connection, one JSON line each way, at most 4 KiB::

    -> {"op": "checkpoint", "volume": "vm1-disk0", "label": "before-upgrade", "move": false}
    <- {"ok": true, "volume": "vm1-disk0", "epoch": 1234, "label": "before-upgrade",
        "moved_from": null | {"epoch": 1200, "time": T}}
    -> {"op": "checkpoint", "group": "vm1", "label": "before-upgrade", "move": false}
    <- {"ok": true, "group": "vm1", "time": T, "epochs": {"vm1-disk0": 1234, ...},
        "moved_from": {"vm1-disk0": {"epoch": 1200, "time": T}, ...}, ...}
    <- {"ok": false, "error": "..."}
    <- {"ok": false, "error": "...", "code": "label_taken", "volume": V,
        "label_on": {"epoch": 1200, "time": T}}

A label names one point. The receiver refuses one that names another point
(message LabelTaken: the answer's code "label_taken") unless the request says
"move" (absent: false); a moved label's answer says where it was.

A checkpoint cuts an epoch at once and labels its recovery point on the
receiver (message Label, answered by Labelled once recorded durably). Scan
volumes: the request wakes the volume; the next scan (pre_scan hook
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

Per-volume operator requests (`cdp pause|resume|resync`, cdp.source.pause)::

    -> {"op": "pause", "volumes": ["vm1-disk0"]}
    <- {"ok": true, "volumes": {"vm1-disk0": {"paused_since": T, "changed": true, ...}}}
    -> {"op": "resync", "volumes": ["vm1-disk0"], "wait": true}
    <- {"ok": true, "volumes": {"vm1-disk0": {"blocks": 1, "epoch": 1240, ...}}}
    <- {"ok": false, "error": "...", "unknown": ["x"], "known": [...]}

Pause and resume answer at once. A resync answers once queued, or with
"wait" once finished (compared, differing blocks sent and acknowledged).

Scan queue (`FairGate`): at most `max_concurrent_scans` scans or resyncs run
at once across the volumes; the others wait in arrival order (FIFO) with
phase "queued". Each start and end is logged with a time stamp.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cdp.errors import CdpError, LabelTakenError, PeerTooOldError
from cdp.source.phase import Phase
from cdp.source.volume import VolumeState
from cdp.wire.messages import Label, Labelled, LabelTaken, valid_label
from cdp.wire.transport import Link

log = logging.getLogger(__name__)
SOCKET = "control.sock"
VOLUME_OPS = ("pause", "resume", "resync")
MAX_REQUEST = 4096
POLL = 0.05


class FairGate:
    """At most `limit` holders at once; waiters are served first come, first served."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.busy = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._waited: dict[str, bool] = {}  # volumes whose next slot came after a wait

    @contextlib.asynccontextmanager
    async def slot(self, vs: VolumeState, what: str) -> AsyncIterator[None]:
        if self.busy < self.limit and not self._waiters:
            self.busy += 1
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            before = vs.phase
            vs.phase = Phase.QUEUED
            log.info("%s queued volume=%s ahead=%d", what, vs.name, len(self._waiters) - 1)
            self._waited[vs.name] = True
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._release()  # the slot was handed to us: pass it on
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(fut)
                raise
            finally:
                if vs.phase == Phase.QUEUED:
                    vs.phase = before
        # quiet by default: a written scan volume rescans up to four times a second; a scan
        # that had to queue, and one that ran long, are worth an info line
        waited = self._waited.pop(vs.name, False)
        t0 = time.time()
        log.log(logging.INFO if waited else logging.DEBUG, "%s start volume=%s t=%.3f", what,
                vs.name, t0)
        try:
            yield
        finally:
            t1 = time.time()
            log.log(logging.INFO if waited or t1 - t0 > 5 else logging.DEBUG,
                    "%s end volume=%s t=%.3f seconds=%.3f", what, vs.name, t1, t1 - t0)
            self._release()

    def _release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot goes straight to the next in line
                return
        self.busy -= 1

    @property
    def queued(self) -> int:
        return sum(1 for f in self._waiters if not f.done())


class Woken(Protocol):
    wake: asyncio.Event  # set: the volume's task runs now (a scan, or a paused one rechecks)


class Daemon(Protocol):
    """What the control channel uses of the source daemon (cdp.source.daemon.Source)."""

    volumes: dict[str, VolumeState]

    @property
    def workers(self) -> Mapping[str, Woken]: ...
    link: Link | None
    nbd: dict[str, Any]

    def _write_status(self) -> None: ...


@dataclass
class _Request:
    volume: str
    label: str
    asked: float
    done: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    move: bool = False  # take the label off the point it names now
    moved: tuple[int, float] | None = None  # (point, capture time) it was taken off


class Control:
    """Checkpoint requests: the Unix socket server and the labelling that follows a cut."""

    def __init__(self, src: Daemon, state_dir: Path) -> None:
        self.src = src
        self.path = state_dir / SOCKET
        self._server: asyncio.AbstractServer | None = None
        self._queued: dict[str, list[_Request]] = {}
        self._labelled: dict[tuple[str, int, str], asyncio.Future[Labelled | LabelTaken]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        old = os.umask(0o177)  # the socket is born 0600
        try:
            self._server = await asyncio.start_unix_server(self._client, path=str(self.path),
                                                           limit=MAX_REQUEST)
        except OSError as exc:
            log.error("control channel %s unavailable (%s): `cdp checkpoint` will not reach "
                      "this source", self.path, exc)
            return
        finally:
            os.umask(old)
        log.debug("control channel on %s", self.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        for t in list(self._tasks):
            t.cancel()

    # -- the socket --------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            answer = await self._answer(reader, writer)
        except Exception as exc:  # an internal error must not take the source down
            log.error("control request failed: %r", exc, exc_info=exc)
            answer = {"ok": False, "error": f"internal error in the source: {exc!r}"}
        with contextlib.suppress(OSError, ConnectionError):
            writer.write((json.dumps(answer) + "\n").encode())
            await writer.drain()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> dict[str, Any]:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            uid = struct.unpack("3i", creds)[1]
            if uid not in (0, os.getuid()):
                return {"ok": False, "error": "permission denied"}
        try:
            async with asyncio.timeout(10):
                line = await reader.readline()
            req = json.loads(line)
        except (ValueError, asyncio.LimitOverrunError, TimeoutError):
            return {"ok": False, "error": "expected one JSON line of at most 4 KiB"}
        if isinstance(req, dict) and req.get("op") in VOLUME_OPS:
            return await self._volume_op(req, reader)
        if not isinstance(req, dict) or req.get("op") != "checkpoint":
            return {"ok": False, "error": "unknown request (expected op = checkpoint, pause, "
                    "resume or resync)"}
        move = req.get("move", False)
        if not isinstance(move, bool):
            return {"ok": False, "error": "move is true or false"}
        if "group" in req:
            return await self._group_request(reader, req.get("group"), req.get("label"), move)
        vol, label = req.get("volume"), req.get("label")
        if not isinstance(vol, str) or vol not in self.src.volumes:
            return {"ok": False, "error": f"no volume {vol!r} in this source"}
        if not isinstance(label, str) or not valid_label(label):
            return {"ok": False, "error": "a label is 1-128 printable characters, not only digits, "
                    "without leading or trailing blanks"}
        r = _Request(vol, label, time.time(), move=move)
        log.info("checkpoint requested volume=%s label=%r move=%s", vol, label, move)
        self.request(r)
        disconnected = asyncio.ensure_future(reader.read(1))  # the client gave up (timeout)
        waits: set[asyncio.Future[Any]] = {r.done, disconnected}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnected.cancel()
        if not r.done.done():
            return {"ok": False, "error": "client went away"}
        exc = r.done.exception()
        if exc is not None:
            return _failure(exc)
        return {"ok": True, "volume": vol, "epoch": r.done.result(), "label": label,
                "moved_from": _where(r.moved)}

    async def _group_request(self, reader: asyncio.StreamReader, group: Any,
                             label: Any, move: bool) -> dict[str, Any]:
        names = sorted(n for n, v in self.src.volumes.items() if v.cfg.group == group)
        if not isinstance(group, str) or not names:
            return {"ok": False, "error": f"no volume of this source is in group {group!r}"}
        if not isinstance(label, str) or not valid_label(label):
            return {"ok": False, "error": "a label is 1-128 printable characters, not only digits, "
                    "without leading or trailing blanks"}
        log.info("checkpoint requested group=%s label=%r move=%s", group, label, move)
        task = asyncio.ensure_future(self._group_checkpoint(group, names, label, move))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        disconnected = asyncio.ensure_future(reader.read(1))  # the client gave up (timeout)
        try:
            await asyncio.wait({task, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnected.cancel()
        if not task.done():
            task.cancel()
            return {"ok": False, "error": "client went away"}
        try:
            when, epochs, moved = task.result()
        except CdpError as exc:
            return _failure(exc)
        return {"ok": True, "group": group, "label": label, "time": when, "epochs": epochs,
                "moved_from": {n: _where(m) for n, m in moved.items()}}

    async def _group_checkpoint(self, group: str, names: list[str], label: str,
                                move: bool) -> tuple[float, dict[str, int], dict[str, Any]]:
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
        for n in names:
            vs = self.src.volumes[n]
            while vs.acked < epochs[n]:
                if lost(n):
                    raise CdpError(f"{n}: the checkpoint's epoch was not kept by the receiver "
                                   "(a resync followed); run the checkpoint again")
                await asyncio.sleep(POLL)
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
        return when, epochs, moved

    # -- pause, resume, resync ------------------------------------------------------

    async def _volume_op(self, req: dict[str, Any], reader: asyncio.StreamReader) -> dict[str, Any]:
        names = req.get("volumes")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            return {"ok": False, "error": "name one or more volumes"}
        known = sorted(self.src.volumes)
        unknown = [n for n in names if n not in self.src.volumes]
        if unknown:
            return {"ok": False, "unknown": unknown, "known": known,
                    "error": f"no volume {', '.join(map(repr, unknown))} in this source (it has "
                    f"{', '.join(known)})"}
        vols = [self.src.volumes[n] for n in dict.fromkeys(names)]
        op = req["op"]
        if op == "resync":
            return await self._resync(vols, bool(req.get("wait")), reader)
        out: dict[str, Any] = {}
        try:
            for vs in vols:
                changed = vs.pause() if op == "pause" else vs.resume()
                if changed:
                    log.info("volume=%s %s (cdp %s)", vs.name,
                             "paused" if op == "pause" else "resumed", op)
                    if (w := self.src.workers.get(vs.name)) is not None:
                        w.wake.set()
                out[vs.name] = {"changed": changed, "paused_since": vs.paused_since or None,
                                "phase": vs.phase}
        except CdpError as exc:
            return {"ok": False, "error": str(exc), "volumes": out}
        self.src._write_status()
        return {"ok": True, "volumes": out}

    async def _resync(self, vols: list[VolumeState], wait: bool,
                      reader: asyncio.StreamReader) -> dict[str, Any]:
        paused = [vs.name for vs in vols if vs.paused_since]
        if paused:
            return {"ok": False, "error": f"{', '.join(paused)} paused: `cdp resume` first (a "
                    "resync ships what differs)"}
        asked: dict[str, int] = {}
        for vs in vols:
            vs.resync.asked += 1
            asked[vs.name] = vs.resync.asked
            log.info("resync requested volume=%s (request %d)", vs.name, vs.resync.asked)
            if (w := self.src.workers.get(vs.name)) is not None:
                w.wake.set()
        self.src._write_status()
        if not wait:
            return {"ok": True, "volumes": {vs.name: {"queued": True, "phase": vs.phase}
                                            for vs in vols}}
        disconnected = asyncio.ensure_future(reader.read(1))  # the client gave up
        try:
            while not disconnected.done():
                for vs in vols:
                    if vs.resync.done >= asked[vs.name]:
                        continue
                    if vs.paused_since:
                        return {"ok": False, "error": f"{vs.name} was paused before its resync "
                                "finished; it runs after `cdp resume`"}
                    if vs.phase == Phase.FAILED:
                        return {"ok": False, "error": f"{vs.name} failed: {vs.error} (its resync "
                                "stays queued until it recovers)"}
                if all(vs.resync.done >= asked[vs.name] for vs in vols):
                    return {"ok": True, "volumes": {vs.name: {
                        "blocks": vs.resync.blocks, "epoch": vs.resync.epoch} for vs in vols}}
                await asyncio.sleep(POLL)
        finally:
            disconnected.cancel()
        return {"ok": False, "error": "client went away"}

    # -- cutting and labelling -----------------------------------------------------

    def request(self, r: _Request) -> None:
        vs = self.src.volumes[r.volume]
        if vs.paused_since:
            r.done.set_exception(CdpError(f"volume {r.volume} is paused: nothing would reach the "
                                          "replica; `cdp resume` it first"))
            return
        if vs.cfg.mode == "nbd":
            self._spawn(self._nbd_checkpoint(r))
        else:
            self._queued.setdefault(r.volume, []).append(r)
            self.src.workers[r.volume].wake.set()

    @contextlib.asynccontextmanager
    async def checkpoints(self, vs: VolumeState) -> AsyncIterator[None]:
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

    def _requeue(self, volume: str, reqs: list[_Request]) -> None:
        if reqs:
            self._queued.setdefault(volume, [])[:0] = reqs

    def _after_scan(self, vs: VolumeState, reqs: list[_Request]) -> None:
        if not reqs:
            return
        if vs.need is not None:
            self._requeue(vs.name, reqs)
            return
        with vs.lock:
            target = max([vs.acked, *(e for e, p in vs.pending.items() if p.committed)])
        self._spawn(self._label(vs, target, reqs, scan=True))

    async def _nbd_checkpoint(self, r: _Request) -> None:
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

    async def _label(self, vs: VolumeState, epoch: int, reqs: list[_Request],
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

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _where(moved: tuple[int, float] | None) -> dict[str, Any] | None:
    return None if moved is None else {"epoch": moved[0], "time": moved[1]}


def _moved_text(ans: Labelled) -> str:
    return f" moved_from={ans.moved_from}" if ans.moved_from else ""


def _failure(exc: BaseException) -> dict[str, Any]:
    """The control answer for a failed checkpoint; a refused label says where it is."""
    out: dict[str, Any] = {"ok": False, "error": str(exc)}
    if isinstance(exc, LabelTakenError):
        out.update(code=exc.wire_code, volume=exc.volume,
                   label_on={"epoch": exc.epoch, "time": exc.time})
    return out


def ask(state_dir: Path, request: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Client side: send one request to the running source and return its answer (a dict);
    CdpError if the source is not running or says nothing, TimeoutError after `timeout`."""
    path = state_dir / SOCKET
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise CdpError(f"the source is not running (no control socket at {path}); start it "
                           "(`cdp source -c ...`, or its service) and try again") from None
        s.sendall((json.dumps(request) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except TimeoutError:
        raise TimeoutError(f"no answer from the source within {timeout:.0f}s") from None
    except OSError as exc:
        raise CdpError(f"cannot talk to the source at {path}: {exc}") from None
    finally:
        s.close()
    try:
        answer = json.loads(buf)
    except ValueError:
        raise CdpError("the source closed the control channel without an answer") from None
    if not isinstance(answer, dict):
        raise CdpError("the source answered something unexpected")
    return answer


def request_checkpoint(state_dir: Path, volume: str | None, label: str, timeout: float,
                       group: str | None = None, move: bool = False) -> dict[str, Any]:
    """Client side (cdp checkpoint): ask the running source; the answer, or a CdpError."""
    which = {"volume": volume} if group is None else {"group": group}
    return ask(state_dir, {"op": "checkpoint", **which, "label": label, "move": move}, timeout)
