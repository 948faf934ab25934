"""One epoch of a QEMU block node: freeze its dirty bitmap with a point-in-time view, read, finish.

The cycle, per epoch (`Fleece.cut()` then `View.finish()`):

    blockdev-add   view (qcow2 overlay in cdp's work dir, backing = the protected node)
    transaction    block-dirty-bitmap-add   cdp-TAG-(N+1)   new live bitmap
                   block-dirty-bitmap-disable cdp-TAG-N     frozen: the changes up to the cut
                   blockdev-backup node -> view, sync none  copy-before-write into the view
    block-export-add  view, read-only, bitmaps [cdp-TAG-N]  on a Unix socket
    NBD            BLOCK_STATUS qemu:dirty-bitmap:cdp-TAG-N (what changed), READ (the data at the cut)
    finish(ok)     export, job, view go; ok: drop cdp-TAG-N; failed: merge it into cdp-TAG-(N+1) first

Why this kind of view: QEMU 7.2 (Debian 12) has no `blockdev-replace`, so a
copy-before-write filter cannot be inserted above a node that the guest (or
qemu-storage-daemon's export) already uses, and a `snapshot-access` node needs
such a filter under it. The classic "image fleecing" works on every version
since 2.x: a `blockdev-backup` job with `sync: none` copies each old cluster
into the overlay before the guest overwrites it (QEMU puts its own
copy-before-write filter in the path for the job's lifetime), so reading the
overlay gives the disk as of the transaction. The guest never waits for cdp:
only for QEMU's copy of an old cluster into a local file, and only for the
first write to each cluster during an epoch.

Bitmaps are named `cdp-TAG-GEN` (GEN counts up); the recording one is the live
bitmap. Persistent on qcow2 images (stored in the image when QEMU closes it),
in memory on others. `Fleece.open()` makes the node's state usable whatever an
earlier run left behind (a source killed mid-epoch): it removes views, jobs
and exports of ours, merges every frozen bitmap of ours back into the live one,
and drops inconsistent ones (QEMU was killed: their content is unknown), which
the caller then learns as `tracked = False`: compare the whole disk.

The view's NBD export lives on QEMU's NBD server (QEMU 7.2 runs one at most). If
the caller names the socket of a server QEMU already runs (qemu-storage-daemon
--nbd-server), that one is used; otherwise cdp starts one on a private socket
in its work dir and stops it on close().

No policy: when to cut, what to do with the extents, and whether an epoch
counts as done are the caller's (cdp/source/qemuworker.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from cdp.durable import make_private_dir
from cdp.errors import QemuError
from cdp.nbd.client import NbdClient
from cdp.nbd.clientevents import Extent, NbdClientError
from cdp.qemu.qmp import Action, Bitmap, Node, Qmp, bitmap_add, bitmap_disable, bitmap_enable, bitmap_merge

log = logging.getLogger(__name__)

ALLOCATION = "base:allocation"
DIRTY = 1  # qemu:dirty-bitmap flag of a dirty extent
ZERO = 2  # base:allocation flag: reads as zeros
GONE_WAIT = 10.0  # seconds an export or job gets to go away after we asked
MAX_SOCKET_PATH = 100  # sun_path holds 107 bytes; leave room
_TAG = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,19}")


def qemu_tag(volume: str) -> str:
    """A short QEMU-safe name part for a volume (node names and job ids: at most 31 bytes)."""
    if _TAG.fullmatch(volume):
        return volume
    return "v" + hashlib.sha1(volume.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Names:
    """What cdp calls its things in QEMU, for one protected node."""

    node: str
    tag: str

    @property
    def prefix(self) -> str:
        return f"cdp-{self.tag}-"

    def bitmap(self, gen: int) -> str:
        return f"{self.prefix}{gen}"

    def gen(self, bitmap: str) -> int | None:
        """The generation of one of our bitmaps; None for anyone else's."""
        rest = bitmap.removeprefix(self.prefix)
        return int(rest) if rest != bitmap and rest.isdigit() else None

    @property
    def view(self) -> str:
        return f"cdp-{self.tag}-view"

    @property
    def view_file(self) -> str:
        return f"cdp-{self.tag}-vfile"

    @property
    def job(self) -> str:
        return f"cdp-{self.tag}-fleece"

    @property
    def export(self) -> str:
        return f"cdp-{self.tag}-view"


@dataclass(frozen=True)
class Tracking:
    """What open() found: whether QEMU's bitmap covers every change since our last finished epoch."""

    tracked: bool  # False: no usable bitmap of ours (first run, or QEMU lost it): compare everything
    live: str | None
    dirty: int  # bytes the live bitmap counts
    merged: tuple[str, ...] = ()  # frozen bitmaps of an earlier run merged back
    dropped: tuple[str, ...] = ()  # inconsistent bitmaps removed


class Fleece:
    """The per-epoch cycle on one block node over one QMP connection."""

    def __init__(self, qmp: Qmp, node: str, tag: str, workdir: Path, *, nbd_socket: Path | None = None,
                 granularity: int | None = None, timeout: float = 30.0) -> None:
        self.qmp = qmp
        self.names = Names(node, tag)
        self.workdir = workdir
        self.granularity = granularity
        self.timeout = timeout  # NBD requests
        self.own_server = nbd_socket is None
        self.socket = nbd_socket if nbd_socket is not None else _socket_path(workdir)
        self.live: str | None = None
        self.persistent = False
        self.size = 0
        self._next_gen = 1
        self._server_started = False

    @property
    def overlay(self) -> Path:
        return self.workdir / "view.qcow2"

    async def open(self) -> Tracking:
        """Clean up after an earlier run, make sure an NBD server runs, and settle on one live bitmap."""
        make_private_dir(self.workdir)
        await self._teardown_view()
        node = await self.qmp.node(self.names.node)
        self.size, self.persistent = node.size, node.driver == "qcow2"
        await self._ensure_server()
        return await self._settle(node)

    async def _settle(self, node: Node) -> Tracking:
        """Merge frozen bitmaps of ours into the newest recording one; drop inconsistent ones."""
        ours = sorted(((g, b) for b in node.bitmaps if (g := self.names.gen(b.name)) is not None),
                      key=lambda gb: gb[0])
        self._next_gen = (ours[-1][0] + 1) if ours else 1
        bad = [b for _, b in ours if b.inconsistent]
        if bad:  # QEMU stopped without storing them: what they say is unknown, so is every other's worth
            for _, b in ours:
                await self.qmp.execute("block-dirty-bitmap-remove", {"node": self.names.node, "name": b.name})
            log.warning("QEMU node %s: bitmap(s) %s inconsistent (QEMU was not shut down cleanly): "
                        "dropped; the next epoch compares the whole disk", self.names.node,
                        ", ".join(b.name for b in bad))
            self.live = None
            return Tracking(False, None, 0, dropped=tuple(b.name for _, b in ours))
        if not ours:
            self.live = None
            return Tracking(False, None, 0)
        live = next((b for _, b in reversed(ours) if b.recording), None)
        if live is None:  # every one frozen (disabled by hand?): the newest records again
            live = ours[-1][1]
            await self.qmp.run(bitmap_enable(self.names.node, live.name))
        frozen = [b.name for _, b in ours if b.name != live.name]
        if frozen:
            await self.qmp.run(bitmap_merge(self.names.node, live.name, frozen))
            for name in frozen:
                await self.qmp.execute("block-dirty-bitmap-remove", {"node": self.names.node, "name": name})
            log.info("QEMU node %s: merged bitmap(s) %s of an unfinished epoch back into %s",
                     self.names.node, ", ".join(frozen), live.name)
        self.live = live.name
        count = (await self.qmp.node(self.names.node)).bitmap(live.name)
        return Tracking(True, live.name, count.count if count else 0, merged=tuple(frozen))

    async def dirty_bytes(self) -> int | None:
        """Bytes the live bitmap marks dirty (None: there is no live bitmap of ours)."""
        if self.live is None:
            return None
        b: Bitmap | None = (await self.qmp.node(self.names.node)).bitmap(self.live)
        if b is None:
            raise QemuError(f"QEMU node {self.names.node} lost cdp's dirty bitmap {self.live} (removed "
                            "by someone else, or QEMU restarted with a raw image)", socket=self.qmp.path)
        return b.count

    async def cut(self) -> View:
        """The transaction: a new live bitmap, the old one frozen, a view of this instant; exported.

        On any failure everything set up so far is torn down (a frozen bitmap merged back) and
        the error raised."""
        view = View(self)
        try:
            await view.setup()
        except BaseException:
            with contextlib.suppress(QemuError):
                await view.finish(False)
            raise
        return view

    async def close(self) -> None:
        """Stop the NBD server if cdp started it (the bitmaps stay: they track on)."""
        if self._server_started:
            self._server_started = False
            with contextlib.suppress(QemuError):
                await self.qmp.execute("nbd-server-stop")

    async def _ensure_server(self) -> None:
        if not self.own_server:
            return
        try:
            await self.qmp.execute("nbd-server-start",
                                   {"addr": {"type": "unix", "data": {"path": str(self.socket)}}})
            self._server_started = True
        except QemuError as exc:
            if "already running" not in str(exc):
                raise
            if not self.socket.is_socket():
                raise QemuError(f"QEMU ({self.qmp.path}) already runs an NBD server, not on cdp's socket "
                                f"{self.socket}: set nbd_socket to its Unix socket so cdp exports its "
                                "view there", socket=self.qmp.path, command="nbd-server-start") from None
            self._server_started = True  # ours, from an earlier run of the source
            log.info("QEMU (%s): reusing cdp's NBD server on %s", self.qmp.path, self.socket)

    async def _teardown_view(self, client: NbdClient | None = None) -> list[QemuError]:
        """Remove our export, job and overlay, whichever exist; every step is tried."""
        names, errors = self.names, []
        if client is not None:
            await client.close()
        steps: list[Callable[[], Awaitable[None]]] = [self._drop_export, self._drop_job, self._drop_nodes]
        for step in steps:
            try:
                await step()
            except QemuError as exc:
                errors.append(exc)
        with contextlib.suppress(FileNotFoundError):
            self.overlay.unlink()
        for e in errors:
            log.warning("QEMU node %s: tearing down the view: %s", names.node, e)
        return errors

    async def _drop_export(self) -> None:
        exports = await self.qmp.execute("query-block-exports")
        if any(e.get("id") == self.names.export for e in exports):
            with contextlib.suppress(QemuError):  # already shutting down: wait below
                await self.qmp.execute("block-export-del", {"id": self.names.export, "mode": "hard"})
            await self._until_gone("query-block-exports", "id", self.names.export)

    async def _drop_job(self) -> None:
        jobs = await self.qmp.execute("query-block-jobs")
        if any(j.get("device") == self.names.job for j in jobs):
            with contextlib.suppress(QemuError):  # it may be concluding by itself
                await self.qmp.execute("block-job-cancel", {"device": self.names.job, "force": True})
            await self._until_gone("query-block-jobs", "device", self.names.job)
        # a job that concluded without auto-dismiss would linger in query-jobs: not ours (auto-dismiss)

    async def _drop_nodes(self) -> None:
        have = {n.name for n in await self.qmp.nodes()}
        for name in (self.names.view, self.names.view_file):
            if name in have:
                await self.qmp.execute("blockdev-del", {"node-name": name})
                have = {n.name for n in await self.qmp.nodes()}  # the overlay's file goes with it

    async def _until_gone(self, query: str, key: str, name: str) -> None:
        deadline = time.monotonic() + GONE_WAIT
        delay = 0.005
        while any(x.get(key) == name for x in await self.qmp.execute(query)):
            if time.monotonic() > deadline:
                raise QemuError(f"QEMU ({self.qmp.path}) still lists {name} in {query} {GONE_WAIT:g} s "
                                "after cdp asked to remove it", socket=self.qmp.path, command=query)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def _create_overlay(self) -> None:
        """An empty qcow2 file of the node's size (qemu-img, from QEMU's qemu-utils)."""
        self.overlay.unlink(missing_ok=True)
        try:
            proc = await asyncio.create_subprocess_exec(
                "qemu-img", "create", "-q", "-f", "qcow2", str(self.overlay), str(self.size),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            out, _ = await proc.communicate()
        except OSError as exc:
            raise QemuError(f"cannot run qemu-img to create the point-in-time view {self.overlay}: "
                            f"{exc.strerror or exc} (install qemu-utils)") from exc
        if proc.returncode != 0:
            raise QemuError(f"qemu-img create {self.overlay} failed: {out.decode(errors='replace').strip()}")


class View:
    """One epoch: the frozen bitmap and the disk as of the cut, over one NBD connection."""

    def __init__(self, fleece: Fleece) -> None:
        self.fleece = fleece
        self.frozen: str | None = None  # None: no bitmap before this cut (every block counts as dirty)
        self.live = ""
        self.cut_at = 0.0  # time.time() just before the transaction: every write finished then is in
        self.until = 0.0  # ... and just after it: no write that started later is
        self.client: NbdClient | None = None
        self._cut = False  # the transaction happened
        self._done = False

    @property
    def size(self) -> int:
        return self.fleece.size

    @property
    def context(self) -> str:
        return f"qemu:dirty-bitmap:{self.frozen}"

    async def setup(self) -> None:
        f, names, qmp = self.fleece, self.fleece.names, self.fleece.qmp
        await f._create_overlay()
        await qmp.execute("blockdev-add", {
            "driver": "qcow2", "node-name": names.view, "backing": names.node,
            "file": {"driver": "file", "node-name": names.view_file, "filename": str(f.overlay)}})
        new = names.bitmap(f._next_gen)
        actions: list[Action] = [bitmap_add(names.node, new, persistent=f.persistent,
                                            granularity=f.granularity)]
        if f.live is not None:
            actions.append(bitmap_disable(names.node, f.live))
        actions.append(Action("blockdev-backup", {"device": names.node, "target": names.view,
                                                  "sync": "none", "job-id": names.job}))
        self.cut_at = time.time()
        await qmp.transaction(actions)
        self.until = time.time()
        self._cut = True
        self.frozen, self.live = f.live, new
        f.live = new
        f._next_gen += 1
        export: dict[str, object] = {"type": "nbd", "id": names.export, "node-name": names.view,
                                     "name": names.export, "writable": False}
        if self.frozen is not None:
            export["bitmaps"] = [self.frozen]
        await qmp.execute("block-export-add", export)
        contexts = [ALLOCATION] + ([self.context] if self.frozen is not None else [])
        try:
            self.client = await NbdClient.connect_unix(str(f.socket), names.export, contexts=contexts,
                                                       timeout=f.timeout)
        except NbdClientError as exc:
            raise QemuError(f"cannot read the point-in-time view of {names.node} over NBD "
                            f"({f.socket}): {exc}") from exc
        if self.client.size != f.size:
            raise QemuError(f"the view of {names.node} has {self.client.size} bytes, the node {f.size}: "
                            "was the disk resized? (a resized volume is a new volume)")

    async def dirty(self) -> list[tuple[int, int]]:
        """(offset, length) runs that changed between the previous cut and this one; with no
        previous cut (no bitmap), the whole disk."""
        if self.frozen is None:
            return [(0, self.size)] if self.size else []
        return [(e.offset, e.length) for e in await self._extents(self.context) if e.flags & DIRTY]

    async def zeros(self) -> list[tuple[int, int]]:
        """(offset, length) runs that read as zeros at the cut (holes): no need to read them."""
        return [(e.offset, e.length) for e in await self._extents(ALLOCATION) if e.flags & ZERO]

    async def read(self, offset: int, length: int) -> bytearray:
        """The disk's bytes as of the cut."""
        assert self.client is not None
        try:
            return await self.client.read(offset, length)
        except NbdClientError as exc:
            raise QemuError(f"reading the point-in-time view of {self.fleece.names.node}: {exc}") from exc

    async def _extents(self, context: str) -> list[Extent]:
        assert self.client is not None
        try:
            return await self.client.extents(context)
        except NbdClientError as exc:
            raise QemuError(f"block status of the view of {self.fleece.names.node}: {exc}") from exc

    async def finish(self, ok: bool) -> None:
        """Tear the view down; `ok` (the epoch is acknowledged): drop the frozen bitmap, else merge it
        back into the live one so its changes go out again. Every step is tried; the first
        failure is raised after (the next open() cleans up what is left)."""
        if self._done:
            return
        self._done = True
        f, names = self.fleece, self.fleece.names
        client, self.client = self.client, None
        errors = await f._teardown_view(client)
        if self._cut and self.frozen is not None:
            try:
                if not ok:
                    await f.qmp.run(bitmap_merge(names.node, self.live, [self.frozen]))
                await f.qmp.execute("block-dirty-bitmap-remove", {"node": names.node, "name": self.frozen})
            except QemuError as exc:
                log.warning("QEMU node %s: %s bitmap %s: %s", names.node,
                            "dropping" if ok else "merging back", self.frozen, exc)
                errors.append(exc)
        if errors:
            raise errors[0]


def _socket_path(workdir: Path) -> Path:
    """workdir/nbd.sock, or a private folder under /tmp named after workdir when that is too long
    for a Unix socket (the same folder on every run: a server left from a killed run is found)."""
    path = workdir / "nbd.sock"
    if len(str(path)) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha1(str(workdir.resolve()).encode()).hexdigest()[:16]
    short = Path(tempfile.gettempdir()) / f"cdp-{os.getuid()}-{digest}"
    make_private_dir(short)
    if short.stat().st_uid != os.getuid() or short.stat().st_mode & 0o077:
        raise QemuError(f"{short} is not a private folder of this user: cannot put the NBD socket there")
    return short / "nbd.sock"
