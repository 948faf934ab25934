"""How archive jobs read a replica: a point-in-time view, never the live image.

`open_replica` is the one place that names the replica's view
(cdp.replica.pointview.open_view); `FileView` reads a plain image file
through the same shape, for tests and for archiving an image by hand.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from cdp.errors import ArchiveError
from cdp.replica.pointview import open_view


class PointReader(Protocol):
    """The interface of cdp.replica.pointview.PointView that archive jobs use."""

    size: int
    block_size: int
    epoch: int
    time: float

    def read(self, offset: int, length: int) -> bytes: ...
    def close(self) -> None: ...


def open_replica(data_dir: Path, volume: str, point: int | None = None) -> PointReader:
    """The replica of `volume` as of `point` (None: the latest), frozen while it is read."""
    view: PointReader = open_view(data_dir, volume, point)
    return view


class FileView:
    """A raw image file read as a point view (epoch and time given by the caller)."""

    def __init__(self, path: Path, block_size: int = 64 * 1024, epoch: int = 0,
                 time: float = 0.0) -> None:
        try:
            self.fd = os.open(path, os.O_RDONLY)
            self.size = os.fstat(self.fd).st_size
        except OSError as exc:
            raise ArchiveError(f"cannot read image {path}: {exc.strerror}") from None
        self.path, self.block_size, self.epoch, self.time = path, block_size, epoch, time

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise ArchiveError(f"{self.path}: short read at {offset}: the image shrank")
        return data

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> FileView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
