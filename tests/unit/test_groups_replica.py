"""Consistency groups at the receiver (cdp.replica.groups): which cuts every member holds,
from the Cut markers the replicas record, driven through real replicas without sockets.

Two members cut together at t1..t7. Member a fell behind: its epoch 2 merges the cuts
t3..t5 (a held its epoch 1 through t2). Member b sent every cut. The pairs that existed
together are t1, t2 and t5; t3 and t4 must never be restored for the group.
"""

from __future__ import annotations

import pytest

from cdp.blocks import Geometry, pack_u64
from cdp.codec import block_hash, compress
from cdp.errors import PointError, UsageError
from cdp.replica import Replica
from cdp.replica.groups import choose_cut, group_cuts, member_point, members
from cdp.replica.journal import Retention
from cdp.replica.points import list_points, note_held, read_held, set_label
from cdp.replica.pointview import open_view

BS = 4096
T = [0.0] + [1_000_000.0 + 10 * k for k in range(1, 9)]  # T[k]: the group's cut k


def _epoch(rep: Replica, epoch: int, at: float, since: float | None, group: str = "g",
           members: tuple[str, ...] = ("a", "b")) -> None:
    """Epoch `epoch` with one block saying which it is; a cut at `at` unless since is None."""
    blk = f"{rep.state.volume}{epoch}".encode().ljust(BS, b".")
    w = rep.begin(epoch, at - 5)
    w.add_data(pack_u64([epoch % 4]), block_hash(blk), BS, compress(blk))
    if since is not None:
        w.mark_cut(at, since, group, list(members))
    w.seal(w.blocks)
    w.apply()


@pytest.fixture
def group(tmp_path):
    reps = {v: Replica.open(tmp_path, v, Geometry(4 * BS, BS), create=True,
                            retention=Retention(None, None)) for v in ("a", "b")}
    _epoch(reps["a"], 1, T[1], 0.0)
    _epoch(reps["a"], 2, T[5], T[2])  # merged t3..t5
    for k in range(1, 6):
        _epoch(reps["b"], k, T[k], T[k - 1])
    yield tmp_path, reps
    for r in reps.values():
        r.close()


def test_only_cuts_every_member_holds_are_group_points(group) -> None:
    data_dir, reps = group
    assert members(data_dir, "g") == ["a", "b"]
    assert [c.time for c in group_cuts(data_dir, "g")] == [T[1], T[2], T[5]]
    at4 = choose_cut(data_dir, "g", at=T[4] + 1)
    assert at4.time == T[2] and {m: p.epoch for m, p in at4.points.items()} == {"a": 1, "b": 2}
    assert member_point(data_dir / "a", T[4]).epoch == 1  # each disk alone: the same cut
    assert member_point(data_dir / "b", T[4]).epoch == 2
    latest = choose_cut(data_dir, "g")
    assert latest.time == T[5] and {m: p.epoch for m, p in latest.points.items()} == {"a": 2, "b": 5}
    with pytest.raises(PointError, match="no cut of group"):
        choose_cut(data_dir, "g", at=T[1] - 1)
    with pytest.raises(UsageError):
        members(data_dir, "nope")
    st = reps["b"].state
    assert st.cut is not None and st.cut["time"] == st.epoch_time == T[5]  # the Cut's time


def test_an_idle_member_holds_later_cuts_once_the_source_says_so(group) -> None:
    data_dir, reps = group
    _epoch(reps["b"], 6, T[6], T[5])
    assert choose_cut(data_dir, "g").time == T[5]  # a said nothing about t6 yet
    note_held(data_dir / "a", 2, T[6] + 1)  # a Current: a still at its epoch 2
    cut = choose_cut(data_dir, "g")
    assert cut.time == T[6] and cut.points["a"].epoch == 2
    assert read_held(data_dir / "a", 1) == 0.0  # says nothing about other epochs
    _epoch(reps["a"], 3, T[7], None)  # a resync's mixed epoch: not a cut
    _epoch(reps["b"], 7, T[7], T[6])
    assert choose_cut(data_dir, "g").time == T[6]
    # what the next epoch's undo file keeps: a's epoch 2 held through t6 (from held.json)
    pts = {p.epoch: p for p in list_points(data_dir / "a")}
    assert pts[2].group == "g" and pts[2].held == T[6] + 1 and pts[3].group is None


def test_labels_name_a_group_cut_only_if_they_name_one_instant(group) -> None:
    data_dir, _ = group
    set_label(data_dir / "a", 1, "ok")
    set_label(data_dir / "b", 2, "ok")  # a held its epoch 1 through t2: one instant
    cut = choose_cut(data_dir, "g", label="ok")
    assert cut.time == T[2]
    with open_view(data_dir, "a", cut.points["a"].epoch) as v:
        assert v.read(BS, 2) == b"a1"
    set_label(data_dir / "a", 1, "bad")
    set_label(data_dir / "b", 4, "bad")  # b at t4, a never held t4
    with pytest.raises(PointError, match="does not name one cut"):
        choose_cut(data_dir, "g", label="bad")
    with pytest.raises(UsageError, match="label"):
        choose_cut(data_dir, "g", label="2")


def test_retention_by_age_keeps_a_point_while_the_group_cut_it_holds_is_young(group) -> None:
    data_dir, reps = group
    j = reps["a"].journal
    j.retention = Retention(max_age=10.0, max_bytes=None)
    j.prune(now=T[2] + 9)  # point 1 was captured at t1 (19 s ago) but held through t2 (9 s)
    assert [p.epoch for p in list_points(data_dir / "a")] == [1, 2]
    j.prune(now=T[2] + 11)
    assert [p.epoch for p in list_points(data_dir / "a")] == [2]


def test_members_that_disagree_are_refused(group) -> None:
    data_dir, reps = group
    _epoch(reps["b"], 6, T[6], T[5], members=("b", "c"))
    with pytest.raises(PointError, match="disagree"):
        members(data_dir, "g")
