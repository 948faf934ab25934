"""Huge TRIM and WRITE_ZEROES through the source's NBD export: captured as extents, never as data.

A kernel nbd client trims up to 4 GiB in one request (mkfs, fstrim). The
source must keep such a request as zero runs, not read and copy the range:
its peak memory (VmHWM, the kernel's high-water mark of the process's RSS)
stays far below the trimmed size, the journal never falls back to tracking,
and the replica converges byte for byte, partly trimmed edge blocks included.
Sparse images keep the multi-GiB volume cheap on disk.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from pathlib import Path

import pytest
from helpers import scaled, wait_converged, wait_for
from test_nbdmode import qemu_io, start_nbd

from cdp.benchmark.nbdclient import NbdClient

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BS = 16 * KiB  # the nbd default block size
SIZE = 5 * GiB + 41 * KiB + 512  # a short last block (9.5 KiB)
CMD_TRIM = 4


def vm_hwm(pid: int) -> int:
    """Peak resident set size of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * KiB
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def raw_trim(port: int, offset: int, length: int) -> None:
    """One NBD_CMD_TRIM of `length` bytes (up to 4 GiB - 1, as the kernel client sends)."""
    c = NbdClient(("127.0.0.1", port), "vol1")
    try:
        c.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, CMD_TRIM, 77, offset, length))
        magic, error, cookie = struct.unpack(">IIQ", c._recv(16))
        assert (magic, error, cookie) == (0x67446698, 0, 77), (hex(magic), error, cookie)
    finally:
        c.sock.close()


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """[start, end) of the data (non-hole) runs of a file, from lseek."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                assert exc.errno == errno.ENXIO, exc
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
    finally:
        os.close(fd)
    return out


def assert_sparse_equal(a: Path, b: Path) -> None:
    """Same size and bytes; only where either file holds data is read (holes read as zeros)."""
    assert a.stat().st_size == b.stat().st_size
    spans = sorted(data_ranges(a) + data_ranges(b))
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in spans:
            pos = start
            while pos < end:
                n = min(end - pos, 8 * MiB)
                fa.seek(pos)
                fb.seek(pos)
                assert fa.read(n) == fb.read(n), f"{a} and {b} differ in [{pos}, {pos + n})"
                pos += n


def converge(env) -> dict:
    """Until the replica is current as of now (compared sparsely: whole-file hashes of 5 GiB
    would read 10 GiB of holes)."""
    v = wait_converged(env, "vol1", time.time(), timeout=scaled(60))
    assert_sparse_equal(env.source.images["vol1"], env.replica_image("vol1"))
    return v


def test_a_4gib_trim_is_captured_as_extents_and_replicates(cdp_env, daemons) -> None:
    env, url = start_nbd(cdp_env, daemons, SIZE)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    src = daemons.all[1]
    tail = SIZE - 64 * KiB  # 64 KiB ending at the end of the volume: the short last block too
    qemu_io(url, "write -P 0x11 0 1M", "write -P 0x22 2G 8M", "write -P 0x33 4095M 2M",
            f"write -P 0x44 {tail} 64k", "flush")
    converge(env)
    before = src_stats(env)
    baseline = vm_hwm(src.pid)

    # One request of almost 4 GiB, cutting into a block at either edge: block 0 keeps its
    # first 1000 bytes, the block holding the end keeps the rest of 0x33.
    raw_trim(port, 1000, 4 * GiB - 64 * KiB)
    # Then, in the same epochs: data written into the trimmed range wins over the trim,
    # WRITE_ZEROES with and without holes, and a trim that ends at the end of the volume.
    qemu_io(url, "write -P 0x55 2G 64k", "write -z 3G 10000", "write -z -u 4097M 1M",
            "discard 4098M 1000M", f"discard {tail + 4096} {SIZE - tail - 4096}", "flush")
    v = converge(env)

    peak = vm_hwm(src.pid)
    assert peak - baseline < 256 * MiB, (baseline, peak)  # the range was never read into memory
    nbd = v["nbd"]
    assert nbd["mode"] == "capture" and nbd["fallbacks"] == 0, nbd
    assert nbd["zeroed_bytes"] >= 4 * GiB + 900 * MiB, nbd  # whole blocks of all the requests
    after = src_stats(env)
    assert after["data"] - before["data"] < 4 * MiB  # edges and the new 64 KiB, no trimmed range
    assert after["zero"] - before["zero"] >= 9 * MiB  # the ~10 MiB of data the trims cleared
    with open(env.source.images["vol1"], "rb") as fh:
        head = fh.read(BS)
        fh.seek(2 * GiB)
        mid = fh.read(128 * KiB)
    assert head == b"\x11" * 1000 + bytes(BS - 1000)
    assert mid == b"\x55" * 64 * KiB + bytes(64 * KiB)


def src_stats(env) -> dict:
    st = wait_for(lambda: env.source.volume_status("vol1"), 10, what="the source's status")
    return dict(st["stats"])


@pytest.fixture(autouse=True)
def _sparse_tmp(tmp_path: Path) -> None:
    """The test relies on holes: skip where the temp file system has none."""
    probe = tmp_path / "probe"
    with open(probe, "wb") as fh:
        fh.truncate(64 * MiB)
    if probe.stat().st_blocks * 512 >= MiB:
        pytest.skip("temp file system does not keep sparse files")
    probe.unlink()
