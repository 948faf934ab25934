"""Single files out of an archived image: ext2/3/4, bare or inside an MBR/GPT partition table.

File systems and partition tables are read by dissect.extfs and
dissect.volume (pure Python, maintained) through a `SnapshotImage`, so only
the chunks holding the metadata and the wanted files are fetched.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from cdp.errors import ArchiveError, UsageError

KIND = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "chardev",
        stat.S_IFBLK: "blockdev", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}


def _imports() -> tuple[Any, Any, Any]:
    try:
        from dissect.extfs import ExtFS
        from dissect.volume import disk
        from dissect.volume.exceptions import DiskError
    except ImportError:
        raise ArchiveError("file-level restore needs dissect.extfs and dissect.volume: "
                           "pip install dissect.extfs dissect.volume") from None
    return ExtFS, disk, DiskError


def open_fs(image: BinaryIO, partition: int | None = None) -> tuple[Any, int | None]:
    """The ext file system of the image (or of one partition): (fs, partition number or None)."""
    ext_fs, disk, disk_error = _imports()
    try:
        parts = list(disk.Disk(image).partitions)
    except (disk_error, ValueError, EOFError):
        parts = []
    if partition is not None or parts:
        chosen = [p for p in parts if partition is None or p.number == partition]
        if not chosen:
            have = ", ".join(str(p.number) for p in parts) or "none"
            raise UsageError(f"no partition {partition} in the image (partitions: {have})")
        for p in chosen:
            with contextlib.suppress(Exception):
                return ext_fs(p.open()), p.number
        raise ArchiveError("no ext2/3/4 file system found in the image's partitions "
                           f"({', '.join(str(p.number) for p in chosen)})")
    image.seek(0)
    try:
        return ext_fs(image), None
    except Exception as exc:
        raise ArchiveError(f"the image holds no partition table and no ext2/3/4 file system "
                           f"({type(exc).__name__}); only ext file systems are supported") from None


def _node(fs: Any, path: str) -> Any:
    try:
        return fs.get(str(PurePosixPath("/") / path))
    except (FileNotFoundError, NotADirectoryError):
        raise UsageError(f"{path}: no such file or directory in the archived image") from None


def _entry(name: str, node: Any) -> dict[str, Any]:
    mode = int(node.inode.i_mode)
    e = {"name": name, "type": KIND.get(stat.S_IFMT(mode), "other"), "size": int(node.size),
         "mode": oct(stat.S_IMODE(mode)), "mtime": node.mtime.timestamp()}
    if stat.S_ISLNK(mode):
        e["target"] = node.link
    return e


def list_path(fs: Any, path: str = "/") -> list[dict[str, Any]]:
    """The entries of a directory (or the one entry of a file), sorted by name."""
    node = _node(fs, path)
    if stat.S_ISDIR(int(node.inode.i_mode)):
        return [_entry(n, c) for n, c in sorted(node.listdir().items()) if n not in (".", "..")]
    return [_entry(PurePosixPath(path).name, node)]


def get_path(fs: Any, path: str, dest: Path) -> list[str]:
    """Copy a file, symlink or directory tree out of the image to `dest`; returns what was written.

    An existing directory as `dest` receives the item under its own name. Modes
    and modification times are kept; ownership is not (files belong to the caller).
    """
    node = _node(fs, path)
    name = PurePosixPath("/" + path).name or "root"
    target = dest / name if dest.is_dir() else dest
    written: list[str] = []
    _copy(node, target, written)
    return written


def _copy(node: Any, target: Path, written: list[str]) -> None:
    mode = int(node.inode.i_mode)
    try:
        if stat.S_ISDIR(mode):
            target.mkdir(exist_ok=True)
            for n, child in sorted(node.listdir().items()):
                if n not in (".", ".."):
                    _copy(child, target / n, written)
        elif stat.S_ISLNK(mode):
            os.symlink(node.link, target)
            written.append(str(target))
            return
        elif stat.S_ISREG(mode):
            tmp = target.with_name(f".{target.name}.cdp-get")
            with open(tmp, "wb") as out, node.open() as src:
                while block := src.read(1 << 20):
                    out.write(block)
            os.replace(tmp, target)
        else:
            return  # devices, fifos, sockets: nothing to copy
        os.chmod(target, stat.S_IMODE(mode))
        ts = node.mtime.timestamp()
        os.utime(target, (ts, ts))
        written.append(str(target))
    except OSError as exc:
        raise ArchiveError(f"cannot write {target}: {exc.strerror or exc}") from None
