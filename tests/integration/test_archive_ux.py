"""`cdp archive get` refuses to overwrite without --force, `archive ls` lists like `ls -l`, and
`archive diff` names what changed between two snapshots, comparing content by chunk ids first.

Images are real ext4 file systems (mkfs.ext4 -d from a folder, then debugfs to change them the
way a guest would: files added, removed, rewritten in place, chmod, chown, touch), archived into a
local repository by the archive engine; the CLI runs as a subprocess.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from archive_fixtures import receiver_with_archive
from helpers import MiB, run_cdp

from cdp.archive.backend import run_sync
from cdp.archive.job import file_opener, init_repo, run_archive
from cdp.config import load_receiver

CHUNK = MiB
WHEN = dt.datetime(2026, 12, 5, 12, 33, 40).timestamp()  # local time, as `ls -l` shows it
BLOB = os.urandom(3 * MiB + 123)
ESC_NAME = "\x1b[31mred\x1b[0m\n"


def _tool(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}")
                                       if os.path.exists(p)), None)
    if path is None:
        pytest.skip(f"{name} not installed (apt-get install e2fsprogs)")
    return path


def _ext4(img: Path, src: Path, size: int = 32 * MiB) -> Path:
    with open(img, "wb") as fh:
        fh.truncate(size)
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"}
    subprocess.run([_tool("mkfs.ext4"), "-q", "-F", "-b", "4096", "-d", str(src), str(img)], check=True,
                   env=env)
    return img


def _debugfs(img: Path, *cmds: str) -> str:
    script = img.parent / f"{img.name}.debugfs"
    script.write_text("\n".join(cmds) + "\n")
    r = subprocess.run([_tool("debugfs"), "-w", "-f", str(script), str(img)], capture_output=True, text=True)
    assert r.returncode == 0 and "debugfs:" in r.stdout, r.stderr
    return r.stdout


class Repo:
    """A local repository with one archive "offsite" of volume vol1, 1 MiB chunks."""

    def __init__(self, tmp_path: Path) -> None:
        self.toml = receiver_with_archive(tmp_path / "rx", str(tmp_path / "repo"), chunk_size="1MiB",
                                          pack_size="4MiB")
        self.cfg = load_receiver(self.toml)
        run_sync(init_repo(self.cfg.archives[0]))

    def snapshot(self, img: Path) -> str:
        return run_archive(self.cfg, "offsite", opener=file_opener({"vol1": img})).snapshot[:8]

    def cdp(self, verb: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return run_cdp("archive", verb, "-c", self.toml, *args)


def _tree(src: Path) -> Path:
    (src / "etc" / "libvirt").mkdir(parents=True)
    (src / "data").mkdir()
    (src / "etc" / "hostname").write_bytes(b"dr-host\n")
    (src / "etc" / "libvirt" / "vm1.xml").write_bytes(b"<domain>vm1</domain>\n" * 50)
    (src / "data" / "blob.bin").write_bytes(BLOB)
    (src / "data" / "small.txt").write_bytes(b"version one of the small file\n" * 100)
    (src / "data" / "gone.txt").write_bytes(b"removed later\n")
    (src / "old").mkdir()
    (src / "old" / "a.txt").write_bytes(b"a\n")
    return src


# -- get: no silent overwrite ------------------------------------------------------------------------


def test_get_refuses_to_overwrite_without_force_and_writes_nothing(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    snap = repo.snapshot(_ext4(tmp_path / "fs.img", _tree(tmp_path / "src")))
    dest = tmp_path / "out"
    dest.mkdir()
    r = repo.cdp("get", snap, "vol1", "/etc", "--to", dest)
    assert r.returncode == 0, r.stderr
    (dest / "etc" / "libvirt" / "vm1.xml").write_bytes(b"edited by the operator\n")
    (dest / "etc" / "hostname").unlink()  # the first file in the walk is missing: no conflict there

    r = repo.cdp("get", snap, "vol1", "/etc", "--to", dest)
    assert r.returncode == 2
    assert f"{dest}/etc/libvirt/vm1.xml exists" in r.stderr and "--force" in r.stderr
    assert "empty destination" in r.stderr
    assert (dest / "etc" / "libvirt" / "vm1.xml").read_bytes() == b"edited by the operator\n"
    assert not (dest / "etc" / "hostname").exists()  # refused before writing anything

    # one file onto an existing file (given by its own name)
    (dest / "h.txt").write_bytes(b"mine\n")
    r = repo.cdp("get", snap, "vol1", "/etc/hostname", "--to", dest / "h.txt")
    assert r.returncode == 2 and f"{dest}/h.txt exists" in r.stderr
    assert (dest / "h.txt").read_bytes() == b"mine\n"

    # an existing empty folder is merged into, not a conflict
    (dest / "data").mkdir()
    r = repo.cdp("get", snap, "vol1", "/data", "--to", dest)
    assert r.returncode == 0, r.stderr
    assert (dest / "data" / "blob.bin").read_bytes() == BLOB

    # --force replaces, and still never writes through a symlink planted at the destination
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not yours\n")
    (dest / "etc" / "hostname").symlink_to(outside)
    r = repo.cdp("get", snap, "vol1", "/etc", "--to", dest, "--force")
    assert r.returncode == 0, r.stderr
    assert (dest / "etc" / "libvirt" / "vm1.xml").read_bytes() == b"<domain>vm1</domain>\n" * 50
    assert not (dest / "etc" / "hostname").is_symlink()
    assert (dest / "etc" / "hostname").read_bytes() == b"dr-host\n"
    assert outside.read_bytes() == b"not yours\n"
    r = repo.cdp("get", snap, "vol1", "/etc/hostname", "--to", dest / "h.txt", "--force")
    assert r.returncode == 0 and (dest / "h.txt").read_bytes() == b"dr-host\n"


# -- ls: like ls -l ----------------------------------------------------------------------------------


def test_ls_shows_modes_owners_sizes_times_and_escapes_names(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "run.sh").write_bytes(b"#!/bin/sh\n")
    (src / "tmp").mkdir()
    (src / ESC_NAME).write_bytes(b"x" * 1234567)
    os.symlink("/etc/hostname", src / "link")
    img = _ext4(tmp_path / "fs.img", src)
    _debugfs(img, "sif run.sh mode 0104750", "sif run.sh uid 1234", "sif run.sh gid 5678",
             "sif tmp mode 041777", f"sif run.sh mtime @{int(WHEN)}")
    repo = Repo(tmp_path)
    snap = repo.snapshot(img)

    r = repo.cdp("ls", snap, "vol1", "/")
    assert r.returncode == 0, r.stderr
    lines = {line.split()[-1] if "->" not in line else "link": line for line in r.stdout.splitlines()}
    when = dt.datetime.fromtimestamp(WHEN).strftime("%Y-%m-%d %H:%M")
    assert re.fullmatch(rf"-rwsr-x--- +1234 +5678 +10 {when} run\.sh", lines["run.sh"])
    assert re.match(r"drwxrwxrwt +\d+ +\d+ +\d+ \d{4}-\d\d-\d\d \d\d:\d\d tmp$", lines["tmp"])
    assert re.match(r"lrwxrwxrwx +\d+ +\d+ +13 .* link -> /etc/hostname$", lines["link"])
    assert "\x1b" not in r.stdout and "\\x1b[31mred\\x1b[0m\\n" in r.stdout  # one line, escaped
    esc = next(line for line in r.stdout.splitlines() if "red" in line)
    assert esc.startswith("-rw-r--r--") and " 1234567 " in esc
    assert len(r.stdout.splitlines()) == 5  # lost+found too

    r = repo.cdp("ls", snap, "vol1", "/", "--human")
    assert r.returncode == 0 and "1.2 MiB" in r.stdout

    r = repo.cdp("ls", snap, "vol1", "/", "--json")
    entries = {e["name"]: e for e in json.loads(r.stdout)["entries"]}
    assert entries["run.sh"] == {"name": "run.sh", "type": "file", "size": 10, "mode": "0o4750",
                                 "mtime": WHEN, "uid": 1234, "gid": 5678}
    assert entries["link"]["target"] == "/etc/hostname" and entries[ESC_NAME]["size"] == 1234567


# -- diff ---------------------------------------------------------------------------------------------


def _blocks(img: Path, path: str) -> list[int]:
    out = _debugfs(img, f"blocks {path}")
    return [int(b) for b in out.split("\n", 1)[1].split()]


def test_diff_names_added_removed_and_modified_comparing_chunk_ids_first(tmp_path: Path) -> None:
    img = _ext4(tmp_path / "fs.img", _tree(tmp_path / "src"))
    repo = Repo(tmp_path)
    first = repo.snapshot(img)

    # the guest changes its files: in place (same blocks), chmod, chown, touch, add, remove, resize
    block = _blocks(img, "/data/small.txt")[0]
    with open(img, "r+b") as fh:
        os.pwrite(fh.fileno(), b"VERSION TWO", block * 4096)  # ext4 here: 4 KiB blocks
    new = tmp_path / "new.txt"
    new.write_bytes(b"a new file, a different size\n")
    _debugfs(img, "sif /etc/libvirt/vm1.xml mode 0100600", "rm /data/gone.txt",
             "rm /etc/hostname", f"write {new} /etc/hostname", "sif /etc/hostname uid 42",
             f"sif /etc/hostname mtime @{int(WHEN)}", "mkdir /newdir", f"write {new} /newdir/f.txt",
             f"sif /data/blob.bin mtime @{int(WHEN)}", "rm /old/a.txt", "rmdir /old")
    second = repo.snapshot(img)

    r = repo.cdp("diff", first, second, "vol1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:-1] == [
        "M  /data/blob.bin  (mtime)",
        "-  /data/gone.txt",
        "M  /data/small.txt  (content)",
        "M  /etc/hostname  (size, content, owner, mtime)",
        "M  /etc/libvirt/vm1.xml  (mode)",
        "+  /newdir/",
        "+  /newdir/f.txt",
        "-  /old/",
        "-  /old/a.txt",
    ]
    assert lines[-1] == f"{first} -> {second}: 2 added, 3 removed, 4 modified"

    r = repo.cdp("diff", first, second, "vol1", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    by_path = {c["path"]: c for c in rep["changes"]}
    assert by_path["/etc/libvirt/vm1.xml"]["before"]["mode"] == "0o644"
    assert by_path["/etc/libvirt/vm1.xml"]["after"]["mode"] == "0o600"
    assert by_path["/data/gone.txt"]["after"] is None and by_path["/newdir/f.txt"]["before"] is None
    # the 3 MiB blob did not move and most of its chunks kept their ids: those parts are settled
    # without reading; only chunks whose ids changed (small.txt's, maybe shared with the blob's
    # tail) are read, so far less than both blobs
    assert rep["bytes_by_chunk_ids"] >= 2 * MiB and rep["bytes_read"] < 2 * len(BLOB)
    assert rep["incomplete"] == []

    # one folder only, and the same snapshot against itself: nothing read, nothing changed
    r = repo.cdp("diff", first, second, "vol1", "/etc", "--json")
    assert {c["path"] for c in json.loads(r.stdout)["changes"]} == {"/etc/hostname", "/etc/libvirt/vm1.xml"}
    r = repo.cdp("diff", first, first, "vol1", "--json")
    rep = json.loads(r.stdout)
    assert r.returncode == 0 and rep["changes"] == [] and rep["bytes_read"] == 0
    assert rep["files_compared"] == rep["by_chunk_ids"] >= 5

    # a path in only one snapshot is wholly added; in neither, or a wrong volume: usage errors
    r = repo.cdp("diff", first, second, "vol1", "/newdir")
    assert r.returncode == 0 and r.stdout.splitlines()[:2] == ["+  /newdir/", "+  /newdir/f.txt"]
    r = repo.cdp("diff", first, second, "vol1", "/nope")
    assert r.returncode == 2 and "in neither snapshot" in r.stderr
    r = repo.cdp("diff", first, second, "vol9")
    assert r.returncode == 2 and "no volume" in r.stderr


def test_diff_reads_files_whose_data_moved(tmp_path: Path) -> None:
    """Same bytes at other blocks (a file copied and renamed over): equal, found by reading."""
    img = _ext4(tmp_path / "fs.img", _tree(tmp_path / "src"))
    repo = Repo(tmp_path)
    first = repo.snapshot(img)
    copy = tmp_path / "blob.copy"
    copy.write_bytes(BLOB)
    before = _blocks(img, "/data/blob.bin")
    _debugfs(img, f"write {copy} /data/blob.new", "rm /data/blob.bin", "ln /data/blob.new /data/blob.bin",
             "unlink /data/blob.new", f"sif /data/blob.bin mtime @{int(WHEN)}")
    assert _blocks(img, "/data/blob.bin") != before
    second = repo.snapshot(img)
    r = repo.cdp("diff", first, second, "vol1", "/data", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert [(c["path"], c["changes"]) for c in rep["changes"]] == [("/data/blob.bin", ["mtime"])]
    assert rep["bytes_read"] >= 2 * len(BLOB)


# -- extents: what the chunk-id comparison relies on ---------------------------------------------------


def _by_extents(fs: object, node: object, image: Path) -> bytes:
    """A file's bytes gathered from the image at its extents (holes as zeros)."""
    runs = node.extents()  # type: ignore[attr-defined]
    assert runs is not None
    out = bytearray()
    with open(image, "rb") as fh:
        for off, n in runs:
            out += bytes(n) if off is None else os.pread(fh.fileno(), n, fs.offset + off)  # type: ignore
    return bytes(out)


def _fat(img: Path, bits: int, files: dict[str, bytes]) -> Path:
    mkfs, mcopy = _tool("mkfs.vfat"), _tool("mcopy")
    with open(img, "wb") as fh:
        fh.truncate(40 * MiB)
    subprocess.run([mkfs, "-F", str(bits), str(img)], check=True, capture_output=True)
    for i, (name, data) in enumerate(files.items()):
        src = img.parent / f"fat-src{i}"
        src.write_bytes(data)
        subprocess.run([mcopy, "-i", str(img), str(src), f"::/{name}"], check=True)
    return img


@pytest.mark.parametrize("kind", ["ext4", "ext4-gpt", "fat16", "fat32"])
def test_extents_locate_every_byte_of_each_file(tmp_path: Path, kind: str) -> None:
    from archive_fixtures import ext4_image

    from cdp.archive.files import open_fs

    files = {"blob.bin": BLOB, "small.txt": b"small\n" * 7, "empty": b""}
    if kind == "ext4":
        src = tmp_path / "src"
        src.mkdir()
        for name, data in files.items():
            (src / name).write_bytes(data)
        with open(src / "sparse.bin", "wb") as fh:  # a hole, then data: mkfs -d keeps the hole
            fh.truncate(MiB)
            fh.seek(MiB)
            fh.write(b"after the hole\n" * 300)
        files["sparse.bin"] = bytes(MiB) + b"after the hole\n" * 300
        img = _ext4(tmp_path / "fs.img", src)
    elif kind == "ext4-gpt":
        img = ext4_image(tmp_path / "fs.img", files, 24 * MiB, partitioned="gpt")
    else:
        img = _fat(tmp_path / "fs.img", int(kind[3:]), files)
    with open(img, "rb") as fh:
        fs, _ = open_fs(fh)
        assert fs.offset == (MiB if kind == "ext4-gpt" else 0)
        for name, data in files.items():
            node = fs.get(f"/{name}")
            assert node.size == len(data)
            assert _by_extents(fs, node, img) == data, name
        if kind == "ext4":
            assert any(off is None for off, _ in fs.get("/sparse.bin").extents() or [])
