"""Failback end to end: replicate, promote, write on both sides, fail back with real processes.

After `cdp failover promote`, the DR image is written (the DR machine ran), and the
original image was also written after the last epoch the DR site applied. `cdp
failback prepare` (original site) + `cdp receiver` + `cdp failback run` (DR site) must
leave the original image byte-identical to the promoted one, sending only the blocks
that differ (counted on the wire by a proxy).
"""

from __future__ import annotations

import json
import random
import time

from conftest import (
    BS,
    Daemon,
    MiB,
    assert_replica_equal,
    file_hash,
    free_port,
    make_image,
    run_cdp,
    wait_converged,
    write_random_blocks,
)

VOL = "vol1"
SIZE = 64 * MiB


def test_failback_ships_only_differences(cdp_env, daemons, counting_proxy, tmp_path):
    env = cdp_env()
    original = env.source.images[VOL]
    rng = random.Random(11)
    make_image(original, SIZE, rng, zero=0.1)
    rx = daemons.receiver(env)
    src = daemons.source(env)
    wait_converged(env, VOL, time.time(), src, rx)
    src.stop()

    # not promoted yet: refused with a clear message
    r = run_cdp("failback", "run", "-c", env.receiver_toml, VOL, "--to", "127.0.0.1:1",
                "--token-file", env.tokens["host1"])
    assert r.returncode == 1 and "is not promoted" in r.stderr, r.stderr

    blocks = SIZE // BS
    order = rng.sample(range(blocks), blocks)
    # the original site wrote after the last epoch the DR site applied
    late = write_random_blocks(original, [order.pop() for _ in range(20)], rng)
    r = run_cdp("failover", "promote", "-c", env.receiver_toml, VOL, "--json")
    assert r.returncode == 0, r.stderr
    promoted = env.replica_image(VOL)
    # the DR machine ran on the promoted image
    dr = write_random_blocks(promoted, [order.pop() for _ in range(30)], rng)
    both = write_random_blocks(promoted, late[:5], rng)  # also some the original changed
    assert file_hash(original) != file_hash(promoted)
    differing = len(set(late) | set(dr) | set(both))

    port = free_port()
    fb = tmp_path / "failback"
    r = run_cdp("failback", "prepare", "-c", env.source.toml, VOL, "--listen",
                f"127.0.0.1:{port}", "--dir", fb, "--json")
    assert r.returncode == 0, r.stderr
    prep = json.loads(r.stdout)
    assert prep["blocks"] == blocks
    frx = Daemon("receiver", fb / "receiver.toml", tmp_path / "failback-receiver.log", port)
    daemons.all.append(frx)
    frx.start()
    proxy = counting_proxy(port)
    r = run_cdp("failback", "run", "-c", env.receiver_toml, VOL, "--to",
                f"127.0.0.1:{proxy.port}", "--token-file", prep["token_file"], "--json",
                timeout=300)
    assert r.returncode == 0, r.stderr + frx.tail()
    rep = json.loads(r.stdout)

    assert file_hash(original) == file_hash(promoted)
    assert differing <= rep["blocks_sent"] <= differing + 2, (rep, differing)
    # random blocks do not compress: what travels is about the differing blocks, a small
    # fraction of the volume (plus the hash map, 16 bytes a block, coming back)
    assert proxy.up <= differing * BS * 1.1 + 256 * 1024, (proxy.up, differing)
    assert proxy.up < SIZE / 20
    assert rep["bytes_sent"] <= proxy.up
    assert proxy.down < blocks * 16 * 1.2 + 64 * 1024
    frx.stop()

    # finish: the promoted image is a replica again; the original source resumes, no reseed
    r = run_cdp("failback", "finish", "-c", env.receiver_toml, VOL, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["replica_id"] != json.loads(r.stdout)["previous_replica_id"]
    r = run_cdp("failback", "finish", "-c", env.receiver_toml, VOL)
    assert r.returncode == 1 and "is not promoted" in r.stderr, r.stderr
    before = env.counters(VOL)
    src.start()
    wait_converged(env, VOL, time.time(), src, rx)
    assert_replica_equal(env, VOL)
    assert env.counters(VOL)["data"] == before["data"], "resuming re-sent blocks"
    more = write_random_blocks(original, [order.pop() for _ in range(3)], rng)
    wait_converged(env, VOL, time.time(), src, rx)
    assert_replica_equal(env, VOL)
    assert env.counters(VOL)["data"] - before["data"] == len(more) * BS
    src.stop()
    rx.stop()
