"""The scan tracker: re-hash a volume and report blocks whose hash changed.

Sparse-aware: holes (SEEK_HOLE) are known to be zero without reading them,
and a run of holes whose blocks were already zero is skipped in one compare.
Pure and synchronous; the source runs it in a worker thread.

Data is hashed in place through a read-only shared mapping of the file (one
window of `chunk` bytes at a time), not copied out of the page cache first:
the copy was most of a hot-cache scan's cost (a 1 GiB scan ran in about 170 ms
with preadv into a buffer, 65-70 ms mapped). Because a shared mapping shows
writes made while it is read, a block found changed is copied out and hashed
again: the hash reported is always the hash of the content reported. Files that
cannot be mapped fall back to preadv. A regular file is checked for shrinking
before each window; one truncated while its window is being read can still end
the process with SIGBUS (as with any mmap reader): a volume must not be resized
while it is replicated.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

from cdp.blocks import Geometry, block_spans, data_extents
from cdp.codec import HASH_LEN, block_hash, zero_hash
from cdp.errors import TrackerError
from cdp.tracker.hashworker import HashHelper, map_window

CHUNK = 16 << 20  # bytes mapped (or read) at a time; the source makes it smaller under read_limit

Change = tuple[int, bytes, memoryview | None]  # (block, new hash, content or None if all zero)


def volume_size(path: Path) -> int:
    """Size of a regular file or block device; TrackerError if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise TrackerError(f"cannot open volume {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return st.st_size
        if stat.S_ISBLK(st.st_mode):
            return os.lseek(fd, 0, os.SEEK_END)
        raise TrackerError(f"{path} is neither a regular file nor a block device")
    finally:
        os.close(fd)


def zero_map(geo: Geometry) -> bytearray:
    """A hash map in which every block is zero: the state of a brand-new replica."""
    full = zero_hash(geo.block_size)
    m = bytearray(full) * geo.blocks  # no intermediate bytes: 16 B per block, once
    last = geo.blocks - 1
    if geo.length(last) != geo.block_size:
        m[last * HASH_LEN:] = zero_hash(geo.length(last))
    return m


def scan(fd: int, geo: Geometry, smap: bytearray, *, progress: Callable[[int], None] | None = None,
         cancelled: Callable[[], bool] | None = None, chunk: int = CHUNK,
         throttle: Callable[[int], None] | None = None,
         holes: Callable[[int], None] | None = None, helper: HashHelper | None = None) -> Iterator[Change]:
    """Yield (block, hash, content) for every block whose hash differs from smap.

    `content` is a view into a reused buffer, valid until the next yield; the
    caller copies what it keeps. smap is read, never written. progress(n) is
    called with bytes read, holes(n) with bytes of holes covered without reading
    (progress(n) when holes is None); cancelled() is checked between chunks. A helper
    (hashworker) hashes every other chunk in a second process.
    """
    size = os.fstat(fd).st_size if stat.S_ISREG(os.fstat(fd).st_mode) else geo.size
    if size != geo.size:
        raise TrackerError(
            f"volume size changed from {geo.size} to {size} bytes; restart the source after "
            "resizing the replica too (a resized volume is a new volume)")
    bs = geo.block_size
    chunk = max(bs, chunk - chunk % bs)
    view = memoryview(bytearray(chunk))
    zfull = zero_hash(bs)
    smv = memoryview(smap)
    if helper is not None:
        helper.attach(fd)
    pos = 0  # next block not yet covered
    for first, count in [*block_spans(data_extents(fd, geo.size), geo), (geo.blocks, 0)]:
        if first > pos:  # a hole: zero blocks, known without reading
            yield from _holes(geo, smv, pos, first, zfull)
            if holes or progress:
                (holes or progress)(min(geo.size, first * bs) - pos * bs)  # type: ignore[misc]
        if not (yield from _read_span(fd, geo, smv, view, first, first + count, progress=progress,
                                      cancelled=cancelled, throttle=throttle, helper=helper)):
            return
        pos = first + count


def scan_spans(fd: int, geo: Geometry, smap: bytearray, spans: list[tuple[int, int]], *,
               progress: Callable[[int], None] | None = None,
               cancelled: Callable[[], bool] | None = None, chunk: int = CHUNK,
               throttle: Callable[[int], None] | None = None) -> Iterator[Change]:
    """Like scan(), over the given (first block, count) runs only: every block is read.

    The NBD tracker uses it to compare the dirty regions of a volume with the
    replica, where holes are rare and the runs small.
    """
    bs = geo.block_size
    chunk = max(bs, chunk - chunk % bs)
    view = memoryview(bytearray(chunk))
    smv = memoryview(smap)
    for first, count in spans:
        if not (yield from _read_span(fd, geo, smv, view, first, min(geo.blocks, first + count),
                                      progress=progress, cancelled=cancelled, throttle=throttle)):
            return


def _read_span(fd: int, geo: Geometry, smv: memoryview, view: memoryview, b: int, end: int, *,
               progress: Callable[[int], None] | None, cancelled: Callable[[], bool] | None,
               throttle: Callable[[int], None] | None,
               helper: HashHelper | None = None) -> Generator[Change, None, bool]:
    """Hash blocks [b, end) in windows of len(view); yield those whose hash differs from smv.

    With a helper, windows go in pairs: the helper hashes the second while this thread
    hashes the first (see hashworker). Returns False if cancelled (the caller stops),
    True when the span is done.
    """
    bs = geo.block_size
    per_chunk = len(view) // bs
    regular = stat.S_ISREG(os.fstat(fd).st_mode)
    mapped = [True]  # False once the file turned out not to be mappable
    while b < end:
        if cancelled and cancelled():
            return False
        first = _window(geo, b, min(end - b, per_chunk))
        b += first[1]
        second = _window(geo, b, min(end - b, per_chunk)) if helper is not None and b < end else None
        if second is not None:
            b += second[1]
        if throttle:
            throttle(first[2] + (second[2] if second else 0))
        sent = (second is not None and mapped[0] and helper is not None
                and helper.submit(second[0] * bs, second[2], bs))
        yield from _window_changes(fd, geo, smv, view, first, None, regular, mapped)
        if progress:
            progress(first[2])
        if second is not None:
            hashes = helper.result() if sent and helper is not None else None
            if hashes is not None and len(hashes) != second[1] * HASH_LEN:
                hashes = None  # the file shrank under the helper: look again here
            yield from _window_changes(fd, geo, smv, view, second, hashes, regular, mapped)
            if progress:
                progress(second[2])
    return True


def _window(geo: Geometry, b: int, nblocks: int) -> tuple[int, int, int]:
    """(first block, blocks, bytes) of the window of nblocks blocks at block b."""
    off = b * geo.block_size
    return b, nblocks, min(geo.size, (b + nblocks) * geo.block_size) - off


def _window_changes(fd: int, geo: Geometry, smv: memoryview, view: memoryview,
                    window: tuple[int, int, int], hashes: bytes | None, regular: bool,
                    mapped: list[bool]) -> Iterator[Change]:
    """The changed blocks of one window. `hashes`: its block hashes if already known (from
    the helper); then the data is only looked at if some differ from smv."""
    b, nblocks, want = window
    bs = geo.block_size
    hinted = hashes is not None  # hashed elsewhere: a changed block is hashed again here
    olds = smv[b * HASH_LEN:(b + nblocks) * HASH_LEN]
    if hashes is not None and hashes == olds:
        return  # an unchanged window, hashed by the helper: nothing to read here
    off = b * bs
    win: memoryview | None = None
    if mapped[0]:
        have = min(want, max(0, os.fstat(fd).st_size - off)) if regular else want
        try:
            win = _map(fd, off, have) if have else None
        except (OSError, ValueError):  # not mappable (a pipe, some devices): read instead
            mapped[0] = False
        if mapped[0] and have < want:  # the file shrank under us: the rest reads as zero
            view[:want] = bytes(want)
            if win is not None:
                view[:have] = win
            win = None
    if win is None and not mapped[0]:
        got = os.preadv(fd, [view[:want]], off)
        if got < want:  # the file shrank under us: the rest reads as zero
            view[got:want] = bytes(want - got)
    src = view if win is None else win
    try:
        if hashes is None:  # all of the window's hashes at once: an unchanged window is one compare
            hashes = b"".join([block_hash(src[q:q + bs]) for q in range(0, want, bs)])
            if hashes == olds:
                return
        zfull = zero_hash(bs)
        p = 0
        for i in range(b, b + nblocks):
            k = (i - b) * HASH_LEN
            h = hashes[k:k + HASH_LEN]
            old = olds[k:k + HASH_LEN]
            n = bs if i < geo.blocks - 1 else geo.length(i)
            if old != h:
                blk = src[p:p + n]
                if win is not None:  # the mapping can change under us: report a private copy
                    blk = view[:n]
                    blk[:] = win[p:p + n]
                    h = block_hash(blk)
                elif hinted:
                    h = block_hash(blk)
                if old != h:
                    yield i, h, (None if h == (zfull if n == bs else zero_hash(n)) else blk)
            p += n
    finally:
        if win is not None:
            win.release()


def _map(fd: int, off: int, length: int) -> memoryview:
    """A read-only view of [off, off+length) of fd, mapped shared and populated at once.

    The mmap object is not closed here: the view keeps it alive, and it is unmapped
    when the view (and any slice of it the caller still holds) is gone.
    """
    return memoryview(map_window(fd, off, length))


def buffer_changes(geo: Geometry, smap: bytearray, first: int, data: bytearray) -> Iterator[Change]:
    """Like scan(), over blocks read elsewhere (a qemu volume reads them over NBD): `data` holds
    whole blocks from block `first` on (the volume's last one may be short)."""
    bs = geo.block_size
    smv, view = memoryview(smap), memoryview(data)
    zfull = zero_hash(bs)
    for p in range(0, len(data), bs):
        i = first + p // bs
        blk = view[p:p + bs]
        h = block_hash(blk)
        if h != smv[i * HASH_LEN:(i + 1) * HASH_LEN]:
            yield i, h, (None if h == (zfull if len(blk) == bs else zero_hash(len(blk))) else blk)


def zero_changes(geo: Geometry, smap: bytearray, start: int, end: int) -> Iterator[Change]:
    """Blocks [start, end) known to be zero without reading them, where smap says otherwise."""
    yield from _holes(geo, memoryview(smap), start, end, zero_hash(geo.block_size))


def _holes(geo: Geometry, smv: memoryview, start: int, end: int, zfull: bytes) -> Iterator[Change]:
    # fast path: stretches of the hole that were already zero in smap, 64Ki blocks at a time
    full_end = min(end, geo.blocks - 1) if geo.length(geo.blocks - 1) != geo.block_size else end
    step = 65536
    pattern = zfull * min(step, max(full_end - start, 0))
    while start < full_end:
        n = min(step, full_end - start)
        if smv[start * HASH_LEN:(start + n) * HASH_LEN] != pattern[:n * HASH_LEN]:
            break
        start += n
    for i in range(start, end):
        z = zfull if geo.length(i) == geo.block_size else zero_hash(geo.length(i))
        if smv[i * HASH_LEN:(i + 1) * HASH_LEN] != z:
            yield i, z, None


def hash_volume(path: Path, geo: Geometry) -> bytearray:
    """The hash of every block of a volume (holes hash as zero without being read)."""
    smap = bytearray(geo.blocks * HASH_LEN)  # all-zero entries never equal a real hash
    fd = os.open(path, os.O_RDONLY)
    try:
        for i, h, _ in scan(fd, geo, smap):
            smap[i * HASH_LEN:(i + 1) * HASH_LEN] = h
    finally:
        os.close(fd)
    return smap
