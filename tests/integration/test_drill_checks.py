"""Drill checks on real images: partition tables parsed here, e2fsck at an offset, user checks."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from cdp.drills.checks import filesystems, fsck_checks, partitions, user_check
from cdp.drills.clone import Clone

MiB = 1024 * 1024
pytestmark = pytest.mark.skipif(shutil.which("mkfs.ext4") is None or shutil.which("e2fsck")
                                is None, reason="needs e2fsprogs")


def mbr(path: Path, parts: list[tuple[int, int, int]]) -> None:
    """Write an MBR with (type, first sector, sectors) entries."""
    table = bytearray(512)
    for i, (ptype, start, count) in enumerate(parts):
        struct.pack_into("<B3xB3xII", table, 446 + 16 * i, 0, ptype, start, count)
    table[510:512] = b"\x55\xaa"
    with open(path, "r+b") as fh:
        fh.write(table)


def gpt(path: Path, parts: list[tuple[int, int]]) -> None:
    """A protective MBR and a GPT header + entries (first, last LBA); checksums not needed."""
    mbr(path, [(0xEE, 1, 0xFFFFFFFF)])
    head = bytearray(512)
    head[:8] = b"EFI PART"
    struct.pack_into("<QII", head, 72, 2, 128, 128)
    entries = bytearray(128 * 128)
    for i, (first, last) in enumerate(parts):
        entries[i * 128:i * 128 + 16] = bytes(range(1, 17))
        struct.pack_into("<QQ", entries, i * 128 + 32, first, last)
    with open(path, "r+b") as fh:
        fh.seek(512)
        fh.write(head)
        fh.seek(1024)
        fh.write(entries)


def mkfs_at(path: Path, offset: int, size: int) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", f"offset={offset}", str(path),
                    str(size // 1024)], check=True, capture_output=True)


def clone_of(path: Path) -> Clone:
    return Clone(path.parent, path, path, "raw")


def test_ext4_in_an_mbr_partition_is_found_and_checked(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    with open(img, "wb") as fh:
        fh.truncate(24 * MiB)
    mkfs_at(img, MiB, 16 * MiB)
    mbr(img, [(0x83, 2048, 16 * 2048), (0x05, 40000, 100)])  # an extended entry is skipped
    assert [(p.name, p.offset) for p in partitions(img)] == [("p1", MiB)]
    assert [(p.name, p.offset) for p in filesystems(img)] == [("p1", MiB)]
    (res,) = fsck_checks(clone_of(img), 60)
    assert res.result == "pass", res.output
    # damage the superblock inside the partition: the check fails
    with open(img, "r+b") as fh:
        fh.seek(MiB + 1024 + 4)
        fh.write(struct.pack("<I", 9999999))
    (res,) = fsck_checks(clone_of(img), 60)
    assert res.result == "fail" and "exit status" in res.output


def test_ext4_in_a_gpt_partition_and_on_a_whole_disk(tmp_path: Path) -> None:
    img = tmp_path / "gpt.raw"
    with open(img, "wb") as fh:
        fh.truncate(20 * MiB)
    mkfs_at(img, 2 * MiB, 8 * MiB)
    gpt(img, [(4096, 4096 + 8 * 2048 - 1)])
    assert [(p.name, p.offset) for p in filesystems(img)] == [("p1", 2 * MiB)]
    assert all(r.result == "pass" for r in fsck_checks(clone_of(img), 60))
    whole = tmp_path / "whole.raw"
    with open(whole, "wb") as fh:
        fh.truncate(8 * MiB)
    mkfs_at(whole, 0, 8 * MiB)
    assert [p.name for p in filesystems(whole)] == ["disk"]
    blank = tmp_path / "blank.raw"
    with open(blank, "wb") as fh:
        fh.truncate(MiB)
    (res,) = fsck_checks(clone_of(blank), 60)
    assert res.result == "skip"


def test_user_check_gets_the_path_and_environment(tmp_path: Path) -> None:
    img = tmp_path / "x.raw"
    img.write_bytes(b"abc")
    ok = user_check('test "$CDP_CLONE" = {} && test -s {}', clone_of(img),
                    {"CDP_CLONE": str(img)}, 30)
    assert ok.result == "pass", ok.output
    bad = user_check("echo oops >&2; false", clone_of(img), {}, 30)
    assert bad.result == "fail" and "oops" in bad.output
