"""Replication end to end: real receiver and source processes on loopback, real files.

Guarantee 2 (convergence through restarts and downtime) and the efficiency
claims behind it (only changed blocks travel, each distinct block once), plus
the `verify` and `status` verbs users script against.
"""

from __future__ import annotations

import json
import random
import time

from helpers import (
    BS,
    MiB,
    assert_replica_equal,
    file_hash,
    make_image,
    run_cdp,
    scaled,
    wait_converged,
    wait_for,
    write_blocks,
    write_random_blocks,
)

VOL = "vol1"


def _seed(cdp_env, daemons, size: int, seed: int, timeout: float = 60, inprocess: bool = True,
          **image_kw):
    """A seeded replica; the daemons run in this process unless the test kills them."""
    env = cdp_env()
    image = env.source.images[VOL]
    rng = random.Random(seed)
    make_image(image, size, rng, **image_kw)
    rx = daemons.receiver(env, inprocess=inprocess)
    t0 = time.time()
    src = daemons.source(env, inprocess=inprocess)
    wait_converged(env, VOL, t0, src, rx, timeout=timeout)
    assert_replica_equal(env, VOL)
    return env, image, rng, rx, src


def test_seed_then_incremental_carries_only_changed_blocks(cdp_env, daemons):
    size = 256 * MiB
    env, image, rng, rx, src = _seed(cdp_env, daemons, size, seed=1, timeout=180)
    after_seed = env.counters(VOL)
    assert after_seed["epochs"] >= 1
    assert env.replica_state(VOL)["epoch"] >= 1

    # Rewrite random blocks for a few seconds while the daemons run. Each block
    # is written at most once, so "distinct changed blocks" is also an upper
    # bound on what a correct source has to carry.
    blocks = size // BS
    order = rng.sample(range(blocks), blocks)
    changed: list[int] = []
    end = time.monotonic() + 3
    while time.monotonic() < end and len(changed) < 480:
        batch = [order.pop() for _ in range(8)]
        write_random_blocks(image, batch, rng)
        changed += batch
        time.sleep(0.05)
    t1 = time.time()
    wait_converged(env, VOL, t1, src, rx, timeout=60)
    assert_replica_equal(env, VOL)

    c = env.counters(VOL)
    logical = c["logical"] - after_seed["logical"]
    wire = c["wire"] - after_seed["wire"]
    data = c["data"] - after_seed["data"]
    slack = 16 + len(changed) // 20  # a block torn by a concurrent read travels twice
    assert len(changed) * BS <= logical <= (len(changed) + slack) * BS, (
        f"{len(changed)} blocks changed but {logical / BS:.0f} blocks were applied")
    assert data >= len(changed) * BS  # random blocks: no dedup possible, all went as data
    assert wire <= (len(changed) + slack) * BS * 1.05 + 1 * MiB
    assert wire < size / 4, f"incremental phase sent {wire} bytes for a {size}-byte image"
    src.stop()
    rx.stop()


def test_dedup_sends_each_distinct_block_once_and_zeroes_as_runs(cdp_env, daemons):
    env = cdp_env()
    image = env.source.images[VOL]
    rng = random.Random(2)
    size = 32 * MiB
    blocks = size // BS
    distinct = [rng.randbytes(BS) for _ in range(6)]
    content: dict[int, bytes] = {}
    for i in range(blocks):
        if (i // 16) % 4 == 0:
            continue  # zero region (a hole)
        content[i] = distinct[i % len(distinct)] if i < 96 else rng.choice(distinct)
    with open(image, "wb") as fh:
        fh.truncate(size)
    write_blocks(image, content)
    rx = daemons.receiver(env, inprocess=True)
    t0 = time.time()
    src = daemons.source(env, inprocess=True)
    wait_converged(env, VOL, t0, src, rx)
    assert_replica_equal(env, VOL)

    c = env.counters(VOL)
    nonzero = len(content)
    assert c["data"] == len(distinct) * BS, "each distinct block must travel exactly once"
    assert c["dedup"] == (nonzero - len(distinct)) * BS
    assert c["logical"] == nonzero * BS
    assert c["zero"] == 0  # a new replica is all zero already: nothing to send
    assert c["wire"] < 2 * len(distinct) * BS + 1 * MiB

    # Zero some data blocks (written as zeros, not punched), and copy known
    # content into former holes: zero runs and references, no data.
    # (not the first copies, blocks 16-21: the source's dedup index points there)
    zeroed = rng.sample([i for i in sorted(content) if i >= 96], 20)
    holes = [i for i in range(blocks) if i not in content]
    copied = rng.sample(holes, 10)
    changes = {i: bytes(BS) for i in zeroed}
    changes.update({i: rng.choice(distinct) for i in copied})
    before = c
    t1 = time.time()
    write_blocks(image, changes)
    wait_converged(env, VOL, t1, src, rx)
    assert_replica_equal(env, VOL)
    c = env.counters(VOL)
    assert c["zero"] - before["zero"] == len(zeroed) * BS
    assert c["dedup"] - before["dedup"] == len(copied) * BS
    assert c["data"] - before["data"] == 0
    src.stop()
    rx.stop()


def test_source_restart_resumes_without_full_resend(cdp_env, daemons):
    size = 32 * MiB
    env, image, rng, rx, src = _seed(cdp_env, daemons, size, seed=3)
    src.stop()
    base = env.counters(VOL)

    changed = write_random_blocks(image, rng.sample(range(size // BS), 40), rng)
    t1 = time.time()
    src.start()
    wait_converged(env, VOL, t1, src, rx)
    assert_replica_equal(env, VOL)
    c = env.counters(VOL)
    logical = c["logical"] - base["logical"]
    wire = c["wire"] - base["wire"]
    assert logical <= (len(changed) + 4) * BS, f"{logical / BS:.0f} blocks resent for 40 changed"
    assert wire <= (len(changed) + 4) * BS * 1.05 + 256 * 1024
    assert wire < size / 10
    src.stop()
    rx.stop()


def test_receiver_downtime_then_converges(cdp_env, daemons):
    size = 32 * MiB
    env, image, rng, rx, src = _seed(cdp_env, daemons, size, seed=4)
    base = env.counters(VOL)
    rx.stop()
    wait_for(lambda: (env.source.status() or {}).get("connected") is False, 15,
             what="the source to notice the receiver is gone")

    changed: set[int] = set()
    for _ in range(6):  # the source keeps scanning and retrying meanwhile
        changed.update(write_random_blocks(image, rng.sample(range(size // BS), 10), rng))
        time.sleep(0.3)
    assert src.running
    t1 = time.time()
    rx.start()
    wait_converged(env, VOL, t1, src, rx, timeout=60)
    assert_replica_equal(env, VOL)
    c = env.counters(VOL)
    assert c["logical"] - base["logical"] <= (len(changed) + 4) * BS
    assert c["wire"] - base["wire"] < size / 4
    src.stop()
    rx.stop()


def test_source_restarted_while_receiver_down_then_both_killed_together(cdp_env, daemons):
    size = 32 * MiB
    env, image, rng, rx, src = _seed(cdp_env, daemons, size, seed=6, inprocess=False)
    base = env.counters(VOL)
    rx.stop()
    changed: set[int] = set()
    changed.update(write_random_blocks(image, rng.sample(range(size // BS), 12), rng))
    src.stop()  # the source restarts while the receiver is away
    changed.update(write_random_blocks(image, rng.sample(range(size // BS), 12), rng))
    src.start()
    time.sleep(1.0)
    assert src.running
    t1 = time.time()
    rx.start()
    wait_converged(env, VOL, t1, src, rx, timeout=60)
    assert_replica_equal(env, VOL)
    # both die at once (a site power cut), more writes land, both come back together
    changed.update(write_random_blocks(image, rng.sample(range(size // BS), 12), rng))
    src.kill()
    rx.kill()
    changed.update(write_random_blocks(image, rng.sample(range(size // BS), 12), rng))
    t2 = time.time()
    rx.start()
    src.start()
    wait_converged(env, VOL, t2, src, rx, timeout=60)
    assert_replica_equal(env, VOL)
    c = env.counters(VOL)
    assert c["wire"] - base["wire"] < size / 4  # never a whole-volume resend
    src.stop()
    rx.stop()


def test_verify_equal_then_names_the_corrupted_block(cdp_env, daemons):
    size = 16 * MiB
    env, _image, _rng, rx, src = _seed(cdp_env, daemons, size, seed=5, zero=0.1)
    toml = env.source.toml

    r = run_cdp("verify", "-c", toml)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{VOL}: equal" in r.stdout
    r = run_cdp("verify", "-c", toml, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep[0]["volume"] == VOL and rep[0]["equal"] is True and rep[0]["differing"] == []
    # the DR site's own check, beside the live receiver (which holds the replica's lock)
    r = run_cdp("verify", "--replica", "-c", env.receiver_toml, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [(x["volume"], x["equal"]) for x in json.loads(r.stdout)] == [(VOL, True)]

    # Corrupt one block of the replica behind the receiver's back. Nothing
    # repairs it (the source only sends what changed at the source): verify must tell.
    src.stop()
    rx.stop()
    bad = 37
    good_hash = file_hash(env.replica_image(VOL))
    with open(env.replica_image(VOL), "r+b") as fh:
        fh.seek(bad * BS + 1000)
        fh.write(b"\xde\xad\xbe\xef" * 64)
    assert file_hash(env.replica_image(VOL)) != good_hash
    rx.start()

    r = run_cdp("verify", "-c", toml)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 of 256 blocks differ" in r.stdout, r.stdout
    assert r.stdout.rstrip().endswith(f": {bad}"), r.stdout
    r = run_cdp("verify", "-c", toml, "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep[0]["equal"] is False and rep[0]["differing"] == [bad]
    r = run_cdp("verify", "--replica", "-c", env.receiver_toml)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.rstrip().endswith(f"1 differing block: {bad}"), r.stdout
    rx.stop()


def test_status_json_reports_epoch_and_lag(cdp_env, daemons):
    size = 8 * MiB
    env, image, rng, rx, src = _seed(cdp_env, daemons, size, seed=6)
    t1 = time.time()
    write_random_blocks(image, [3, 4, 5], rng)
    wait_converged(env, VOL, t1, src, rx)
    epoch = env.replica_state(VOL)["epoch"]
    assert epoch >= 2

    def receiver_report():
        r = run_cdp("status", "-c", env.receiver_toml, "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        rep = json.loads(r.stdout)
        return rep if rep["volumes"] and rep["volumes"][0]["connected"] else None

    rep = wait_for(receiver_report, 15, interval=0.3, what="receiver status to show the source")
    assert rep["kind"] == "receiver"
    v = rep["volumes"][0]
    assert v["volume"] == VOL and v["epoch"] == epoch
    assert isinstance(v["lag"], float) and 0 <= v["lag"] < scaled(60)
    assert v["client"] == "host1" and v["error"] == ""
    assert v["counters"]["epochs"] == epoch and v["size"] == size

    r = run_cdp("status", "-c", env.source.toml, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["kind"] == "source" and rep["running"] is True and rep["connected"] is True
    v = rep["volumes"][0]
    assert v["volume"] == VOL and v["acked_epoch"] == epoch and v["pending_epochs"] == 0
    assert v["seeded"] is True and v["error"] == ""
    assert isinstance(v["lag"], float) and 0 <= v["lag"] < scaled(60)
    src.stop()
    rx.stop()

    # Stopped daemons: status still answers from the files, and says so.
    r = run_cdp("status", "-c", env.source.toml, "--json")
    assert r.returncode == 0
    rep = json.loads(r.stdout)
    assert rep["running"] is False or rep["connected"] is False
    r = run_cdp("status", "-c", env.receiver_toml, "--json")
    assert r.returncode == 0
    v = json.loads(r.stdout)["volumes"][0]
    assert v["epoch"] == epoch and v["connected"] is False


def test_idle_source_does_not_rescan_continuously(cdp_env, daemons):
    """With nothing changing, scans come from the scan_interval timer, not from the
    source's own reads of the volume (which file watching also reports)."""
    env = cdp_env(scan_interval="30s", min_scan_interval="0.1s")
    image = env.source.images[VOL]
    make_image(image, 8 * MiB, random.Random(7))
    rx = daemons.receiver(env, inprocess=True)
    t0 = time.time()
    src = daemons.source(env, inprocess=True)
    wait_converged(env, VOL, t0, src, rx)
    time.sleep(1.5)  # the status file is written once a second
    before = env.source.volume_status(VOL)["stats"]["scans"]
    time.sleep(4)
    after = env.source.volume_status(VOL)["stats"]["scans"]
    assert after - before <= 1, (
        f"{after - before:.0f} scans in 4 s of an unchanged volume with scan_interval = 30s")
    src.stop()
    rx.stop()
