"""A checkpoint label names one point (issue 15, item 8): reusing it is refused with exit 2
and the point it names keeps it (and its protection from retention); --move moves it and
says from where. Real receiver and source processes; the receiver's journal decides."""

from __future__ import annotations

import json
import random
import shutil
import time

import pytest
from helpers import MiB, run_cdp, wait_converged
from test_groups import DISKS, GROUP, Writer, settle, start_group

from cdp.replica.points import list_points, read_labels

VOL = "vol1"


def _write(env, rng: random.Random) -> None:
    with open(env.source.images[VOL], "r+b") as fh:
        fh.seek(rng.randrange(0, 60) * 64 * 1024)
        fh.write(rng.randbytes(64 * 1024))


def _checkpoint(env, label: str, *extra: str):
    return run_cdp("checkpoint", "-c", env.source.toml, VOL, "--label", label, "--timeout",
                   "30s", *extra)


def test_a_reused_label_is_refused_until_moved(cdp_env, daemons):
    env = cdp_env(scan_interval="0.3s")
    with open(env.source.images[VOL], "wb") as fh:
        fh.truncate(4 * MiB)
    rng = random.Random(8)
    rx = daemons.receiver(env, inprocess=True)
    src = daemons.source(env, inprocess=True)
    wait_converged(env, VOL, time.time(), src, rx)
    _write(env, rng)
    r = _checkpoint(env, "base", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    first = json.loads(r.stdout)
    assert first["moved_from"] is None
    old = first["epoch"]
    old_time = next(p.time for p in list_points(env.replica_dir(VOL)) if p.epoch == old)

    # the same label again on a newer point: refused, nothing moves
    _write(env, rng)
    r = _checkpoint(env, "base")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"point {old} of {VOL}" in r.stdout and "--move" in r.stdout
    assert time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(old_time)) in r.stdout
    assert read_labels(env.replica_dir(VOL)) == {old: "base"}
    assert "label refused" in rx.log_text()
    r = _checkpoint(env, "base", "--json")  # --json says the same, with where it is
    assert r.returncode == 2
    ans = json.loads(r.stdout)
    assert ans["code"] == "label_taken" and ans["label_on"] == {"epoch": old, "time": old_time}
    # the same label on the point it names already is no reuse
    assert read_labels(env.replica_dir(VOL)) == {old: "base"}

    # --move: it moves, and says from where
    _write(env, rng)
    r = _checkpoint(env, "base", "--move")
    assert r.returncode == 0, r.stdout + r.stderr
    new = max(read_labels(env.replica_dir(VOL)))
    assert new > old and read_labels(env.replica_dir(VOL)) == {new: "base"}
    assert f"label 'base' moved from point {old} (" in r.stdout and f"to point {new}" in r.stdout
    assert f"from epoch {old} to epoch {new}" in rx.log_text()
    # another label (on another point: a point holds one label) is no reuse
    _write(env, rng)
    r = _checkpoint(env, "other", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(read_labels(env.replica_dir(VOL)).values()) == ["base", "other"]


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
def test_a_group_checkpoint_refuses_a_reused_label_and_moves_it_on_every_disk(cdp_env, daemons):
    env = start_group(cdp_env, daemons, "100MiB")
    w = Writer(env)
    try:
        w.burst(3)
        settle(env)
        cmd = ("checkpoint", "-c", env.source.toml, "--group", GROUP, "--label", "g",
               "--timeout", "60s", "--json")
        r = run_cdp(*cmd)
        assert r.returncode == 0, r.stdout + r.stderr
        before = json.loads(r.stdout)["epochs"]
        assert {d: read_labels(env.replica_dir(d)) for d in DISKS} == {
            d: {before[d]: "g"} for d in DISKS}

        w.burst(3)
        r = run_cdp(*cmd)
        assert r.returncode == 2, r.stdout + r.stderr
        ans = json.loads(r.stdout)
        assert ans["code"] == "label_taken" and ans["label_on"]["epoch"] == before[ans["volume"]]
        assert "--move" in ans["error"]
        assert {d: read_labels(env.replica_dir(d)) for d in DISKS} == {
            d: {before[d]: "g"} for d in DISKS}

        w.burst(3)
        r = run_cdp(*cmd[:-1], "--move")
        assert r.returncode == 0, r.stdout + r.stderr
        now = {d: max(read_labels(env.replica_dir(d))) for d in DISKS}
        for d in DISKS:
            assert now[d] > before[d] and read_labels(env.replica_dir(d)) == {now[d]: "g"}
            assert f"{d}: label 'g' moved from point {before[d]} (" in r.stdout
    finally:
        w.close()
