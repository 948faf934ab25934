"""The NBD server against libnbd's tools (nbdinfo, nbdcopy; Debian package libnbd-bin).

libnbd negotiates structured replies and base:allocation whenever a server
offers them, so these tests exercise OFFSET_DATA/OFFSET_HOLE reads and
BLOCK_STATUS with a client we did not write. Holes are checked against the
image file itself (lseek SEEK_DATA/SEEK_HOLE) and against what the test wrote.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import scaled

from tests.integration.test_nbd_qemu import Running, _serve, data_ranges

MiB = 1024 * 1024
SIZE = 16 * MiB
# (offset, length) of the data regions the image gets; everything else stays a hole.
DATA = [(1 * MiB, MiB), (5 * MiB, 64 * 1024), (9 * MiB + 512 * 1024, 3 * MiB)]


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not on PATH (apt-get install libnbd-bin)")
    return path


def run(*args: str | Path) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=scaled(60))
    assert proc.returncode == 0, f"{args[0]} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def file_extents(path: Path) -> list[tuple[int, int, bool]]:
    """(offset, length, is_data) runs covering the whole file, from lseek (data_ranges)."""
    out: list[tuple[int, int, bool]] = []
    pos = 0
    for start, length in data_ranges(path):
        if start > pos:
            out.append((pos, start - pos, False))
        out.append((start, length, True))
        pos = start + length
    size = path.stat().st_size
    if pos < size:
        out.append((pos, size - pos, False))
    return out


@pytest.fixture
def sparse_image(tmp_path: Path) -> Path:
    path = tmp_path / "sparse.raw"
    rng = random.Random(7)
    with open(path, "wb") as fh:
        fh.truncate(SIZE)
        for offset, length in DATA:
            os.pwrite(fh.fileno(), rng.randbytes(length), offset)
        os.fsync(fh.fileno())
    return path


@pytest.fixture
def served(sparse_image: Path) -> Iterator[Running]:
    yield from _serve(sparse_image, "disk", None)


def info(url: str, *flags: str) -> Any:
    return json.loads(run(need("nbdinfo"), "--json", *flags, url))


def test_nbdinfo_shows_the_export(served: Running) -> None:
    doc = info(served.url)
    assert doc["protocol"] == "newstyle-fixed"
    assert doc["structured"] is True
    [export] = doc["exports"]
    assert export["export-name"] == "disk"
    assert export["export-size"] == SIZE
    assert "base:allocation" in export["contexts"]
    assert export["can_df"] and export["can_flush"] and export["can_fua"] and export["can_zero"]
    assert not export["is_read_only"]


def test_nbdinfo_list(served: Running) -> None:
    doc = info(served.url, "--list")
    assert [(e["export-name"], e["export-size"]) for e in doc["exports"]] == [("disk", SIZE)]


def test_nbdinfo_map_matches_the_file_holes(served: Running) -> None:
    extents = info(served.url, "--map")
    # Contiguous, covering the whole export.
    assert extents[0]["offset"] == 0
    for a, b in itertools.pairwise(extents):
        assert a["offset"] + a["length"] == b["offset"]
    assert extents[-1]["offset"] + extents[-1]["length"] == SIZE
    # Merge equal neighbours, then compare with lseek on the file itself.
    merged: list[tuple[int, int, bool]] = []
    for e in extents:
        assert e["type"] in (0, 3), e  # data, or hole+zero
        is_data = e["type"] == 0
        if merged and merged[-1][2] == is_data:
            off, length, _ = merged[-1]
            merged[-1] = (off, length + e["length"], is_data)
        else:
            merged.append((e["offset"], e["length"], is_data))
    assert merged == file_extents(served.image)
    # And with what the test wrote: every written byte is data, the first MiB is a hole.
    for offset, length in DATA:
        covering = [m for m in merged if m[0] <= offset and offset + length <= m[0] + m[1]]
        assert covering and covering[0][2], (offset, length, merged)
    assert merged[0] == (0, MiB, False)


def test_nbdinfo_map_totals_match_the_file(served: Running) -> None:
    # --totals walks the whole map: data bytes must equal what lseek reports.
    totals = info(served.url, "--map", "--totals")
    data_bytes = sum(t["size"] for t in totals if t["type"] == 0)
    assert data_bytes == sum(length for _, length, is_data in file_extents(served.image) if is_data)


def test_nbdcopy_out_and_back(served: Running, tmp_path: Path) -> None:
    nbdcopy = need("nbdcopy")
    out = tmp_path / "copy.raw"
    run(nbdcopy, served.url, out)
    assert out.stat().st_size == SIZE
    assert out.read_bytes() == served.image.read_bytes()
    # Now write different content into the export and compare byte for byte.
    src = tmp_path / "new.raw"
    rng = random.Random(11)
    with open(src, "wb") as fh:
        fh.truncate(SIZE)
        os.pwrite(fh.fileno(), rng.randbytes(3 * MiB), 2 * MiB)
        os.pwrite(fh.fileno(), rng.randbytes(4096), SIZE - 4096)
    run(nbdcopy, "--flush", src, served.url)
    assert served.image.read_bytes() == src.read_bytes()
    assert served.flushes, "nbdcopy --flush did not reach the tracker"
    # Every byte that changed was reported to the tracker.
    changed = bytearray(SIZE)
    for offset, length in served.dirty():
        changed[offset:offset + length] = b"\x01" * length
    before = out.read_bytes()
    after = served.image.read_bytes()
    for start in range(0, SIZE, 4096):
        if before[start:start + 4096] != after[start:start + 4096]:
            assert changed[start:start + 4096] == b"\x01" * 4096, f"change at {start} not tracked"
    # And a copy of the copy reads back the same through the server.
    again = tmp_path / "again.raw"
    run(nbdcopy, served.url, again)
    assert again.read_bytes() == src.read_bytes()
