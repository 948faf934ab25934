"""Copy a file, symlink or folder tree out of an archived image into a target folder, safely.

Everything a guest's file system says is untrusted: names, modes, symlink targets,
sizes, even its shape (a folder may hold itself). Writing goes through
`cdp.safewrite`, so nothing is created outside the target whatever the names; this
module walks the image's tree and decides what to write:

- an entry whose name is unsafe ("..", "/", NUL, ...), or that would have to pass
  through a symlink or a non-folder in the target, is skipped and reported, and
  the walk goes on (the CLI then exits 1 naming each one);
- symlinks are recreated as symlinks with their target as stored, never followed;
- setuid, setgid and sticky bits are dropped unless `preserve_special`;
- a folder met twice (hard-linked or looped) or more than MAX_DEPTH deep is skipped;
- data is streamed, up to the entry's declared size, zero blocks left as holes;
- devices, FIFOs, sockets and junctions are not created;
- without `force`, nothing is replaced: before anything is written, the target is
  checked for an entry a file or symlink of the copy would replace (`first_existing`),
  and the copy is refused naming it. Existing folders are merged into.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cdp.archive.files import FileSystem, Node, find
from cdp.errors import ArchiveError, UnsafeEntryError, UsageError
from cdp.safewrite import Target, check_name, safe_mode
from cdp.textsafe import printable

MAX_DEPTH = 256  # folders below the copied one; one open descriptor per level while copying
READ_SIZE = 1 << 20


@dataclass
class Extracted:
    """What a copy wrote (target paths) and what it skipped ((image path, reason) pairs)."""

    written: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"written": self.written,
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped]}


def get_path(fs: FileSystem, path: str, dest: Path, *, preserve_special: bool = False,
             force: bool = False) -> Extracted:
    """Copy `path` of the image to `dest`: into it under its own name when `dest` is a folder.

    Modes (without setuid/setgid/sticky unless `preserve_special`) and modification
    times are kept; ownership is not (files belong to the caller). Without `force`,
    UsageError (nothing written) when the copy would replace anything in the target.
    """
    node = find(fs, path)
    clean = posixpath.normpath("/" + path.lstrip("/"))
    if dest.is_dir():
        folder, name = dest, PurePosixPath(clean).name or "root"
    else:
        folder, name = dest.parent, dest.name
    with Target.open(folder) as target:
        if not force:
            existing = first_existing(node, target, name)
            if existing is not None:
                raise UsageError(f"--to: {printable(existing)} exists and would be overwritten; pass "
                                 "--force to overwrite, or pick an empty destination")
        return extract(node, target, name, clean, preserve_special=preserve_special)


def first_existing(node: Node, target: Target, name: str) -> str | None:
    """The first entry in the target a copy of `node` as `name` would replace, or None.

    Only folders that exist on both sides are walked (nothing below a new folder can
    be in the way), with the copy's own limits on depth and on folders met twice.
    Entries the copy would skip anyway (unsafe names, things in the way) are not named.
    """
    return _Probe().entry(node, target, name, 0)


class _Probe:
    def __init__(self) -> None:
        self.seen: set[Any] = set()

    def entry(self, node: Node, target: Target, name: str, depth: int) -> str | None:
        try:
            check_name(name)
            if node.type in ("file", "symlink"):
                # a folder in the way is skipped by the copy, not replaced
                return target.child(name) if target.exists(name) and not target.is_dir(name) else None
            if node.type != "dir" or depth > MAX_DEPTH or not target.is_dir(name):
                return None
        except UnsafeEntryError:
            return None
        if node.ident is not None:
            if node.ident in self.seen:
                return None
            self.seen.add(node.ident)
        try:  # the existing folder, never through a symlink (is_dir checked it is a real folder)
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=target.fd)
        except OSError:
            return None  # the copy will report it
        with Target(fd, target.child(name)) as sub:
            for child_name, child in node.children():
                hit = self.entry(child, sub, child_name, depth + 1)
                if hit is not None:
                    return hit
        return None


def extract(node: Node, target: Target, name: str, path: str, *, preserve_special: bool = False) -> Extracted:
    """Write `node` (the image's `path`) as `name` in `target`; unsafe entries are skipped, not written."""
    out = Extracted()
    _Walk(out, preserve_special).entry(node, target, name, path, 0)
    return out


class _Walk:
    def __init__(self, out: Extracted, preserve_special: bool) -> None:
        self.out = out
        self.preserve = preserve_special
        self.seen: set[Any] = set()  # identities of the folders copied so far

    def entry(self, node: Node, target: Target, name: str, path: str, depth: int) -> None:
        try:
            if node.type == "dir":
                self.folder(node, target, name, path, depth)
            elif node.type == "symlink":
                target.symlink(name, node.target or "", node.mtime)
                self.out.written.append(target.child(name))
            elif node.type == "file":
                self.file(node, target, name, path)
            # devices, FIFOs, sockets, junctions: nothing to copy
        except UnsafeEntryError as exc:
            self.out.skipped.append((path, str(exc)))

    def folder(self, node: Node, target: Target, name: str, path: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise UnsafeEntryError(f"refused: more than {MAX_DEPTH} folders deep")
        if node.ident is not None:
            if node.ident in self.seen:
                raise UnsafeEntryError("refused: this folder was met before (a hard-linked or looped folder)")
            self.seen.add(node.ident)
        with target.subdir(name) as sub:
            self.out.written.append(sub.path)
            for child_name, child in node.children():
                self.entry(child, sub, child_name, f"{path.rstrip('/')}/{child_name}", depth + 1)
            sub.settle(safe_mode(node.mode, self.preserve), node.mtime)

    def file(self, node: Node, target: Target, name: str, path: str) -> None:
        try:
            node.check_readable()
        except ArchiveError as exc:
            self.out.skipped.append((path, f"not copied: {exc}"))
            return
        with contextlib.closing(node.open()) as src:
            target.write_file(name, iter(lambda: src.read(READ_SIZE), b""), limit=node.size,
                              mode=safe_mode(node.mode, self.preserve), mtime=node.mtime)
        self.out.written.append(target.child(name))
