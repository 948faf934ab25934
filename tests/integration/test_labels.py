"""Labelled baselines: `cdp checkpoint` through the source's control channel, labels on the
receiver that outlive tight retention, `--point LABEL` in drills, `cdp points --unlabel`."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers import MiB, bytes_hash, file_hash, run_cdp, wait_converged, wait_for

from cdp.replica.points import list_points
from cdp.replica.pointview import open_view

VOL = "vol1"


def view_hash(data_dir: Path, epoch: int) -> str:
    with open_view(data_dir, VOL, epoch) as v:
        return bytes_hash(v.read(0, v.size))


def change(image: Path, rng: random.Random, env, src, rx) -> int:
    """Rewrite a few blocks in the middle of the image (not the file system's metadata),
    wait for the replica; returns the replica's epoch."""
    with open(image, "r+b") as fh:
        for _ in range(3):
            fh.seek(rng.randrange(64, 200) * 64 * 1024)
            fh.write(rng.randbytes(64 * 1024))
    wait_converged(env, VOL, time.time(), src, rx)
    return env.replica_state(VOL)["epoch"]


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs mkfs.ext4")
def test_labelled_point_outlives_tight_retention_and_drills_by_label(cdp_env, daemons):
    env = cdp_env(scan_interval="0.3s", receiver_extra='keep_points = "1s"')
    image = env.source.images[VOL]
    with open(image, "wb") as fh:
        fh.truncate(16 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    rng = random.Random(5)
    rx = daemons.receiver(env, inprocess=True)
    src = daemons.source(env, inprocess=True)
    wait_converged(env, VOL, time.time(), src, rx)
    before = change(image, rng, env, src, rx)

    # a checkpoint with nothing written since: the current point gets the label
    r = run_cdp("checkpoint", "-c", env.source.toml, VOL, "--label", "quiet", "--json",
                "--timeout", "30s")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["epoch"] == before

    # written, then checkpointed at once (no waiting for the scan timer): a new epoch
    with open(image, "r+b") as fh:
        fh.seek(100 * 64 * 1024)
        fh.write(rng.randbytes(64 * 1024))
    want = file_hash(image)
    r = run_cdp("checkpoint", "-c", env.source.toml, VOL, "--label", "base line 1", "--json",
                "--timeout", "30s")
    assert r.returncode == 0, r.stdout + r.stderr
    base = json.loads(r.stdout)["epoch"]
    assert base > before
    assert view_hash(env.data_dir, base) == want
    assert "checkpoint labelled" in src.log_text() and "point labelled" in rx.log_text()

    # more epochs, each older than keep_points: every unlabelled point before it goes
    for _ in range(4):
        time.sleep(1.2)
        change(image, rng, env, src, rx)

    def pruned() -> list:
        pts = list_points(env.replica_dir(VOL))
        return pts if pts[0].epoch == before else []

    pts = wait_for(pruned, 30, what="retention to drop the points before the first label")
    by_epoch = {p.epoch: p for p in pts}
    assert by_epoch[before].label == "quiet" and by_epoch[base].label == "base line 1"
    assert min(by_epoch) == before  # nothing older survived
    assert view_hash(env.data_dir, base) == want

    # the label names the point in drills; cdp points shows it
    r = run_cdp("failover", "test", "-c", env.receiver_toml, VOL, "--point", "base line 1",
                "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["ok"] and rep["point"]["epoch"] == base
    r = run_cdp("points", "-c", env.receiver_toml, VOL)
    assert r.returncode == 0 and "base line 1" in r.stdout and "quiet" in r.stdout
    r = run_cdp("failover", "test", "-c", env.receiver_toml, VOL, "--point", "no such label")
    assert r.returncode == 2 and "labelled" in r.stderr

    # unlabelled, the points go with the next prune
    for label in ("quiet", "base line 1"):
        r = run_cdp("points", "-c", env.receiver_toml, VOL, "--unlabel", label)
        assert r.returncode == 0, r.stderr
    change(image, rng, env, src, rx)
    wait_for(lambda: list_points(env.replica_dir(VOL))[0].epoch > base, 30,
             what="unlabelled points to be dropped")
    src.stop()
    rx.stop()


def test_checkpoint_without_a_running_source_fails(cdp_env):
    env = cdp_env()
    r = run_cdp("checkpoint", "-c", env.source.toml, VOL, "--label", "x", "--timeout", "2s")
    assert r.returncode == 1 and "not running" in r.stdout
    r = run_cdp("checkpoint", "-c", env.source.toml, VOL, "--label", "123")
    assert r.returncode == 2
    r = run_cdp("checkpoint", "-c", env.source.toml, "nope", "--label", "x")
    assert r.returncode == 2
