"""Labels in the recovery-point journal: stored durably, shown by list_points, resolved by
name, and holding retention back like a pin until removed."""

from __future__ import annotations

import random
import time

import pytest

from cdp.blocks import Geometry, pack_u64
from cdp.codec import block_hash, compress
from cdp.errors import PointError
from cdp.replica import Replica
from cdp.replica.journal import (
    Retention,
    list_points,
    read_labels,
    remove_label,
    resolve_point,
    set_label,
)
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
        set_label(vol, 6, "base")  # a label names one point: it moves
        assert read_labels(vol) == {6: "base"}
        rep.journal.prune()
        assert [p.epoch for p in list_points(vol)] == [6]
        assert list_points(vol)[0].label == "base" and list_points(vol)[0].current
        assert remove_label(vol, 6) == "base" and remove_label(vol, 6) is None
    finally:
        rep.close()
