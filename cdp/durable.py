"""Durability helpers: fsync'd files, atomic replace, directory fsync, hole punching."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import threading
from pathlib import Path
from typing import Any

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    _fallocate.restype = ctypes.c_int


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | memoryview, *, sync: bool = True) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new file, never a mix.

    The temporary name is unique per process and thread, so concurrent writers of one
    path never write into each other's temporary file (the last rename wins).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, *, sync: bool = True) -> None:
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), sync=sync)


def read_json(path: Path) -> Any:
    with open(path, "rb") as fh:
        return json.load(fh)


_punch_supported = True


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a byte range (reads return zeros). False if the file system cannot."""
    global _punch_supported
    if not _punch_supported or _fallocate is None:
        return False
    rc = _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        _punch_supported = False
        return False
    raise OSError(err, os.strerror(err))


def write_zeros(fd: int, offset: int, length: int, punch: bool = True) -> None:
    """Zero a range: punch a hole where possible (keeps replicas sparse), else write zeros
    (always, with punch=False: space reserved ahead must stay allocated), in bounded chunks."""
    if punch and punch_hole(fd, offset, length):
        return
    chunk = bytes(min(length, 1 << 20))
    while length > 0:
        n = min(length, len(chunk))
        os.pwrite(fd, chunk[:n], offset)
        offset += n
        length -= n
