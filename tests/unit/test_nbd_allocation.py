"""base:allocation extents and hole detection of the NBD server, on a real sparse temp file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdp.nbd.image import allocation_extents, is_hole
from cdp.nbd.spec import STATE_HOLE, STATE_ZERO

MiB = 1 << 20
HOLE = STATE_HOLE | STATE_ZERO


@pytest.fixture
def sparse(tmp_path: Path) -> Iterator[int]:
    """A 8 MiB file with data in [1 MiB, 2 MiB) and [5 MiB, 5 MiB + 64 KiB); an open fd."""
    path = tmp_path / "sparse.raw"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 8 * MiB)
    os.pwrite(fd, b"\x01" * MiB, MiB)
    os.pwrite(fd, b"\x02" * 65536, 5 * MiB)
    if os.lseek(fd, 0, os.SEEK_DATA) != MiB:
        os.close(fd)
        pytest.skip("this file system does not report holes (SEEK_DATA)")
    yield fd
    os.close(fd)


def test_whole_file(sparse: int) -> None:
    assert allocation_extents(sparse, 0, 8 * MiB) == [
        (MiB, HOLE), (MiB, 0), (3 * MiB, HOLE), (65536, 0), (3 * MiB - 65536, HOLE)]


def test_range_cut_inside_extents(sparse: int) -> None:
    # Starts inside the first hole, ends inside the second data run.
    assert allocation_extents(sparse, MiB // 2, 5 * MiB - MiB // 2 + 4096) == [
        (MiB // 2, HOLE), (MiB, 0), (3 * MiB, HOLE), (4096, 0)]
    assert allocation_extents(sparse, MiB + 4096, 4096) == [(4096, 0)]
    assert allocation_extents(sparse, 7 * MiB, MiB) == [(MiB, HOLE)]  # the tail: no data after it


def test_is_hole(sparse: int) -> None:
    assert is_hole(sparse, 0, MiB)
    assert not is_hole(sparse, 0, MiB + 1)
    assert not is_hole(sparse, 5 * MiB + 65535, 1)
    assert is_hole(sparse, 5 * MiB + 65536, 4096)
    assert is_hole(sparse, 6 * MiB, 2 * MiB)
