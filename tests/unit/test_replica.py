"""Replica store: epochs apply atomically, the WAL recovers or discards, bad input changes nothing."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

import cdp.replica.wal as wal
from cdp.blocks import Geometry, pack_u64
from cdp.codec import block_hash, compress, zero_hash
from cdp.errors import RemoteProtocolError, ReplicaError, VolumeError
from cdp.replica import Replica

BS = 65536
GEO = Geometry(16 * BS + 1000, BS)  # a short last block


def blocks_for(rng: random.Random, idx: list[int]) -> list[bytes]:
    return [rng.randbytes(GEO.length(i)) for i in idx]


def add(w, idx: list[int], blocks: list[bytes]) -> None:
    data = b"".join(blocks)
    w.add_data(pack_u64(idx), b"".join(block_hash(b) for b in blocks), len(data), compress(data))


def image(root: Path) -> bytes:
    return (root / "v" / "image").read_bytes()


@pytest.fixture
def rep(tmp_path: Path):
    r = Replica.open(tmp_path, "v", GEO, create=True)
    yield r
    r.close()


def test_new_replica_is_sparse_zero_with_zero_hashes(rep: Replica, tmp_path: Path) -> None:
    assert image(tmp_path) == bytes(GEO.size)
    assert rep.state.epoch == 0
    hashes = rep.stored_hashes(0, GEO.blocks)
    assert hashes[:16] == zero_hash(BS)
    assert hashes[-16:] == zero_hash(GEO.length(GEO.blocks - 1))
    assert rep.rehash(0, GEO.blocks) == hashes


def test_epoch_applies_data_zero_and_refs(rep: Replica, tmp_path: Path) -> None:
    rng = random.Random(1)
    b = blocks_for(rng, [0, 1, 16])
    w = rep.begin(1, 100.0)
    add(w, [0, 1, 16], b)
    # block 5 repeats block 1 of this same epoch; block 6 references block 0 too
    assert w.add_refs(pack_u64([5, 6]), block_hash(b[1]) + block_hash(b[0]), rep,
                      pack_u64([1, 0])) == []
    st = w.commit(w.blocks)
    assert st.epoch == 1 and st.epoch_time == 100.0
    img = image(tmp_path)
    assert img[0:BS] == b[0] and img[5 * BS:6 * BS] == b[1] and img[6 * BS:7 * BS] == b[0]
    assert img[16 * BS:] == b[2]
    assert st.counters["dedup"] == 2 * BS and st.counters["data"] == 2 * BS + 1000
    # now zero block 1 in epoch 2
    w = rep.begin(2, 200.0)
    w.add_zero(pack_u64([1, 1]))
    w.commit(1)
    assert image(tmp_path)[BS:2 * BS] == bytes(BS)
    assert rep.rehash(0, GEO.blocks) == rep.stored_hashes(0, GEO.blocks)


def test_wrong_reference_is_reported_missing_not_applied(rep: Replica, tmp_path: Path) -> None:
    rng = random.Random(2)
    w = rep.begin(1, 1.0)
    add(w, [0], blocks_for(rng, [0]))
    w.commit(1)
    before = image(tmp_path)
    w = rep.begin(2, 2.0)
    # claims block 3 should get content hashing to X, found at block 0: it does not match
    missing = w.add_refs(pack_u64([3]), block_hash(b"something else"), rep, pack_u64([0]))
    assert missing == [3]
    # out-of-range source block is missing too, not an error
    assert w.add_refs(pack_u64([4]), block_hash(b"x"), rep, pack_u64([10**9])) == [4]
    w.abort()
    assert image(tmp_path) == before and rep.state.epoch == 1


def test_bad_data_changes_nothing(rep: Replica, tmp_path: Path) -> None:
    rng = random.Random(3)
    good = blocks_for(rng, [0])
    w = rep.begin(1, 1.0)
    with pytest.raises(VolumeError) as e:  # past the end
        add(w, [GEO.blocks], [rng.randbytes(BS)])
    assert e.value.wire_code == "bounds"
    with pytest.raises(VolumeError) as e:  # hash does not match content
        data = good[0]
        w.add_data(pack_u64([0]), block_hash(b"other"), len(data), compress(data))
    assert e.value.wire_code == "integrity"
    with pytest.raises(RemoteProtocolError):  # raw_len lies
        w.add_data(pack_u64([0]), block_hash(good[0]), BS - 1, compress(good[0]))
    with pytest.raises(VolumeError):  # zero run past the end
        w.add_zero(pack_u64([GEO.blocks - 1, 2]))
    w.abort()
    assert image(tmp_path) == bytes(GEO.size) and rep.state.epoch == 0


def test_commit_count_mismatch_is_refused(rep: Replica, tmp_path: Path) -> None:
    w = rep.begin(1, 1.0)
    add(w, [2], blocks_for(random.Random(4), [2]))
    with pytest.raises(RemoteProtocolError):
        w.commit(5)
    assert image(tmp_path) == bytes(GEO.size) and rep.state.epoch == 0


def test_geometry_mismatch_and_lock(tmp_path: Path, rep: Replica) -> None:
    with pytest.raises(ReplicaError, match="in use"):
        Replica.open(tmp_path, "v", GEO)
    rep.close()
    with pytest.raises(VolumeError) as e:
        Replica.open(tmp_path, "v", Geometry(GEO.size + BS, BS))
    assert e.value.wire_code == "geometry"
    with pytest.raises(ReplicaError, match="no replica"):
        Replica.open(tmp_path, "nope", GEO)


def _sealed_epoch(tmp_path: Path, rng: random.Random) -> tuple[bytes, list[int], list[bytes]]:
    """A replica with epoch 1 applied and epoch 2 sealed in the WAL but not applied."""
    r = Replica.open(tmp_path, "v", GEO, create=True)
    w = r.begin(1, 1.0)
    add(w, [0, 1], blocks_for(rng, [0, 1]))
    w.commit(2)
    before = image(tmp_path)
    idx = [1, 2, 16]
    blocks = blocks_for(rng, idx)
    w = r.begin(2, 2.0)
    add(w, idx, blocks)
    w.seal(3)
    r.close()  # "crash" between seal and apply
    return before, idx, blocks


def test_sealed_epoch_is_replayed_on_open(tmp_path: Path) -> None:
    before, idx, blocks = _sealed_epoch(tmp_path, random.Random(5))
    assert image(tmp_path) == before
    r = Replica.open(tmp_path, "v", GEO)
    assert r.state.epoch == 2
    img = image(tmp_path)
    for i, b in zip(idx, blocks, strict=True):
        assert img[i * BS:i * BS + len(b)] == b
    assert r.rehash(0, GEO.blocks) == r.stored_hashes(0, GEO.blocks)
    r.close()


@pytest.mark.parametrize("cut", [1, 17, 100, 1000, -1])
def test_torn_wal_is_discarded(tmp_path: Path, cut: int) -> None:
    before, _, _ = _sealed_epoch(tmp_path, random.Random(6))
    log = tmp_path / "v" / "wal.0"
    size = log.stat().st_size
    os.truncate(log, size - cut if cut > 0 else size // 2)
    r = Replica.open(tmp_path, "v", GEO)
    assert r.state.epoch == 1 and image(tmp_path) == before
    assert wal.committed_epoch(log) is None  # the log holds no epoch any more
    r.close()


def test_corrupt_record_is_discarded(tmp_path: Path) -> None:
    before, _, _ = _sealed_epoch(tmp_path, random.Random(7))
    log = tmp_path / "v" / "wal.0"
    data = bytearray(log.read_bytes())
    data[len(data) // 2] ^= 0x40
    log.write_bytes(bytes(data))
    assert wal.committed_epoch(log) is None
    r = Replica.open(tmp_path, "v", GEO)
    assert r.state.epoch == 1 and image(tmp_path) == before
    r.close()


def test_partly_applied_epoch_is_finished_by_replay(tmp_path: Path) -> None:
    """Crash in the middle of apply: the image holds a mix until reopen replays the WAL."""
    rng = random.Random(8)
    _, idx, blocks = _sealed_epoch(tmp_path, rng)
    fd = os.open(tmp_path / "v" / "image", os.O_WRONLY)
    os.pwrite(fd, blocks[0], idx[0] * BS)  # only the first block reached the image
    os.close(fd)
    r = Replica.open(tmp_path, "v", GEO)
    img = image(tmp_path)
    assert r.state.epoch == 2
    for i, b in zip(idx, blocks, strict=True):
        assert img[i * BS:i * BS + len(b)] == b
    r.close()


def test_two_sealed_epochs_replay_in_order(tmp_path: Path) -> None:
    rng = random.Random(9)
    r = Replica.open(tmp_path, "v", GEO, create=True)
    b1, b2 = blocks_for(rng, [3]), blocks_for(rng, [3])
    w1 = r.begin(1, 1.0)
    add(w1, [3], b1)
    w1.seal(1)
    w2 = r.begin(2, 2.0)  # received while epoch 1 is still unapplied
    add(w2, [3], b2)
    w2.seal(1)
    r.close()
    r = Replica.open(tmp_path, "v", GEO)
    assert r.state.epoch == 2
    assert image(tmp_path)[3 * BS:4 * BS] == b2[0]
    r.close()


def test_epoch_out_of_order_is_refused(rep: Replica) -> None:
    with pytest.raises(ReplicaError):
        rep.begin(3, 1.0)


def test_repeat_within_epoch_survives_a_later_overwrite_of_its_source(tmp_path: Path) -> None:
    """COPY records apply in WAL order: the copy sees the source as it was at that point."""
    rng = random.Random(10)
    a, b = rng.randbytes(BS), rng.randbytes(BS)
    r = Replica.open(tmp_path, "v", GEO, create=True)
    w = r.begin(1, 1.0)
    add(w, [1], [a])
    assert w.add_refs(pack_u64([5]), block_hash(a), r, pack_u64([1])) == []
    add(w, [1], [b])  # block 1 changes again later in the same epoch
    # a reference to content no longer at its first home is found where it still is
    assert w.add_refs(pack_u64([7]), block_hash(a), r, pack_u64([1])) == []
    w.seal(w.blocks)
    r.close()  # crash before apply: recovery replays the WAL
    r = Replica.open(tmp_path, "v", GEO)
    img = image(tmp_path)
    assert img[BS:2 * BS] == b and img[5 * BS:6 * BS] == a and img[7 * BS:8 * BS] == a
    assert r.rehash(0, GEO.blocks) == r.stored_hashes(0, GEO.blocks)
    r.close()
