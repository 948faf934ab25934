"""Promote starts a new generation of the replica: labels and points of the history before it
never name the epochs that replication reuses after a failback, and stop holding retention
back; a promote cut short records the epoch it started from; promoted volumes say so.

In process, with real replica folders: epochs applied through Replica, promote and finish
called as the CLI calls them, every restored byte compared with a copy kept at the time.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from cdp.blocks import Geometry, pack_u64
from cdp.cli.main import main
from cdp.codec import block_hash, compress
from cdp.drills import promote as promote_mod
from cdp.drills.failback import finish
from cdp.drills.promote import promote
from cdp.errors import DrillError, PointError
from cdp.replica import Replica
from cdp.replica.journal import Retention
from cdp.replica.points import list_points, read_labels, resolve_point, set_label
from cdp.replica.pointview import open_view

BS = 64 * 1024
GEO = Geometry(16 * BS, BS)
OLD = Retention(max_age=60.0, max_bytes=None)  # every test epoch is older than this


def receiver_toml(tmp_path: Path) -> Path:
    token = tmp_path / "t.token"
    token.write_text("x" * 32)
    os.chmod(token, 0o600)
    cfg = tmp_path / "receiver.toml"
    cfg.write_text('[receiver]\ndata_dir = "replicas"\n[[receiver.client]]\nname = "h"\n'
                   'token_file = "t.token"\nvolumes = ["v"]\n')
    return cfg


def epoch(rep: Replica, e: int, blocks: dict[int, bytes]) -> None:
    w = rep.begin(e, time.time() - 1000 + e)
    idx = sorted(blocks)
    data = b"".join(blocks[i] for i in idx)
    w.add_data(pack_u64(idx), b"".join(block_hash(blocks[i]) for i in idx), len(data),
               compress(data))
    w.seal(w.blocks)
    w.apply()


def point_bytes(data_dir: Path, e: int) -> bytes:
    with open_view(data_dir, "v", e) as v:
        return v.read(0, v.size)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_labels_and_points_do_not_survive_promote_and_failback(tmp_path, capsys):
    cfg = receiver_toml(tmp_path)
    data = tmp_path / "replicas"
    vol = data / "v"
    rng = random.Random(3)
    rep = Replica.open(data, "v", GEO, create=True, retention=Retention(None, None))
    epoch(rep, 1, {i: rng.randbytes(BS) for i in range(16)})
    for e in range(2, 7):
        epoch(rep, e, {e: rng.randbytes(BS), 0: rng.randbytes(BS)})
    set_label(vol, 4, "pre-promote")
    set_label(vol, 6, "rolled back")  # its epoch is rolled back by the promote
    kept = {e: point_bytes(data, e) for e in (4, 6)}
    rep.close()

    rec = promote(data, "v", resolve_point(vol, "pre-promote"))
    assert rec["epoch"] == 4 and rec["previous_epoch"] == 6
    assert (vol / "image").read_bytes() == kept[4]
    assert rec["labels_dropped"] == {"4": "pre-promote", "6": "rolled back"}
    assert read_labels(vol) == {} and [p.epoch for p in list_points(vol)] == [4]

    # a promoted volume says so, and has nothing to drill
    rc, out, _ = cli(capsys, "points", "-c", str(cfg), "v", "--json")
    assert rc == 0 and json.loads(out)["promoted"]["state"] == "promoted"
    assert json.loads(out)["generation"] == 2
    rc, out, _ = cli(capsys, "points", "-c", str(cfg), "v")
    assert rc == 0 and "was PROMOTED at epoch 4" in out
    rc, _, err = cli(capsys, "failover", "test", "-c", str(cfg), "v", "--format", "raw")
    assert rc == 2 and "PROMOTED" in err and "no point to drill" in err

    # the DR machine writes; failback; replication resumes and reuses epoch numbers 5, 6, 7
    with open(vol / "image", "r+b") as fh:
        fh.seek(9 * BS)
        fh.write(rng.randbytes(BS))
    failed_back = (vol / "image").read_bytes()
    with pytest.raises(DrillError, match="no `cdp failback run`"):
        finish(data, "v")  # (see test_failback.py for the whole path with a run)
    assert finish(data, "v", discard_dr_writes=True)["discarded_dr_writes"]
    rep = Replica.open(data, "v", GEO, retention=Retention(None, None))
    for e in (5, 6, 7):
        epoch(rep, e, {e + 3: rng.randbytes(BS)})
    assert [p.epoch for p in list_points(vol)] == [4, 5, 6, 7]
    assert all(p.label is None for p in list_points(vol))  # "rolled back" is not on the new 6
    assert point_bytes(data, 4) == failed_back

    # the old label names nothing now: refused with the reason, never the failed-back image
    with pytest.raises(PointError, match="dropped when the volume was promoted"):
        resolve_point(vol, "pre-promote")
    rc, _, err = cli(capsys, "failover", "test", "-c", str(cfg), "v", "--point", "pre-promote",
                     "--format", "raw")
    assert rc == 2 and "promoted" in err, err
    # a label of the new generation works as usual
    set_label(vol, 6, "after failback")
    assert resolve_point(vol, "after failback") == 6 and read_labels(vol) == {6: "after failback"}
    want = point_bytes(data, 6)
    rc, out, err = cli(capsys, "failover", "test", "-c", str(cfg), "v", "--point",
                       "after failback", "--format", "raw", "--keep", "--json")
    assert rc == 0, err
    clone = Path(json.loads(out)["clone"])
    assert clone.read_bytes() == want
    rep.close()


def test_stale_labels_do_not_hold_retention_back(tmp_path):
    data = tmp_path / "replicas"
    vol = data / "v"
    rng = random.Random(4)
    rep = Replica.open(data, "v", GEO, create=True, retention=Retention(None, None))
    for e in range(1, 4):
        epoch(rep, e, {e: rng.randbytes(BS)})
    set_label(vol, 2, "gone with the journal")
    # a label from before a promote (as an older cdp left it): another generation
    raw = json.loads((vol / "labels.json").read_text())
    raw["3"] = {"label": "old history", "time": 1.0, "generation": 0}
    (vol / "labels.json").write_text(json.dumps(raw))
    rep.close()
    rep = Replica.open(data, "v", retention=Retention(0, 0))  # journaling off: points go
    rep.close()
    rep = Replica.open(data, "v", retention=OLD)
    for e in range(4, 8):
        epoch(rep, e, {e: rng.randbytes(BS)})
    rep.journal.prune()
    assert [p.epoch for p in list_points(vol)] == [7]  # nothing held back
    assert read_labels(vol) == {}
    rep.close()


class Killed(BaseException):
    """Stands for a SIGKILL in the middle of the rollback."""


def test_promote_cut_short_mid_rollback_records_the_epoch_it_started_from(tmp_path, monkeypatch):
    data = tmp_path / "replicas"
    vol = data / "v"
    rng = random.Random(5)
    rep = Replica.open(data, "v", GEO, create=True)
    epoch(rep, 1, {i: rng.randbytes(BS) for i in range(16)})
    for e in range(2, 8):
        epoch(rep, e, {e: rng.randbytes(BS), 1: rng.randbytes(BS)})
    want = point_bytes(data, 3)
    rep.close()

    real = Replica.rollback

    def cut_short(self: Replica, point: int) -> None:
        real(self, self.state.epoch - 2)  # two epochs undone, durably, then the process dies
        raise Killed

    monkeypatch.setattr(promote_mod.Replica, "rollback", cut_short)
    with pytest.raises(Killed):
        promote(data, "v", 3)
    assert json.loads((vol / "state.json").read_text())["epoch"] == 5
    monkeypatch.setattr(promote_mod.Replica, "rollback", real)

    rec = promote(data, "v", 3)  # run again: it finishes
    assert rec["epoch"] == 3 and rec["previous_epoch"] == 7 and rec["rolled_back_epochs"] == 4
    assert (vol / "image").read_bytes() == want
    assert json.loads((vol / "promoted.json").read_text())["previous_epoch"] == 7
