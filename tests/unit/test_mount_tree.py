"""The mount's tree over a hostile file system (no FUSE needed): names FUSE cannot carry are left
out, a folder that holds itself is ELOOP, modes and symlink targets are as stored, writes refused."""

from __future__ import annotations

import errno
import io
import os
import stat
from typing import BinaryIO

import pytest

from cdp.archive.files import FileSystem, Node
from cdp.mount.sources import Opened, ReaderFile
from cdp.mount.tree import MAX_DEPTH, Tree


class FakeNode(Node):
    def __init__(self, type_: str, mode: int = 0o644, data: bytes = b"", target: str | None = None,
                 ident: object = None) -> None:
        self.type, self.mode, self.data, self._target, self.ident = type_, mode, data, target, ident
        self.kids: list[tuple[str, Node]] = []

    @property
    def size(self) -> int:
        return len(self.data if self._target is None else self._target.encode())

    @property
    def mtime(self) -> float:
        return 1_600_000_000.5

    @property
    def target(self) -> str | None:
        return self._target

    def children(self) -> list[tuple[str, Node]]:
        return self.kids

    def open(self) -> BinaryIO:
        return io.BytesIO(self.data)


class FakeFs(FileSystem):
    def __init__(self, root: Node) -> None:
        self.root = root

    def get(self, path: str) -> Node:
        assert path == "/"
        return self.root


class Image:
    size = 3 * 4096 + 5

    def read(self, offset: int, length: int) -> bytes:
        return bytes((offset + i) % 251 for i in range(max(0, min(length, self.size - offset))))


def hostile_tree() -> Tree:
    root = FakeNode("dir", 0o755, ident=2)
    loop = FakeNode("dir", 0o700, ident=11)
    loop.kids = [("again", loop)]  # a folder that holds itself
    deep = FakeNode("dir", 0o755, ident=None)
    deep.kids = [("d", deep)]  # no identity to compare (FAT): only depth stops it
    root.kids = [("", FakeNode("file")), (".", root), ("..", root), ("a/b", FakeNode("file")),
                 ("nul\0name", FakeNode("file")), ("junction", FakeNode("other")),
                 ("ok.txt", FakeNode("file", 0o4751, b"hello")),
                 ("link", FakeNode("symlink", 0o777, target="/etc/shadow")),
                 ("loop", loop), ("deep", deep), ("fifo", FakeNode("fifo", 0o600))]
    return Tree(Opened("vol1", Image(), 1_700_000_000.0, "point 1 of vol1", fs=FakeFs(root)))


def test_names_fuse_cannot_carry_are_left_out() -> None:
    t = hostile_tree()
    assert t.readdir("/") == [".", "..", "vol1.img", "files"]
    assert t.readdir("/files") == [".", "..", "ok.txt", "link", "loop", "deep", "fifo"]
    for bad in ("/files/a", "/files/junction", "/nope", "/files/nope"):
        with pytest.raises(OSError) as e:
            t.getattr(bad)
        assert e.value.errno == errno.ENOENT


def test_modes_times_and_symlinks_as_stored() -> None:
    t = hostile_tree()
    a = t.getattr("/files/ok.txt")
    assert a["st_mode"] == stat.S_IFREG | 0o4751 and a["st_size"] == 5
    assert a["st_mtime"] == 1_600_000_000_500_000_000
    link = t.getattr("/files/link")
    assert stat.S_ISLNK(link["st_mode"]) and t.readlink("/files/link") == "/etc/shadow"
    assert stat.S_ISFIFO(t.getattr("/files/fifo")["st_mode"])
    img = t.getattr("/vol1.img")
    assert img["st_size"] == Image.size and stat.S_IMODE(img["st_mode"]) == 0o444
    with pytest.raises(OSError) as e:
        t.readlink("/files/ok.txt")
    assert e.value.errno == errno.EINVAL


def test_a_folder_that_holds_itself_and_endless_depth_stop() -> None:
    t = hostile_tree()
    assert t.readdir("/files/loop") == [".", "..", "again"]
    with pytest.raises(OSError) as e:
        t.getattr("/files/loop/again")
    assert e.value.errno == errno.ELOOP
    path = "/files" + "/deep" + "/d" * (MAX_DEPTH - 3)
    assert stat.S_ISDIR(t.getattr(path)["st_mode"])
    with pytest.raises(OSError) as e:
        t.getattr(path + "/d/d")
    assert e.value.errno == errno.ENAMETOOLONG


def test_reads_and_refused_writes() -> None:
    t = hostile_tree()
    fh = t.open("/files/ok.txt", os.O_RDONLY)
    assert t.read("/files/ok.txt", 3, 1, fh) == b"ell"
    t.release(fh)
    assert t.read("/vol1.img", 10, Image.size - 4, 0) == Image().read(Image.size - 4, 4)
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(OSError) as e:
            t.open("/files/ok.txt", flags)
        assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:
        t.open("/files/loop", os.O_RDONLY)
    assert e.value.errno == errno.EISDIR


def test_an_unreadable_image_is_eio_not_other_data() -> None:
    class Broken(Image):
        def read(self, offset: int, length: int) -> bytes:
            raise RuntimeError("epoch 5 was applied without a journal record")

    t = Tree(Opened("vol1", Broken(), 0.0, "point 1 of vol1"))
    assert t.readdir("/") == [".", "..", "vol1.img"]
    with pytest.raises(OSError) as e:
        t.read("/vol1.img", 4096, 0, 0)
    assert e.value.errno == errno.EIO


def test_reader_file_reads_across_blocks_and_the_end() -> None:
    f = ReaderFile(Image(), block=4096)
    f.seek(4090)
    assert f.read(20) == Image().read(4090, 20)
    f.seek(-3, io.SEEK_END)
    assert f.read(100) == Image().read(Image.size - 3, 3)
    assert f.read(1) == b""
