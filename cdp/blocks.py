"""Block geometry, packed index arrays, and the data/hole map of sparse files."""

from __future__ import annotations

import bisect
import errno
import os
import sys
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cdp.errors import RemoteProtocolError

_LITTLE = sys.byteorder == "little"


@dataclass(frozen=True)
class Geometry:
    """A volume's size and block size; the last block may be short."""

    size: int
    block_size: int

    @property
    def blocks(self) -> int:
        return -(-self.size // self.block_size)

    def length(self, index: int) -> int:
        """Bytes in block `index` (all but the last are block_size)."""
        start = index * self.block_size
        return min(self.block_size, self.size - start)

    def offset(self, index: int) -> int:
        return index * self.block_size


def pack_u64(values: Iterable[int]) -> bytes:
    """Little-endian u64 array: compact and fast to decode for index lists on the wire."""
    a = array("Q", values)
    if not _LITTLE:
        a.byteswap()
    return a.tobytes()


def unpack_u64(blob: bytes, what: str = "index list") -> array:
    """Inverse of pack_u64; raises the protocol's error on a bad length."""
    if len(blob) % 8:
        raise RemoteProtocolError(f"{what}: length {len(blob)} is not a multiple of 8")
    a = array("Q")
    a.frombytes(blob)
    if not _LITTLE:
        a.byteswap()
    return a


def runs(indices: Iterable[int]) -> Iterator[tuple[int, int]]:
    """(start, count) runs of consecutive indices, in the given order."""
    start = prev = -2
    for i in indices:
        if i == prev + 1:
            prev = i
            continue
        if start >= 0:
            yield start, prev - start + 1
        start = prev = i
    if start >= 0:
        yield start, prev - start + 1


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the parts of a file that may hold data; holes are skipped.

    Uses SEEK_DATA/SEEK_HOLE; where the file system or device does not support
    them, the whole range is returned (every block is read).
    """
    extents: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            extents.append((start, end - start))
            pos = end
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTTY):
            return [(0, size)]
        raise
    return extents


def block_spans(extents: list[tuple[int, int]], geo: Geometry) -> list[tuple[int, int]]:
    """Block ranges (first, count) touching the data extents, merged and in order."""
    spans: list[tuple[int, int]] = []
    bs = geo.block_size
    for off, length in extents:
        first = off // bs
        last = min((off + length - 1) // bs, geo.blocks - 1)
        if spans and first <= spans[-1][0] + spans[-1][1]:
            s, c = spans[-1]
            spans[-1] = (s, max(c, last - s + 1))
        else:
            spans.append((first, last - first + 1))
    return spans


def merge_runs(pairs: Iterable[int]) -> list[tuple[int, int]]:
    """(start, count) pairs, flat, as sorted disjoint runs: overlapping and adjacent runs merge.

    Zero runs come from a peer: however they repeat or overlap, what follows is O(runs)."""
    it = iter(pairs)
    spans = sorted(zip(it, it, strict=True))
    out: list[tuple[int, int]] = []
    for start, count in spans:
        if out and start <= out[-1][0] + out[-1][1]:
            s0, c0 = out[-1]
            out[-1] = (s0, max(c0, start + count - s0))
        elif count:
            out.append((start, count))
    return out


def keys_in_runs(keys: list[int], merged: list[tuple[int, int]]) -> Iterator[int]:
    """Of sorted `keys`, those inside sorted disjoint `merged` runs: one sweep, O(keys + runs)."""
    k = 0
    for start, count in merged:
        end = start + count
        k = bisect.bisect_left(keys, start, k)
        while k < len(keys) and keys[k] < end:
            yield keys[k]
            k += 1
