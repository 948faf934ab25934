"""Labels taken from several processes at once: one wins. (Moved from tests/unit, which
starts no processes: each racer here is a forked process.)"""

from __future__ import annotations

import multiprocessing
import random
import time

from cdp.blocks import Geometry, pack_u64
from cdp.codec import block_hash, compress
from cdp.errors import LabelTakenError
from cdp.replica import Replica
from cdp.replica.journal import Retention
from cdp.replica.points import read_labels, set_label

BS = 64 * 1024


def _epoch(rep: Replica, epoch: int, blocks: dict[int, bytes]) -> None:
    w = rep.begin(epoch, time.time() - 1000 + epoch)  # every point is older than the retention
    idx = sorted(blocks)
    data = b"".join(blocks[i] for i in idx)
    w.add_data(pack_u64(idx), b"".join(block_hash(blocks[i]) for i in idx), len(data),
               compress(data))
    w.seal(w.blocks)
    w.apply()


def test_of_racing_checkpoints_with_one_label_only_one_takes_it(tmp_path):
    """Each racer labels its own point with the same label, from its own process (as two
    receiver connections' workers would, or a receiver and another tool): one wins, the
    others are refused naming the winner's point, and the label is on that point."""
    rng = random.Random(2)
    rep = Replica.open(tmp_path, "v", Geometry(16 * BS, BS), create=True,
                       retention=Retention(max_age=None, max_bytes=None))
    vol = tmp_path / "v"
    try:
        for e in range(1, 7):
            _epoch(rep, e, {e: rng.randbytes(BS)})
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(6) as pool:
            got = pool.starmap(_try_label, [(str(vol), e) for e in range(1, 7)])
        winners = [e for e, other in got if other is None]
        assert len(winners) == 1, got
        assert read_labels(vol) == {winners[0]: "race"}
        assert all(other == winners[0] for e, other in got if e != winners[0]), got
    finally:
        rep.close()


def _try_label(vol: str, epoch: int) -> tuple[int, int | None]:
    from pathlib import Path

    try:
        set_label(Path(vol), epoch, "race")
    except LabelTakenError as exc:
        return epoch, exc.epoch
    return epoch, None
