"""The source's control channel and its scan queue.

Control channel: a Unix socket ``<state_dir>/control.sock`` (mode 0600; only
the source's own user or root may talk to it, checked with SO_PEERCRED).
One request per connection, one JSON line each way, at most 4 KiB::

    -> {"op": "checkpoint", "volume": "vm1-disk0", "label": "before-upgrade"}
    <- {"ok": true, "volume": "vm1-disk0", "epoch": 1234, "label": "before-upgrade"}
    <- {"ok": false, "error": "..."}

A checkpoint cuts an epoch at once and labels its recovery point on the
receiver (message Label, answered by Labelled once recorded durably). Scan
volumes: the request wakes the volume; the next scan (pre_scan hook
included) starts after the request, and the last epoch it commits (or the
acknowledged epoch, if it found nothing changed) is labelled once
acknowledged. NBD volumes: the journal cuts at once; the first epoch whose
capture time is at or after the cut is labelled once acknowledged (the
open epoch at the cut, possibly merged with later writes when the sender
is behind: still a state the guest had).

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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cdp.errors import CdpError
from cdp.messages import Label, Labelled, valid_label
from cdp.source.volume import VolumeState
from cdp.transport import Link

log = logging.getLogger(__name__)
SOCKET = "control.sock"
MAX_REQUEST = 4096
POLL = 0.05


class FairGate:
    """At most `limit` holders at once; waiters are served first come, first served."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.busy = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @contextlib.asynccontextmanager
    async def slot(self, vs: VolumeState, what: str) -> AsyncIterator[None]:
        if self.busy < self.limit and not self._waiters:
            self.busy += 1
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            before = vs.phase
            vs.phase = "queued"
            log.info("%s queued volume=%s ahead=%d", what, vs.name, len(self._waiters) - 1)
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
                if vs.phase == "queued":
                    vs.phase = before
        t0 = time.time()
        log.info("%s start volume=%s t=%.3f", what, vs.name, t0)
        try:
            yield
        finally:
            t1 = time.time()
            log.info("%s end volume=%s t=%.3f seconds=%.3f", what, vs.name, t1, t1 - t0)
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


class Daemon(Protocol):
    """What the control channel uses of the source daemon (cdp.source.daemon.Source)."""

    volumes: dict[str, VolumeState]
    wake: dict[str, asyncio.Event]
    link: Link | None
    nbd: dict[str, Any]


@dataclass
class _Request:
    volume: str
    label: str
    asked: float
    done: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Control:
    """Checkpoint requests: the Unix socket server and the labelling that follows a cut."""

    def __init__(self, src: Daemon, state_dir: Path) -> None:
        self.src = src
        self.path = state_dir / SOCKET
        self._server: asyncio.AbstractServer | None = None
        self._queued: dict[str, list[_Request]] = {}
        self._labelled: dict[tuple[str, int, str], asyncio.Future[None]] = {}
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
            line = await asyncio.wait_for(reader.readline(), 10)
            req = json.loads(line)
        except (ValueError, asyncio.LimitOverrunError, TimeoutError):
            return {"ok": False, "error": "expected one JSON line of at most 4 KiB"}
        if not isinstance(req, dict) or req.get("op") != "checkpoint":
            return {"ok": False, "error": "unknown request (expected op = checkpoint)"}
        vol, label = req.get("volume"), req.get("label")
        if not isinstance(vol, str) or vol not in self.src.volumes:
            return {"ok": False, "error": f"no volume {vol!r} in this source"}
        if not isinstance(label, str) or not valid_label(label):
            return {"ok": False, "error": "a label is 1-128 printable characters, not only digits, "
                    "without leading or trailing blanks"}
        r = _Request(vol, label, time.time())
        log.info("checkpoint requested volume=%s label=%r", vol, label)
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
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "volume": vol, "epoch": r.done.result(), "label": label}

    # -- cutting and labelling -----------------------------------------------------

    def request(self, r: _Request) -> None:
        vs = self.src.volumes[r.volume]
        if vs.cfg.mode == "nbd":
            self._spawn(self._nbd_checkpoint(r))
        else:
            self._queued.setdefault(r.volume, []).append(r)
            self.src.wake[r.volume].set()

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
                and not getattr(journal, "sealed", None) and not vs.pending and vs.phase == "idle")
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
                await self._send_label(vs, epoch, r.label)
                log.info("checkpoint labelled volume=%s epoch=%d label=%r", vs.name, epoch,
                         r.label)
                if not r.done.done():
                    r.done.set_result(epoch)
        except Exception as exc:
            for r in reqs:
                if not r.done.done():
                    r.done.set_exception(exc)

    async def _send_label(self, vs: VolumeState, epoch: int, label: str) -> None:
        while True:  # a reconnect in between: send again on the new connection
            link = self.src.link
            if link is None or vs.name not in link.session.volumes:
                await asyncio.sleep(POLL)
                continue
            key = (vs.name, epoch, label)
            fut = self._labelled[key] = asyncio.get_running_loop().create_future()
            try:
                await link.send(Label(vs.name, epoch, label))
                while not fut.done():
                    if self.src.link is not link:
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(fut), 0.5)
                if fut.done():
                    return
            except CdpError as exc:
                log.info("volume=%s: label not sent (%s); trying again", vs.name, exc)
                await asyncio.sleep(POLL)
            finally:
                self._labelled.pop(key, None)

    def labelled(self, msg: Labelled) -> None:
        """The receiver recorded a label (called by the daemon's reader)."""
        fut = self._labelled.get((msg.volume, msg.epoch, msg.label))
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def request_checkpoint(state_dir: Path, volume: str, label: str, timeout: float) -> dict[str, Any]:
    """Client side (cdp checkpoint): ask the running source; the answer, or a CdpError."""
    path = state_dir / SOCKET
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise CdpError(f"the source is not running (no control socket at {path})") from None
        s.sendall((json.dumps({"op": "checkpoint", "volume": volume, "label": label}) + "\n")
                  .encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(MAX_REQUEST)
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
