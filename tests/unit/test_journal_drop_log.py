"""What retention says when it drops points: nothing for point 0 (the empty replica before
the first epoch, which a first seed drops at once), and which points otherwise."""

from __future__ import annotations

import logging
import random
import time

from cdp.blocks import Geometry, pack_u64
from cdp.codec import block_hash, compress
from cdp.replica import Replica
from cdp.replica.journal import Retention
from cdp.replica.points import list_points

BS = 64 * 1024


def _epoch(rep: Replica, epoch: int, when: float, blocks: dict[int, bytes]) -> None:
    w = rep.begin(epoch, when)
    idx = sorted(blocks)
    data = b"".join(blocks[i] for i in idx)
    w.add_data(pack_u64(idx), b"".join(block_hash(blocks[i]) for i in idx), len(data),
               compress(data))
    w.seal(w.blocks)
    w.apply()


def _dropped(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if "dropped" in r.getMessage() and r.levelno >= logging.INFO]


def test_a_first_seed_drops_point_0_quietly_and_real_points_are_named(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="cdp.replica.journal")
    rng = random.Random(4)
    rep = Replica.open(tmp_path, "v", Geometry(16 * BS, BS), create=True,
                       retention=Retention(max_age=3600.0, max_bytes=None))
    try:
        now = time.time()
        _epoch(rep, 1, now, {i: rng.randbytes(BS) for i in range(16)})  # the seed
        assert [p.epoch for p in list_points(tmp_path / "v")] == [1]  # point 0 went...
        assert _dropped(caplog) == []  # ...without a word: nothing restorable was lost
        assert any("point 0" in r.getMessage() for r in caplog.records)  # (debug)

        # later, retention drops real points: the message says which, and when they were
        _epoch(rep, 2, now + 1, {3: rng.randbytes(BS)})
        _epoch(rep, 3, now + 2, {4: rng.randbytes(BS)})
        assert [p.epoch for p in list_points(tmp_path / "v")] == [1, 2, 3]
        assert rep.journal.prune(now=now + 3600 + 1.5) == [2, 3]
        assert [p.epoch for p in list_points(tmp_path / "v")] == [3]
        msgs = _dropped(caplog)
        assert len(msgs) == 1, msgs
        t1, t2 = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) for t in (now, now + 1))
        assert "volume=v dropped 2 oldest recovery point(s) (retention)" in msgs[0]
        assert f"epoch 1 ({t1}) to epoch 2 ({t2})" in msgs[0]
    finally:
        rep.close()
