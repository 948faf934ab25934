"""Source-side volume state: epochs roll back exactly; the builder dedups and splits."""

from __future__ import annotations

import concurrent.futures
import random
from pathlib import Path

import pytest

from cdp.blocks import Geometry, unpack_u64
from cdp.codec import block_hash, zero_hash
from cdp.config import VolumeConfig
from cdp.source.volume import DedupIndex, EpochBuilder, VolumeState
from cdp.tracker.scan import zero_map
from cdp.wire.messages import Data, Ref, Zero

BS = 65536
GEO = Geometry(32 * BS, BS)


def volume(tmp_path: Path, name: str = "v") -> VolumeState:
    vs = VolumeState(VolumeConfig(name=name, path=tmp_path / f"{name}.img"), tmp_path / "state")
    vs.geo = GEO
    vs.adopt("rid", 0, zero_map(GEO))
    return vs


def build(vs, changes, volumes=None, index=None, *, max_epoch=1 << 30, batch=1 << 20):
    ops: list = []
    pool = concurrent.futures.ThreadPoolExecutor(1)
    b = EpochBuilder(vs, volumes or {vs.name: vs}, index if index is not None else DedupIndex(1000),
                     pool, ops.append,
                     capture_time=1.0, batch_bytes=batch, max_epoch_bytes=max_epoch, level=1)
    for i, data in changes:
        h = block_hash(data) if data is not None else zero_hash(BS)
        b.add(i, h, memoryview(data) if data is not None else None)
    b.commit()
    out = [("data", op[1].result()) if op[0] == "data" else op for op in ops]
    pool.shutdown()
    return out


def test_builder_sends_repeats_once_and_zeros_as_runs(tmp_path: Path) -> None:
    vs = volume(tmp_path)
    rng = random.Random(1)
    a, b = rng.randbytes(BS), rng.randbytes(BS)
    index = DedupIndex(1000)
    # first make blocks 20, 21 non-zero so that zeroing them is a change
    build(vs, [(20, a), (21, b)], index=index)
    vs.acknowledged(1)
    ops = build(vs, [(0, a), (1, b), (2, a), (3, a), (20, None), (21, None)], index=index)
    kinds = [op[0] for op in ops]
    assert kinds[0] == "begin" and kinds[-1] == "commit"
    msgs = [op[1] for op in ops if op[0] in ("data", "msg")]
    datas = [m for m in msgs if isinstance(m, Data)]
    refs = [m for m in msgs if isinstance(m, Ref)]
    zeros = [m for m in msgs if isinstance(m, Zero)]
    assert not datas  # a and b are already held by the replica (blocks 20/21, acked)
    assert sorted(unpack_u64(refs[0].indices).tolist()) == [0, 1, 2, 3]
    assert unpack_u64(zeros[0].runs).tolist() == [20, 2]
    assert ops[-1][2] == 6  # blocks in the epoch


def test_unacked_other_volume_is_not_referenced(tmp_path: Path) -> None:
    v1, v2 = volume(tmp_path, "a"), volume(tmp_path, "b")
    vols = {"a": v1, "b": v2}
    index = DedupIndex(1000)
    blk = random.Random(2).randbytes(BS)
    build(v1, [(0, blk)], vols, index)  # epoch 1 of a: sent, not acknowledged
    ops = build(v2, [(5, blk)], vols, index)
    assert any(op[0] == "data" for op in ops)  # b sends it as data
    v1.acknowledged(1)
    ops = build(v2, [(6, blk)], vols, index)
    assert not any(op[0] == "data" for op in ops)
    assert any(op[0] == "msg" and isinstance(op[1], Ref) and op[1].from_volume in ("a", "b")
               for op in ops)


def test_epochs_split_at_max_epoch_bytes(tmp_path: Path) -> None:
    vs = volume(tmp_path)
    rng = random.Random(3)
    ops = build(vs, [(i, rng.randbytes(BS)) for i in range(10)], max_epoch=4 * BS, batch=2 * BS)
    begins = [op[1] for op in ops if op[0] == "begin"]
    commits = [(op[1], op[2]) for op in ops if op[0] == "commit"]
    assert begins == [1, 2, 3]
    assert commits == [(1, 4), (2, 4), (3, 2)]


def test_undo_restores_the_map_exactly(tmp_path: Path) -> None:
    vs = volume(tmp_path)
    rng = random.Random(4)
    build(vs, [(i, rng.randbytes(BS)) for i in range(5)])
    vs.acknowledged(1)
    after1 = bytes(vs.smap)
    build(vs, [(i, rng.randbytes(BS)) for i in range(3, 8)], max_epoch=2 * BS)  # epochs 2..4
    assert set(vs.pending) == {2, 3, 4}
    vs.undo_from(2)
    assert bytes(vs.smap) == after1 and not vs.pending


def test_reconcile_follows_the_receiver(tmp_path: Path) -> None:
    vs = volume(tmp_path)
    rng = random.Random(5)
    build(vs, [(i, rng.randbytes(BS)) for i in range(6)], max_epoch=2 * BS)  # epochs 1..3
    snap = {}
    for e in (1, 2, 3):
        vs.pending[e].committed = True
    # the receiver applied 1 and 2; the ack of 2 was lost
    vs.acknowledged(1)
    snap_before_3 = bytearray(vs.smap)
    for blk, old in vs.pending[3].undo:
        snap_before_3[blk * 16:(blk + 1) * 16] = old
    snap[2] = bytes(snap_before_3)
    assert vs.reconcile("rid", 2)
    assert vs.acked == 2 and not vs.pending and bytes(vs.smap) == snap[2]
    assert not vs.reconcile("other-replica", 2)  # a different replica: fetch its map instead
    assert not vs.reconcile("rid", 1)  # the receiver went backwards: we cannot know


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    vs = volume(tmp_path)
    build(vs, [(1, random.Random(6).randbytes(BS))])
    assert not vs.save()  # pending epochs: the map is ahead of the replica
    vs.acknowledged(1)
    assert vs.save()
    again = VolumeState(vs.cfg, tmp_path / "state")
    again.load(GEO)
    assert again.smap == vs.smap and again.acked == 1 and again.replica_id == "rid"
    other = VolumeState(vs.cfg, tmp_path / "state")
    other.load(Geometry(GEO.size * 2, BS))  # resized volume: no memory
    assert other.smap is None


@pytest.mark.parametrize("cap", [0, 2])
def test_dedup_index_is_bounded(cap: int) -> None:
    idx = DedupIndex(cap)
    for i in range(5):
        idx.add(bytes([i]) * 16, "v", i, 1)
    assert len(idx) == cap


def test_a_pause_is_kept_on_disk_until_resumed(tmp_path: Path) -> None:
    vs = volume(tmp_path)
    assert not vs.paused_since and vs.status().paused is False
    assert vs.pause() is True
    since = vs.paused_since
    assert since and vs.pause() is False and vs.paused_since == since  # already paused
    again = volume(tmp_path)  # a restart
    assert again.paused_since == since and again.status().paused_since == since
    assert again.resume() is True and again.resume() is False
    assert volume(tmp_path).paused_since == 0.0
    (tmp_path / "state" / "v" / "paused.json").write_text("{not json")
    assert volume(tmp_path).paused_since > 0  # unreadable: stays paused rather than ship


def test_resync_requests_are_served_in_turn() -> None:
    from cdp.source.volume import ResyncState

    r = ResyncState()
    assert not r.wanted and r.status() == ""
    r.asked += 1
    assert r.wanted and r.status() == "queued"
    r.running = r.asked
    assert not r.wanted and r.status() == "running"
    r.asked += 1  # asked again while one runs: that one started too early to serve it
    assert r.wanted and r.status() == "running"
    r.done, r.running = r.running, 0
    assert r.wanted and r.status() == "queued"
