"""Failback end to end: replicate, promote, write on both sides, fail back: the receivers in
this process, the source and every `cdp` command real processes.

After `cdp failover promote`, the DR image is written (the DR machine ran), and the
original image was also written after the last epoch the DR site applied. `cdp
failback prepare` (original site) + `cdp receiver` + `cdp failback run` (DR site) must
leave the original image byte-identical to the promoted one, sending only the blocks
that differ (counted on the wire by a proxy).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

from helpers import (
    BS,
    MiB,
    assert_replica_equal,
    file_hash,
    free_port,
    make_image,
    run_cdp,
    wait_converged,
    wait_for,
    write_random_blocks,
)
from inprocess import InProcessDaemon

VOL = "vol1"
SIZE = 64 * MiB


def test_failback_ships_only_differences(cdp_env, daemons, fault_proxy, tmp_path):
    env = cdp_env()
    original = env.source.images[VOL]
    rng = random.Random(11)
    make_image(original, SIZE, rng, zero=0.1)
    rx = daemons.receiver(env, inprocess=True)
    src = daemons.source(env)  # a process: `cdp failback` checks it is gone by its pid
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
    frx = InProcessDaemon("receiver", fb / "receiver.toml", tmp_path / "failback-receiver.log", port)
    daemons.all.append(frx)
    frx.start()
    proxy = fault_proxy(port)
    r = run_cdp("failback", "run", "-c", env.receiver_toml, VOL, "--to",
                f"127.0.0.1:{proxy.port}", "--token-file", prep["token_file"], "--json",
                timeout=300)
    assert r.returncode == 0, r.stderr + frx.tail()
    rep = json.loads(r.stdout)

    assert file_hash(original) == file_hash(promoted)
    assert rep["blocks_sent"] == differing, (rep, differing)
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


def promote_and_prepare(env, daemons, tmp_path, size: int, seed: int):
    """Replicate an image, stop the source, promote, and serve the original image for
    failback (prepare + a failback receiver); returns (rng, rx, src, prep, frx, port)."""
    original = env.source.images[VOL]
    rng = random.Random(seed)
    make_image(original, size, rng, zero=0.1)
    rx = daemons.receiver(env, inprocess=True)
    src = daemons.source(env)  # a process: `cdp failback` checks it is gone by its pid
    wait_converged(env, VOL, time.time(), src, rx)
    src.stop()
    r = run_cdp("failover", "promote", "-c", env.receiver_toml, VOL, "--json")
    assert r.returncode == 0, r.stderr
    port = free_port()
    fb = tmp_path / "failback"
    r = run_cdp("failback", "prepare", "-c", env.source.toml, VOL, "--listen",
                f"127.0.0.1:{port}", "--dir", fb, "--json")
    assert r.returncode == 0, r.stderr
    frx = InProcessDaemon("receiver", fb / "receiver.toml", tmp_path / "failback-receiver.log", port)
    daemons.all.append(frx)
    frx.start()
    return rng, rx, src, json.loads(r.stdout), frx, port


def failback_run(env, prep, port: int) -> subprocess.CompletedProcess[str]:
    return run_cdp("failback", "run", "-c", env.receiver_toml, VOL, "--to", f"127.0.0.1:{port}",
                   "--token-file", prep["token_file"], "--json", timeout=120)


def test_finish_refuses_until_a_run_shipped_the_dr_writes(cdp_env, daemons, tmp_path):
    env = cdp_env()
    size = 8 * MiB
    rng, rx, src, prep, frx, port = promote_and_prepare(env, daemons, tmp_path, size, 12)
    original, promoted = env.source.images[VOL], env.replica_image(VOL)
    # the DR machine wrote a file: finish before any run is refused, nothing changes
    write_random_blocks(promoted, [7, 8, 9], rng)
    dr = promoted.read_bytes()
    r = run_cdp("failback", "finish", "-c", env.receiver_toml, VOL)
    assert r.returncode == 1 and "no `cdp failback run`" in r.stderr, r.stderr
    assert "--discard-dr-writes" in r.stderr
    assert (env.replica_dir(VOL) / "promoted.json").exists() and promoted.read_bytes() == dr

    r = failback_run(env, prep, port)
    assert r.returncode == 0, r.stderr + frx.tail()
    assert json.loads(r.stdout)["blocks_sent"] >= 3 and original.read_bytes() == dr
    # the DR machine ran on after that run: refused again, the original lacks this write
    write_random_blocks(promoted, [20], rng)
    dr = promoted.read_bytes()
    r = run_cdp("failback", "finish", "-c", env.receiver_toml, VOL)
    assert r.returncode == 1 and "changed after the last completed" in r.stderr, r.stderr
    r = failback_run(env, prep, port)
    assert r.returncode == 0, r.stderr + frx.tail()
    assert json.loads(r.stdout)["blocks_sent"] == 1 and original.read_bytes() == dr
    frx.stop()
    r = run_cdp("failback", "finish", "-c", env.receiver_toml, VOL, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["verified"]

    # the original site's source resumes: every DR write is still there, on both sides
    src.start()
    wait_converged(env, VOL, time.time(), src, rx)
    assert promoted.read_bytes() == dr and original.read_bytes() == dr
    assert_replica_equal(env, VOL)
    src.stop()
    rx.stop()


def test_failback_run_after_a_kill_and_through_a_reset_counts_each_block_once(
        cdp_env, daemons, fault_proxy, tmp_path):
    env = cdp_env()
    size = 32 * MiB
    rng, rx, _, prep, frx, port = promote_and_prepare(env, daemons, tmp_path, size, 13)
    original, promoted = env.source.images[VOL], env.replica_image(VOL)
    changed = rng.sample(range(size // BS), 400)
    write_random_blocks(promoted, changed, rng)
    dr = promoted.read_bytes()

    # a run killed while it waits for a receiver that is not there leaves its work folder
    proc = subprocess.Popen([sys.executable, "-m", "cdp", "failback", "run", "-c",
                             str(env.receiver_toml), VOL, "--to", f"127.0.0.1:{free_port()}",
                             "--token-file", prep["token_file"]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        left = wait_for(lambda: list(env.data_dir.glob(f".failback-{VOL}-*")), 30,
                        what="the run's work folder")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert left[0].exists()

    # the next run removes it; its connection is reset half way through the one epoch
    proxy = fault_proxy(port)
    reset = proxy.inject_at(len(changed) * BS // 2, "reset", "up")
    r = failback_run(env, prep, proxy.port)
    proxy.close()
    assert r.returncode == 0, r.stderr + frx.tail()
    rep = json.loads(r.stdout)
    assert reset.fired and reset.wait(0).connections >= 1  # a live connection was reset
    assert not left[0].exists() and rep["removed_leftovers"] == [left[0].name]
    assert original.read_bytes() == dr
    assert rep["blocks_sent"] == len(changed), rep
    assert rep["block_sends"] > len(changed), rep  # what went twice is reported apart
    frx.stop()
    r = run_cdp("failback", "finish", "-c", env.receiver_toml, VOL, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["verified"], r.stderr
    assert not list(env.data_dir.glob(".failback-*"))
    rx.stop()
