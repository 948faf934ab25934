"""`cdp checkpoint` on an nbd volume: the journal cuts at once and the labelled point holds
every write acknowledged before the request."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import MiB, bytes_hash, file_hash, run_cdp
from test_nbdmode import converge, qemu_io, start_nbd

from cdp.replica.points import list_points
from cdp.replica.pointview import open_view

pytestmark = pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io not installed")


def test_checkpoint_cuts_the_nbd_journal_and_labels_that_point(cdp_env, daemons) -> None:
    env, url = start_nbd(cdp_env, daemons, 16 * MiB, volume_extra='epoch_interval = "30s"')
    qemu_io(url, "write -P 0x11 0 1M", "flush")
    converge(env, daemons)
    # idle: the current point is labelled
    r = run_cdp("checkpoint", "-c", env.source.toml, "vol1", "--label", "idle", "--json",
                "--timeout", "30s")
    assert r.returncode == 0, r.stdout + r.stderr
    idle = json.loads(r.stdout)["epoch"]
    # writes without a flush, then a checkpoint: the point has them all
    qemu_io(url, "write -P 0x22 2M 512k", "write -P 0x33 9M 64k")
    want = file_hash(env.source.images["vol1"])
    r = run_cdp("checkpoint", "-c", env.source.toml, "vol1", "--label", "after writes",
                "--json", "--timeout", "30s")
    assert r.returncode == 0, r.stdout + r.stderr
    epoch = json.loads(r.stdout)["epoch"]
    assert epoch > idle
    with open_view(env.data_dir, "vol1", epoch) as v:
        assert bytes_hash(v.read(0, v.size)) == want
    labels = {p.epoch: p.label for p in list_points(env.replica_dir("vol1"))}
    assert labels[idle] == "idle" and labels[epoch] == "after writes"
