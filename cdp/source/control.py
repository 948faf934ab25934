"""The source's control channel: `cdp checkpoint|pause|resume|resync` reach the running source here.

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

What a checkpoint does (scan, nbd, group): cdp/source/checkpoint.py.

Per-volume operator requests (`cdp pause|resume|resync`, cdp.source.pause)::

    -> {"op": "pause", "volumes": ["vm1-disk0"]}
    <- {"ok": true, "volumes": {"vm1-disk0": {"paused_since": T, "changed": true, ...}}}
    -> {"op": "resync", "volumes": ["vm1-disk0"], "wait": true}
    <- {"ok": true, "volumes": {"vm1-disk0": {"blocks": 1, "epoch": 1240, ...}}}
    <- {"ok": false, "error": "...", "unknown": ["x"], "known": [...]}

Pause and resume answer at once. A resync answers once queued, or with
"wait" once finished (compared, differing blocks sent and acknowledged).

The client side is cdp/source/controlclient.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

from cdp.errors import CdpError, LabelTakenError
from cdp.source.checkpoint import POLL, Checkpoints, GroupResult, Request
from cdp.source.checkpoint import Daemon as CheckpointDaemon
from cdp.source.controlclient import SOCKET
from cdp.source.phase import Phase
from cdp.source.volume import VolumeState
from cdp.wire.messages import Labelled, LabelTaken, valid_label

log = logging.getLogger(__name__)
VOLUME_OPS = ("pause", "resume", "resync")
MAX_REQUEST = 4096
BAD_LABEL = ("a label is 1-128 printable characters, not only digits, without leading or "
             "trailing blanks")


class Daemon(CheckpointDaemon, Protocol):
    """What the control channel uses of the source daemon (cdp.source.daemon.Source)."""

    def _write_status(self) -> None: ...


class Control:
    """The Unix socket server: reads one request, answers it, and hands checkpoints to
    Checkpoints; the daemon and the scan workers reach the checkpoints through it."""

    def __init__(self, src: Daemon, state_dir: Path) -> None:
        self.src = src
        self.path = state_dir / SOCKET
        self.cuts = Checkpoints(src)
        self._server: asyncio.AbstractServer | None = None

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
        self.cuts.stop()

    def checkpoints(self, vs: VolumeState) -> AbstractAsyncContextManager[None]:
        """Around one scan of `vs` (Checkpoints.around_scan)."""
        return self.cuts.around_scan(vs)

    def labelled(self, msg: Labelled | LabelTaken) -> None:
        """The receiver recorded a label, or refused it (called by the daemon's reader)."""
        self.cuts.labelled(msg)

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
            return await self._group_checkpoint(reader, req.get("group"), req.get("label"), move)
        return await self._checkpoint(reader, req.get("volume"), req.get("label"), move)

    # -- checkpoint --------------------------------------------------------------------

    async def _checkpoint(self, reader: asyncio.StreamReader, vol: Any, label: Any,
                          move: bool) -> dict[str, Any]:
        if not isinstance(vol, str) or vol not in self.src.volumes:
            return {"ok": False, "error": f"no volume {vol!r} in this source"}
        if not isinstance(label, str) or not valid_label(label):
            return {"ok": False, "error": BAD_LABEL}
        r = Request(vol, label, time.time(), move=move)
        log.info("checkpoint requested volume=%s label=%r move=%s", vol, label, move)
        self.cuts.request(r)
        if not await _unless_gone(reader, r.done):
            return {"ok": False, "error": "client went away"}
        exc = r.done.exception()
        if exc is not None:
            return _failure(exc)
        return {"ok": True, "volume": vol, "epoch": r.done.result(), "label": label,
                "moved_from": _where(r.moved)}

    async def _group_checkpoint(self, reader: asyncio.StreamReader, group: Any,
                                label: Any, move: bool) -> dict[str, Any]:
        names = sorted(n for n, v in self.src.volumes.items() if v.cfg.group == group)
        if not isinstance(group, str) or not names:
            return {"ok": False, "error": f"no volume of this source is in group {group!r}"}
        if not isinstance(label, str) or not valid_label(label):
            return {"ok": False, "error": BAD_LABEL}
        log.info("checkpoint requested group=%s label=%r move=%s", group, label, move)
        task: asyncio.Task[GroupResult] = self.cuts.spawn(self.cuts.group(group, names, label, move))
        if not await _unless_gone(reader, task):
            task.cancel()
            return {"ok": False, "error": "client went away"}
        try:
            when, epochs, moved = task.result()
        except CdpError as exc:
            return _failure(exc)
        return {"ok": True, "group": group, "label": label, "time": when, "epochs": epochs,
                "moved_from": {n: _where(m) for n, m in moved.items()}}

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


async def _unless_gone(reader: asyncio.StreamReader, fut: asyncio.Future[Any]) -> bool:
    """Wait for `fut` or for the client to hang up (it gave up: a timeout); True if `fut` is done."""
    disconnected = asyncio.ensure_future(reader.read(1))
    try:
        await asyncio.wait({fut, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnected.cancel()
    return fut.done()


def _where(moved: tuple[int, float] | None) -> dict[str, Any] | None:
    return None if moved is None else {"epoch": moved[0], "time": moved[1]}


def _failure(exc: BaseException) -> dict[str, Any]:
    """The control answer for a failed checkpoint; a refused label says where it is."""
    out: dict[str, Any] = {"ok": False, "error": str(exc)}
    if isinstance(exc, LabelTakenError):
        out.update(code=exc.wire_code, volume=exc.volume,
                   label_on={"epoch": exc.epoch, "time": exc.time})
    return out
