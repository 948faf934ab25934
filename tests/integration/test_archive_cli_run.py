"""`cdp archive run` on a real replica, read through its point-in-time view and hash map."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from archive_fixtures import receiver_with_archive
from helpers import file_hash, run_cdp

from cdp.blocks import Geometry, pack_u64
from cdp.codec import block_hash, compress
from cdp.replica import Replica

BS = 64 * 1024


def _epoch(rep: Replica, epoch: int, blocks: dict[int, bytes]) -> None:
    w = rep.begin(epoch, time.time() - 100 + epoch)
    idx = sorted(blocks)
    data = b"".join(blocks[i] for i in idx)
    w.add_data(pack_u64(idx), b"".join(block_hash(blocks[i]) for i in idx), len(data), compress(data))
    w.seal(w.blocks)
    w.apply()


def test_cli_run_archives_the_replica_at_its_latest_point(tmp_path: Path) -> None:
    toml = receiver_with_archive(tmp_path / "rx", str(tmp_path / "repo"), volumes=["vm1"])
    data_dir = tmp_path / "rx" / "replicas"
    rng = random.Random(4)
    rep = Replica.open(data_dir, "vm1", Geometry(128 * BS, BS), create=True)
    try:
        _epoch(rep, 1, {i: rng.randbytes(BS) for i in range(0, 128, 3)})
        _epoch(rep, 2, {i: rng.randbytes(BS) for i in (5, 60, 61)})
    finally:
        rep.close()
    assert run_cdp("archive", "init", "-c", toml).returncode == 0
    r = run_cdp("archive", "run", "-c", toml, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["volumes"][0]["volume"] == "vm1" and report["volumes"][0]["size"] == 128 * BS
    r = run_cdp("archive", "list", "-c", toml, "--json")
    (snap,) = json.loads(r.stdout)
    assert snap["volumes"][0]["epoch"] == 2
    out = tmp_path / "vm1.img"
    r = run_cdp("archive", "restore", "-c", toml, "latest", "vm1", "--to", out)
    assert r.returncode == 0, r.stderr
    first = file_hash(data_dir / "vm1" / "image")
    assert file_hash(out) == first

    # the next run reads only the chunks the replica's hash map shows changed
    rep = Replica.open(data_dir, "vm1")
    try:
        _epoch(rep, 3, {i: rng.randbytes(BS) for i in (7, 100)})  # chunks 1 and 25 of 32 (256 KiB)
    finally:
        rep.close()
    r = run_cdp("archive", "run", "-c", toml, "--json")
    assert r.returncode == 0, r.stderr
    vol = json.loads(r.stdout)["volumes"][0]
    assert vol["chunks"] == 32 and vol["unread_chunks"] == 30 and vol["new_chunks"] == 2
    r = run_cdp("archive", "run", "-c", toml, "--json", "--full-read")
    vol = json.loads(r.stdout)["volumes"][0]
    assert vol["unread_chunks"] == 0 and vol["new_chunks"] == 0
    r = run_cdp("archive", "restore", "-c", toml, "latest", "vm1", "--to", tmp_path / "vm1-3.img")
    assert r.returncode == 0, r.stderr
    assert file_hash(tmp_path / "vm1-3.img") == file_hash(data_dir / "vm1" / "image") != first
    r = run_cdp("archive", "verify", "-c", toml, "--read-data")
    assert r.returncode == 0, r.stdout
