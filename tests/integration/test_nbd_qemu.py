"""The NBD server against the real qemu tools (qemu-io, qemu-img) on loopback and a Unix socket.

The server runs on its own event loop in a thread of the test process so the
tests can see what its hooks recorded; qemu runs as a separate process.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import scaled

from cdp.nbd.server import NbdServer

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-io") is None or shutil.which("qemu-img") is None,
    reason="qemu-io/qemu-img not on PATH (apt-get install qemu-utils)",
)

MiB = 1024 * 1024
SIZE = 8 * MiB


@dataclass
class Running:
    server: NbdServer
    image: Path
    url: str
    writes: list[tuple[int, int]] = field(default_factory=list)
    flushes: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def dirty(self) -> list[tuple[int, int]]:
        with self.lock:
            return list(self.writes)


def _serve(image: Path, export: str, unix_path: Path | None, **server_kwargs: Any) -> Iterator[Running]:
    """NbdServer on its own loop thread with a recording tracker; server_kwargs go to NbdServer."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    holder: dict[str, Running] = {}

    class Tracker:
        async def before_change(self, offset: int, length: int) -> None:
            pass

        def changed(self, offset: int, length: int) -> None:
            with holder["r"].lock:
                holder["r"].writes.append((offset, length))

        async def flushed(self) -> None:
            with holder["r"].lock:
                holder["r"].flushes.append(1)

    server = NbdServer(image, export=export, host=None if unix_path else "127.0.0.1", port=0,
                       unix_path=unix_path, tracker=Tracker(), **server_kwargs)
    fut: Future[None] = asyncio.run_coroutine_threadsafe(server.start(), loop)
    fut.result(timeout=scaled(10))
    if unix_path is not None:
        url = f"nbd+unix:///{export}?socket={unix_path}"
    else:
        url = f"nbd://127.0.0.1:{server.tcp_port}/{export}"
    holder["r"] = Running(server, image, url)
    try:
        yield holder["r"]
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=scaled(10))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(scaled(10))
        loop.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as fh:
        fh.truncate(SIZE)
    return path


@pytest.fixture
def nbd(image: Path) -> Iterator[Running]:
    yield from _serve(image, "disk", None)


def qemu_io(url: str, *commands: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    proc = subprocess.run([*args, url], capture_output=True, text=True, timeout=scaled(60))
    # qemu-io exits 0 even when a command fails; failures show up in its output.
    out = proc.stdout + proc.stderr
    if check:
        assert proc.returncode == 0 and "failed" not in out and "error" not in out.lower(), out
    return proc


def test_write_read_pattern_and_hooks(nbd: Running) -> None:
    qemu_io(nbd.url, "write -P 0xab 0 1M")
    qemu_io(nbd.url, "read -P 0xab 0 1M")
    assert nbd.image.read_bytes()[:MiB] == b"\xab" * MiB
    assert sum(length for _, length in nbd.dirty()) == MiB
    assert min(off for off, _ in nbd.dirty()) == 0
    # A wrong pattern is detected by qemu-io, so the read check above means something.
    bad = qemu_io(nbd.url, "read -P 0xcd 0 1M", check=False)
    assert "Pattern verification failed" in bad.stdout + bad.stderr


def test_qemu_img_compare_and_info(nbd: Running) -> None:
    qemu_io(nbd.url, "write -P 0x11 4096 64k", "write -P 0x22 3M 1M", "flush")
    assert nbd.flushes
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", nbd.url, str(nbd.image)],
                   check=True, capture_output=True, timeout=scaled(60))
    info = subprocess.run(["qemu-img", "info", "-f", "raw", nbd.url], check=True, capture_output=True,
                          text=True, timeout=scaled(60)).stdout
    assert str(SIZE) in info
    data = nbd.image.read_bytes()
    assert data[4096:4096 + 65536] == b"\x11" * 65536
    assert data[3 * MiB:4 * MiB] == b"\x22" * MiB


def test_discard_and_write_zeroes(nbd: Running) -> None:
    qemu_io(nbd.url, "write -P 0xee 0 2M")
    qemu_io(nbd.url, "discard 0 64k", "write -z 1M 128k", "write -z -u 1536k 64k")
    data = nbd.image.read_bytes()
    assert data[:65536] == bytes(65536)
    assert data[65536:MiB] == b"\xee" * (MiB - 65536)
    assert data[MiB:MiB + 131072] == bytes(131072)
    assert data[1536 * 1024:1600 * 1024] == bytes(65536)
    qemu_io(nbd.url, "read -P 0 1M 128k", "read -P 0xee 1152k 384k")
    dirty = nbd.dirty()
    for rng in [(0, 65536), (MiB, 131072), (1536 * 1024, 65536)]:
        assert rng in dirty, (rng, dirty)


def test_fua_write(nbd: Running) -> None:
    qemu_io(nbd.url, "write -f -P 0x5a 8k 8k")
    qemu_io(nbd.url, "read -P 0x5a 8k 8k")
    assert (8192, 8192) in nbd.dirty()


def test_write_past_end_is_refused(nbd: Running) -> None:
    proc = qemu_io(nbd.url, f"write -P 0x01 {SIZE - 512} 4k", check=False)
    out = proc.stdout + proc.stderr
    assert "failed" in out or "error" in out.lower(), out
    assert nbd.dirty() == []
    assert nbd.image.stat().st_size == SIZE


def test_unknown_export_fails_cleanly(nbd: Running) -> None:
    url = nbd.url.rsplit("/", 1)[0] + "/nope"
    proc = subprocess.run(["qemu-io", "-f", "raw", "-c", "read 0 4k", url], capture_output=True, text=True,
                          timeout=scaled(60))
    assert proc.returncode != 0
    # The server keeps serving the real export.
    qemu_io(nbd.url, "read -P 0 0 4k")


def test_unix_socket(image: Path, tmp_path: Path) -> None:
    for running in _serve(image, "", tmp_path / "nbd.sock"):
        qemu_io(running.url, "write -P 0x77 0 64k", "read -P 0x77 0 64k")
        assert running.dirty() == [(0, 65536)]
    assert image.read_bytes()[:65536] == b"\x77" * 65536
    assert not (tmp_path / "nbd.sock").exists()


def test_garbage_client_does_not_hurt_the_server(nbd: Running) -> None:
    port = nbd.server.tcp_port
    assert port is not None
    with socket.create_connection(("127.0.0.1", port), timeout=scaled(10)) as sock:
        greeting = sock.recv(18, socket.MSG_WAITALL)
        assert greeting == b"NBDMAGICIHAVEOPT\x00\x03"
        sock.sendall(struct.pack(">I", 3) + b"not an option header at all")
        assert sock.recv(100) == b""  # the server hung up on the bad option magic
    qemu_io(nbd.url, "write -P 0x42 0 4k", "read -P 0x42 0 4k")
    assert nbd.dirty() == [(0, 4096)]


def test_qemu_img_map_sees_holes(nbd: Running) -> None:
    # qemu's client asks BLOCK_STATUS with REQ_ONE, one extent at a time.
    qemu_io(nbd.url, "write -P 0x33 1M 64k", "write -P 0x44 6M 1M")
    out = subprocess.run(["qemu-img", "map", "-f", "raw", "--output=json", nbd.url], check=True,
                         capture_output=True, text=True, timeout=scaled(60)).stdout
    got = [(e["start"], e["length"], e["data"]) for e in json.loads(out)]
    assert got[0][0] == 0 and sum(length for _, length, _ in got) == SIZE
    data = [(start, length) for start, length, is_data in got if is_data]
    assert data == data_ranges(nbd.image), got  # what lseek says about the file itself
    for written in [(MiB, 65536), (6 * MiB, MiB)]:
        assert any(s <= written[0] and sum(written) <= s + n for s, n in data), (written, data)
    assert all(e["zero"] for e in json.loads(out) if not e["data"])
    assert got[0] == (0, MiB, False)


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of the data (non-hole) runs of a file, straight from lseek."""
    out = []
    with open(path, "rb") as fh:
        fd, size, pos = fh.fileno(), os.fstat(fh.fileno()).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                assert exc.errno == errno.ENXIO, exc
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos - start))
    return out
