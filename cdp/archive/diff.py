"""Which files changed between two archived images of one volume (`cdp archive diff`).

Both images are opened with the parsers of `cdp archive ls/get` (cdp.archive.files)
and their trees are walked side by side, by name, in sorted order. Every path is
reported at most once:

    +  only in the second image (a new folder brings its whole tree)
    -  only in the first image
    M  in both, with what changed: type, size, content, mode, owner, mtime, target

Folders are reported as modified only for type, mode or owner: their size and time
change whenever an entry in them does, which the entries already say.

Content is compared without reading where the snapshots allow: when a file's data
lies on the same byte ranges of both images (its `extents`) and the chunks under
those ranges have the same ids in both snapshots, the bytes are the same (chunk ids
are content hashes). Only chunks whose ids differ are read and compared, and only
files whose extents are unknown or moved are read whole. A file whose size changed
has changed content, without reading.

The images are untrusted: a folder met twice on one side (a loop) or deeper than
MAX_DEPTH is not walked, and unreadable content is not guessed at; both are
reported in `incomplete` instead.
"""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from cdp.archive.files import FileSystem, Node, entry
from cdp.errors import ArchiveError, UsageError
from cdp.textsafe import printable

MAX_DEPTH = 256
READ_SIZE = 1 << 20


@dataclass
class Side:
    """One image: its file system, the image as a file, and (when known) its chunk ids."""

    fs: FileSystem
    image: BinaryIO
    ids: list[bytes] | None = None
    chunk_size: int = 0


@dataclass
class Change:
    kind: str  # "+", "-" or "M"
    path: str
    type: str
    changes: list[str] = field(default_factory=list)  # for "M": what changed
    before: dict[str, Any] | None = None  # the entry in the first image (cdp.archive.files.entry)
    after: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "type": self.type, "changes": self.changes,
                "before": self.before, "after": self.after}


@dataclass
class Stats:
    """How content was compared: files of equal size compared, those settled by chunk ids alone,
    bytes of file data settled by chunk ids, and bytes read (from both images together)."""

    files_compared: int = 0
    by_chunk_ids: int = 0
    bytes_by_chunk_ids: int = 0
    bytes_read: int = 0
    incomplete: list[tuple[str, str]] = field(default_factory=list)  # (path, why)

    def to_json(self) -> dict[str, Any]:
        return {"files_compared": self.files_compared, "by_chunk_ids": self.by_chunk_ids,
                "bytes_by_chunk_ids": self.bytes_by_chunk_ids, "bytes_read": self.bytes_read,
                "incomplete": [{"path": p, "reason": r} for p, r in self.incomplete]}


class Differ:
    """Walks two images' trees; `changes(path)` yields what differs below `path`."""

    def __init__(self, a: Side, b: Side) -> None:
        self.a, self.b = a, b
        self.stats = Stats()
        self.seen: tuple[set[Any], set[Any]] = (set(), set())

    def changes(self, path: str, na: Node | None, nb: Node | None) -> Iterator[Change]:
        """What differs between `na` (first image's `path`) and `nb`; None: absent on that side."""
        yield from self._pair(path, na, nb, 0)

    # -- walking -------------------------------------------------------------------------------------

    def _pair(self, path: str, na: Node | None, nb: Node | None, depth: int) -> Iterator[Change]:
        if na is None and nb is not None:
            yield from self._one("+", path, nb, 1, depth)
            return
        if nb is None and na is not None:
            yield from self._one("-", path, na, 0, depth)
            return
        assert na is not None and nb is not None
        what = self._compare(path, na, nb)
        if what:
            yield Change("M", path, nb.type, what, _meta(path, na), _meta(path, nb))
        if na.type == "dir" and nb.type == "dir":
            kids = self._children(path, na, 0, depth), self._children(path, nb, 1, depth)
            for name in sorted(set(kids[0]) | set(kids[1])):
                yield from self._pair(_join(path, name), kids[0].get(name), kids[1].get(name), depth + 1)
        elif na.type == "dir":  # a folder became something else: its tree is gone
            for name, child in self._children(path, na, 0, depth).items():
                yield from self._one("-", _join(path, name), child, 0, depth + 1)
        elif nb.type == "dir":
            for name, child in self._children(path, nb, 1, depth).items():
                yield from self._one("+", _join(path, name), child, 1, depth + 1)

    def _one(self, kind: str, path: str, node: Node, side: int, depth: int) -> Iterator[Change]:
        meta = _meta(path, node)
        yield Change(kind, path, node.type, [], meta if kind == "-" else None, meta if kind == "+" else None)
        if node.type == "dir":
            for name, child in self._children(path, node, side, depth).items():
                yield from self._one(kind, _join(path, name), child, side, depth + 1)

    def _children(self, path: str, node: Node, side: int, depth: int) -> dict[str, Node]:
        which = "first" if side == 0 else "second"
        if depth >= MAX_DEPTH:
            self.stats.incomplete.append((path, f"not walked in the {which} image: more than {MAX_DEPTH} "
                                                "folders deep"))
            return {}
        if node.ident is not None:
            if node.ident in self.seen[side]:
                self.stats.incomplete.append((path, f"not walked in the {which} image: this folder was "
                                                    "met before (a hard-linked or looped folder)"))
                return {}
            self.seen[side].add(node.ident)
        return dict(node.children())

    # -- comparing ------------------------------------------------------------------------------------

    def _compare(self, path: str, na: Node, nb: Node) -> list[str]:
        if na.type != nb.type:
            return ["type"]
        what: list[str] = []
        if na.type == "file":
            if na.size != nb.size:
                what += ["size", "content"]
            elif na.size and not self._same_content(path, na, nb):
                what.append("content")
        if na.mode != nb.mode:
            what.append("mode")
        if (na.uid, na.gid) != (nb.uid, nb.gid):
            what.append("owner")
        if na.type != "dir" and na.mtime != nb.mtime:
            what.append("mtime")
        if na.type == "symlink" and na.target != nb.target:
            what.append("target")
        return what

    def _same_content(self, path: str, na: Node, nb: Node) -> bool:
        """Equal bytes? By chunk ids where the data did not move, else by reading."""
        self.stats.files_compared += 1
        ra, rb = _absolute(na, self.a), _absolute(nb, self.b)
        if ra is not None and ra == rb and self._chunks_comparable():
            same = self._same_by_chunks(ra)
            if same is not None:
                return same
        try:
            na.check_readable()
            nb.check_readable()
            with contextlib.closing(na.open()) as fa, contextlib.closing(nb.open()) as fb:
                return self._same_streams(fa, fb, na.size)
        except ArchiveError as exc:
            self.stats.incomplete.append((path, f"content not compared: {exc}"))
            return True

    def _chunks_comparable(self) -> bool:
        return (self.a.ids is not None and self.b.ids is not None and self.a.chunk_size > 0
                and self.a.chunk_size == self.b.chunk_size)

    def _same_by_chunks(self, runs: list[tuple[int | None, int]]) -> bool | None:
        """Compare the data at `runs` (the same in both images) reading only chunks whose ids differ;
        None when the runs point outside the images (a damaged entry: the caller reads the file)."""
        assert self.a.ids is not None and self.b.ids is not None
        cs = self.a.chunk_size
        count = min(len(self.a.ids), len(self.b.ids))
        differing: list[tuple[int, int]] = []
        settled = 0
        for off, n in runs:
            if off is None or n <= 0:
                continue
            first, last = off // cs, (off + n - 1) // cs
            if last >= count:
                return None
            for i in range(first, last + 1):
                lo, hi = max(off, i * cs), min(off + n, (i + 1) * cs)
                if self.a.ids[i] != self.b.ids[i]:
                    differing.append((lo, hi - lo))
                else:
                    settled += hi - lo
        self.stats.bytes_by_chunk_ids += settled
        if not differing:
            self.stats.by_chunk_ids += 1
            return True
        for off, n in differing:
            if _read_at(self.a.image, off, n) != _read_at(self.b.image, off, n):
                self.stats.bytes_read += 2 * n
                return False
            self.stats.bytes_read += 2 * n
        return True

    def _same_streams(self, fa: BinaryIO, fb: BinaryIO, size: int) -> bool:
        left = size
        while left > 0:
            n = min(READ_SIZE, left)
            da, db = fa.read(n), fb.read(n)
            self.stats.bytes_read += len(da) + len(db)
            if da != db:
                return False
            if not da:
                return True  # both ended early (the size lied) and agreed so far
            left -= len(da)
        return True


def diff(a: Side, b: Side, path: str = "/") -> tuple[list[Change], Stats]:
    """Every change below `path` (which may be missing from one image, not from both)."""
    clean = posixpath.normpath("/" + path.lstrip("/"))
    na, nb = lookup(a.fs, clean), lookup(b.fs, clean)
    if na is None and nb is None:
        raise UsageError(f"{printable(path)}: in neither snapshot; `cdp archive ls` lists what they hold")
    differ = Differ(a, b)
    return list(differ.changes(clean, na, nb)), differ.stats


def lookup(fs: FileSystem, path: str) -> Node | None:
    """The entry at `path`, or None when there is none."""
    try:
        return fs.get(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _absolute(node: Node, side: Side) -> list[tuple[int | None, int]] | None:
    runs = node.extents()
    if runs is None:
        return None
    return [(None if off is None else side.fs.offset + off, n) for off, n in runs]


def _read_at(image: BinaryIO, off: int, n: int) -> bytes:
    image.seek(off)
    return image.read(n)


def _join(path: str, name: str) -> str:
    return f"{path.rstrip('/')}/{name}"


def _meta(path: str, node: Node) -> dict[str, Any]:
    return entry(path, node)
