"""Durability helpers: fsync'd files, atomic replace, directory fsync, hole punching; private
folders and files (owner only, whatever the umask) and the lock a daemon holds on its folder."""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import threading
from pathlib import Path
from typing import Any, BinaryIO

from cdp.errors import ConfigError, InUseError

# What cdp creates for replicas, WALs, journals, state and caches: readable by its own user only,
# whatever the umask (a replica is a copy of a whole disk). Existing modes are left alone.
DIR_MODE = 0o700
FILE_MODE = 0o600

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


def atomic_write(path: Path, data: bytes | memoryview, *, sync: bool = True,
                 sync_dir: bool = True) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new file, never a mix.

    The temporary name is unique per process and thread, so concurrent writers of one
    path never write into each other's temporary file (the last rename wins).
    sync_dir=False: the content is durable before the rename but the rename itself is not
    yet; the caller fsyncs the folder later (before it relies on the new file surviving).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with create_private(tmp) as fh:
            fh.write(data)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync and sync_dir:
        fsync_dir(path.parent)


def fdatasync_all(fds: list[int]) -> None:
    """fdatasync several files at once: the device sees one burst of writes and flushes
    that it can merge, instead of one flush after another."""
    if len(fds) <= 1:
        for fd in fds:
            os.fdatasync(fd)
        return
    futs = [_sync_pool().submit(os.fdatasync, fd) for fd in fds[1:]]
    err: BaseException | None = None
    try:
        os.fdatasync(fds[0])
    except OSError as exc:
        err = exc
    for f in futs:
        try:
            f.result()
        except OSError as exc:
            err = err or exc
    if err is not None:
        raise err


_sync_executor: concurrent.futures.ThreadPoolExecutor | None = None
_sync_lock = threading.Lock()


def _sync_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _sync_executor
    with _sync_lock:
        if _sync_executor is None:
            _sync_executor = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="cdp-sync")
        return _sync_executor


def make_private_dir(path: Path) -> Path:
    """Create `path` and its missing parents, each mode 0700; folders that exist stay as they are."""
    missing: list[Path] = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue
        os.chmod(d, DIR_MODE)  # exactly 0700, even under a umask that takes owner bits
    if not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(path))
    return path


def open_private(path: Path | str, flags: int) -> int:
    """os.open that creates a missing file mode 0600 (whatever the umask)."""
    return os.open(path, flags, FILE_MODE)


def create_private(path: Path | str, buffering: int = -1) -> BinaryIO:
    """A new (or truncated) file opened "wb", mode 0600 when created."""
    fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    return os.fdopen(fd, "wb", buffering=buffering)


class DirLock:
    """An exclusive flock on a file in a daemon's folder, held while it runs; the file holds its pid.

    The folder is created (0700) if missing. A second receiver on one data_dir (or source
    on one state_dir) is refused at start instead of failing volume by volume later. The
    lock goes with the process (close() or exit, even kill -9); the file stays, so there is
    no race on removing it. ConfigError if the folder cannot be made or the file opened.
    """

    def __init__(self, folder: Path, name: str, who: str, key: str) -> None:
        self.path = folder / name
        try:
            make_private_dir(folder)
            fd = open_private(self.path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise ConfigError(f"{key} {folder}: cannot create it or its lock file {name}: "
                              f"{exc.strerror or exc}; check the path and who owns it") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").split()
            finally:
                os.close(fd)
            pid = f"pid {holder[0]}" if holder and holder[0].isdigit() else "pid unknown"
            raise InUseError(
                f"{key} {folder} is in use by another {who} ({pid}, per {self.path}): stop that "
                f"one first, or give this one another {key}") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = -1


def atomic_write_json(path: Path, obj: Any, *, sync: bool = True, sync_dir: bool = True) -> None:
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), sync=sync,
                 sync_dir=sync_dir)


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
