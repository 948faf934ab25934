"""Crash tests: SIGKILL real daemons at random moments, then reopen and verify by hashing.

Guarantee 1: after any crash the replica equals the source as of some whole
epoch, never a mix, and an acknowledged epoch is never lost. Guarantee 2:
replication converges through kills of either side, without resending
the whole volume each time.
"""

from __future__ import annotations

import random
import time

from helpers import (
    BS,
    MiB,
    bytes_hash,
    file_hash,
    free_port,
    make_image,
    replace_atomically,
    wait_converged,
    wait_for,
    write_random_blocks,
)

from cdp.replica import Replica

VOL = "vol1"


def _written(pid: int) -> int:
    """Bytes a process has passed to write(2)-like calls so far (WAL, image, state, socket)."""
    try:
        with open(f"/proc/{pid}/io") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("wchar:"))
    except (OSError, StopIteration, ValueError):
        return 0


def _reopen(env) -> int:
    rep = Replica.open(env.data_dir, VOL)
    try:
        return rep.state.epoch
    finally:
        rep.close()


def _opened_since_start(rx) -> bool:
    """The receiver's current run has opened the volume for the source (it reconnected)."""
    text = rx.log_text()
    last = text.rfind(f"---- start #{rx.starts} of receiver ----")
    return last >= 0 and f"volume opened client=host1 volume={VOL}" in text[last:]


def test_receiver_sigkill_during_apply_keeps_whole_epochs(cdp_env, daemons):
    """Kill -9 the receiver over and over while epochs arrive and apply.

    The source image only ever changes by an atomic rename of a whole new
    version, so every state a scan can see is one of the recorded versions:
    after each kill the recovered replica must hash as one of them.
    """
    env = cdp_env()
    image = env.source.images[VOL]
    rng = random.Random(11)
    size = 64 * MiB
    blocks = size // BS
    make_image(image, size, rng, zero=0.2, text=0.2)
    current = bytearray(image.read_bytes())
    versions = {bytes_hash(current)}
    epoch_hash: dict[int, str] = {}  # what each recovered epoch looked like: must never change

    rx = daemons.receiver(env)
    t0 = time.time()
    src = daemons.source(env)
    wait_converged(env, VOL, t0, src, rx, timeout=60)

    rounds, replays = 22, 0
    for r in range(rounds):
        # a new version: 20-50% of the blocks rewritten with random data
        changed = rng.sample(range(blocks), int(blocks * rng.uniform(0.2, 0.5)))
        for i in changed:
            current[i * BS:(i + 1) * BS] = rng.randbytes(BS)
        base = _written(rx.pid)
        start_epoch = env.replica_state(VOL)["epoch"]
        replace_atomically(image, current)
        versions.add(bytes_hash(current))

        # Random data does not compress: receiving the epoch writes at least `epoch_bytes`
        # to the WAL, applying it as much again to the image. The receiver's write count
        # tells how far it got (it may also be catching up on an earlier version).
        epoch_bytes = len(changed) * BS
        mode = r % 3
        if mode == 0:  # anywhere: before, during or after the epoch
            time.sleep(rng.uniform(0.0, 1.0))
        else:
            share = rng.uniform(0.1, 0.95) if mode == 1 else rng.uniform(1.0, 1.9)
            goal = base + share * epoch_bytes

            def far_enough(goal=goal, start=start_epoch) -> bool:
                assert rx.running, f"the receiver died by itself:\n{rx.tail()}"
                return _written(rx.pid) >= goal or env.replica_state(VOL)["epoch"] > start + 1

            wait_for(far_enough, 20, interval=0.001,
                     what=f"round {r}: the receiver to write the epoch")
        status = env.source.volume_status(VOL) or {}
        acked_before = status.get("acked_epoch", 0)
        rx.kill()

        # Offline, in this process: open runs the same recovery the receiver runs.
        before = env.replica_state(VOL)["epoch"]
        epoch = _reopen(env)
        if epoch > before:
            replays += 1  # killed between WAL commit and state update: recovery applied it
        got = file_hash(env.replica_image(VOL))
        assert got in versions, f"round {r}: replica at epoch {epoch} is a mix of versions"
        assert epoch >= acked_before, (
            f"round {r}: the source saw epoch {acked_before} acknowledged, replica is at {epoch}")
        assert epoch_hash.setdefault(epoch, got) == got, f"round {r}: epoch {epoch} changed"
        # recovery is done once: opening again changes nothing
        assert _reopen(env) == epoch
        assert file_hash(env.replica_image(VOL)) == got

        rx.start()
        wait_for(lambda: _opened_since_start(rx), 30, interval=0.02,
                 what=f"round {r}: the source to reconnect")

    t_last = time.time()
    wait_converged(env, VOL, t_last, src, rx, timeout=90)
    assert file_hash(env.replica_image(VOL)) == bytes_hash(current)
    assert file_hash(image) == bytes_hash(current)
    src.stop()
    rx.stop()
    print(f"{rounds} kills: {replays} committed epochs replayed on reopen, "
          f"{len(epoch_hash)} distinct epochs seen after a kill")


def test_source_sigkill_during_streaming_never_resends_everything(cdp_env, daemons,
                                                                  fault_proxy):
    """Kill -9 the source mid-stream repeatedly; it must pick up from what the replica holds."""
    port = free_port()
    proxy = fault_proxy(port)
    env = cdp_env(port=port, receiver_addr=f"127.0.0.1:{proxy.port}")
    image = env.source.images[VOL]
    rng = random.Random(12)
    size = 64 * MiB
    blocks = size // BS
    make_image(image, size, rng, zero=0.1, text=0.2)

    rx = daemons.receiver(env)
    src = daemons.source(env)
    sf = env.source

    def streamed_or_done(start_up: int, threshold: float, since: float):
        def cond() -> bool:
            if proxy.up - start_up >= threshold:
                return True
            v = sf.volume_status(VOL)
            return bool(v and v.get("current_as_of", 0) >= since and not v.get("pending_epochs"))
        return cond

    # round 0: kill during the seed
    t0 = time.time()
    wait_for(streamed_or_done(0, rng.uniform(5, 25) * MiB, t0), 60, interval=0.005,
             what="the seed to stream")
    src.kill()
    rounds = 8
    changed_bytes = 0
    seeds_before = 0
    for r in range(1, rounds):
        src.start()
        if r == 1:
            t1 = time.time()
            wait_converged(env, VOL, t1, src, rx, timeout=60)
            seeds_before = src.log_text().count("new replica, seeding")
        changed = write_random_blocks(image, rng.sample(range(blocks), blocks // 10), rng)
        changed_bytes += len(changed) * BS
        since = time.time()
        start_up = proxy.up
        wait_for(streamed_or_done(start_up, rng.uniform(0.1, 0.8) * len(changed) * BS, since),
                 60, interval=0.005, what=f"round {r}: changes to stream")
        src.kill()

    src.start()
    t_last = time.time()
    wait_converged(env, VOL, t_last, src, rx, timeout=60)
    assert file_hash(env.replica_image(VOL)) == file_hash(image)
    assert src.log_text().count("new replica, seeding") == seeds_before, (
        "the source re-seeded a replica that already held data")
    total = proxy.up
    assert total < rounds * size / 2, f"{total} bytes sent over {rounds} kills of a {size}-byte volume"
    assert total <= 2 * size + 2.5 * changed_bytes, (
        f"{total} bytes sent for a {size}-byte seed and {changed_bytes} bytes of changes")
    src.stop()
    rx.stop()
