"""Recovery-point journal: undo records, views of earlier points, retention, crash points."""

from __future__ import annotations

import errno
import os
import random
import time
from pathlib import Path

import pytest

import cdp.replica.wal as wal
from cdp.blocks import Geometry, pack_u64
from cdp.codec import block_hash, compress, zero_hash
from cdp.errors import PointError, ReplicaError
from cdp.replica import Replica
from cdp.replica.journal import Retention
from cdp.replica.points import list_points
from cdp.replica.pointview import open_view
from cdp.replica.undo import undo_name

BS = 65536
GEO = Geometry(24 * BS + 1000, BS)  # a short last block
T0 = time.time() - 1000  # epoch e was captured at T0 + e


def image(root: Path) -> bytes:
    return (root / "v" / "image").read_bytes()


def write_epoch(rep: Replica, rng: random.Random, epoch: int, *, apply: bool = True):
    """A random epoch: data blocks, a zero run, an in-epoch repeat; returns the writer."""
    w = rep.begin(epoch, T0 + epoch)
    idx = sorted(rng.sample(range(GEO.blocks), rng.randint(1, 6)))
    blocks = [rng.randbytes(GEO.length(i)) if rng.random() < 0.8 else bytes(GEO.length(i))
              for i in idx]
    data = b"".join(blocks)
    w.add_data(pack_u64(idx), b"".join(block_hash(b) for b in blocks), len(data), compress(data))
    full = [i for i, b in zip(idx, blocks, strict=True) if len(b) == BS]
    if full and rng.random() < 0.5:
        src = full[0]
        dst = rng.choice([i for i in range(GEO.blocks - 1) if i != src])
        h = block_hash(blocks[idx.index(src)])
        assert w.add_refs(pack_u64([dst]), h, rep, pack_u64([src])) == []
    if rng.random() < 0.5:
        start = rng.randrange(GEO.blocks - 3)
        w.add_zero(pack_u64([start, rng.randint(1, 3)]))
    w.seal(w.blocks)
    if apply:
        w.apply()
    return w


@pytest.fixture
def rep(tmp_path: Path):
    r = Replica.open(tmp_path, "v", GEO, create=True)
    yield r
    r.close()


def history_of(rep: Replica, tmp_path: Path, n: int, seed: int = 1) -> dict[int, bytes]:
    rng = random.Random(seed)
    hist = {0: image(tmp_path)}
    for e in range(1, n + 1):
        write_epoch(rep, rng, e)
        hist[e] = image(tmp_path)
    return hist


def test_every_point_reads_as_it_was(rep: Replica, tmp_path: Path) -> None:
    hist = history_of(rep, tmp_path, 12)
    points = list_points(tmp_path / "v")
    # point 0, the empty replica, has no capture time (0): the 24h retention drops it at once
    assert [p.epoch for p in points] == list(range(1, 13))
    assert points[-1].current and points[2].time == T0 + 3
    for e, want in hist.items():
        if e == 0:
            continue
        with open_view(tmp_path, "v", e) as v:
            assert v.epoch == e and v.size == GEO.size and v.block_size == BS
            assert v.read(0, GEO.size) == want, f"point {e}"
            # odd offsets and lengths, and the short last block
            assert v.read(BS - 7, 3 * BS + 11) == want[BS - 7:4 * BS + 4]
            assert v.read(GEO.size - 5, 100) == want[-5:]
            hashes = v.block_hashes()
            for i in range(GEO.blocks):
                blk = want[i * BS:(i + 1) * BS]
                assert hashes[i * 16:(i + 1) * 16] == block_hash(blk), (e, i)
    with open_view(tmp_path, "v") as v:
        assert v.epoch == 12 and v.read(0, GEO.size) == hist[12]


def test_unchanged_and_zero_blocks_cost_nothing(rep: Replica, tmp_path: Path) -> None:
    rng = random.Random(5)
    b, c = rng.randbytes(BS), rng.randbytes(BS)
    w = rep.begin(1, T0 + 1)
    w.add_data(pack_u64([3]), block_hash(b), BS, compress(b))
    w.commit(w.blocks)
    w = rep.begin(2, T0 + 2)
    w.add_zero(pack_u64([10, 4]))  # zeroing zero blocks: nothing to save
    w.add_data(pack_u64([3, 5]), block_hash(b) + block_hash(c), 2 * BS, compress(b + c))
    w.commit(w.blocks)  # block 3 rewritten with the same content: nothing to save
    w = rep.begin(3, T0 + 3)
    w.add_zero(pack_u64([3, 1]))
    w.commit(w.blocks)
    from cdp.replica.undo import UndoFile
    u2 = UndoFile(tmp_path / "v" / "journal" / undo_name(2))
    u3 = UndoFile(tmp_path / "v" / "journal" / undo_name(3))
    assert list(u2.entries) == [5] and u2.entries[5][1] == 0  # was zero: no data saved
    assert list(u3.entries) == [3] and u3.read(u3.entries[3], BS) == b
    u2.close()
    u3.close()
    with open_view(tmp_path, "v", 1) as v:
        assert v.read(3 * BS, 3 * BS) == b + bytes(2 * BS)


def test_retention_by_size_and_age_drops_oldest_only(tmp_path: Path) -> None:
    rep = Replica.open(tmp_path, "v", GEO, create=True)
    hist = history_of(rep, tmp_path, 10, seed=2)
    sizes = {p.epoch: p.size for p in list_points(tmp_path / "v")}
    rep.close()
    # by size: keep the newest points whose undo files fit in 3 files' worth
    budget = sum(sizes[e] for e in (7, 8, 9))
    rep = Replica.open(tmp_path, "v", retention=Retention(None, budget))
    pts = list_points(tmp_path / "v")
    assert [p.epoch for p in pts] == [7, 8, 9, 10]
    assert sum(p.size for p in pts) <= budget
    assert image(tmp_path) == hist[10]
    for p in pts:
        with open_view(tmp_path, "v", p.epoch) as v:
            assert v.read(0, GEO.size) == hist[p.epoch]
    with pytest.raises(PointError, match="not kept"):
        open_view(tmp_path, "v", 6)
    # by age: keep points captured after T0 + 8.5
    rep.journal.retention = Retention(max_age=100.0, max_bytes=None)
    rep.journal.prune(now=T0 + 108.5)
    assert [p.epoch for p in list_points(tmp_path / "v")] == [9, 10]
    assert image(tmp_path) == hist[10]
    rep.close()


def test_a_pinned_point_is_not_dropped(rep: Replica, tmp_path: Path) -> None:
    hist = history_of(rep, tmp_path, 5, seed=3)
    with open_view(tmp_path, "v", 2) as v:
        rep.journal.retention = Retention(None, 1)
        rep.journal.prune()
        assert [p.epoch for p in list_points(tmp_path / "v")] == [2, 3, 4, 5]
        rng = random.Random(9)
        write_epoch(rep, rng, 6)  # applies while the view is open, then prunes
        assert v.read(0, GEO.size) == hist[2]
    rep.journal.prune()
    assert [p.epoch for p in list_points(tmp_path / "v")] == [6]


def test_view_stays_on_its_point_while_epochs_apply(rep: Replica, tmp_path: Path) -> None:
    hist = history_of(rep, tmp_path, 3, seed=4)
    rng = random.Random(10)
    with open_view(tmp_path, "v", 3) as v3, open_view(tmp_path, "v", 1) as v1:
        for e in range(4, 9):
            write_epoch(rep, rng, e)
            assert v3.read(0, GEO.size) == hist[3]
            assert v1.read(0, GEO.size) == hist[1]


def _half_apply(rep: Replica, rng: random.Random, epoch: int, monkeypatch) -> None:
    """Seal an epoch, save its undo record, then fail after the first image write."""
    calls = {"n": 0}
    real = os.pwrite

    def flaky(fd, data, off):
        if fd == rep.image_fd:
            calls["n"] += 1
            if calls["n"] > 1:
                raise OSError(errno.EIO, "simulated crash")
        return real(fd, data, off)

    monkeypatch.setattr(os, "pwrite", flaky)
    try:
        with pytest.raises(ReplicaError):
            write_epoch(rep, rng, epoch)
    finally:
        monkeypatch.setattr(os, "pwrite", real)
    assert (rep.path / "journal" / undo_name(epoch)).exists()


def test_crash_after_undo_during_apply_replays_and_keeps_points(tmp_path: Path,
                                                                monkeypatch) -> None:
    rep = Replica.open(tmp_path, "v", GEO, create=True)
    rep.seeded(0)  # whole: data reaches the image at apply (a seed places it at receipt)
    hist = history_of(rep, tmp_path, 4, seed=6)
    rng = random.Random(60)
    _half_apply(rep, rng, 5, monkeypatch)
    assert rep.state.epoch == 4
    rep.close()
    # a view opened now (before the receiver comes back) sees whole points
    with open_view(tmp_path, "v") as v:
        assert v.epoch == 4 and v.read(0, GEO.size) == hist[4]
    with open_view(tmp_path, "v", 2) as v:
        assert v.read(0, GEO.size) == hist[2]
    # reopening replays epoch 5 from the WAL, reusing the undo record made before the crash
    rep = Replica.open(tmp_path, "v")
    assert rep.state.epoch == 5
    for e in range(1, 5):
        with open_view(tmp_path, "v", e) as v:
            assert v.read(0, GEO.size) == hist[e], e
    rep.close()


def test_crash_with_undo_but_no_committed_wal_restores_the_previous_epoch(
        tmp_path: Path, monkeypatch) -> None:
    rep = Replica.open(tmp_path, "v", GEO, create=True)
    rep.seeded(0)  # whole: data reaches the image at apply (a seed places it at receipt)
    hist = history_of(rep, tmp_path, 3, seed=7)
    _half_apply(rep, random.Random(70), 4, monkeypatch)
    wal_path = rep.wal_path(4)
    rep.close()
    assert image(tmp_path) != hist[3]  # half applied
    os.truncate(wal_path, os.path.getsize(wal_path) - 10)  # the commit is gone
    assert wal.committed_epoch(wal_path) is None
    rep = Replica.open(tmp_path, "v")
    assert rep.state.epoch == 3 and image(tmp_path) == hist[3]
    assert not (tmp_path / "v" / "journal" / undo_name(4)).exists()
    assert rep.stored_hashes(0, GEO.blocks) == rep.rehash(0, GEO.blocks)
    rep.close()


def test_torn_undo_tmp_is_discarded_and_epoch_still_applies(tmp_path: Path) -> None:
    rep = Replica.open(tmp_path, "v", GEO, create=True)
    hist = history_of(rep, tmp_path, 2, seed=8)
    w = write_epoch(rep, random.Random(80), 3, apply=False)  # sealed, never applied: "killed"
    del w
    rep.close()
    tmp = tmp_path / "v" / "journal" / f".{undo_name(3)}.tmp"
    tmp.write_bytes(b"CDPUNDO1 torn")
    rep = Replica.open(tmp_path, "v")
    assert rep.state.epoch == 3 and not tmp.exists()
    for e in (1, 2):
        with open_view(tmp_path, "v", e) as v:
            assert v.read(0, GEO.size) == hist[e]
    rep.close()


def test_rollback_and_a_rollback_cut_short(tmp_path: Path) -> None:
    rep = Replica.open(tmp_path, "v", GEO, create=True)
    hist = history_of(rep, tmp_path, 8, seed=9)
    rep.rollback(6)
    assert rep.state.epoch == 6 and image(tmp_path) == hist[6]
    assert rep.stored_hashes(0, GEO.blocks) == rep.rehash(0, GEO.blocks)
    # cut short: epoch 6's record written back and the state moved, but the file not yet gone
    from cdp.replica.undo import UndoFile
    u = UndoFile(tmp_path / "v" / "journal" / undo_name(6))
    rep.restore(u)
    u.close()
    rep.close()
    import json
    st = json.loads((tmp_path / "v" / "state.json").read_text())
    st["epoch"] = 5
    (tmp_path / "v" / "state.json").write_text(json.dumps(st))
    rep = Replica.open(tmp_path, "v")
    assert rep.state.epoch == 5 and image(tmp_path) == hist[5]
    assert [p.epoch for p in list_points(tmp_path / "v")] == [1, 2, 3, 4, 5]
    rep.close()


def test_journal_off_keeps_no_points_and_views_refuse_old_ones(tmp_path: Path) -> None:
    rep = Replica.open(tmp_path, "v", GEO, create=True)
    history_of(rep, tmp_path, 3, seed=11)
    view = open_view(tmp_path, "v", 1)
    rep.close()
    rep = Replica.open(tmp_path, "v", retention=Retention(0, 0))
    write_epoch(rep, random.Random(1), 4)
    assert [p.epoch for p in list_points(tmp_path / "v")] == [4]
    with pytest.raises(ReplicaError, match="without a journal record"):
        view.read(0, BS)
    view.close()
    rep.close()


def test_zero_hashes_in_views(rep: Replica, tmp_path: Path) -> None:
    with open_view(tmp_path, "v") as v:
        h = v.block_hashes()
        assert h[:16] == zero_hash(BS) and h[-16:] == zero_hash(GEO.length(GEO.blocks - 1))


def test_crash_with_the_journal_off_then_on_offers_no_mixed_point(tmp_path: Path,
                                                                   monkeypatch) -> None:
    rep = Replica.open(tmp_path, "v", GEO, create=True, retention=Retention(0, 0))
    hist = history_of(rep, tmp_path, 2, seed=12)
    rng = random.Random(120)
    calls = {"n": 0}
    real = os.pwrite

    def flaky(fd, data, off):
        if fd == rep.image_fd:
            calls["n"] += 1
            if calls["n"] > 1:
                raise OSError(errno.EIO, "simulated crash")
        return real(fd, data, off)

    monkeypatch.setattr(os, "pwrite", flaky)
    with pytest.raises(ReplicaError):
        write_epoch(rep, rng, 3)
    monkeypatch.setattr(os, "pwrite", real)
    rep.close()
    assert image(tmp_path) != hist[2]  # half way into epoch 3, and no undo record of it
    rep = Replica.open(tmp_path, "v")  # journal back on: replays epoch 3 from the WAL
    assert rep.state.epoch == 3
    assert [p.epoch for p in list_points(tmp_path / "v")] == [3]  # not a mixed point 2
    hist[3] = image(tmp_path)
    write_epoch(rep, rng, 4)
    assert [p.epoch for p in list_points(tmp_path / "v")] == [3, 4]
    with open_view(tmp_path, "v", 3) as v:
        assert v.read(0, GEO.size) == hist[3]
    rep.close()


def test_saving_old_blocks_takes_their_hashes_from_the_hash_map(rep: Replica, tmp_path: Path,
                                                               monkeypatch) -> None:
    """The replica's hash map already holds the hash of every block an epoch overwrites:
    the undo file records it instead of hashing the old content again, and reading the
    point back still checks the saved content against it."""
    hist = history_of(rep, tmp_path, 3, seed=9)
    import cdp.replica.journal as journal
    import cdp.replica.undo as undo

    def no_rehash(data: bytes) -> bytes:
        raise AssertionError("the undo journal hashed an old block again")

    old = [i for i in range(GEO.blocks) if hist[3][i * BS:(i + 1) * BS].strip(b"\0")]
    assert old  # blocks with data: their old content must be saved
    rng = random.Random(10)
    new = [rng.randbytes(GEO.length(i)) for i in old]
    data = b"".join(new)
    w = rep.begin(4, T0 + 4)
    w.add_data(pack_u64(old), b"".join(block_hash(b) for b in new), len(data), compress(data))
    w.seal(w.blocks)
    # the undo files are made by journal.py (which needs no hash function) and undo.py
    monkeypatch.setattr(journal, "block_hash", no_rehash, raising=False)
    monkeypatch.setattr(undo, "block_hash", no_rehash)
    w.apply()
    monkeypatch.undo()
    with open_view(tmp_path, "v", 3) as v:
        assert v.read(0, GEO.size) == hist[3]
    with open_view(tmp_path, "v", 4) as v:
        assert v.read(0, GEO.size) == image(tmp_path) != hist[3]
