"""A read-only, seekable file over fixed-size blocks fetched on demand, with a small LRU cache.

The file-system parsers (archive file restore, `cdp mount`) read images through many
small reads; what they read never changes while open, so caching the last few blocks
spares a fetch (an archive chunk download, a point view's journal look) per read.
Subclasses say how big the image is and how to fetch block i.
"""

from __future__ import annotations

import collections
import io
from typing import Any


class BlockFile(io.RawIOBase):
    """Subclasses set `size` and `block` and implement `fetch(i)` (the bytes of block i; the
    last may be short)."""

    size: int
    block: int

    def __init__(self, cache_blocks: int) -> None:
        super().__init__()
        self.pos = 0
        self.cache: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self.cache_blocks = cache_blocks

    def fetch(self, i: int) -> bytes:
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError("seek before the start of the image")
        self.pos = base + offset
        return self.pos

    def _cached(self, i: int) -> bytes:
        data = self.cache.get(i)
        if data is not None:
            self.cache.move_to_end(i)
            return data
        data = self.fetch(i)
        self.cache[i] = data
        if len(self.cache) > self.cache_blocks:
            self.cache.popitem(last=False)
        return data

    def readinto(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        want = min(len(mv), max(0, self.size - self.pos))
        got = 0
        while got < want:
            i, within = divmod(self.pos, self.block)
            data = self._cached(i)
            n = min(want - got, len(data) - within)
            if n <= 0:
                break  # a short block inside the image: the fetch found less than it should
            mv[got:got + n] = data[within:within + n]
            got += n
            self.pos += n
        return got
