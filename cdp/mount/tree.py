"""The mounted tree: paths to entries, attributes and data; no FUSE in here (fuse.py serves it).

    /               the mount's root (read-only, owned by the user who mounted it)
    /VOL.img        the image as of the point, read straight through the opened Reader
    /files/...      the image's files as cdp.archive.files models them (absent when no parser
                    could read the image; `Opened.no_fs` says why)

Everything below files/ comes from the guest and is untrusted. Modes are shown as
stored, setuid bits included (the mount is nosuid, nodev, ro, so they have no
effect); symlinks are symlinks, their targets as stored and never followed here
(the kernel resolves them, as for any symlink); names FUSE cannot carry ("",
".", "..", or holding "/" or NUL) are left out; a folder that contains itself
(a damaged or hostile file system) reads as ELOOP, and paths deeper than
MAX_DEPTH as ENAMETOOLONG, so no walk through the mount runs forever.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import stat
from dataclasses import dataclass
from typing import Any, BinaryIO

from cdp.archive.files import Node
from cdp.errors import ArchiveError
from cdp.mount.sources import Opened
from cdp.textsafe import printable

log = logging.getLogger(__name__)

FILES = "files"
MAX_DEPTH = 256
DIR_CACHE = 512  # folders whose listing is kept
TYPES = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "chardev": stat.S_IFCHR,
         "blockdev": stat.S_IFBLK, "fifo": stat.S_IFIFO, "socket": stat.S_IFSOCK}


class FsError(OSError):
    """An errno for the kernel; the message is for the log."""

    def __init__(self, code: int, why: str = "") -> None:
        super().__init__(code, why or os.strerror(code))


@dataclass
class Entry:
    """One path of the mount: a fixed entry (root, VOL.img) or a guest Node."""

    kind: str  # "root", "image" or "node"
    node: Node | None = None


def usable_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


class Tree:
    """Paths of the mount for an Opened point or snapshot; thread-safe only under one caller."""

    def __init__(self, opened: Opened) -> None:
        self.opened = opened
        self.image_name = f"{opened.volume}.img"
        self.uid, self.gid = os.getuid(), os.getgid()
        self._root: Node | None = None
        self._dirs: collections.OrderedDict[str, dict[str, Node]] = collections.OrderedDict()
        self._files: dict[int, BinaryIO] = {}
        self._next_fh = 1
        if opened.fs is not None:
            root = self._guest(opened.fs.get, "/")
            if root.type == "dir":
                self._root = root
            else:
                opened.no_fs = "its file system has no root folder"

    # -- lookup --------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return [self.image_name] + ([FILES] if self._root is not None else [])

    def lookup(self, path: str) -> Entry:
        if path == "/":
            return Entry("root")
        parts = path.strip("/").split("/")
        if parts == [self.image_name]:
            return Entry("image")
        if parts[0] != FILES or self._root is None:
            raise FsError(errno.ENOENT)
        if len(parts) > MAX_DEPTH:
            raise FsError(errno.ENAMETOOLONG, f"more than {MAX_DEPTH} folders deep")
        node = self._root
        seen = {node.ident} if node.ident is not None else set()
        walked = f"/{FILES}"
        for name in parts[1:]:
            if node.type != "dir":
                raise FsError(errno.ENOTDIR)
            child = self._children(walked, node).get(name)
            if child is None:
                raise FsError(errno.ENOENT)
            walked = f"{walked}/{name}"
            if child.type == "dir" and child.ident is not None:
                if child.ident in seen:
                    raise FsError(errno.ELOOP, f"{printable(walked)}: a folder that holds itself")
                seen.add(child.ident)
            node = child
        return Entry("node", node)

    def _children(self, path: str, node: Node) -> dict[str, Node]:
        kids = self._dirs.get(path)
        if kids is not None:
            self._dirs.move_to_end(path)
            return kids
        kids = {}
        left_out = 0
        for name, child in self._guest(node.children):
            if usable_name(name) and child.type in TYPES:
                kids[name] = child
            else:
                left_out += 1
        if left_out:
            log.info("%s: %d entries left out (names FUSE cannot show, or junctions)", printable(path),
                     left_out)
        self._dirs[path] = kids
        if len(self._dirs) > DIR_CACHE:
            self._dirs.popitem(last=False)
        return kids

    def _guest(self, fn: Any, *args: Any) -> Any:
        """Call into the file-system parser: what it raises on a damaged image becomes EIO, logged."""
        try:
            return fn(*args)
        except OSError as exc:
            if isinstance(exc, FsError):
                raise
            log.warning("%s: read error in the image: %s", self.opened.what, exc)
            raise FsError(errno.EIO) from None
        except Exception as exc:
            log.warning("%s: the file-system parser failed: %s: %s", self.opened.what, type(exc).__name__,
                        printable(str(exc)))
            raise FsError(errno.EIO) from None

    # -- attributes ----------------------------------------------------------------------------

    def getattr(self, path: str) -> dict[str, Any]:
        e = self.lookup(path)
        t = int(self.opened.time * 1e9)
        base = {"st_uid": self.uid, "st_gid": self.gid, "st_atime": t, "st_mtime": t, "st_ctime": t}
        if e.kind == "root":
            return {**base, "st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2 + (self._root is not None)}
        if e.kind == "image":
            return {**base, "st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": self.opened.image.size}
        node = e.node
        assert node is not None
        mode = TYPES[node.type] | node.mode  # as stored: setuid bits too (the mount is nosuid)
        m = int(self._guest(lambda: node.mtime) * 1e9)
        size = self._guest(lambda: node.size) if node.type in ("file", "symlink") else 0
        return {**base, "st_mode": mode, "st_nlink": 2 if node.type == "dir" else 1, "st_size": size,
                "st_atime": m, "st_mtime": m, "st_ctime": m, "st_blocks": (size + 511) // 512}

    def readdir(self, path: str) -> list[str]:
        e = self.lookup(path)
        if e.kind == "root":
            return [".", "..", *self.names()]
        if e.kind != "node" or e.node is None or e.node.type != "dir":
            raise FsError(errno.ENOTDIR)
        return [".", "..", *self._children(path.rstrip("/"), e.node)]

    def readlink(self, path: str) -> str:
        e = self.lookup(path)
        if e.node is None or e.node.type != "symlink":
            raise FsError(errno.EINVAL)
        node = e.node
        target = self._guest(lambda: node.target)
        if not target or "\0" in target:
            raise FsError(errno.EIO, "an empty or NUL-holding symlink target")
        return str(target)

    # -- data ----------------------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise FsError(errno.EROFS)
        e = self.lookup(path)
        if e.kind == "image":
            return 0
        if e.kind != "node" or e.node is None or e.node.type != "file":
            raise FsError(errno.EISDIR if e.kind == "root" or (e.node and e.node.type == "dir")
                          else errno.EACCES)
        node = e.node
        try:
            node.check_readable()
        except ArchiveError as exc:  # EFS-encrypted, deduplicated or compressed by Windows
            log.warning("%s: %s: %s", self.opened.what, printable(path), exc)
            raise FsError(errno.EIO) from None
        except Exception:
            self._guest(node.check_readable)  # logs the parser's failure, raises EIO
        fh = self._guest(node.open)
        n = self._next_fh
        self._next_fh += 1
        self._files[n] = fh
        return n

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        if fh == 0:
            return self._image_read(offset, size)
        f = self._files.get(fh)
        if f is None:
            raise FsError(errno.EBADF)

        def chunk() -> bytes:
            f.seek(offset)
            return bytes(f.read(size))
        return bytes(self._guest(chunk))

    def _image_read(self, offset: int, size: int) -> bytes:
        try:
            return self.opened.image.read(offset, max(0, min(size, self.opened.image.size - offset)))
        except Exception as exc:  # the point can no longer be read as it was: EIO, never other data
            log.warning("%s: cannot read the image at %d: %s", self.opened.what, offset, exc)
            raise FsError(errno.EIO) from None

    def release(self, fh: int) -> None:
        f = self._files.pop(fh, None)
        if f is not None:
            with contextlib.suppress(Exception):
                f.close()

    def close(self) -> None:
        for fh in list(self._files):
            self.release(fh)
