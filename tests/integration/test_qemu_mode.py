"""mode = "qemu" end to end: a qemu-storage-daemon serves a qcow2 image with a writable NBD export that
qemu-io writes through (the guest), while a real source and receiver (in one event loop, as in
test_inprocess_links.py) replicate it; cdp is never in the write path.

1. while the guest writes, epochs come from QEMU's dirty bitmap; once it stops and the source says
   the replica is current, the replica's bytes are the disk's (read through the export);
2. QEMU goes away (its QMP socket with it): the volume shows a clear error and retries; once
   QEMU is back (the persistent bitmap stored in the image) replication resumes from the bitmap,
   without comparing the whole disk again, and nothing written before or after is lost;
3. a `cdp source` process SIGKILLed mid-epoch leaves its view and frozen bitmap in QEMU: the
   restarted source cleans up, merges the bitmap back and goes on from it, rereading nothing else.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import scaled, wait_converged, wait_for
from qsd import NODE, Qsd, needs_qemu, running_qsd

from cdp.config import load_receiver, load_source
from cdp.nbd.client import NbdClient
from cdp.qemu.qmp import Qmp
from cdp.receiver import Receiver
from cdp.source.daemon import Source

pytestmark = needs_qemu

KiB, MiB = 1 << 10, 1 << 20
SIZE = 32 * MiB
VOL = "vol1"


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[Qsd]:
    with running_qsd(tmp_path, SIZE) as q:
        yield q


def _env(cdp_env: Callable[..., Any], q: Qsd) -> Any:
    env = cdp_env(mode="qemu", volume_extra=f'qmp = "{q.qmp}"\nnode = "{NODE}"\nnbd_socket = "{q.nbd}"\n'
                                             'epoch_interval = "0.1s"',
                  source_extra='retry_max = "1s"')
    env.source.images[VOL].write_bytes(b"")  # `path` names the image for status; cdp never reads it
    return env


def _guest(q: Qsd, seed: int, rounds: int) -> None:
    """Random writes of 4 KiB..256 KiB through the writable export, a batch per qemu-io run."""
    rng = random.Random(seed)
    for _ in range(rounds):
        cmds = []
        for _ in range(16):
            n = rng.choice((4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB))
            off = rng.randrange(0, SIZE - n) // 512 * 512
            cmds.append(f"write -P {rng.randrange(1, 255)} {off} {n}")
        q.write(*cmds)


async def _disk(q: Qsd) -> bytes:
    async with await NbdClient.connect_unix(str(q.nbd), NODE, timeout=scaled(10)) as c:
        return bytes(await c.read(0, SIZE))


async def _until(cond: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {scaled(timeout):.0f}s waiting for {what}")
        await asyncio.sleep(0.02)


async def _converged(src: Source, q: Qsd, replica: Path, since: float) -> None:
    """The source says the replica holds everything written before a moment after `since`;
    then the replica's bytes are the disk's."""
    vs = src.volumes[VOL]
    await _until(lambda: vs.current_as_of > since and not vs.pending, 60, "the replica to be current")
    assert replica.read_bytes() == await _disk(q)


def _run(env: Any, body: Callable[[Source], Any]) -> None:
    async def main() -> None:
        rx = Receiver(load_receiver(env.receiver_toml))
        ready = asyncio.Event()
        rx_task = asyncio.create_task(rx.run(ready))
        await ready.wait()
        src = Source(load_source(env.source.toml))
        src_task = asyncio.create_task(src.run())
        try:
            await body(src)
        finally:
            src.stop()
            await src_task
            rx.stop()
            await rx_task

    asyncio.run(main())


def test_a_disk_written_through_qemu_replicates_from_its_dirty_bitmap(cdp_env: Any, qsd: Qsd) -> None:
    env = _env(cdp_env, qsd)
    qsd.write(f"write -P 0x42 {3 * MiB} 1M", f"write -P 0x43 {SIZE - 64 * KiB} 64k")  # before cdp

    async def body(src: Source) -> None:
        vs = src.volumes[VOL]
        await _until(lambda: vs.seeded and not vs.pending and vs.current_as_of, 60, "the first epoch")
        assert vs.stats["scans"] == 1  # one whole-disk comparison, holes skipped
        assert vs.stats["data"] + vs.stats["dedup"] == MiB + 64 * KiB  # what was written, no more
        await asyncio.to_thread(_guest, qsd, 1, 10)
        epochs = vs.stats["epochs"]
        await _converged(src, qsd, env.replica_image(VOL), time.time())
        assert vs.stats["scans"] == 1 and vs.stats["epochs"] > epochs  # from the bitmap only
        assert src.status().volumes[0].mode == "qemu"

    _run(env, body)


def test_qemu_gone_is_a_clear_error_and_nothing_is_lost_when_it_is_back(cdp_env: Any, qsd: Qsd) -> None:
    env = _env(cdp_env, qsd)

    async def body(src: Source) -> None:
        vs = src.volumes[VOL]
        await _until(lambda: vs.seeded and not vs.pending and vs.current_as_of, 60, "the first epoch")
        stop = threading.Event()

        def guest() -> None:
            seed = 10
            while not stop.is_set():
                _guest(qsd, seed, 1)
                seed += 1

        writer = asyncio.ensure_future(asyncio.to_thread(guest))
        await asyncio.sleep(0.5)
        stop.set()
        await writer
        await asyncio.to_thread(qsd.stop)  # SIGTERM: QEMU stores its persistent bitmaps and goes
        await _until(lambda: vs.error, 30, "the volume to report the lost QEMU")
        st = src.status().volumes[0]
        assert st.phase == "failed" and str(qsd.qmp) in st.error, st.error
        await asyncio.sleep(1.5)  # ... and it keeps retrying meanwhile
        assert vs.error
        await asyncio.to_thread(qsd.start)
        await asyncio.to_thread(_guest, qsd, 99, 3)
        await _converged(src, qsd, env.replica_image(VOL), time.time())
        assert vs.error == "" and vs.stats["scans"] == 1  # resumed from the bitmap, no whole compare

    _run(env, body)


def _qemu_has(q: Qsd, node: str) -> bool:
    async def ask() -> bool:
        async with Qmp(q.qmp, timeout=scaled(10)) as qmp:
            return any(n.name == node for n in await qmp.nodes())

    return asyncio.run(ask())


def test_a_source_killed_mid_epoch_resumes_from_the_bitmap(cdp_env: Any, qsd: Qsd, daemons: Any) -> None:
    env = cdp_env(mode="qemu", volume_extra=f'qmp = "{qsd.qmp}"\nnode = "{NODE}"\nnbd_socket = "{qsd.nbd}"\n'
                                             'epoch_interval = "0.1s"\nrate_limit = "2MiB/s"')
    env.source.images[VOL].write_bytes(b"")
    rx = daemons.receiver(env)
    src = daemons.source(env)
    wait_converged(env, VOL, 0, src, rx)
    noise = env.root / "noise"
    noise.write_bytes(random.Random(5).randbytes(12 * MiB))  # incompressible: seconds at 2 MiB/s
    qsd.write(f"write -s {noise} 0 12M")

    def reading() -> bool:  # (QMP serves one client at a time: the source; ask its status instead)
        v = env.source.volume_status(VOL) or {}
        return v.get("phase") == "sending" and v.get("progress_done", 0) > 0

    wait_for(reading, 30, what="an epoch under way")
    src.kill()  # mid-epoch: the view, the job, the export and the frozen bitmap stay in QEMU
    assert _qemu_has(qsd, "cdp-vol1-view")
    qsd.write(f"write -P 0x77 {20 * MiB} 64k")  # ... and the guest goes on
    since = time.time()
    src.start()
    v = wait_converged(env, VOL, since, src, rx, timeout=120)
    assert v["stats"]["scans"] == 0, v  # from the bitmap: no whole-disk comparison after the restart
    assert "merged bitmap(s) cdp-vol1-" in src.log_text()
    assert env.replica_image(VOL).read_bytes() == asyncio.run(_disk(qsd))
    src.stop()
    assert not _qemu_has(qsd, "cdp-vol1-view")
