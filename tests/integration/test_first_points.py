"""Point 0 and leftovers (issue 15, item 14 and the recovery issue's rest), with a real
receiver and source: a first seed drops nothing a user could restore, so it says nothing
about it; point 0 (the empty replica before the first epoch) is refused by failover test
and promote; a receiver that starts removes the work folders of killed failback runs,
unless a run holds its volume's lock."""

from __future__ import annotations

import fcntl
import os
import random
import re
import time

from helpers import MiB, run_cdp, wait_converged, wait_for

VOL = "vol1"
DROPPED = "oldest recovery point"


def _write(image, rng: random.Random) -> None:
    with open(image, "r+b") as fh:
        fh.seek(rng.randrange(0, 60) * 64 * 1024)
        fh.write(rng.randbytes(64 * 1024))


def test_a_first_seed_drops_nothing_restorable_and_point_0_is_refused(cdp_env, daemons):
    env = cdp_env(scan_interval="0.3s", receiver_extra='keep_points = "2s"')
    image = env.source.images[VOL]
    rng = random.Random(6)
    with open(image, "wb") as fh:
        fh.truncate(4 * MiB)
    _write(image, rng)
    rx = daemons.receiver(env, inprocess=True)
    src = daemons.source(env, inprocess=True)
    wait_converged(env, VOL, time.time(), src, rx)
    assert env.replica_state(VOL)["epoch"] >= 1
    assert DROPPED not in rx.log_text(), rx.tail()  # point 0 went, and nothing restorable

    for verb in (("failover", "test"), ("failover", "promote", "--force")):
        r = run_cdp(*verb, "-c", env.receiver_toml, VOL, "--point", "0")
        assert r.returncode == 2, r.stdout + r.stderr
        assert "point 0 of vol1 is the empty replica before the first epoch" in r.stderr
        assert "the first restorable point is 1" in r.stderr
    assert not (env.replica_dir(VOL) / "promoted.json").exists()
    r = run_cdp("failover", "test", "-c", env.receiver_toml, VOL, "--point", "1")
    assert r.returncode in (0, 2), r.stderr  # 1 may have aged out; never the empty one
    assert "empty replica" not in r.stderr

    # points that did hold something go with retention, and the log says which
    _write(image, rng)
    wait_converged(env, VOL, time.time(), src, rx)
    time.sleep(2.5)
    _write(image, rng)
    wait_converged(env, VOL, time.time(), src, rx)
    line = wait_for(lambda: next((x for x in rx.log_text().splitlines() if DROPPED in x), None),
                    30, what="retention to drop a point that held something")
    assert re.search(r"volume=vol1 dropped \d+ oldest recovery point\(s\) \(retention\): "
                     r"epoch [1-9]\d* \(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\)", line), line


def test_a_starting_receiver_removes_what_killed_failback_runs_left(cdp_env, daemons):
    env = cdp_env()
    data = env.data_dir
    (data / VOL).mkdir(parents=True)
    killed = data / ".failback-gone-vm-1a2b3c4d"  # its volume is gone: removed
    killed.mkdir()
    (killed / "state.json").write_text("{}")
    live = data / f".failback-{VOL}-x9y8z7w6"  # its run holds the lock: kept
    live.mkdir()
    other = data / ".failback-notes"  # not a run's folder (no suffix): kept
    other.mkdir()
    fd = os.open(data / VOL / "failback.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rx = daemons.receiver(env)
        assert not killed.exists() and live.is_dir() and other.is_dir()
        assert f"removed {killed.name}, left by a failback run that was killed" in rx.log_text()
        assert f"failback work folders of {VOL} kept" in rx.log_text()
        rx.stop()
    finally:
        os.close(fd)  # the run ended without cleaning up (killed)
    rx.start()
    assert not live.exists() and other.is_dir()
    assert f"removed {live.name}, left by a failback run that was killed" in rx.log_text()
    rx.stop()
