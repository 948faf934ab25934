"""What a mount shows, opened so that it cannot change or go away while it is mounted.

A replica point is read through cdp.replica.pointview, which pins the point
(retention keeps its undo files) and holds no writer lock: the receiver goes on
applying epochs and the view goes on showing the same point. If the receiver
applies an epoch without an undo record (journaling switched off), the view
refuses to read instead of returning newer data: reads then fail with EIO.

An archived snapshot is read through cdp.archive.restore.SnapshotImage while
the repository's shared lock is held (and refreshed), so `cdp archive prune`
cannot delete its packs until the mount ends.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cdp.archive.files import FileSystem, open_fs
from cdp.blockfile import BlockFile
from cdp.config import ReceiverConfig, valid_name
from cdp.errors import ArchiveError, UsageError

log = logging.getLogger(__name__)
CACHE_BLOCKS = 64  # blocks of the point kept for the file-system parser (a point never changes)


class Reader(Protocol):
    """Random access to an image: what the mount's VOL.img reads through."""

    size: int

    def read(self, offset: int, length: int) -> bytes: ...


@dataclass
class Opened:
    """An opened point or snapshot: the image, its file system (or why not), and how to let go."""

    volume: str
    image: Reader
    time: float  # when the point was captured (the image's and the root's mtime)
    what: str  # "point 12 of vol1", for logs
    fs: FileSystem | None = None
    partition: int | None = None
    no_fs: str = ""  # why files/ is absent
    epoch: int | None = None  # a replica point's epoch
    snapshot: str | None = None  # an archived snapshot's id
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        while self.closers:
            with contextlib.suppress(Exception):
                self.closers.pop()()


class ReaderFile(BlockFile):
    """A Reader as a seekable read-only file for the file-system parsers, with a small block cache.

    Caching is safe because what a mount shows never changes; it spares the
    point view's per-read journal look for the parsers' many small reads.
    """

    def __init__(self, reader: Reader, block: int = 64 * 1024) -> None:
        super().__init__(CACHE_BLOCKS)
        self.reader, self.block, self.size = reader, block, reader.size

    def fetch(self, i: int) -> bytes:
        return self.reader.read(i * self.block, self.block)


def attach_fs(opened: Opened, fh: io.RawIOBase, partition: int | None) -> None:
    """Open the image's file system for files/; when that fails, say why in `no_fs`."""
    try:
        opened.fs, opened.partition = open_fs(fh, partition)  # type: ignore[arg-type]
    except UsageError:
        raise  # --partition names no partition: the command line is wrong
    except ArchiveError as exc:
        opened.no_fs = str(exc)
    except Exception as exc:  # the parsers on a damaged image: files/ is left out, the image stays
        opened.no_fs = f"the file-system parser failed: {type(exc).__name__}: {exc}"


# -- a replica point ----------------------------------------------------------------------------


def open_point(cfg: ReceiverConfig, volume: str, *, point: str | None = None, at: float | None = None,
               label: str | None = None, partition: int | None = None) -> Opened:
    """The replica of `volume` as of a point: --point (epoch or label), --label, --at, or the latest."""
    from cdp.drills.drill import choose_point
    from cdp.replica.points import resolve_point
    from cdp.replica.pointview import open_view

    if not valid_name(volume):
        raise UsageError(f"{volume!r} is not a volume name")
    vol_dir = cfg.data_dir / volume
    if label is not None and label.isdigit():
        raise UsageError(f"--label {label!r}: labels are never only digits; for an epoch use --point")
    text = label if label is not None else point
    epoch = None if text is None else resolve_point(vol_dir, text)
    chosen = choose_point(vol_dir, epoch, at) if at is not None or epoch is not None else None
    view = open_view(cfg.data_dir, volume, None if chosen is None else chosen.epoch)
    opened = Opened(volume, view, view.time, f"point {view.epoch} of {volume}", epoch=view.epoch,
                    closers=[view.close])
    try:
        attach_fs(opened, ReaderFile(view, view.block_size), partition)
    except BaseException:
        opened.close()
        raise
    return opened


# -- an archived snapshot ------------------------------------------------------------------------


class _Locked:
    """A Reader over a SnapshotImage (a file with a position) safe to call from any thread."""

    def __init__(self, image: Any) -> None:
        self.image, self.size, self.lock = image, int(image.v.size), threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        with self.lock:
            self.image.seek(offset)
            return bytes(self.image.read(length))


def open_snapshot(cfg: ReceiverConfig, archive: str | None, snapshot: str, volume: str, *,
                  partition: int | None = None) -> Opened:
    """`volume` of an archived snapshot; the repository's shared lock is held until close()."""
    import cdp.archive.lock as locks
    from cdp.archive.job import open_repo, pick_archive
    from cdp.archive.restore import Portal, SnapshotImage, volume_of

    a = pick_archive(cfg, archive)
    portal = Portal()
    opened: Opened | None = None
    try:
        repo = portal.call(open_repo(a))
        held = portal.call(locks.lock(repo, exclusive=False))  # before the snapshot: prune may be running
        closers: list[Callable[[], None]] = [portal.close, lambda: portal.call(held.release())]
        try:
            snap = portal.call(repo.find_snapshot(snapshot))
            v = volume_of(snap, volume)
            portal.call(repo.load_index())
        except BaseException:
            for c in reversed(closers):
                with contextlib.suppress(Exception):
                    c()
            raise
        when = v.point_time or snap.time
        opened = Opened(volume, _Locked(SnapshotImage(repo, v, portal)), float(when),
                        f"snapshot {snap.short} of {volume} (archive {a.name})", snapshot=snap.id,
                        closers=closers)
        attach_fs(opened, SnapshotImage(repo, v, portal, cache_chunks=16), partition)
        return opened
    except BaseException:
        if opened is not None:
            opened.close()
        elif portal.thread.is_alive():
            with contextlib.suppress(Exception):
                portal.close()
        raise
