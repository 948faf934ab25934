"""The NBD server's file I/O on its image: whole preads and pwrites, zeroing, and holes.

Plain functions on a file descriptor, run on the event loop thread or a worker
thread as the server decides. BLOCK_STATUS (`base:allocation`) and all-zero
READs are answered from the image's holes, found with lseek(SEEK_DATA/SEEK_HOLE).
"""

from __future__ import annotations

import errno
import os

from cdp.durable import write_zeros
from cdp.nbd.spec import MAX_EXTENTS, STATE_HOLE, STATE_ZERO

_ZERO_CHUNK = bytes(1 << 20)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    n = os.pwrite(fd, data, offset)
    if n == len(data):
        return
    view = memoryview(data)[n:]
    offset += n
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    first = os.pread(fd, length, offset)
    if len(first) == length:
        return first
    parts = [first]
    offset += len(first)
    length -= len(first)
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:  # the file shrank under us: what lies past its end reads as zeros
            parts.append(bytes(length))
            break
        parts.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(parts)


def write_zero_bytes(fd: int, offset: int, length: int) -> None:
    """Zeros written as data: for WRITE_ZEROES with NO_HOLE, where deallocating is forbidden."""
    while length > 0:
        n = min(length, len(_ZERO_CHUNK))
        pwrite_all(fd, memoryview(_ZERO_CHUNK)[:n], offset)
        offset += n
        length -= n


def _next_data(fd: int, pos: int) -> int | None:
    """Where data starts at or after pos; None past the last data; pos itself if lseek cannot tell."""
    try:
        return os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # nothing but hole from pos to the end of the file
            return None
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no SEEK_DATA here: all data
            return pos
        raise


def is_hole(fd: int, offset: int, length: int) -> bool:
    """The range holds no data at all (reads as zeros without reading)."""
    start = _next_data(fd, offset)
    return start is None or start >= offset + length


def allocation_extents(fd: int, offset: int, length: int) -> list[tuple[int, int]]:
    """base:allocation extents (length, flags) covering [offset, offset+length): holes read as zero.

    At most MAX_EXTENTS; the client asks again for the rest.
    """
    end = offset + length
    pos = offset
    out: list[tuple[int, int]] = []
    while pos < end and len(out) < MAX_EXTENTS:
        data = _next_data(fd, pos)
        data = end if data is None else min(data, end)
        if data > pos:
            out.append((data - pos, STATE_HOLE | STATE_ZERO))
            pos = data
            continue
        try:
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENXIO):
                raise
            hole = end
        hole = max(hole, pos + 1)  # pos holds data, so the next hole lies beyond it
        out.append((hole - pos, 0))
        pos = hole
    return out


def write_at(fd: int, data: bytes, offset: int, fua: bool) -> None:
    """A WRITE: all of data at offset; fua: durable before returning."""
    pwrite_all(fd, data, offset)
    if fua:
        os.fdatasync(fd)


def zero_range(fd: int, offset: int, length: int, no_hole: bool, fua: bool) -> None:
    """A TRIM or WRITE_ZEROES: the range reads as zeros (written as data with no_hole)."""
    if no_hole:
        write_zero_bytes(fd, offset, length)
    else:
        write_zeros(fd, offset, length)
    if fua:
        os.fdatasync(fd)
