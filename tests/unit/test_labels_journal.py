"""Labels in the recovery-point journal: stored durably, shown by list_points, resolved by
name, and holding retention back like a pin until removed."""

from __future__ import annotations

import random
import time

import pytest

from cdp.blocks import Geometry, pack_u64
from cdp.codec import block_hash, compress
from cdp.errors import LabelTakenError, PointError
from cdp.replica import Replica
from cdp.replica.journal import Retention
from cdp.replica.points import list_points, read_labels, remove_label, resolve_point, set_label
from cdp.replica.pointview import open_view

BS = 64 * 1024


def _epoch(rep: Replica, epoch: int, blocks: dict[int, bytes]) -> None:
    w = rep.begin(epoch, time.time() - 1000 + epoch)  # every point is older than the retention
    idx = sorted(blocks)
    data = b"".join(blocks[i] for i in idx)
    w.add_data(pack_u64(idx), b"".join(block_hash(blocks[i]) for i in idx), len(data),
               compress(data))
    w.seal(w.blocks)
    w.apply()


def test_a_labelled_point_outlives_retention_until_unlabelled(tmp_path):
    rng = random.Random(1)
    rep = Replica.open(tmp_path, "v", Geometry(16 * BS, BS), create=True,
                       retention=Retention(max_age=60.0, max_bytes=None))
    vol = tmp_path / "v"
    try:
        _epoch(rep, 1, {i: rng.randbytes(BS) for i in range(16)})
        _epoch(rep, 2, {3: rng.randbytes(BS)})
        with open_view(tmp_path, "v", 2) as v:
            want = v.read(0, v.size)
        set_label(vol, 2, "base")
        set_label(vol, 1, "older")
        set_label(vol, 2, "base")  # idempotent
        assert read_labels(vol) == {1: "older", 2: "base"}
        remove_label(vol, 1)
        for e in range(3, 7):
            _epoch(rep, e, {3: rng.randbytes(BS), e: rng.randbytes(BS)})
        pts = list_points(vol)
        assert [p.epoch for p in pts] == [2, 3, 4, 5, 6]  # 0 and 1 dropped, 2 kept
        assert pts[0].label == "base" and all(p.label is None for p in pts[1:])
        assert resolve_point(vol, "base") == 2 and resolve_point(vol, "5") == 5
        with pytest.raises(PointError):
            resolve_point(vol, "nope")
        with open_view(tmp_path, "v", 2) as v:
            assert v.read(0, v.size) == want
        # a label names one point: it does not move unasked, and moves when asked
        point2 = next(p for p in list_points(vol) if p.epoch == 2)
        with pytest.raises(LabelTakenError) as taken:
            set_label(vol, 6, "base")
        assert (taken.value.epoch, taken.value.time) == (2, point2.time)
        assert "point 2" in str(taken.value) and "--move" in str(taken.value)
        assert read_labels(vol) == {2: "base"}  # nothing changed
        assert set_label(vol, 6, "base", move=True) == (2, point2.time)
        assert read_labels(vol) == {6: "base"}
        assert set_label(vol, 6, "base", move=True) == (2, point2.time)  # a resend: same answer
        rep.journal.prune()
        assert [p.epoch for p in list_points(vol)] == [6]
        assert list_points(vol)[0].label == "base" and list_points(vol)[0].current
        assert remove_label(vol, 6) == "base" and remove_label(vol, 6) is None
    finally:
        rep.close()


def test_a_label_whose_point_is_gone_names_the_new_point_without_asking(tmp_path):
    rng = random.Random(3)
    rep = Replica.open(tmp_path, "v", Geometry(16 * BS, BS), create=True,
                       retention=Retention(max_age=60.0, max_bytes=None))
    vol = tmp_path / "v"
    try:
        for e in range(1, 4):
            _epoch(rep, e, {e: rng.randbytes(BS)})
        assert [p.epoch for p in list_points(vol)] == [3]  # all older points aged out
        from cdp.replica.points import _write_labels

        _write_labels(vol, {1: {"label": "old", "time": 1.0, "generation": 1}})  # left behind
        assert set_label(vol, 3, "old") is None  # no kept point had it: nothing to refuse
        assert read_labels(vol) == {3: "old"}
    finally:
        rep.close()
