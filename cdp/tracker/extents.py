"""Sorted, disjoint runs of blocks: what a TRIM or WRITE_ZEROES left all zero, kept as extents.

The NBD journal records a trim as one run, not as the content of every block
it covers: `mkfs` or `fstrim` through the export sends ranges of up to 4 GiB,
which as captured blocks would cost gigabytes of memory and seconds of
copying on the event loop. Adding, removing and testing a block cost
O(log runs) plus the runs merged or split; the memory is two ints per run.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator


class BlockRuns:
    """A set of block indices stored as sorted, disjoint, non-adjacent [start, end) runs."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, runs: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in runs:
            self.add(start, end)

    def __len__(self) -> int:
        """The number of runs (not of blocks)."""
        return len(self._starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self._starts, self._ends, strict=True)

    def __contains__(self, block: object) -> bool:
        if not isinstance(block, int):
            return False
        i = bisect_right(self._starts, block) - 1
        return i >= 0 and block < self._ends[i]

    def __repr__(self) -> str:
        return f"BlockRuns({list(self)!r})"

    def blocks(self) -> int:
        """How many blocks the runs cover."""
        return sum(self._ends) - sum(self._starts)

    def add(self, start: int, end: int) -> None:
        """Cover [start, end), merging with every run it overlaps or touches."""
        if start >= end:
            return
        i = bisect_left(self._ends, start)  # first run ending at or after start
        j = bisect_right(self._starts, end)  # runs before j start at or before end
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def remove(self, start: int, end: int) -> None:
        """Uncover [start, end), splitting a run that reaches past either side."""
        if start >= end or not self._starts:
            return
        i = bisect_right(self._ends, start)  # first run ending after start
        j = bisect_left(self._starts, end)  # runs before j start before end
        if i >= j:
            return
        starts: list[int] = []
        ends: list[int] = []
        if self._starts[i] < start:
            starts.append(self._starts[i])
            ends.append(start)
        if self._ends[j - 1] > end:
            starts.append(end)
            ends.append(self._ends[j - 1])
        self._starts[i:j] = starts
        self._ends[i:j] = ends

    def update(self, other: BlockRuns) -> None:
        for start, end in other:
            self.add(start, end)
