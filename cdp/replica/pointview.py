"""A read-only view of a replica as of a recovery point, stable while the receiver applies.

    with open_view(data_dir, "vm1-disk0", point=1234) as v:
        data = v.read(0, v.size)

The content of point P is the current image overlaid, block by block, with
the oldest undo record of an epoch > P (journal.py). The receiver applies
newer epochs in another process meanwhile; this stays correct without
blocking it because of one ordering the receiver keeps: the undo file of
epoch E is in place before the first byte of E reaches the image. So every
read() reads the image first, then looks for undo files that appeared since
(epoch numbers are consecutive: one stat), then overlays. A block the
receiver changed during the read is covered by an undo file found by that
look, whose saved content is the block as of P (or older epochs' saved
content, which is what P holds). If an epoch was applied without an undo
file (journaling switched off), the view cannot be right any more and says
so instead of returning wrong data.

A view pins its point (points.py: pins/), so retention never drops the
undo files it reads; the pin goes with close() or with the process.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import os
import uuid
from pathlib import Path
from types import TracebackType

from cdp.blocks import Geometry
from cdp.codec import HASH_LEN, zero_hash
from cdp.durable import make_private_dir, read_json
from cdp.errors import PointError, ReplicaError
from cdp.replica.points import list_points, pins_locked
from cdp.replica.undo import NO_HASH, JournalCorrupt, UndoFile, undo_name

PROMOTED = "promoted.json"
OPEN_FILES = 256  # undo files kept open; the others are opened for each read


class PointView:
    """The replica of one volume as of one epoch; see open_view()."""

    def __init__(self, vol_dir: Path, volume: str, point: int | None) -> None:
        self.volume = volume
        self._dir = vol_dir
        self._files: list[UndoFile] = []
        self._overlay: dict[int, int] = {}  # block -> index in _files (oldest epoch > P wins)
        self._keys: list[int] | None = []
        self._pin_fd = -1
        self._image_fd = self._hash_fd = -1
        if (vol_dir / PROMOTED).exists():
            raise ReplicaError(f"volume {volume!r} was promoted ({vol_dir / PROMOTED}); its image "
                               "is a live disk now, not a replica with recovery points")
        try:
            with pins_locked(vol_dir):
                st = self._state()
                latest = int(st["epoch"])
                p = latest if point is None else point
                if p > latest or p < 0:
                    raise PointError(f"{volume}: there is no point {p} (the latest is {latest}; "
                                     f"`cdp points` lists them)")
                missing = next((e for e in range(latest, p, -1)
                                if not (vol_dir / "journal" / undo_name(e)).exists()), None)
                if missing is not None:
                    oldest = missing
                    raise PointError(f"{volume}: point {p} is not kept (the oldest kept is "
                                     f"{oldest}; `cdp points` lists them)")
                self._pin(p)
            self.epoch = p
            self.size = int(st["size"])
            self.block_size = int(st["block_size"])
            self.geometry = Geometry(self.size, self.block_size)
            self.time = float(st.get("epoch_time", 0.0))
            self._image_fd = os.open(vol_dir / "image", os.O_RDONLY)
            self._hash_fd = os.open(vol_dir / "hashes", os.O_RDONLY)
            self._next = p + 1
            self._refresh()
            if p < latest:
                self.time = float(self._files[0].meta.get("base_time", 0.0))
        except OSError as exc:
            self.close()
            raise ReplicaError(f"cannot open a view of {vol_dir}: {exc}") from None
        except BaseException:
            self.close()
            raise

    def _state(self) -> dict:
        try:
            return read_json(self._dir / "state.json")
        except (OSError, ValueError) as exc:
            raise ReplicaError(f"{self._dir}: no readable replica state ({exc}); is it a "
                               "replica folder?") from None

    def _pin(self, point: int) -> None:
        pins = self._dir / "pins"
        make_private_dir(pins)
        path = pins / f"{point}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._pin_fd, self._pin_path = fd, path

    def _refresh(self) -> None:
        """Load undo files that appeared since the last look (consecutive epochs)."""
        while True:
            path = self._dir / "journal" / undo_name(self._next)
            try:
                u = UndoFile(path)
            except FileNotFoundError:
                applied = int(self._state()["epoch"])
                if applied >= self._next:
                    raise ReplicaError(
                        f"{self.volume}: epoch {self._next} was applied without a journal record "
                        f"(journaling off?); point {self.epoch} can no longer be read") from None
                return
            except JournalCorrupt as exc:
                raise ReplicaError(f"{self.volume}: {exc}") from None
            k = len(self._files)
            self._files.append(u)
            won = False
            for block in u.entries:
                if block not in self._overlay:
                    self._overlay[block] = k
                    won = True
                    self._keys = None
            if not won or k >= OPEN_FILES:
                u.close()  # pinned, so it stays on disk: reopened per read if needed
            self._next += 1

    def _blocks_in(self, first: int, last: int) -> list[int]:
        if self._keys is None:
            self._keys = sorted(self._overlay)
        lo = bisect.bisect_left(self._keys, first)
        hi = bisect.bisect_right(self._keys, last)
        return self._keys[lo:hi]

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the point (short at the end of the volume)."""
        if offset < 0 or length < 0:
            raise ValueError("offset and length must not be negative")
        end = min(self.size, offset + length)
        if offset >= end:
            return b""
        geo = self.geometry
        first, last = offset // self.block_size, (end - 1) // self.block_size
        base = geo.offset(first)
        top = geo.offset(last) + geo.length(last)
        buf = bytearray(os.pread(self._image_fd, top - base, base))
        buf += bytes(top - base - len(buf))
        self._refresh()  # after the image read: see journal ordering above
        for b in self._blocks_in(first, last):
            u = self._files[self._overlay[b]]
            n = geo.length(b)
            a = geo.offset(b) - base
            buf[a:a + n] = u.read(u.entries[b], n)
        return bytes(buf[offset - base:end - base])

    def block_hashes(self) -> bytes:
        """xxh3-128 of every block of the point, 16 bytes each (an all-zero block hashes as one)."""
        geo = self.geometry
        n = geo.blocks
        raw = bytearray(os.pread(self._hash_fd, n * HASH_LEN, 0))
        raw += bytes(n * HASH_LEN - len(raw))
        self._refresh()
        for b in self._blocks_in(0, n - 1):
            u = self._files[self._overlay[b]]
            raw[b * HASH_LEN:(b + 1) * HASH_LEN] = u.entries[b][2]
        pos = raw.find(NO_HASH)
        while pos >= 0:
            if pos % HASH_LEN:  # a run of zero bytes across two hashes: look on from the next
                pos = raw.find(NO_HASH, pos + HASH_LEN - pos % HASH_LEN)
                continue
            raw[pos:pos + HASH_LEN] = zero_hash(geo.length(pos // HASH_LEN))
            pos = raw.find(NO_HASH, pos + HASH_LEN)
        return bytes(raw)

    def close(self) -> None:
        for u in self._files:
            u.close()
        self._files = []
        for fd in (self._image_fd, self._hash_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._image_fd = self._hash_fd = -1
        if self._pin_fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self._pin_path)
            os.close(self._pin_fd)
            self._pin_fd = -1

    def __enter__(self) -> PointView:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def open_view(data_dir: Path, volume: str, point: int | None = None) -> PointView:
    """A view of `volume`'s replica in `data_dir` as of epoch `point` (None: the latest applied).

    PointError if that point is not kept; ReplicaError if there is no replica.
    """
    if not volume or "/" in volume or volume in (".", "..") or volume.startswith("."):
        raise PointError(f"{volume!r} is not a volume name")
    vol_dir = Path(data_dir) / volume
    if not (vol_dir / "state.json").exists():
        raise ReplicaError(f"no replica of volume {volume!r} in {data_dir}")
    return PointView(vol_dir, volume, point)


__all__ = ["PointView", "list_points", "open_view"]
