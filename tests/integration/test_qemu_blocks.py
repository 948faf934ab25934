"""The qemu-mode building blocks against a real qemu-storage-daemon: QMP dirty bitmaps through
cdp.qemu.qmp, their dirty extents and the data through cdp's NBD client.

A qcow2 image is served by qemu-storage-daemon (file and qcow2 nodes, a QMP
monitor on a Unix socket, a writable NBD export on another); qemu-io writes
through that export as a guest would. Each test then freezes a bitmap, exports
it read-only over NBD (`block-export-add ... bitmaps: [NAME]`) and checks that
BLOCK_STATUS on `qemu:dirty-bitmap:NAME` returns exactly the written extents at
the bitmap's granularity and READ the written bytes:

1. one bitmap: the extents, the data, base:allocation;
2. a `transaction` that starts a new bitmap and freezes the old one at one point, and a
   failing transaction that changes nothing;
3. merging a frozen bitmap back into the live one (what a failed epoch will do), clear, remove;
4. a persistent bitmap survives a restart of qemu-storage-daemon, stored in the image;
5. errors: unknown nodes and bitmaps, a missing socket, a context the export lacks.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from helpers import scaled
from qsd import NODE, Qsd, needs_qemu, running_qsd

from cdp.errors import QemuError
from cdp.nbd.client import NbdClient
from cdp.nbd.clientevents import NbdRefusedError
from cdp.qemu.qmp import Qmp, bitmap_add, bitmap_disable

pytestmark = needs_qemu

KiB, MiB = 1 << 10, 1 << 20
SIZE = 16 * MiB
GRAN = 64 * KiB
DIRTY = 1  # the qemu:dirty-bitmap context's status flag for a dirty block


def _start(q: Qsd, log: Path) -> None:
    q.log = log
    q.start()


def _stop(q: Qsd) -> None:
    q.stop()


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[Qsd]:
    with running_qsd(tmp_path, SIZE) as q:
        yield q


def _run(q: Qsd, body: Callable[[Qmp], Awaitable[None]]) -> None:
    async def main() -> None:
        async with Qmp(q.qmp, timeout=scaled(10)) as qmp:
            await body(qmp)

    asyncio.run(main())


async def _export_bitmaps(qmp: Qmp, export: str, *bitmaps: str) -> None:
    """A read-only NBD export of the node that carries these (frozen) bitmaps."""
    await qmp.execute("block-export-add", {"type": "nbd", "id": export, "node-name": NODE, "name": export,
                                           "writable": False, "bitmaps": list(bitmaps)})


async def _unexport(qmp: Qmp, export: str) -> None:
    """block-export-del, then wait until it is gone: the bitmaps stay busy until then."""
    await qmp.execute("block-export-del", {"id": export})
    for _ in range(int(scaled(100))):
        if not any(e["id"] == export for e in await qmp.execute("query-block-exports")):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"export {export} was not removed")


async def _dirty(q: Qsd, qmp: Qmp, bitmap: str) -> list[tuple[int, int]]:
    """The dirty (offset, length) runs of a frozen bitmap, read with cdp's NBD client."""
    export = f"x-{bitmap}"
    await _export_bitmaps(qmp, export, bitmap)
    context = f"qemu:dirty-bitmap:{bitmap}"
    try:
        async with await NbdClient.connect_unix(str(q.nbd), export, contexts=[context],
                                                timeout=scaled(10)) as client:
            return [(e.offset, e.length) for e in await client.extents(context) if e.flags & DIRTY]
    finally:
        await _unexport(qmp, export)


def test_a_frozen_bitmap_reads_back_as_exactly_the_written_extents(qsd: Qsd) -> None:
    async def body(qmp: Qmp) -> None:
        await qmp.add_bitmap(NODE, "b0", granularity=GRAN)
        (b0,) = (await qmp.node(NODE)).bitmaps
        assert (b0.name, b0.granularity, b0.count, b0.recording, b0.persistent) == ("b0", GRAN, 0, True, True)
        await asyncio.to_thread(qsd.write, "write -P 0xab 70000 10", f"write -P 0xcd {MiB} 4k",
                                f"write -P 0xef {3 * MiB - 4 * KiB} 8k")
        assert (await qmp.node(NODE)).bitmap("b0").count == 4 * GRAN  # type: ignore[union-attr]

        # An enabled bitmap cannot go out on a read-only export: freeze it first.
        with pytest.raises(QemuError, match="incompatible with readonly export"):
            await _export_bitmaps(qmp, "early", "b0")
        await qmp.run(bitmap_disable(NODE, "b0"))
        await _export_bitmaps(qmp, "x0", "b0")
        contexts = ["base:allocation", "qemu:dirty-bitmap:b0"]
        async with await NbdClient.connect_unix(str(qsd.nbd), "x0", contexts=contexts,
                                                timeout=scaled(10)) as client:
            assert client.size == SIZE and client.contexts == tuple(contexts)
            dirty = [(e.offset, e.length) for e in await client.extents(contexts[1]) if e.flags & DIRTY]
            assert dirty == [(GRAN, GRAN), (MiB, GRAN), (3 * MiB - GRAN, 2 * GRAN)]
            granule = await client.read(GRAN, GRAN)
            assert granule == bytes(70000 - GRAN) + b"\xab" * 10 + bytes(2 * GRAN - 70010)
            assert await client.read(MiB, 4 * KiB) == b"\xcd" * 4 * KiB
            assert await client.read(3 * MiB - 4 * KiB, 8 * KiB) == b"\xef" * 8 * KiB
            # base:allocation: only the written clusters hold data, the rest reads as zeros.
            data = [(e.offset, e.length) for e in await client.extents(contexts[0]) if not e.flags & 1]
            assert data == [(GRAN, GRAN), (MiB, GRAN), (3 * MiB - GRAN, 2 * GRAN)]
        await _unexport(qmp, "x0")

    _run(qsd, body)


def test_a_transaction_starts_a_new_bitmap_and_freezes_the_old_at_one_point(qsd: Qsd) -> None:
    async def body(qmp: Qmp) -> None:
        await qmp.add_bitmap(NODE, "b0", granularity=GRAN)
        await asyncio.to_thread(qsd.write, "write -P 1 0 4k")
        await qmp.transaction([bitmap_add(NODE, "b1", granularity=GRAN), bitmap_disable(NODE, "b0")])
        await asyncio.to_thread(qsd.write, f"write -P 2 {2 * MiB} 4k")
        node = await qmp.node(NODE)
        b0, b1 = node.bitmap("b0"), node.bitmap("b1")
        assert b0 is not None and b1 is not None
        assert (b0.recording, b0.count, b1.recording, b1.count) == (False, GRAN, True, GRAN)
        assert await _dirty(qsd, qmp, "b0") == [(0, GRAN)]

        # A transaction with a failing action changes nothing: b2 is not created.
        with pytest.raises(QemuError, match="b9") as err:
            await qmp.transaction([bitmap_add(NODE, "b2"), bitmap_disable(NODE, "b9")])
        assert err.value.command == "transaction" and err.value.error_class == "GenericError"
        assert (await qmp.node(NODE)).bitmap("b2") is None

        await qmp.transaction([bitmap_add(NODE, "b2", granularity=GRAN), bitmap_disable(NODE, "b1")])
        assert await _dirty(qsd, qmp, "b1") == [(2 * MiB, GRAN)]

    _run(qsd, body)


def test_merge_puts_a_frozen_bitmap_back_into_the_live_one(qsd: Qsd) -> None:
    async def body(qmp: Qmp) -> None:
        await qmp.add_bitmap(NODE, "b0", granularity=GRAN)
        await asyncio.to_thread(qsd.write, f"write -P 1 {5 * MiB} 100k")
        await qmp.transaction([bitmap_add(NODE, "b1", granularity=GRAN), bitmap_disable(NODE, "b0")])
        await asyncio.to_thread(qsd.write, f"write -P 2 {9 * MiB} 1")
        # The epoch of b0 failed: nothing it recorded may be forgotten.
        await qmp.merge_bitmaps(NODE, "b1", ["b0"])
        await qmp.remove_bitmap(NODE, "b0")
        assert [b.name for b in (await qmp.node(NODE)).bitmaps] == ["b1"]
        await qmp.run(bitmap_disable(NODE, "b1"))
        assert await _dirty(qsd, qmp, "b1") == [(5 * MiB, 2 * GRAN), (9 * MiB, GRAN)]
        await qmp.clear_bitmap(NODE, "b1")
        assert (await qmp.node(NODE)).bitmap("b1").count == 0  # type: ignore[union-attr]
        assert await _dirty(qsd, qmp, "b1") == []

    _run(qsd, body)


def test_a_persistent_bitmap_survives_a_restart_of_qemu(qsd: Qsd, tmp_path: Path) -> None:
    async def before(qmp: Qmp) -> None:
        await qmp.add_bitmap(NODE, "b0", granularity=GRAN)
        await qmp.add_bitmap(NODE, "scratch", persistent=False)
        await asyncio.to_thread(qsd.write, f"write -P 7 {7 * MiB} 64k")

    _run(qsd, before)
    _stop(qsd)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(qsd.image)], check=True,
                                     capture_output=True, text=True, timeout=scaled(30)).stdout)
    stored = info["format-specific"]["data"]["bitmaps"]
    assert [(b["name"], b["granularity"], b["flags"]) for b in stored] == [("b0", GRAN, ["auto"])]
    _start(qsd, tmp_path / "qsd.log")

    async def after(qmp: Qmp) -> None:
        (b0,) = (await qmp.node(NODE)).bitmaps
        assert (b0.name, b0.count, b0.recording, b0.inconsistent) == ("b0", GRAN, True, False)
        await qmp.run(bitmap_disable(NODE, "b0"))
        assert await _dirty(qsd, qmp, "b0") == [(7 * MiB, GRAN)]

    _run(qsd, after)


def test_errors_name_what_is_wrong(qsd: Qsd, tmp_path: Path) -> None:
    async def body(qmp: Qmp) -> None:
        with pytest.raises(QemuError, match="nope") as err:
            await qmp.add_bitmap("nope", "b0")
        assert err.value.command == "block-dirty-bitmap-add" and err.value.socket == str(qsd.qmp)
        with pytest.raises(QemuError, match=r"no block node named 'nope' \(it has: disk0, file0\)"):
            await qmp.node("nope")
        with pytest.raises(QemuError, match="b0"):
            await qmp.remove_bitmap(NODE, "b0")
        with pytest.raises(QemuError, match="CommandNotFound"):
            await qmp.execute("no-such-command")
        assert {n.name for n in await qmp.nodes()} == {NODE, "file0"}
        assert await qmp.query_block() == []  # qemu-storage-daemon has nodes, but no guest devices
        with pytest.raises(NbdRefusedError, match="qemu:dirty-bitmap:b0"):
            await NbdClient.connect_unix(str(qsd.nbd), NODE, contexts=["qemu:dirty-bitmap:b0"],
                                         timeout=scaled(10))
        with pytest.raises(QemuError, match="No such file"):
            async with Qmp(tmp_path / "absent.sock", timeout=scaled(5)):
                pass

    _run(qsd, body)
