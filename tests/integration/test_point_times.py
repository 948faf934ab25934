"""When a recovery point was captured, and what `cdp failover test --at T` may return.

Every clone is compared byte for byte with a copy of the source image kept at
the moment it stands for. `--at T` must return a point holding no write that
finished after T, and never the empty replica from before the first epoch.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest
from helpers import (
    BS,
    CdpEnv,
    MiB,
    bytes_hash,
    file_hash,
    make_image,
    run_cdp,
    wait_converged,
    wait_for,
    write_blocks,
)

VOL = "vol1"


def drill_at(env: CdpEnv, at: float, tmp: Path) -> tuple[int, dict, str]:
    """`cdp failover test --at AT --format raw --keep --json`: exit status, report, and the
    hash of the clone (removed afterwards)."""
    r = run_cdp("failover", "test", "-c", env.receiver_toml, VOL, "--at", repr(at),
                "--format", "raw", "--keep", "--dir", tmp, "--json")
    if r.returncode not in (0, 1):
        return r.returncode, {"stderr": r.stderr}, ""
    rep = json.loads(r.stdout)
    h = file_hash(rep["clone"])
    shutil.rmtree(Path(rep["clone"]).parent)
    return r.returncode, rep, h


def test_at_before_the_first_point_is_refused(cdp_env, daemons, tmp_path: Path) -> None:
    # kept forever: by age, point 0 (time 0) would be dropped at once, hiding the mistake
    env = cdp_env(receiver_extra='keep_points = "forever"')
    image = env.source.images[VOL]
    make_image(image, 2 << 20, random.Random(51), zero=0.0)
    seeded = image.read_bytes()  # the image the first epoch captures
    rx = daemons.receiver(env, inprocess=True)
    before = time.time()
    src = daemons.source(env, inprocess=True)
    wait_converged(env, VOL, before, src, rx)
    # before the first epoch the replica held nothing: no point was captured then
    rc, rep, _ = drill_at(env, before - 60, tmp_path / "drills")
    assert rc == 2, rep
    assert "no point captured at or before" in rep["stderr"], rep
    assert "the oldest is epoch 1" in rep["stderr"], rep
    # the first point itself is found, and is the image as seeded
    rc, rep, h = drill_at(env, time.time(), tmp_path / "drills")
    assert rc == 0 and rep["point"]["epoch"] == 1, rep
    assert h == bytes_hash(seeded)
    src.stop()
    rx.stop()


def points(env: CdpEnv) -> list[dict]:
    r = run_cdp("points", "-c", env.receiver_toml, VOL, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["points"]


def test_a_point_is_stamped_when_pre_scan_returns(cdp_env, daemons, tmp_path: Path) -> None:
    """The guest's writer holds a lock that the quiesce hook waits for (as fsfreeze waits for
    writes in flight): a write that finished while the hook waited is in the point, so the
    point must not claim a time before that write."""
    lock, waits = tmp_path / "guest.lock", tmp_path / "waits"
    lock.touch()
    pre = f"echo waiting >> {waits} && flock {lock} true"
    env = cdp_env(volume_extra=f"pre_scan = {json.dumps(pre)}",
                  receiver_extra='keep_points = "forever"')
    image = env.source.images[VOL]
    make_image(image, 1 * MiB, random.Random(52), zero=0.0)
    rx = daemons.receiver(env, inprocess=True)
    t0 = time.time()
    src = daemons.source(env, inprocess=True)
    wait_converged(env, VOL, t0, src, rx)
    before = image.read_bytes()
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the writer takes the lock ...
        n = len(waits.read_text().splitlines())
        wait_for(lambda: len(waits.read_text().splitlines()) > n, 30,
                 what="a scan whose pre_scan waits for the lock")
        at = time.time()  # ... a scan's hook waits for it: the state is not captured yet
        write_blocks(image, {5: os.urandom(BS)})  # a write that finishes after `at`
        done = time.time()
    finally:
        os.close(fd)  # the write is done: the hook gets the lock and the scan reads it
    after = image.read_bytes()
    wait_converged(env, VOL, time.time(), src, rx)
    assert file_hash(env.replica_image(VOL)) == bytes_hash(after)
    # --at a time before the write finished: the point from before it, byte for byte
    rc, rep, h = drill_at(env, at, tmp_path / "drills")
    assert h == bytes_hash(before), "--at returned a point holding a write that finished later"
    assert rc == 0 and rep["point"]["epoch"] == 1, rep
    newest = points(env)[-1]
    assert newest["epoch"] == 2 and newest["time"] > done, newest
    rc, rep, h = drill_at(env, newest["time"], tmp_path / "drills")
    assert rc == 0 and rep["point"]["epoch"] == 2 and h == bytes_hash(after), rep
    src.stop()
    rx.stop()


def test_a_scan_over_a_period_counts_from_the_end_of_its_reads(cdp_env, daemons,
                                                                tmp_path: Path) -> None:
    """No hook, no snapshot: the scan reads over a period (slowed by read_limit). A write that
    lands after the scan began, in a block it reads later, is in the point; `--at` a time in
    between must not return that point (README: "Scans see torn state")."""
    size = 6 * MiB  # read at 3 MiB/s: the last block is read two seconds into a scan
    env = cdp_env(source_extra='read_limit = "3MiB/s"', scan_interval="0.5s",
                  receiver_extra='keep_points = "forever"')
    image = env.source.images[VOL]
    make_image(image, size, random.Random(53), zero=0.0)
    rx = daemons.receiver(env, inprocess=True)
    t0 = time.time()
    src = daemons.source(env, inprocess=True)
    wait_converged(env, VOL, t0, src, rx)
    before = image.read_bytes()
    for _ in range(3):
        n = src.log_text().count("scan start volume=vol1")
        wait_for(lambda n=n: src.log_text().count("scan start volume=vol1") > n, 30,
                 what="a scan")
        time.sleep(0.3)
        at = time.time()  # the scan began before this; it reads the last block about 1.7 s later
        write_blocks(image, {size // BS - 1: os.urandom(BS)})
        after = image.read_bytes()
        want = bytes_hash(after)
        wait_for(lambda want=want: file_hash(env.replica_image(VOL)) == want, 30,
                 what="the write to reach the replica")
        torn = points(env)[-1]
        if torn["time"] <= at:
            break  # the scan that began before `at` read the write
        before = after  # a machine so slow that the next scan read it: once more
    else:
        pytest.fail("no scan that began before a write read it, in three tries")
    rc, rep, h = drill_at(env, at, tmp_path / "drills")
    assert h == bytes_hash(before), "--at returned a point holding a write that finished later"
    assert rc == 0 and rep["point"]["epoch"] == torn["epoch"] - 1, rep
    assert torn["time"] <= at < torn["until"], torn
    rc, rep, h = drill_at(env, torn["until"], tmp_path / "drills")
    assert rc == 0 and rep["point"]["epoch"] == torn["epoch"] and h == bytes_hash(after), rep
    src.stop()
    rx.stop()
