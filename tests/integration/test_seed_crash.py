"""SIGKILL the receiver during a first seed, where data goes into the image at receipt.

A seeding replica (never yet whole) keeps no second copy of the data in its WAL: each
block is written into the image as it arrives (replica/writer.py, EpochWriter._placeable).
A crash may then leave data of an epoch that was never committed in blocks the hash map
holds as zero. The promise: a crash costs a resend, never a skipped block. After every
kill, the reopened replica is a whole-epoch state of the seed (each block the source's or
zero, as its hash map says), no acknowledged epoch is lost, and once the seed finishes
the replica equals the source and agrees with its hash map.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

from helpers import (
    BS,
    MiB,
    assert_replica_equal,
    file_hash,
    make_image,
    wait_converged,
    wait_for,
)

from cdp.codec import HASH_LEN, block_hash, zero_hash
from cdp.durable import read_json
from cdp.replica import Replica

VOL = "vol1"


def _placed(rdir: Path) -> Iterator[int]:
    """Blocks whose image holds data while the hash map holds them as zero (read offline),
    lazily: a poll stops at the first, a count reads them all."""
    hashes = (rdir / "hashes").read_bytes()
    zeros = (bytes(HASH_LEN), zero_hash(BS))
    with open(rdir / "image", "rb") as fh:
        for i in range(len(hashes) // HASH_LEN):
            if (hashes[i * HASH_LEN:(i + 1) * HASH_LEN] in zeros
                    and os.pread(fh.fileno(), BS, i * BS).rstrip(b"\0")):
                yield i


def _left_placed(rdir: Path) -> int:
    return sum(1 for _ in _placed(rdir))


def _placing(rdir: Path) -> bool:
    return next(_placed(rdir), None) is not None


def _check_whole_epoch(rdir: Path, source: bytes) -> None:
    """Every block is the source's or zero, exactly as the hash map says."""
    hashes = (rdir / "hashes").read_bytes()
    image = (rdir / "image").read_bytes()
    zero = bytes(BS)
    for i in range(len(source) // BS):
        blk = image[i * BS:(i + 1) * BS]
        h = hashes[i * HASH_LEN:(i + 1) * HASH_LEN]
        assert blk in (source[i * BS:(i + 1) * BS], zero), f"block {i} is neither source nor zero"
        if h == bytes(HASH_LEN):
            assert blk == zero, f"block {i}: the hash map says never written, the image holds data"
        else:
            assert block_hash(blk) == h, f"block {i} does not match its hash-map entry"


def test_receiver_sigkill_during_seed_costs_a_resend_never_a_block(cdp_env, daemons):
    rng = random.Random(16)
    env = cdp_env(source_extra='max_epoch_bytes = "2MiB"\nrate_limit = "24MiB/s"')
    image = env.source.images[VOL]
    size = 48 * MiB
    make_image(image, size, rng, zero=0.15, text=0.35)
    with open(image, "r+b") as fh:  # repeats across epochs: references resolved to RAW/COPY
        rep = rng.randbytes(BS)
        for i in range(0, size // BS, 37):
            os.pwrite(fh.fileno(), rep, i * BS)
    source = image.read_bytes()
    rdir = env.replica_dir(VOL)

    rx = daemons.receiver(env)
    src = daemons.source(env)
    kills = placed_rounds = 0
    last_epoch = 0
    for r in range(10):
        def moved_on(last: int = last_epoch) -> bool:
            st = env.replica_state(VOL) or {}
            return st.get("epoch", 0) >= last + 1 or not st.get("seeding", True)

        wait_for(moved_on, 30, interval=0.005, what=f"round {r}: the seed to move on")
        state = env.replica_state(VOL) or {}
        if not state.get("seeding", True):
            break  # the seed finished before this round could interrupt it
        if r % 2:
            # every other round, kill the moment an epoch's data is in the image and not yet in
            # the hash map: the case placement adds (a random moment misses it on a busy
            # machine, and so does a kill that waits for a second look)
            seen: dict[str, int] = {}

            def placed_then_kill(seen: dict[str, int] = seen) -> bool:
                acked_now = (env.source.volume_status(VOL) or {}).get("acked_epoch", 0)
                st = env.replica_state(VOL) or {}
                if _placing(rdir) or not st.get("seeding", True):
                    rx.kill()
                    seen["acked"] = acked_now
                    return True
                return False

            wait_for(placed_then_kill, 30, interval=0.002, what=f"round {r}: an epoch being placed")
            acked = seen["acked"]  # acknowledged before the kill: must survive it
        else:
            time.sleep(rng.uniform(0.0, 0.15))  # into the next epoch: received, sealed or applying
            acked = (env.source.volume_status(VOL) or {}).get("acked_epoch", 0)
            rx.kill()
        kills += 1
        placed_rounds += _left_placed(rdir) > 0
        rep = Replica.open(env.data_dir, VOL)  # the recovery the receiver runs
        try:
            assert rep.state.epoch >= acked, f"round {r}: acknowledged epoch {acked} was lost"
            last_epoch = rep.state.epoch
            seeding = rep.state.seeding
        finally:
            rep.close()
        _check_whole_epoch(rdir, source)
        if not seeding:
            break
        rx.start()

    assert kills >= 3, "the seed finished before it could be interrupted often enough"
    assert placed_rounds >= 1, "no kill left placed data behind: the test did not test placement"
    if not rx.running:
        rx.start()
    t0 = time.time()
    wait_converged(env, VOL, t0, src, rx, timeout=120)
    assert_replica_equal(env, VOL)
    assert file_hash(image) == file_hash(env.replica_image(VOL))
    wait_for(lambda: not read_json(rdir / "state.json").get("seeding", True), 30,
             what="the replica to leave seeding once whole")
    # the seed's data went into the image, not through the WAL as well
    assert max((rdir / f"wal.{k}").stat().st_size for k in (0, 1)) < 256 * 1024
    src.stop()
    rx.stop()
    print(f"{kills} kills during the seed, {placed_rounds} left placed data that reopen zeroed")
