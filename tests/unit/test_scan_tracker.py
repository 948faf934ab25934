"""The scan tracker hashes through a shared mapping of the volume: what it reports must still be
self-consistent while the file is written, and it must report exactly the changed blocks."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

from cdp.blocks import Geometry
from cdp.codec import HASH_LEN, block_hash, zero_hash
from cdp.tracker.scan import hash_volume, scan, scan_spans, zero_map

BS = 4096


def _image(path: Path, blocks: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(blocks * BS))
    data[7 * BS:9 * BS] = bytes(2 * BS)  # two zero blocks inside the data
    path.write_bytes(data)
    return bytes(data)


def test_reports_exactly_the_changed_blocks_with_their_content(tmp_path: Path) -> None:
    img = tmp_path / "v.img"
    data = _image(img, 300)
    with open(img, "r+b") as f:  # a tail that is not a whole block
        f.seek(0, os.SEEK_END)
        f.write(b"t" * 100)
    geo = Geometry(300 * BS + 100, BS)
    smap = hash_volume(img, geo)
    changed = {3, 150, 299, 300}
    with open(img, "r+b") as f:
        for b in changed:
            f.seek(b * BS)
            f.write(b"\x01" * 10)
    fd = os.open(img, os.O_RDONLY)
    try:
        seen = {}
        for i, h, content in scan(fd, geo, smap, chunk=64 * 1024):
            assert content is not None and block_hash(content) == h
            seen[i] = bytes(content)
        assert set(seen) == changed
        assert seen[150][:10] == b"\x01" * 10 and seen[150][10:] == data[150 * BS + 10:151 * BS]
        assert len(seen[300]) == 100
        assert [i for i, _, _ in scan_spans(fd, geo, smap, [(140, 20)])] == [150]
        zeros = [i for i, h, c in scan(fd, geo, zero_map(geo)) if c is None]
        assert zeros == [] and {7, 8}.isdisjoint(i for i, _, _ in scan(fd, geo, zero_map(geo)))
    finally:
        os.close(fd)


def test_a_block_written_while_it_is_scanned_is_reported_consistently(tmp_path: Path) -> None:
    """A writer rewrites blocks as fast as it can during scans: every reported (hash, content)
    pair must agree (the receiver checks it), and an all-zero verdict must mean zero content.
    Hashing a shared mapping and handing out a view of it would report content that changed
    after it was hashed."""
    img = tmp_path / "v.img"
    _image(img, 512)
    geo = Geometry(512 * BS, BS)
    stop = threading.Event()

    def writer() -> None:
        rng = random.Random(2)
        fd = os.open(img, os.O_WRONLY)
        try:
            while not stop.is_set():
                b = rng.randrange(512)
                os.pwrite(fd, rng.choice([bytes(BS), rng.randbytes(BS)]), b * BS)
        finally:
            os.close(fd)

    t = threading.Thread(target=writer)
    t.start()
    reported = 0
    try:
        fd = os.open(img, os.O_RDONLY)
        try:
            for _ in range(60):
                for _i, h, content in scan(fd, geo, zero_map(geo), chunk=64 * 1024):
                    if content is None:
                        assert h == zero_hash(BS)
                    else:
                        assert block_hash(content) == h
                        reported += 1
        finally:
            os.close(fd)
    finally:
        stop.set()
        t.join()
    assert reported > 0


def test_hash_volume_matches_block_hashes(tmp_path: Path) -> None:
    img = tmp_path / "v.img"
    data = _image(img, 64)
    geo = Geometry(len(data), BS)
    smap = hash_volume(img, geo)
    for b in range(64):
        assert bytes(smap[b * HASH_LEN:(b + 1) * HASH_LEN]) == block_hash(data[b * BS:(b + 1) * BS])
