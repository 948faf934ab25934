"""The qemu-mode epoch cycle (cdp.qemu.fleece) against a real qemu-storage-daemon.

qemu-io writes through the daemon's writable NBD export as a guest would, also while cdp
reads a point-in-time view. Each test checks what the issue asks of one epoch:

1. the view reads the disk as it was at the cut while the guest keeps writing, and the frozen
   bitmap's extents are the writes before the cut; writes after it are in the next epoch only;
2. a failed epoch's changes come back in the next one (merged back);
3. a setup that fails halfway, and a source that vanished mid-epoch, leave nothing behind once
   torn down or reopened, and lose no change;
4. cdp's own NBD server when QEMU runs none, and a clear error when QEMU runs another one;
5. finishing leaves no extra nodes, bitmaps, exports or jobs.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from helpers import scaled
from qsd import NODE, Qsd, needs_qemu, running_qsd

from cdp.errors import QemuError
from cdp.qemu.fleece import Fleece
from cdp.qemu.qmp import Qmp

pytestmark = needs_qemu

KiB, MiB = 1 << 10, 1 << 20
SIZE = 16 * MiB
GRAN = 64 * KiB  # the default granularity of a bitmap on a qcow2 image with 64 KiB clusters
TAG = "vm1"


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[Qsd]:
    with running_qsd(tmp_path, SIZE) as q:
        yield q


def _run(q: Qsd, body: Callable[[Qmp], Awaitable[None]]) -> None:
    async def main() -> None:
        async with Qmp(q.qmp, timeout=scaled(10)) as qmp:
            await body(qmp)

    asyncio.run(main())


def _fleece(qmp: Qmp, q: Qsd, tmp_path: Path, *, own_server: bool = False) -> Fleece:
    return Fleece(qmp, NODE, TAG, tmp_path / "work", nbd_socket=None if own_server else q.nbd,
                  timeout=scaled(10))


async def _state(qmp: Qmp) -> tuple[set[str], list[str], list[str], list[tuple[str, bool]]]:
    """Nodes, export ids, job ids, and the node's bitmaps (name, recording)."""
    nodes = {n.name for n in await qmp.nodes() if n.name and not n.name.startswith("#")}
    exports = [e["id"] for e in await qmp.execute("query-block-exports")]
    jobs = [j["device"] for j in await qmp.execute("query-block-jobs")]
    bitmaps = sorted((b.name, b.recording) for b in (await qmp.node(NODE)).bitmaps
                     if b.name)  # a running backup job has an unnamed one of its own
    return nodes, exports, jobs, bitmaps


async def _clean(qmp: Qmp, live: str) -> None:
    """Nothing of cdp's left in QEMU but its live bitmap."""
    nodes, exports, jobs, bitmaps = await _state(qmp)
    assert (nodes, exports, jobs, bitmaps) == ({NODE, "file0"}, ["exp0"], [], [(live, True)])
    assert not any(n.name.startswith("cdp") for n in await qmp.nodes())


def test_the_view_is_the_disk_at_the_cut_while_the_guest_writes_on(qsd: Qsd, tmp_path: Path) -> None:
    async def body(qmp: Qmp) -> None:
        await asyncio.to_thread(qsd.write, f"write -P 0x11 {MiB} 128k")
        f = _fleece(qmp, qsd, tmp_path)
        t = await f.open()
        assert (t.tracked, t.live) == (False, None)

        # First cut: no bitmap before it, so every block counts; the view is the whole disk.
        view = await f.cut()
        assert (view.frozen, view.live) == (None, "cdp-vm1-1")
        assert await view.dirty() == [(0, SIZE)]
        assert await view.zeros() == [(0, MiB), (MiB + 128 * KiB, SIZE - MiB - 128 * KiB)]
        assert await view.read(MiB, 128 * KiB) == b"\x11" * 128 * KiB
        await view.finish(True)
        await _clean(qmp, "cdp-vm1-1")

        # Second cut: the writes before it are its extents, and the view keeps their content
        # while the guest overwrites them (and writes elsewhere) after the cut.
        await asyncio.to_thread(qsd.write, "write -P 0xaa 0 64k", f"write -P 0xaa {4 * MiB + 100} 10")
        assert await f.dirty_bytes() == 2 * GRAN
        view = await f.cut()
        assert (view.frozen, view.live) == ("cdp-vm1-1", "cdp-vm1-2")
        started = threading.Event()

        def guest() -> None:
            started.set()
            for i in range(20):
                qsd.write("write -P 0xbb 0 64k", f"write -P 0xbb {4 * MiB} 64k",
                          f"write -P 0xcc {8 * MiB + i * GRAN} 4k")

        writer = asyncio.ensure_future(asyncio.to_thread(guest))
        await asyncio.to_thread(started.wait)
        reads = 0
        while not writer.done() or reads < 3:
            assert await view.read(0, 64 * KiB) == b"\xaa" * 64 * KiB
            assert await view.read(4 * MiB, 100) == bytes(100)
            assert await view.read(4 * MiB + 100, 10) == b"\xaa" * 10
            assert await view.read(8 * MiB, 20 * GRAN) == bytes(20 * GRAN)
            reads += 1
        await writer
        assert await view.dirty() == [(0, GRAN), (4 * MiB, GRAN)]
        await view.finish(True)
        await _clean(qmp, "cdp-vm1-2")

        # The writes after the second cut are in the third epoch, and only there.
        assert await f.dirty_bytes() == 22 * GRAN
        view = await f.cut()
        assert await view.dirty() == [(0, GRAN), (4 * MiB, GRAN), (8 * MiB, 20 * GRAN)]
        assert await view.read(4 * MiB, 64 * KiB) == b"\xbb" * 64 * KiB
        await view.finish(True)
        await _clean(qmp, "cdp-vm1-3")
        await f.close()

    _run(qsd, body)


def test_a_failed_epochs_changes_come_back_in_the_next(qsd: Qsd, tmp_path: Path) -> None:
    async def body(qmp: Qmp) -> None:
        f = _fleece(qmp, qsd, tmp_path)
        await f.open()
        await (await f.cut()).finish(True)
        await asyncio.to_thread(qsd.write, f"write -P 1 {2 * MiB} 4k")
        view = await f.cut()
        assert await view.dirty() == [(2 * MiB, GRAN)]
        await asyncio.to_thread(qsd.write, f"write -P 2 {6 * MiB} 4k")
        await view.finish(False)  # e.g. the link failed: not acknowledged
        await _clean(qmp, "cdp-vm1-2")
        view = await f.cut()
        assert await view.dirty() == [(2 * MiB, GRAN), (6 * MiB, GRAN)]
        assert await view.read(2 * MiB, 4 * KiB) == b"\x01" * 4 * KiB
        await view.finish(True)
        await _clean(qmp, "cdp-vm1-3")

    _run(qsd, body)


def test_a_setup_failing_halfway_is_torn_down_and_forgets_nothing(qsd: Qsd, tmp_path: Path) -> None:
    async def body(qmp: Qmp) -> None:
        f = _fleece(qmp, qsd, tmp_path)
        await f.open()
        await (await f.cut()).finish(True)
        await asyncio.to_thread(qsd.write, f"write -P 1 {3 * MiB} 4k")
        # An export by the name cdp's view wants: the transaction happens, the export fails.
        await qmp.execute("block-export-add", {"type": "nbd", "id": "cdp-vm1-view", "node-name": NODE,
                                               "name": "squatter", "writable": False})
        with pytest.raises(QemuError, match="cdp-vm1-view"):
            await f.cut()
        # Torn down (the export by cdp's name too), the frozen cdp-vm1-1 merged into cdp-vm1-2.
        await _clean(qmp, "cdp-vm1-2")
        view = await f.cut()
        assert await view.dirty() == [(3 * MiB, GRAN)]
        await view.finish(True)
        await _clean(qmp, "cdp-vm1-3")

    _run(qsd, body)


def test_a_source_gone_mid_epoch_is_cleaned_up_and_merged_back_on_reopen(qsd: Qsd, tmp_path: Path) -> None:
    async def first(qmp: Qmp) -> None:
        f = _fleece(qmp, qsd, tmp_path)
        await f.open()
        await (await f.cut()).finish(True)
        await asyncio.to_thread(qsd.write, f"write -P 1 {5 * MiB} 4k")
        view = await f.cut()  # ... and the source dies: no finish, the connection just closes
        assert view.client is not None
        await view.client.close()
        await asyncio.to_thread(qsd.write, f"write -P 2 {7 * MiB} 4k")

    _run(qsd, first)

    async def second(qmp: Qmp) -> None:
        nodes, exports, jobs, bitmaps = await _state(qmp)
        assert "cdp-vm1-view" in nodes and "cdp-vm1-view" in exports and jobs == ["cdp-vm1-fleece"]
        assert bitmaps == [("cdp-vm1-1", False), ("cdp-vm1-2", True)]
        f = _fleece(qmp, qsd, tmp_path)
        t = await f.open()
        assert (t.tracked, t.live, t.merged, t.dirty) == (True, "cdp-vm1-2", ("cdp-vm1-1",), 2 * GRAN)
        await _clean(qmp, "cdp-vm1-2")
        view = await f.cut()
        assert view.live == "cdp-vm1-3"
        assert await view.dirty() == [(5 * MiB, GRAN), (7 * MiB, GRAN)]
        await view.finish(True)
        await _clean(qmp, "cdp-vm1-3")

    _run(qsd, second)


def test_cdp_runs_its_own_nbd_server_when_qemu_has_none(tmp_path: Path) -> None:
    with running_qsd(tmp_path, SIZE, serve_nbd=False) as q:
        q.stop()
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {MiB} 64k", str(q.image)],
                       check=True, capture_output=True, timeout=scaled(30))
        q.start()

        async def body(qmp: Qmp) -> None:
            f = _fleece(qmp, q, tmp_path, own_server=True)
            await f.open()
            assert f.socket.is_socket()
            view = await f.cut()
            assert await view.read(MiB, 64 * KiB) == b"\x5a" * 64 * KiB
            await view.finish(True)
            await f.close()
            await qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {
                "path": str(tmp_path / "other.sock")}}})  # the server is stopped: another may start

        _run(q, body)


def test_another_nbd_server_in_qemu_is_a_clear_error(qsd: Qsd, tmp_path: Path) -> None:
    async def body(qmp: Qmp) -> None:
        f = _fleece(qmp, qsd, tmp_path, own_server=True)
        with pytest.raises(QemuError, match=r"already runs an NBD server.*set nbd_socket"):
            await f.open()

    _run(qsd, body)
