"""An authenticated source that abuses the receiver must not hold another client hostage.

host2 is a real, authenticated client gone bad: over six connections, one per volume, it sends
epochs made of nothing but Zero frames whose runs each cover the whole volume, and it never
reads what the receiver answers. Meanwhile host1's real source replicates as usual. The
receiver must keep host1 converging, keep its own memory bounded, and host2's floods must be
applied right (its replicas are all zeros and agree with their hash maps).
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from pathlib import Path

from helpers import (
    MiB,
    assert_replica_equal,
    feed,
    make_image,
    scaled,
    sent,
    wait_converged,
    wait_for,
    write_random_blocks,
)

from cdp.blocks import pack_u64
from cdp.codec import HASH_LEN, block_hash, zero_hash
from cdp.wire.messages import Begin, Commit, Open, Zero
from cdp.wire.source_session import SourceSession

ABUSED = [f"abuse{i}" for i in range(6)]
RUNS = 4096  # per frame, each over the whole volume
GIB = 1 << 30
BS = 4096
RSS_LIMIT = 500 * MiB


def rss_peak(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def flood(port: int, token: bytes, vol: str, stop: threading.Event, frames: list[int]) -> None:
    """host2 gone bad, on one of its volumes: epochs of whole-volume zero runs, as fast as the
    receiver takes them, and it never reads an answer after Opened."""
    sock = socket.create_connection(("127.0.0.1", port), 10)
    sess = SourceSession("host2", token)
    sess.start()
    sock.sendall(sent(sess))
    for _ in range(2):  # Challenge, then Welcome
        got: list = []
        while not got:
            data = sock.recv(65536)
            assert data, "the receiver closed the connection during the handshake"
            got = feed(sess, data)
        if sess.state.name != "READY":
            sess.auth()
            sock.sendall(sent(sess))
    blocks = GIB // BS
    sock.sendall(sent(sess, Open(vol, GIB, BS)))
    got = []
    while not got:
        got = feed(sess, sock.recv(65536))
    assert type(got[0]).__name__ == "Opened", got
    runs = pack_u64([0, blocks] * RUNS)
    epoch = 0
    sock.settimeout(scaled(60))
    try:
        while not stop.is_set():
            epoch += 1
            sock.sendall(sent(sess, Begin(vol, epoch, time.time())))
            for _ in range(4):
                sock.sendall(sent(sess, Zero(vol, epoch, runs)))
                frames.append(1)
            sock.sendall(sent(sess, Commit(vol, epoch, 4 * RUNS * blocks)))
            sess.volumes[vol].committed.clear()  # we never read the Acks: pretend we did
    except OSError:
        pass  # the receiver stopped reading us (flow control) or closed: either is fine
    finally:
        sock.close()


def test_a_flooding_source_does_not_starve_another(cdp_env, daemons) -> None:
    env = cdp_env({"host1": ["vol1"], "host2": ABUSED})
    image = env.sources["host1"].images["vol1"]
    make_image(image, 16 * MiB, random.Random(1))
    rx = daemons.receiver(env)
    src = daemons.source(env, "host1")
    wait_converged(env, "vol1", time.time() - 60, src, rx)
    stop = threading.Event()
    frames: list[int] = []
    abusers = [threading.Thread(target=flood, args=(env.port, env.token("host2"), vol, stop, frames),
                                daemon=True) for vol in ABUSED]
    for t in abusers:
        t.start()
    try:
        wait_for(lambda: len(frames) >= 24, 60, what="the flood under way")
        rng = random.Random(2)
        for _ in range(3):  # host1 goes on replicating while the flood runs
            write_random_blocks(image, rng.sample(range(256), 128), rng)  # 8 MiB epochs
            since = time.time()
            wait_converged(env, "vol1", since, src, rx, timeout=60)
        assert_replica_equal(env, "vol1", image)
        assert len(frames) >= 24
    finally:
        stop.set()
        for t in abusers:
            t.join(scaled(90))
    assert rx.running, rx.tail()
    assert rss_peak(rx.pid) < RSS_LIMIT, f"receiver peak RSS {rss_peak(rx.pid) >> 20} MiB"
    # what was applied of the flood is right: all zeros, and the hash map says so
    for vol in ABUSED:
        st = env.replica_state(vol)
        if not st or st["epoch"] == 0:
            continue
        d = env.replica_dir(vol)
        assert os.stat(d / "image").st_blocks == 0, f"{vol}: zeroed image is not sparse"
        hashes = (d / "hashes").read_bytes()
        assert hashes.count(0) == len(hashes), f"{vol}: hash map not zeroed"
        assert zero_hash(BS) == block_hash(bytes(BS)) and len(hashes) == (GIB // BS) * HASH_LEN
