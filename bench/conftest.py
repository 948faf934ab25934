"""Deterministic disk-like data for the hot-path benchmarks.

Run from the repository root (bench/ is outside ``testpaths``, so name it)::

    python3 -m pytest bench -q --benchmark-only

Every benchmark records the bytes one round processes in
``extra_info['bytes']`` and, when the benchmark ran, MB/s (10^6 bytes/s) from
the mean and the best round in ``extra_info['MBps']`` / ``['MBps_best']``;
a table of those figures is printed at the end of the run.

Data is seeded, so every run measures the same bytes. A "mixed" set of
64 KiB blocks is ~35% all-zero, ~30% text-like (log lines), ~25% random and
~10% repeats of an earlier non-zero block, shuffled.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cdp.blocks import Geometry

BLOCK = 64 * 1024
MiB = 1024 * 1024
SEED = 20240517

MIXED_BLOCKS = 1024  # 64 MiB
IMAGE_SIZE = 256 * MiB
IMAGE_REGION = 8 * MiB  # one data region every IMAGE_STRIDE bytes; the rest is holes
IMAGE_STRIDE = 32 * MiB

_WORDS = [
    "the", "a", "of", "to", "in", "volume", "block", "epoch", "replica", "source", "receiver",
    "write", "read", "commit", "flush", "sync", "error", "warning", "kernel", "ext4", "inode",
    "journal", "page", "cache", "request", "response", "client", "server", "user", "session",
    "timeout", "retry", "connected", "closed", "opened", "started", "stopped", "GET", "POST",
    "/api/v1/items", "status=200", "status=404", "bytes=4096", "latency_ms=12", "id=7f3a9c",
]
_LEVELS = ("INFO", "WARN", "DEBUG", "ERROR")


class DiskData:
    """Generates 64 KiB blocks of each kind from one seeded random.Random."""

    def __init__(self, seed: int = SEED) -> None:
        self.rng = random.Random(seed)
        rng = self.rng
        self._lines = [
            f"{rng.choice(_LEVELS)} pid={rng.randrange(1, 65536)} "
            + " ".join(rng.choices(_WORDS, k=rng.randrange(4, 14))) + "\n"
            for _ in range(4096)
        ]
        self._seq = 0

    def zero(self) -> bytes:
        return bytes(BLOCK)  # a fresh object each time (== on the same object short-cuts)

    def random(self) -> bytes:
        return self.rng.randbytes(BLOCK)

    def text(self) -> bytes:
        """Log-like lines with a growing sequence number: compresses ~4-5x, the slow case for zstd."""
        rng = self.rng
        parts: list[str] = []
        n = 0
        while n < BLOCK:
            for line in rng.choices(self._lines, k=256):
                s = f"{self._seq:012d} {line}"
                self._seq += rng.randrange(1, 9000)
                parts.append(s)
                n += len(s)
        return "".join(parts).encode()[:BLOCK]

    def mixed(self, count: int) -> tuple[list[bytes], list[str]]:
        """`count` blocks of the mix, and the kind of each ('zero', 'text', 'random', 'repeat')."""
        rng = self.rng
        n_zero = count * 35 // 100
        n_text = count * 30 // 100
        n_repeat = count * 10 // 100
        n_random = count - n_zero - n_text - n_repeat
        kinds = ["zero"] * n_zero + ["text"] * n_text + ["random"] * n_random + ["repeat"] * n_repeat
        rng.shuffle(kinds)
        blocks: list[bytes] = []
        nonzero: list[int] = []
        for i, kind in enumerate(kinds):
            if kind == "zero":
                blocks.append(self.zero())
                continue
            if kind == "repeat" and nonzero:
                blk = blocks[rng.choice(nonzero)]
            elif kind == "text":
                blk = self.text()
            else:
                blk = self.random()
            blocks.append(blk)
            nonzero.append(i)
        return blocks, kinds


@dataclass
class MixedSet:
    blocks: list[bytes]
    kinds: list[str]
    buffer: bytes = field(repr=False)  # the blocks concatenated

    def of_kind(self, *kinds: str) -> list[bytes]:
        return [b for b, k in zip(self.blocks, self.kinds, strict=True) if k in kinds]

    @property
    def nonzero(self) -> list[bytes]:
        """What a Data message carries: zero blocks travel as Zero runs instead."""
        return self.of_kind("text", "random", "repeat")


@dataclass(frozen=True)
class Image:
    path: Path
    geometry: Geometry
    extents: list[tuple[int, int]]  # (offset, length) of the data regions

    @property
    def data_bytes(self) -> int:
        return sum(n for _, n in self.extents)


@pytest.fixture(scope="session")
def disk_data() -> DiskData:
    """A seeded block generator (for benchmarks that need blocks of their own)."""
    return DiskData(SEED + 1)


@pytest.fixture(scope="session")
def mixed() -> MixedSet:
    """1024 mixed 64 KiB blocks (64 MiB), the same every run."""
    blocks, kinds = DiskData(SEED).mixed(MIXED_BLOCKS)
    return MixedSet(blocks, kinds, b"".join(blocks))


@pytest.fixture(scope="session")
def text_blocks(mixed: MixedSet) -> list[bytes]:
    return mixed.of_kind("text")


def write_image(path: Path, blocks: list[bytes], size: int = IMAGE_SIZE,
                region: int = IMAGE_REGION, stride: int = IMAGE_STRIDE) -> Image:
    """A sparse file of `size` bytes: a `region`-byte data region every `stride` bytes, holes between.

    Data regions are filled from `blocks` in order (cycling); their zero
    blocks are written out, so they are allocated zeros, not holes.
    """
    extents = [(off, min(region, size - off)) for off in range(0, size, stride)]
    it = _cycle(blocks)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for off, length in extents:
            chunk = b"".join(next(it) for _ in range(length // BLOCK))
            os.pwrite(fd, chunk, off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return Image(path, Geometry(size, BLOCK), extents)


def _cycle(blocks: list[bytes]) -> Iterator[bytes]:
    while True:
        yield from blocks


@pytest.fixture
def image_file(tmp_path: Path, mixed: MixedSet) -> Image:
    """A 256 MiB sparse image in tmp_path: 8 regions of 8 MiB of mixed data (64 MiB), holes elsewhere."""
    return write_image(tmp_path / "image.raw", mixed.blocks)


# -- MB/s reporting -----------------------------------------------------------

_RESULTS = pytest.StashKey[list[tuple[str, int, float, float]]]()


@pytest.fixture
def throughput(benchmark, request: pytest.FixtureRequest) -> Callable[..., None]:
    """record(nbytes, **extra): call after the benchmark ran with the bytes one round processed."""

    def record(nbytes: int, **extra: object) -> None:
        benchmark.extra_info["bytes"] = nbytes
        benchmark.extra_info.update(extra)
        meta = getattr(benchmark, "stats", None)
        stats = getattr(meta, "stats", None)
        if stats is None or not stats.mean:  # --benchmark-disable: nothing was timed
            return
        mean_mbps = nbytes / stats.mean / 1e6
        best_mbps = nbytes / stats.min / 1e6
        benchmark.extra_info["MBps"] = round(mean_mbps, 1)
        benchmark.extra_info["MBps_best"] = round(best_mbps, 1)
        request.config.stash.setdefault(_RESULTS, []).append(
            (request.node.name, nbytes, mean_mbps, best_mbps))

    return record


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    results = config.stash.get(_RESULTS, [])
    if not results:
        return
    terminalreporter.section("throughput (MB/s = 10^6 bytes/s)")
    width = max(len(name) for name, *_ in results)
    terminalreporter.write_line(f"{'benchmark':<{width}}  {'bytes/round':>12}  {'mean':>9}  {'best':>9}")
    for name, nbytes, mean_mbps, best_mbps in results:
        terminalreporter.write_line(
            f"{name:<{width}}  {nbytes:>12}  {mean_mbps:>9.1f}  {best_mbps:>9.1f}")
