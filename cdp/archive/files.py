"""Single files out of an archived image: ext2/3/4, FAT12/16/32 or NTFS, bare or in an MBR/GPT partition.

File systems and partition tables are read by dissect.extfs, dissect.fat,
dissect.ntfs and dissect.volume (pure Python, maintained) through a
`SnapshotImage`, so only the chunks holding the metadata and the wanted files
are fetched.

Each file system is wrapped in a small adapter (`ExtVolume`, `FatVolume`,
`NtfsVolume`) whose `get(path)` returns a `Node`: one uniform entry model
(type, size, permission bits, mtime, symlink target, children, data) so that
listing and copying do not care which file system holds the files. FAT and
NTFS have no Unix permissions: files get 0o644 (0o444 when read-only),
directories 0o755. FAT times are local time (as DOS wrote them), NTFS and ext
times are UTC.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import posixpath
import stat
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any, BinaryIO

from cdp.errors import ArchiveError, UsageError
from cdp.textsafe import printable

KIND = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "chardev",
        stat.S_IFBLK: "blockdev", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}
FILE_MODE, READONLY_MODE, DIR_MODE = 0o644, 0o444, 0o755
NO_FS = "no ext2/3/4, FAT or NTFS file system found"
SYMLINK_READ = 4096  # PATH_MAX: longer targets are refused when copying (cdp.safewrite)
ESP_GUID = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"  # GPT type of an EFI system partition (MBR: 0xEF)
EXT4_INLINE_DATA_FL = 0x10000000  # the data sits in the inode itself: no blocks


def _imports() -> tuple[Any, Any]:
    try:
        from dissect.volume import disk
        from dissect.volume.exceptions import DiskError
    except ImportError:
        raise ArchiveError("file-level restore needs dissect.volume: pip install dissect.volume") from None
    return disk, DiskError


def byte_runs(runs: list[tuple[int | None, int]], unit: int, base: int,
              size: int) -> list[tuple[int | None, int]] | None:
    """A parser's runs ((first unit or None for a hole, units)) as byte ranges from `base`, clipped
    to `size`; None when they do not cover the size (a damaged or hostile entry: read it instead)."""
    out: list[tuple[int | None, int]] = []
    left = size
    for start, count in runs:
        if left <= 0:
            break
        n = min(int(count) * unit, left)
        out.append((None if start is None else base + int(start) * unit, n))
        left -= n
    return out if left <= 0 else None


class Node:
    """One entry of an opened file system in the uniform model; subclasses wrap the native objects."""

    type = "other"  # file, dir, symlink, other (ext adds chardev, blockdev, fifo, socket)
    mode = FILE_MODE  # permission bits only
    ident: Any = None  # the entry's identity in its file system (inode, cluster, record) when known

    @property
    def size(self) -> int:
        return 0

    @property
    def mtime(self) -> float:
        return 0.0

    @property
    def target(self) -> str | None:
        """A symlink's target."""
        return None

    @property
    def uid(self) -> int | None:
        """The owner's numeric id (None on file systems without Unix owners)."""
        return None

    @property
    def gid(self) -> int | None:
        return None

    def extents(self) -> list[tuple[int | None, int]] | None:
        """Where a file's data lies on its file system's device: (byte offset or None for a hole,
        length) in file order, clipped to the size; None when not known (inline data, NTFS).

        `cdp archive diff` uses it to compare files by the chunk ids under them, without reading.
        """
        return None

    def children(self) -> list[tuple[str, Node]]:
        """A directory's entries sorted by name, without ".", ".." and file-system metadata."""
        raise NotImplementedError

    def open(self) -> BinaryIO:
        """A file's data."""
        raise NotImplementedError

    def check_readable(self) -> None:
        """Raise ArchiveError when the data cannot be read as it was written (encrypted, ...)."""


class FileSystem:
    """An opened file system: `get(path)` returns its Node (FileNotFoundError, NotADirectoryError)."""

    kind = ""
    native: Any
    offset = 0  # where the file system starts in the image (its partition's offset), set by open_fs

    def get(self, path: str) -> Node:
        raise NotImplementedError


# -- ext2/3/4 ------------------------------------------------------------------------------------------


class ExtNode(Node):
    def __init__(self, inode: Any) -> None:
        self.native = inode
        self.imode = int(inode.inode.i_mode)
        self.type = KIND.get(stat.S_IFMT(self.imode), "other")
        self.mode = stat.S_IMODE(self.imode)
        self.ident = int(inode.inum)

    @property
    def size(self) -> int:
        return int(self.native.size)

    @property
    def mtime(self) -> float:
        return float(self.native.mtime.timestamp())

    @property
    def target(self) -> str | None:
        if not stat.S_ISLNK(self.imode):
            return None
        # read at most one byte more than a target may hold: the size is the guest's to choose
        with contextlib.closing(self.native.open()) as fh:
            return bytes(fh.read(SYMLINK_READ)).decode(errors="surrogateescape")

    @property
    def uid(self) -> int:
        i = self.native.inode
        return int(i.i_uid) | int(i.i_uid_high) << 16

    @property
    def gid(self) -> int:
        i = self.native.inode
        return int(i.i_gid) | int(i.i_gid_high) << 16

    def extents(self) -> list[tuple[int | None, int]] | None:
        if self.type != "file" or self.native.inode.i_flags & EXT4_INLINE_DATA_FL:
            return None
        return byte_runs(self.native.dataruns(), self.native.extfs.block_size, 0, self.size)

    def children(self) -> list[tuple[str, Node]]:
        return [(n, ExtNode(c)) for n, c in sorted(self.native.listdir().items()) if n not in (".", "..")]

    def open(self) -> BinaryIO:
        return self.native.open()


class ExtVolume(FileSystem):
    kind = "ext"

    def __init__(self, fh: BinaryIO) -> None:
        try:
            from dissect.extfs import ExtFS
        except ImportError:
            raise ArchiveError("file-level restore needs dissect.extfs: pip install dissect.extfs") from None
        self.native = ExtFS(fh)

    def get(self, path: str) -> Node:
        return ExtNode(self.native.get(path))


# -- FAT12/16/32 ---------------------------------------------------------------------------------------

_FAT_EPOCH = dt.datetime(1980, 1, 1)  # naive: DOS times are local time


class FatNode(Node):
    def __init__(self, dirent: Any) -> None:
        self.native = dirent
        is_dir = bool(dirent.is_directory())
        self.type = "dir" if is_dir else "file"
        self.mode = DIR_MODE if is_dir else READONLY_MODE if dirent.is_readonly() else FILE_MODE
        if is_dir:
            self.ident = dirent.cluster or None

    @property
    def size(self) -> int:
        return int(self.native.size)

    @property
    def mtime(self) -> float:
        try:
            return float(self.native.mtime.timestamp())
        except (ValueError, OverflowError):  # a zero or damaged DOS date
            return _FAT_EPOCH.timestamp()

    def children(self) -> list[tuple[str, Node]]:
        out: dict[str, Node] = {}
        for d in self.native.iterdir():
            name = fat_name(d)
            if name not in (".", "..") and not d.is_volume_id():
                out[name] = FatNode(d)
        return sorted(out.items())

    def extents(self) -> list[tuple[int | None, int]] | None:
        if self.type != "file":
            return None
        fs = self.native.fs
        return byte_runs(self.native.dataruns(), fs.cluster_size, fs.first_data_sector * fs.sector_size,
                         self.size)

    def open(self) -> BinaryIO:
        return self.native.open()


def fat_name(d: Any) -> str:
    """The long name, or the 8.3 name with Windows NT's lower-case flags (mtools, Linux and Windows
    store "readme.txt" as "README.TXT" plus a flag, without a long name)."""
    if d.ldirents or d.dirent is None:
        return str(d.name)
    flags = int(d.dirent.DIR_NTRes)
    base, dot, ext = str(d.short_name).partition(".")
    if flags & 0x08:
        base = base.lower()
    if flags & 0x10:
        ext = ext.lower()
    return base + dot + ext


class FatVolume(FileSystem):
    kind = "fat"

    def __init__(self, fh: BinaryIO) -> None:
        try:
            from dissect.fat.fat import FATFS
        except ImportError:
            raise ArchiveError("FAT needs dissect.fat: pip install dissect.fat") from None
        self.native = FATFS(fh)

    def get(self, path: str) -> Node:
        return FatNode(self.native.get(posixpath.normpath(path)))


# -- NTFS ----------------------------------------------------------------------------------------------

NTFS_FIRST_USER_RECORD = 24  # records 0-23: $MFT, $LogFile, ..., $Extend and reserved ones
NTFS_READONLY, NTFS_ENCRYPTED = 0x1, 0x4000
NTFS_STANDARD_INFORMATION, NTFS_FILE_NAME = 0x10, 0x30
NTFS_UNREADABLE_TAGS = {0x80000013: "deduplicated by Windows", 0x80000017: "compressed by Windows (WOF)"}


class NtfsNode(Node):
    def __init__(self, record: Any) -> None:
        self.native = record
        if record.is_symlink():
            self.type = "symlink"
        elif record.is_mount_point():
            self.type = "other"  # a junction: its target names a drive letter we do not have
        else:
            self.type = "dir" if record.is_dir() else "file"
        self.attrs = self._std("file_attributes", 0)
        self.ident = record.segment
        self.mode = (DIR_MODE if self.type == "dir" else
                     READONLY_MODE if self.attrs & NTFS_READONLY else FILE_MODE)

    def _std(self, field: str, default: Any) -> Any:
        """A field of $STANDARD_INFORMATION (else of $FILE_NAME)."""
        for code in (NTFS_STANDARD_INFORMATION, NTFS_FILE_NAME):
            attrs = self.native.attributes[code]
            if attrs:
                return getattr(attrs[0], field)
        return default

    @property
    def size(self) -> int:
        if self.type == "file" and self.native.has_stream():
            return int(self.native.size())
        return 0

    @property
    def mtime(self) -> float:
        t = self._std("last_modification_time", None)
        return float(t.timestamp()) if t is not None else 0.0

    @property
    def target(self) -> str | None:
        return str(self.native.reparse_point_name).replace("\\", "/") if self.type == "symlink" else None

    def children(self) -> list[tuple[str, Node]]:
        out: dict[str, Node] = {}
        for entry in self.native.iterdir(ignore_dos=True):
            if entry.attribute is None:
                continue
            name = str(entry.attribute.file_name)
            if name in (".", "..") or name in out:
                continue
            record = entry.dereference()
            if record.segment is not None and record.segment < NTFS_FIRST_USER_RECORD:
                continue  # metadata files: $MFT, $Bitmap, ... and the root's own "."
            out[name] = NtfsNode(record)
        return sorted(out.items())

    def open(self) -> BinaryIO:
        if not self.native.has_stream():
            return io.BytesIO()
        return self.native.open()

    def check_readable(self) -> None:
        if self.attrs & NTFS_ENCRYPTED:
            raise ArchiveError("encrypted with EFS; its data cannot be read without the user's key")
        reparse = self.native.attributes[0xC0]
        if reparse:
            why = NTFS_UNREADABLE_TAGS.get(int(reparse[0].tag))
            if why:
                raise ArchiveError(f"{why}; its data cannot be read from the image")


class NtfsVolume(FileSystem):
    kind = "ntfs"

    def __init__(self, fh: BinaryIO) -> None:
        try:
            from dissect.ntfs import NTFS
        except ImportError:
            raise ArchiveError("NTFS needs dissect.ntfs: pip install dissect.ntfs") from None
        self.native = NTFS(fh)
        if self.native.mft is None:
            raise ArchiveError("NTFS without a master file table")
        from dissect.ntfs.exceptions import Error

        self._error = Error

    def get(self, path: str) -> Node:
        try:
            return NtfsNode(self.native.mft.get(posixpath.normpath(path)))
        except (FileNotFoundError, NotADirectoryError):
            raise
        except self._error as exc:  # a link on the way that cannot be followed, a broken index
            raise ArchiveError(f"{path}: {exc}") from None


# -- detection -----------------------------------------------------------------------------------------

PROBES: tuple[tuple[str, Callable[[BinaryIO], FileSystem]], ...] = (
    ("ext", ExtVolume), ("FAT", FatVolume), ("NTFS", NtfsVolume))


def _probe(open_: Callable[[], BinaryIO], kinds: tuple[tuple[str, Callable[[BinaryIO], FileSystem]], ...],
           why: list[str]) -> FileSystem | None:
    """The first file system that opens, trying ext, then FAT, then NTFS; reasons noted in `why`."""
    for name, cls in kinds:
        try:
            fh = open_()
            fh.seek(0)
            return cls(fh)
        except ArchiveError as exc:  # a dissect package missing
            why.append(f"{name}: {exc}")
        except Exception as exc:
            why.append(f"{name}: {type(exc).__name__}")
    return None


def _is_esp(part: Any) -> bool:
    t = part.type
    return t == 0xEF if isinstance(t, int) else str(t).lower() == ESP_GUID


def open_fs(image: BinaryIO, partition: int | None = None) -> tuple[FileSystem, int | None]:
    """The file system of the image (or of one partition): (fs, partition number or None).

    Without `partition` the first partition with ext wins (as before FAT and NTFS
    were read), then the first with FAT or NTFS; an EFI system partition is taken
    only when no other partition holds a file system.
    """
    disk, disk_error = _imports()
    try:
        parts = list(disk.Disk(image).partitions)
    except (disk_error, ValueError, EOFError):
        parts = []
    if partition is not None or parts:
        chosen = [p for p in parts if partition is None or p.number == partition]
        if not chosen:
            have = ", ".join(str(p.number) for p in parts) or "none"
            raise UsageError(f"no partition {partition} in the image (partitions: {have})")
        why: list[str] = []
        ext, others = PROBES[0], PROBES[1:]
        tries = [(ext, p) for p in chosen]  # ext first, in partition order: as before FAT and NTFS
        for esp in (False, True):
            tries += [(kind, p) for kind in others for p in chosen if _is_esp(p) == esp]
        for kind, p in tries:
            fs = _probe(p.open, (kind,), why)
            if fs is not None:
                fs.offset = int(p.offset)
                return fs, p.number
        missing = sorted({w for w in why if "pip install" in w})
        raise ArchiveError(f"{NO_FS} in the image's partitions ({', '.join(str(p.number) for p in chosen)})"
                           + (f"; {'; '.join(missing)}" if missing else ""))
    why = []
    fs = _probe(lambda: image, PROBES, why)
    if fs is None:
        raise ArchiveError(f"{NO_FS}: the image holds no partition table and no file system on its "
                           f"whole ({'; '.join(why)})")
    return fs, None


# -- listing (copying: cdp/archive/extract.py) ----------------------------------------------------------


def find(fs: FileSystem, path: str) -> Node:
    try:
        return fs.get(str(PurePosixPath("/") / path))
    except (FileNotFoundError, NotADirectoryError):
        raise UsageError(f"{printable(path)}: no such file or directory in the archived image; "
                         "`cdp archive ls` lists what it holds") from None


def entry(name: str, node: Node) -> dict[str, Any]:
    """The raw fields of an entry (mode as an octal string, mtime in seconds), for JSON and listings."""
    e: dict[str, Any] = {"name": name, "type": node.type, "size": node.size, "mode": oct(node.mode),
                         "mtime": node.mtime, "uid": node.uid, "gid": node.gid}
    if node.type == "symlink":
        e["target"] = node.target
    return e


def list_path(fs: FileSystem, path: str = "/") -> list[dict[str, Any]]:
    """The entries of a directory (or the one entry of a file), sorted by name."""
    node = find(fs, path)
    if node.type == "dir":
        return [entry(n, c) for n, c in node.children()]
    return [entry(PurePosixPath(path).name, node)]
