"""Source and receiver in one event loop (no subprocess, no waiting on process start-up):
links that die while a guest writes through the NBD export, at random moments, in
whatever the volume's task was doing (waiting for work, for acks, mid-epoch).

The source must notice each death, end the connection's tasks and reconnect (a task that
ignores its cancellation holds the connection forever: that race, a cancel landing as a
write wakes the journal, is too narrow to hit here reliably and is pinned by
test_nbd_journal.py and test_scanpace.py). At the end the replica equals the image and its
hash map agrees.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

from helpers import MiB, assert_replica_equal, scaled

from cdp.benchmark.nbdclient import NbdClient
from cdp.config import load_receiver, load_source
from cdp.receiver import Receiver
from cdp.source.daemon import Source

VOL = "vol1"
KILLS = 30


def _writer(url: str, size: int, stop: threading.Event, seed: int) -> int:
    """Random 16 KiB writes with a FLUSH every 8, until `stop`; returns how many."""
    host, rest = url.removeprefix("nbd://").split(":", 1)
    port, export = rest.split("/", 1)
    client = NbdClient((host, int(port)), export)
    rng = random.Random(seed)
    n = 0
    try:
        while not stop.is_set():
            for _ in range(8):
                client.write(rng.randrange(size // 16384) * 16384, rng.randbytes(16384))
                n += 1
            client.flush()
    finally:
        client.close()
    return n


async def _until(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + scaled(timeout)
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {scaled(timeout):.0f}s waiting for {what}")
        await asyncio.sleep(0.01)


def test_links_killed_under_nbd_writes_always_reconnect_and_converge(cdp_env) -> None:  # type: ignore[no-untyped-def]
    size = 8 * MiB
    env = cdp_env(mode="nbd", volume_extra='epoch_interval = "50ms"')
    img = env.source.images[VOL]
    img.write_bytes(random.Random(1).randbytes(size))
    rng = random.Random(7)

    async def main() -> int:
        rx = Receiver(load_receiver(env.receiver_toml))
        ready = asyncio.Event()
        rx_task = asyncio.create_task(rx.run(ready))
        await ready.wait()
        src = Source(load_source(env.source.toml))
        src_task = asyncio.create_task(src.run())
        vs = src.volumes[VOL]
        try:
            await _until(lambda: src.connected and vs.seeded and not vs.pending, 60, "the seed")
            stop = threading.Event()
            writes = asyncio.ensure_future(asyncio.to_thread(
                _writer, env.source.nbd_urls[VOL], size, stop, 3))
            kills = 0
            for _ in range(KILLS):
                await asyncio.sleep(rng.uniform(0.0, 0.1))
                await _until(lambda: src.connected and rx._by_id, 30,
                             f"the source to reconnect after kill {kills}")
                for conn in list(rx._by_id.values()):
                    conn.link.abort()  # a reset at whatever byte the stream was at
                kills += 1
            stop.set()
            n = await writes
            assert n > 0
            t_end = time.time()
            await _until(lambda: src.connected and not vs.pending and vs.current_as_of >= t_end,
                         60, "the replica to hold every write")
            return kills
        finally:
            src.stop()
            rx.stop()
            async with asyncio.timeout(scaled(60)):
                await asyncio.gather(src_task, rx_task, return_exceptions=True)

    kills = asyncio.run(main())
    assert kills == KILLS
    assert_replica_equal(env, VOL)
