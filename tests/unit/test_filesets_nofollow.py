"""The file-set reader never follows a symlink out of the set, even one swapped in after the walk.

Issue 13, defect 10 (in part): walked paths were opened without O_NOFOLLOW,
so whoever can write inside a protected folder could replace a file (or a
folder on its way) by a symlink between the walk and the read and make the
source replicate, say, /etc/shadow. Now each component below the listed path
is opened with O_NOFOLLOW, the file with O_NONBLOCK, and fstat must show a
regular file.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from cdp.config import FilesetConfig
from cdp.source.filesets import read_file, walk, wire_name


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    d = tmp_path / "set"
    (d / "sub").mkdir(parents=True)
    (d / "vm.xml").write_bytes(b"<domain/>")
    (d / "sub" / "net.xml").write_bytes(b"<network/>")
    secret = tmp_path / "secret"
    (secret / "sub").mkdir(parents=True)
    (secret / "vm.xml").write_bytes(b"SECRET")
    (secret / "sub" / "net.xml").write_bytes(b"SECRET TOO")
    return d, secret


def test_a_file_swapped_for_a_symlink_after_the_walk_is_not_followed(tmp_path: Path) -> None:
    d, secret = _setup(tmp_path)
    found, refused = walk(FilesetConfig("s", (d,)))
    assert not refused
    f = found[wire_name(str(d / "vm.xml"))]
    (d / "vm.xml").unlink()
    (d / "vm.xml").symlink_to(secret / "vm.xml")
    got = read_file(f, 1000)
    assert isinstance(got, str) and "symlink" in got
    # the next walk sees the symlink for what it is: outside the set, refused
    found, refused = walk(FilesetConfig("s", (d,)))
    assert wire_name(str(d / "vm.xml")) not in found
    assert "outside the file set" in refused[wire_name(str(d / "vm.xml"))]


def test_a_folder_swapped_for_a_symlink_after_the_walk_is_not_followed(tmp_path: Path) -> None:
    d, secret = _setup(tmp_path)
    found, _ = walk(FilesetConfig("s", (d,)))
    f = found[wire_name(str(d / "sub" / "net.xml"))]
    os.rename(d / "sub", tmp_path / "moved")
    (d / "sub").symlink_to(secret / "sub")
    got = read_file(f, 1000)
    assert isinstance(got, str) and "symlink" in got


def test_a_fifo_swapped_in_cannot_hang_the_read(tmp_path: Path) -> None:
    d, _ = _setup(tmp_path)
    found, _ = walk(FilesetConfig("s", (d,)))
    f = found[wire_name(str(d / "vm.xml"))]
    (d / "vm.xml").unlink()
    os.mkfifo(d / "vm.xml")
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(read_file(f, 1000)), daemon=True)
    t.start()
    t.join(10)
    assert out and isinstance(out[0], str) and "FIFO" in out[0]


def test_symlinks_inside_the_set_are_still_read_from_inside_it(tmp_path: Path) -> None:
    d, _ = _setup(tmp_path)
    (d / "alias.xml").symlink_to(d / "sub" / "net.xml")  # policy: content under the link's name
    found, _ = walk(FilesetConfig("s", (d,)))
    got = read_file(found[wire_name(str(d / "alias.xml"))], 1000)
    assert not isinstance(got, str) and got[0] == b"<network/>"
    # a listed path that is itself a symlink is the operator's choice: followed, once
    listed = tmp_path / "listed.xml"
    listed.symlink_to(d / "vm.xml")
    found, refused = walk(FilesetConfig("s", (listed,)))
    got = read_file(found[wire_name(str(listed))], 1000)
    assert not refused and not isinstance(got, str) and got[0] == b"<domain/>"
