"""A persistent map of the regions of a volume that may differ from the replica.

The NBD tracker sees every write, but a crash (kill -9, power cut) takes its
memory with it. This map is what survives: one bit per region (a few MiB of
the volume), set durably *before* the first write to a clean region reaches
the image, and cleared only after the receiver acknowledged an epoch that
holds everything written there. After a restart only the blocks of set
regions are compared with the replica and re-sent, never the whole volume.

The cost on the write path is bounded the way DRBD's activity log bounds
its own: a write into a region that is already dirty costs nothing; the first
write into a clean region costs one small pwrite and one fdatasync of this
file, shared by every writer waiting at that moment (group commit; the NBD
server also offers the writes queued behind a waiting one, see
WriteJournal.before_changes). Clearing is lazy (no
sync): a bit that is set for too long only costs a compare after a crash.

File ``<state_dir>/<volume>/dirty``: a 32-byte header (magic, volume size,
region size) then the bitmap, bit r of byte r // 8 for region r. A missing,
short or mismatched file means "everything may be dirty".
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Iterable
from pathlib import Path

from cdp.durable import make_private_dir

MAGIC = b"CDPDIRT1"
_HEADER = struct.Struct(">8sQQ8x")


class DirtyMap:
    """Region bitmap on disk with an in-memory copy; mark() is durable, clear() lazy."""

    def __init__(self, path: Path, size: int, region: int) -> None:
        if region <= 0:
            raise ValueError("region size must be positive")
        self.path = path
        self.size = size
        self.region = region
        self.regions = max(1, -(-size // region))
        self.bits = bytearray(-(-self.regions // 8))
        self.trusted = False  # False: the file was missing or did not match; assume all dirty
        self._fd = -1
        self._lock = asyncio.Lock()
        self._wanted: set[int] = set()  # regions writers wait for: the next sync writes them
        self.syncs = 0  # fdatasyncs paid on the write path (for status and tests)

    # -- life cycle ------------------------------------------------------------

    def open(self) -> None:
        """Load the map (or start a fresh one) and keep the file open for marking."""
        make_private_dir(self.path.parent)
        header = _HEADER.pack(MAGIC, self.size, self.region)
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read()
            if raw[:_HEADER.size] == header and len(raw) == _HEADER.size + len(self.bits):
                self.bits[:] = raw[_HEADER.size:]
                self.trusted = True
        except FileNotFoundError:
            pass
        if not self.trusted:
            # unknown history: every region may differ; the first resync compares them all
            self.bits[:] = b"\xff" * len(self.bits)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.pwrite(self._fd, header + bytes(self.bits), 0)
        os.ftruncate(self._fd, _HEADER.size + len(self.bits))
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- queries ---------------------------------------------------------------

    def is_set(self, r: int) -> bool:
        return bool(self.bits[r >> 3] & (1 << (r & 7)))

    def dirty_regions(self) -> list[int]:
        return [r for r in range(self.regions) if self.is_set(r)]

    def count(self) -> int:
        return sum(bin(b).count("1") for b in self.bits)

    def regions_of(self, offset: int, length: int) -> range:
        """Regions touched by a byte range (empty for length 0)."""
        if length <= 0:
            return range(0)
        return range(offset // self.region, min(self.regions, (offset + length - 1) // self.region + 1))

    # -- changes ---------------------------------------------------------------

    async def mark(self, regions: Iterable[int]) -> None:
        """Make the regions dirty on disk before the caller writes into them.

        Group commit: a writer that finds a sync running waits for it, and the next sync
        writes the regions of every writer that waited meanwhile: one fdatasync serves
        them all, however many clean regions they touch (16 requests in flight into 16
        clean regions cost 2 syncs, not 16). `bits` only ever holds what is durable: a
        writer never returns on a bit another writer's sync has not made durable yet.
        """
        todo = [r for r in regions if not self.is_set(r)]
        if not todo:
            return
        self._wanted.update(todo)
        async with self._lock:
            todo = [r for r in todo if not self.is_set(r)]  # an earlier batch took them
            if not todo:
                return
            batch = sorted(self._wanted)
            self._wanted.clear()
            lo, hi = batch[0] >> 3, (batch[-1] >> 3) + 1
            if hi - lo > 4096:  # scattered: write the whole map once
                lo, hi = 0, len(self.bits)
            chunk = bytearray(self.bits[lo:hi])  # what is durable, plus this batch
            for r in batch:
                chunk[(r >> 3) - lo] |= 1 << (r & 7)
            await asyncio.to_thread(self._write_sync, bytes(chunk), _HEADER.size + lo)
            for r in batch:  # durable now
                self.bits[r >> 3] |= 1 << (r & 7)
            self.syncs += 1

    def _write_sync(self, chunk: bytes, offset: int) -> None:
        os.pwrite(self._fd, chunk, offset)
        os.fdatasync(self._fd)

    def clear(self, regions: Iterable[int]) -> None:
        """Forget regions the replica now holds; written without a sync (a crash only re-compares)."""
        rs = [r for r in regions if self.is_set(r)]
        if not rs:
            return
        for r in rs:
            self.bits[r >> 3] &= ~(1 << (r & 7)) & 0xFF
        if self._fd >= 0:
            lo, hi = min(rs) >> 3, (max(rs) >> 3) + 1
            os.pwrite(self._fd, bytes(self.bits[lo:hi]), _HEADER.size + lo)

    def set_all(self) -> None:
        """Every region dirty, durably (used when the replica must be compared as a whole)."""
        self.bits[:] = b"\xff" * len(self.bits)
        if self._fd >= 0:
            os.pwrite(self._fd, bytes(self.bits), _HEADER.size)
            os.fdatasync(self._fd)
