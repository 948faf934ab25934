"""What the NBD tracker's write journal captures: units of blocks as they were at a cut.

A `Captured` unit holds the content of the blocks written in one epoch (or in
several consecutive ones, merged) and the runs of blocks that were zeroed; a
`Resync` unit names regions to read live instead. Here too is how their
content is made: blocks read back from the image or taken from a WRITE's
payload, epochs merged (each block's latest change wins) and a unit spilled to
a file. A spill file holds the unit's block contents back to back in block
order, nothing else; the unit keeps the (block, length) list to read it
(`Captured.order`) and its zero runs in memory. The journal
(cdp.tracker.journal) decides when to cut, merge, spill and hand units out.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cdp.blocks import Geometry, runs
from cdp.durable import create_private
from cdp.tracker.extents import BlockRuns

RUN_COST = 64  # bytes of memory a zero run is charged against capture_memory


@dataclass
class Captured:
    """Blocks as they were at one cut (several consecutive cuts, once merged).

    `blocks` holds content, `zeros` the runs of blocks that were all zero at
    the cut (trims, write-zeroes); the two never overlap. `nbytes` counts the
    content only. A spilled unit keeps its blocks in a file instead (`spill`,
    with `order` listing (block, length) in file order; its zero runs stay in
    memory); read it with items(). `since`: the cut before the unit's first write
    (the previous unit's state held through it); `mark`: sealed at a marked cut.
    """

    seq: int
    time: float
    blocks: dict[int, bytes]
    nbytes: int
    spill: Path | None = None
    order: list[tuple[int, int]] = field(default_factory=list)
    zeros: BlockRuns = field(default_factory=BlockRuns)
    since: float = 0.0
    mark: bool = False

    def memory(self) -> int:
        """What the unit holds in memory, as charged against capture_memory."""
        return (0 if self.spill is not None else self.nbytes) + RUN_COST * len(self.zeros)

    def items(self) -> Iterator[tuple[int, bytes]]:
        """(block, content) in block order; reads a spilled unit from its file (worker thread)."""
        if self.spill is None:
            for b in sorted(self.blocks):
                yield b, self.blocks[b]
            return
        with open(self.spill, "rb") as fh:
            for b, length in self.order:
                yield b, fh.read(length)


@dataclass
class Resync:
    """Regions to read live and compare with the replica; closed at a later cut.

    `spans` are (first block, count) runs covering the dirty regions, or None
    when every region is dirty (read the whole volume, skipping holes).
    """

    seq: int
    time: float
    spans: list[tuple[int, int]] | None


def merge_units(units: list[Captured]) -> Captured:
    """Consecutive in-memory units as one: the state at the last one's cut.

    Merged in order, each block's latest change wins: a later zero run drops
    earlier content, later content leaves the zero runs.
    """
    merged: dict[int, bytes] = {}
    zeros = BlockRuns()
    for u in units:
        for start, end in u.zeros:
            drop_range(merged, start, end)
            zeros.add(start, end)
        if zeros:
            for first, count in runs(sorted(u.blocks)):
                zeros.remove(first, first + count)
        merged.update(u.blocks)
    return Captured(units[-1].seq, units[-1].time, merged,
                    sum(len(v) for v in merged.values()), zeros=zeros, since=units[0].since,
                    mark=units[-1].mark)


def write_spill(path: Path, unit: Captured) -> list[tuple[int, int]]:
    """Write the unit's blocks to a new private file at path; their (block, length) in file order."""
    with create_private(path) as fh:
        order = []
        for b in sorted(unit.blocks):
            fh.write(unit.blocks[b])
            order.append((b, len(unit.blocks[b])))
    return order


def read_blocks(fd: int, geo: Geometry, blocks: list[int]) -> dict[int, bytes]:
    """The content of blocks (sorted), read from the image in runs of up to 64."""
    out: dict[int, bytes] = {}
    bs = geo.block_size
    i = 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1 and j - i < 63:
            j += 1
        start = blocks[i] * bs
        end = min(geo.size, (blocks[j] + 1) * bs)
        data = pread_padded(fd, end - start, start)
        for b in blocks[i:j + 1]:
            lo = b * bs - start
            out[b] = data[lo:lo + geo.length(b)]
        i = j + 1
    return out


def blocks_from_payload(fd: int, geo: Geometry, first: int, last: int, offset: int,
                        data: bytes) -> list[bytes]:
    """The content of blocks first..last after `data` was written at `offset` over them."""
    bs = geo.block_size
    if offset == first * bs and len(data) == geo.length(first) and first == last:
        return [data]  # the common case: one whole block, no copy at all
    out: list[bytes] = []
    view = memoryview(data)
    end = offset + len(data)
    b = first
    while b <= last:
        lo = b * bs
        hi = lo + geo.length(b)
        if offset <= lo and hi <= end:
            out.append(bytes(view[lo - offset:hi - offset]))
            b += 1
            continue
        # a block the write covers in part: read it (and any such neighbours) back
        k = b
        while k + 1 <= last and not (offset <= (k + 1) * bs
                                     and (k + 1) * bs + geo.length(k + 1) <= end):
            k += 1
        start = lo
        stop = k * bs + geo.length(k)
        out += split_blocks(pread_padded(fd, stop - start, start), start, b, k, geo)
        b = k + 1
    return out


def in_range(blocks: dict[int, bytes] | set[int], start: int, end: int) -> list[int]:
    """The blocks in [start, end), visiting the smaller of the range and the collection: a 4 GiB
    trim over a few captured blocks, or a few trimmed blocks over a large capture, stays cheap."""
    if end - start <= len(blocks):
        return [b for b in range(start, end) if b in blocks]
    return [b for b in blocks if start <= b < end]


def drop_range(blocks: dict[int, bytes], start: int, end: int) -> int:
    """Remove the blocks in [start, end) from a capture; returns the bytes dropped."""
    return sum(len(blocks.pop(b)) for b in in_range(blocks, start, end))


def split_blocks(data: bytes, start: int, first: int, last: int, geo: Geometry) -> list[bytes]:
    """Blocks first..last out of `data`, read from byte `start` (the offset of `first`)."""
    bs = geo.block_size
    return [data[b * bs - start:b * bs - start + geo.length(b)] for b in range(first, last + 1)]


def pread_padded(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) < length:  # past the end of a shrunk file: zeros, as the server reads it
        data += bytes(length - len(data))
    return data
