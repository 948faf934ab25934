"""Replication through a faulty link: tests/faultproxy.py sits between source and receiver
and drops, resets, stalls, delays and cuts frames in half while a steady write load runs.
Afterwards the replica must be byte-identical (nothing lost), and the faults must not have
made the source read or send the volume wholesale again."""

from __future__ import annotations

import random
import threading
import time

from faultproxy import FaultProxy
from helpers import (
    BS,
    MiB,
    assert_replica_equal,
    free_port,
    make_image,
    wait_converged,
    wait_for,
    write_random_blocks,
)

from cdp.benchmark.nbdclient import NbdClient

VOL = "vol1"
CHAOS = 12.0  # seconds of faults under load, per test


def _load(stop: threading.Event, write) -> threading.Thread:
    def run() -> None:
        while not stop.is_set():
            write()
            time.sleep(0.05)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_scan_mode_converges_through_faults_without_resending_the_volume(cdp_env, daemons):
    port = free_port()
    proxy = FaultProxy(port, seed=3, interval=0.6, delay=0.005)
    try:
        env = cdp_env(port=port, receiver_addr=f"127.0.0.1:{proxy.port}")
        size = 32 * MiB
        image = env.source.images[VOL]
        rng = random.Random(3)
        make_image(image, size, rng)
        rx = daemons.receiver(env)
        src = daemons.source(env)
        wait_converged(env, VOL, time.time(), src, rx)
        seeded = env.counters(VOL)

        written = [0]
        wrng = random.Random(4)

        def write() -> None:
            write_random_blocks(image, wrng.sample(range(size // BS), 3), wrng)
            written[0] += 3 * BS

        stop = threading.Event()
        proxy.start_chaos()
        writer = _load(stop, write)
        time.sleep(CHAOS)
        stop.set()
        writer.join()
        proxy.calm()

        wait_converged(env, VOL, time.time(), src, rx, timeout=90)
        assert_replica_equal(env, VOL)
        assert rx.running and src.running
        assert sum(proxy.faults.values()) >= 8, proxy.faults
        assert proxy.connections >= 4, "the faults should have forced reconnects"
        # only changed blocks were applied: every reconnect resumed (or fetched the hash map),
        # none re-sent the volume
        after = env.counters(VOL)
        assert after["logical"] - seeded["logical"] <= written[0], (after, seeded, written)
        st = env.source.volume_status(VOL)
        assert st is not None and st["stats"]["scanned"] <= (st["stats"]["scans"] + 1) * size
    finally:
        proxy.close()


def test_nbd_mode_converges_through_faults_and_resyncs_only_dirty_regions(cdp_env, daemons):
    port = free_port()
    proxy = FaultProxy(port, seed=5, interval=0.6, delay=0.005)
    try:
        env = cdp_env(port=port, receiver_addr=f"127.0.0.1:{proxy.port}", mode="nbd",
                      volume_extra='dirty_region = "1MiB"')
        size, hot = 32 * MiB, 4 * MiB  # writes land in the first `hot` bytes only
        image = env.source.images[VOL]
        rng = random.Random(5)
        make_image(image, size, rng)
        rx = daemons.receiver(env)
        src = daemons.source(env)
        nbd_port = int(env.source.nbd_urls[VOL].rsplit(":", 1)[1].split("/")[0])
        wait_for(lambda: (env.source.volume_status(VOL) or {}).get("nbd"), 20,
                 what="the nbd export")
        wait_converged(env, VOL, time.time(), src, rx)
        # a clean stop clears the regions the seed replicated (they stay marked while "hot",
        # 10 s, and a resync re-reads marked regions): from here on only writes dirty regions
        src.stop()
        src.start()
        wait_for(lambda: (env.source.volume_status(VOL) or {}).get("nbd"), 20,
                 what="the nbd export after a restart")
        wait_converged(env, VOL, time.time(), src, rx)
        client = NbdClient(("127.0.0.1", nbd_port), VOL)
        scanned0 = env.source.volume_status(VOL)["stats"]["scanned"]

        written = [0]
        wrng = random.Random(6)

        def write() -> None:
            for _ in range(2):
                client.write(wrng.randrange(hot // BS) * BS, wrng.randbytes(BS))
            client.flush()
            written[0] += 2 * BS

        stop = threading.Event()
        proxy.start_chaos()
        writer = _load(stop, write)
        time.sleep(CHAOS)
        stop.set()
        writer.join()
        client.close()
        proxy.calm()

        wait_converged(env, VOL, time.time(), src, rx, timeout=90)
        assert_replica_equal(env, VOL)
        reconnects = proxy.connections - 1
        assert reconnects >= 3 and sum(proxy.faults.values()) >= 8, proxy.faults
        # every session that got as far as opening the volume began with a resync (a
        # connection the proxy broke before that, in the handshake, has nothing to resync)
        opened = src.log_text().rsplit("---- start #", 1)[-1].count("resuming at epoch")
        assert opened >= 3, f"only {opened} sessions opened the volume through the faults"
        st = env.source.volume_status(VOL)
        assert st is not None and st["nbd"]["resyncs"] >= opened
        # captured writes plus one read of the dirty (hot) regions per session; one read of
        # the whole volume per session would be 8 times more
        scanned = st["stats"]["scanned"] - scanned0
        assert scanned <= written[0] + (opened + 2) * hot, (
            f"{scanned / MiB:.0f} MiB read for {written[0] / MiB:.0f} MiB written over "
            f"{opened} sessions ({reconnects} reconnects)")
    finally:
        proxy.close()
