"""A seeding replica places data in the image at receipt; the WAL keeps no second copy.

What a crash or an abort leaves is zeroed again (the hash map still says zero there), a sealed
epoch replays from the image, and once the replica is whole (seeded) data goes through the WAL.
"""

from __future__ import annotations

import random
from pathlib import Path

from cdp.blocks import Geometry, pack_u64
from cdp.codec import block_hash, compress
from cdp.replica import EpochWriter, Replica

BS = 4096
GEO = Geometry(64 * BS, BS)


def add(w: EpochWriter, idx: list[int], blocks: list[bytes]) -> None:
    data = b"".join(blocks)
    w.add_data(pack_u64(idx), b"".join(block_hash(b) for b in blocks), len(data), compress(data))


def image(root: Path) -> bytes:
    return (root / "v" / "image").read_bytes()


def agree(r: Replica) -> None:
    assert r.rehash(0, GEO.blocks) == r.stored_hashes(0, GEO.blocks), "image and hash map differ"


def test_seed_places_at_receipt_and_a_crash_before_commit_is_zeroed(tmp_path: Path) -> None:
    rng = random.Random(1)
    r = Replica.open(tmp_path, "v", GEO, create=True)
    assert r.state.seeding
    blocks = [rng.randbytes(BS) for _ in range(8)]
    w = r.begin(1, 1.0)
    add(w, list(range(8)), blocks)
    assert image(tmp_path)[:8 * BS] == b"".join(blocks)  # in the image before any commit
    r.close()  # a crash: no commit, no abort
    r = Replica.open(tmp_path, "v")
    assert r.state.epoch == 0 and image(tmp_path) == bytes(GEO.size)
    agree(r)
    r.close()


def test_sealed_seed_epoch_replays_from_the_image(tmp_path: Path) -> None:
    rng = random.Random(2)
    r = Replica.open(tmp_path, "v", GEO, create=True)
    blocks = [rng.randbytes(BS) for _ in range(5)]
    w = r.begin(1, 1.0)
    add(w, [3, 4, 5, 9, 10], blocks)
    w.seal(5)
    assert (tmp_path / "v" / "wal.1").stat().st_size < BS  # no copy of the 5 blocks in the WAL
    r.close()  # a crash after the commit was durable, before the apply
    r = Replica.open(tmp_path, "v")
    assert r.state.epoch == 1
    assert [r.read_block(i) for i in (3, 4, 5, 9, 10)] == blocks
    agree(r)
    r.close()


def test_abort_zeroes_what_was_placed_and_repeats_copy(tmp_path: Path) -> None:
    rng = random.Random(3)
    r = Replica.open(tmp_path, "v", GEO, create=True)
    a = r.begin(1, 1.0)
    add(a, [0, 1], [rng.randbytes(BS), rng.randbytes(BS)])
    a.abort()
    assert image(tmp_path) == bytes(GEO.size)
    agree(r)
    same = rng.randbytes(BS)
    w = r.begin(1, 2.0)
    add(w, [0], [same])
    w.commit(1)
    w = r.begin(2, 3.0)  # a later epoch refers to block 0's content four times
    h = block_hash(same)
    missing = w.add_refs(pack_u64([20, 21, 22, 23]), h * 4, r, pack_u64([0, 0, 0, 0]))
    assert missing == []
    w.commit(4)
    assert all(r.read_block(i) == same for i in (0, 20, 21, 22, 23))
    assert w.counters["dedup"] == 4 * BS
    agree(r)
    r.close()


def test_whole_replica_goes_through_the_wal(tmp_path: Path) -> None:
    rng = random.Random(4)
    r = Replica.open(tmp_path, "v", GEO, create=True)
    w = r.begin(1, 1.0)
    add(w, [0], [rng.randbytes(BS)])
    w.commit(1)
    assert not r.seeded(0)  # not the applied epoch: nothing changes
    assert r.seeded(1) and not r.state.seeding
    r.close()
    r = Replica.open(tmp_path, "v")
    assert not r.state.seeding  # for good
    before = image(tmp_path)
    w = r.begin(2, 2.0)
    add(w, [7, 8], [rng.randbytes(BS), rng.randbytes(BS)])
    assert image(tmp_path) == before  # untouched until the epoch commits
    w.commit(2)
    assert (tmp_path / "v" / "wal.0").stat().st_size > 2 * BS  # the data went through the WAL
    agree(r)
    r.close()
