"""Getting data back: whole images (sparse where zero) and a random-access view of a snapshot.

`SnapshotImage` is a read-only, seekable file over a snapshot's chunks that
fetches (and checks) chunks on demand and keeps a few in a cache, so a file
system reader can pull single files out of an archived image without the
image ever being restored whole. It runs synchronously on a caller thread;
the repository's async backend runs on an event loop in another thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import os
import secrets
import stat
import threading
from collections.abc import Awaitable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import cdp.archive.lock as locks
from cdp.archive.crypto import ZERO_ID
from cdp.archive.job import Progress
from cdp.archive.repo import Manifest, Repository, VolumeSnap
from cdp.blockfile import BlockFile
from cdp.errors import ArchiveError, UsageError

T = TypeVar("T")
WINDOW = 4  # chunks fetched at once while restoring


def volume_of(snap: Manifest, volume: str) -> VolumeSnap:
    v = snap.volume(volume)
    if v is None:
        have = ", ".join(x.volume for x in snap.volumes)
        raise UsageError(f"snapshot {snap.short} has no volume {volume!r} (it has {have})")
    return v


async def restore_image(repo: Repository, snap: Manifest, volume: str, to: Path,
                        progress: Progress | None = None, force: bool = False) -> dict[str, Any]:
    """Write the volume's image to `to`: a new file (holes for zero chunks) or a block device.

    A file is written beside the target and renamed into place at the end, so
    an interrupted restore leaves no half image under the target's name.
    """
    v = volume_of(snap, volume)
    held = await locks.lock(repo, exclusive=False)  # prune must not delete under our feet
    try:
        return await _restore(repo, snap, v, to, progress, force)
    finally:
        await held.release()


async def _restore(repo: Repository, snap: Manifest, v: VolumeSnap, to: Path, progress: Progress | None,
                   force: bool) -> dict[str, Any]:
    volume = v.volume
    await repo.load_index()
    ids = v.ids()
    missing = [c for c in set(ids) if c != ZERO_ID and c not in repo.index]
    if missing:
        raise ArchiveError(f"snapshot {snap.short} volume {volume}: {len(missing)} chunk(s) missing "
                           f"from the repository (e.g. {missing[0].hex()}); run `cdp archive verify`")
    is_dev = to.exists() and stat.S_ISBLK(to.stat().st_mode)
    if to.exists() and not is_dev and not force:
        raise UsageError(f"{to} exists; choose another path or pass --force to overwrite it")
    # a fresh temporary name, never a file or symlink someone else left in the folder
    target = to if is_dev else to.with_name(f".{to.name}.{secrets.token_hex(6)}.cdp-restore")
    flags = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(target, os.O_WRONLY | (0 if is_dev else flags), 0o600)
    except OSError as exc:
        raise ArchiveError(f"cannot write {to}: {exc.strerror}") from None
    written = zero = 0
    try:
        if not is_dev:
            os.ftruncate(fd, v.size)
        window: collections.deque[tuple[int, int, asyncio.Future[bytes]]] = collections.deque()
        pos = 0
        for i, cid in enumerate(ids):
            off = i * v.chunk_size
            n = min(v.chunk_size, v.size - off)
            if cid == ZERO_ID and not is_dev:
                zero += n
                continue
            window.append((off, n, asyncio.ensure_future(repo.read_chunk(cid, n))))
            while len(window) >= WINDOW:
                pos = await _write_one(fd, window, pos, v.size, progress, volume)
                written += 1
        while window:
            pos = await _write_one(fd, window, pos, v.size, progress, volume)
            written += 1
        os.fsync(fd)
    except BaseException:
        for _, _, f in window:
            f.cancel()
        os.close(fd)
        if not is_dev:
            with contextlib.suppress(OSError):
                os.unlink(target)
        raise
    os.close(fd)
    if not is_dev:
        os.replace(target, to)
    if progress is not None:
        progress(volume, v.size, v.size)
    return {"snapshot": snap.id, "volume": volume, "to": str(to), "size": v.size,
            "chunks": len(ids), "zero_bytes": zero}


async def _write_one(fd: int, window: collections.deque[tuple[int, int, asyncio.Future[bytes]]],
                     pos: int, size: int, progress: Progress | None, volume: str) -> int:
    off, n, fut = window.popleft()
    data = await fut
    try:
        os.pwrite(fd, data, off)
    except OSError as exc:
        raise ArchiveError(f"cannot write the restored image: {exc.strerror}") from None
    if progress is not None:
        progress(volume, off + n, size)
    return off + n


class Portal:
    """An event loop on its own thread, so synchronous code can call the async repository."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="archive-io")
        self.thread.start()

    def call(self, aw: Awaitable[T]) -> T:
        async def wrap() -> T:
            return await aw
        coro: Coroutine[Any, Any, T] = wrap()
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        gc.collect()  # see backend.run_sync

    def __enter__(self) -> Portal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SnapshotImage(BlockFile):
    """One volume of a snapshot as a read-only seekable file; chunks fetched on demand."""

    def __init__(self, repo: Repository, v: VolumeSnap, portal: Portal, cache_chunks: int = 8) -> None:
        super().__init__(cache_chunks)
        self.repo, self.v, self.portal = repo, v, portal
        self.size, self.block = v.size, v.chunk_size
        self.ids = v.ids()
        self.fetches = 0

    def fetch(self, i: int) -> bytes:
        n = min(self.block, self.size - i * self.block)
        data = self.portal.call(self.repo.read_chunk(self.ids[i], n))
        self.fetches += self.ids[i] != ZERO_ID
        return data
