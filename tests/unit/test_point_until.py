"""A point's two source times: captured (`time`) and nothing later than (`until`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdp.blocks import Geometry, pack_u64
from cdp.codec import block_hash, compress
from cdp.errors import RemoteProtocolError
from cdp.replica import Replica
from cdp.replica.journal import Retention
from cdp.replica.points import Point, find_point, list_points
from cdp.wire.messages import Commit, from_wire, to_wire


def test_commit_carries_until_and_takes_an_older_source_without_it() -> None:
    msg = Commit("vm1", 7, 3, 1234.5)
    assert from_wire(to_wire(msg)) == msg
    assert from_wire([Commit.TYPE, "vm1", 7, 3]) == Commit("vm1", 7, 3, 0.0)
    for bad in ([Commit.TYPE, "vm1", 7], [Commit.TYPE, "vm1", 7, 3, 1.0, 2.0],
                [Commit.TYPE, "vm1", 7, 3, "soon"]):
        with pytest.raises(RemoteProtocolError):
            from_wire(bad)


def test_at_finds_a_point_once_nothing_later_can_be_in_it() -> None:
    points = [Point(0, 0.0, 0, 0),
              Point(1, 100.0, 0, 0, until=100.0),  # quiesced: one instant
              Point(2, 200.0, 0, 0, until=230.0),  # read from 200 to 230
              Point(3, 240.0, 0, 0, current=True)]  # no until recorded: its time
    assert find_point(points, 50.0) is None  # point 0 (nothing replicated) is never the answer
    assert find_point(points, 100.0) == points[1]
    assert find_point(points, 229.9) == points[1]  # point 2 may hold a write made after 229.9
    assert find_point(points, 230.0) == points[2]
    assert find_point(points, 1e9) == points[3]


def test_until_is_kept_per_point_and_through_a_rollback(tmp_path: Path) -> None:
    geo = Geometry(8 * 4096, 4096)
    rep = Replica.open(tmp_path, "v", geo, create=True, retention=Retention(None, None))
    try:
        for epoch, (t, until) in enumerate([(100.0, 130.0), (140.0, 0.0), (150.0, 151.0)], 1):
            w = rep.begin(epoch, t)
            data = bytes([epoch]) * 4096
            w.add_data(pack_u64([epoch]), block_hash(data), len(data), compress(data))
            w.seal(w.blocks, until)  # 0: an older source, which sends no until
            w.apply()
        assert [(p.epoch, p.time, p.until) for p in list_points(tmp_path / "v")] == [
            (0, 0.0, 0.0), (1, 100.0, 130.0), (2, 140.0, 140.0), (3, 150.0, 151.0)]
        rep.rollback(1)
        assert (rep.state.epoch_time, rep.state.epoch_until) == (100.0, 130.0)
    finally:
        rep.close()
