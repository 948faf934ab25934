"""Benchmarks of the hot paths: hash, zero check, compress, framing, scan, WAL apply.

    python3 -m pytest bench -q --benchmark-only

Each benchmark records the bytes one round handles (extra_info['bytes']) and
MB/s; see conftest.py. Hot page cache throughout, as in PERF-NOTES.md.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cdp import codec
from cdp.blocks import Geometry, pack_u64, runs
from cdp.replica import Replica
from cdp.tracker.hashworker import HashHelper
from cdp.tracker.scan import scan, zero_map
from cdp.wire import frames
from cdp.wire.messages import Data

BLOCK = 64 * 1024
MiB = 1024 * 1024
BATCH_BLOCKS = 32  # 2 MiB batches, as the source sends them
BATCHES_PER_ROUND = 8  # 16 MiB per compression round


def batches_of(blocks: list[bytes], count: int = BATCHES_PER_ROUND) -> list[bytes]:
    need = count * BATCH_BLOCKS
    assert len(blocks) >= need, f"only {len(blocks)} blocks, need {need}"
    return [b"".join(blocks[i:i + BATCH_BLOCKS]) for i in range(0, need, BATCH_BLOCKS)]


# -- 1. hashing ---------------------------------------------------------------

def test_block_hash(benchmark, mixed, throughput):
    """xxh3-128 of each 64 KiB slice of a 64 MiB buffer, through a memoryview (as scan does)."""
    mv = memoryview(mixed.buffer)
    h = codec.block_hash

    def run() -> int:
        n = 0
        for off in range(0, len(mv), BLOCK):
            h(mv[off:off + BLOCK])
            n += 1
        return n

    assert benchmark(run) == len(mv) // BLOCK
    throughput(len(mv))


# -- 2. zero detection ----------------------------------------------------------

@pytest.fixture(scope="module")
def zero_inputs(mixed):
    zeros = [bytes(BLOCK) for _ in range(512)]  # 32 MiB, distinct objects
    return {
        "zeros": (zeros, bytes(len(zeros) * BLOCK)),
        "mixed": (mixed.blocks, mixed.buffer),
    }


@pytest.mark.parametrize("data", ["zeros", "mixed"])
@pytest.mark.parametrize("method", ["hash_eq", "bytes_eq", "memoryview_eq"])
def test_zero_detect(benchmark, zero_inputs, throughput, data, method):
    """hash_eq hashes each block and compares with codec.zero_hash (the hash is needed anyway);
    bytes_eq compares bytes blocks with bytes(65536); memoryview_eq compares memoryview
    slices of one buffer with it (what a reused read buffer gives)."""
    blocks, buffer = zero_inputs[data]
    zero = bytes(BLOCK)
    zh = codec.zero_hash(BLOCK)
    h = codec.block_hash
    mv = memoryview(buffer)
    offsets = range(0, len(buffer), BLOCK)

    if method == "hash_eq":
        def run() -> int:
            return sum(1 for b in blocks if h(b) == zh)
    elif method == "bytes_eq":
        def run() -> int:
            return sum(1 for b in blocks if b == zero)
    else:
        def run() -> int:
            return sum(1 for off in offsets if mv[off:off + BLOCK] == zero)

    found = benchmark(run)
    assert found == sum(1 for b in blocks if b == zero)
    throughput(len(buffer), zero_blocks=found)


# -- 3. batch compression -------------------------------------------------------

@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="bench-zstd") as ex:
        yield ex


@pytest.fixture(scope="module")
def compress_batches(mixed, text_blocks):
    """Eight 2 MiB batches per kind: 'mixed' as on disk (zeros included), 'data' as a Data
    message carries (zero blocks go as Zero runs), 'text' the slow case for zstd."""
    return {
        "mixed": batches_of(mixed.blocks),
        "data": batches_of(mixed.nonzero),
        "text": batches_of(text_blocks),
    }


KINDS = ["mixed", "data", "text"]


@pytest.mark.parametrize("kind", KINDS)
def test_compress_1thread(benchmark, compress_batches, throughput, kind):
    batches = compress_batches[kind]
    compress = codec.compress
    out = benchmark(lambda: [compress(b, 1) for b in batches])
    raw = sum(map(len, batches))
    throughput(raw, ratio=round(sum(map(len, out)) / raw, 3))


@pytest.mark.parametrize("kind", KINDS)
def test_compress_2threads(benchmark, compress_batches, pool, throughput, kind):
    """Each 2 MiB batch split in two 1 MiB frames compressed in two threads (zstd drops the GIL)."""
    halves = [[b[:len(b) // 2], b[len(b) // 2:]] for b in compress_batches[kind]]
    compress = codec.compress

    def run() -> list[list[bytes]]:
        return [list(pool.map(compress, pair)) for pair in halves]

    out = benchmark(run)
    raw = sum(map(len, compress_batches[kind]))
    throughput(raw, ratio=round(sum(len(z) for pair in out for z in pair) / raw, 3))


@pytest.mark.parametrize("kind", KINDS)
def test_decompress(benchmark, compress_batches, throughput, kind):
    batches = compress_batches[kind]
    blobs = [(codec.compress(b, 1), len(b)) for b in batches]
    decompress = codec.decompress
    assert [decompress(z, n) for z, n in blobs] == batches
    # outputs are dropped as they come, so their memory is reused (no page faults in the figure)
    assert benchmark(lambda: sum(len(decompress(z, n)) for z, n in blobs)) == sum(map(len, batches))
    throughput(sum(map(len, batches)), compressed=sum(len(z) for z, _ in blobs))


# -- 4. framing ---------------------------------------------------------------

@pytest.fixture(scope="module")
def data_messages(mixed):
    """Data messages of 2 MiB raw batches of non-zero blocks, compressed at level 1."""
    blocks = mixed.nonzero
    msgs = []
    for k, start in enumerate(range(0, len(blocks) - BATCH_BLOCKS + 1, BATCH_BLOCKS)):
        chunk = blocks[start:start + BATCH_BLOCKS]
        raw = b"".join(chunk)
        msgs.append(Data("vol0", 7, pack_u64(range(k * BATCH_BLOCKS, (k + 1) * BATCH_BLOCKS)),
                         b"".join(codec.block_hash(b) for b in chunk), len(raw), codec.compress(raw, 1)))
    return msgs[:16]


def test_frame_encode(benchmark, data_messages, throughput):
    """frames.encode of Data messages; each frame is dropped once encoded, as the transport does."""
    encode = frames.encode
    wire = benchmark(lambda: sum(len(encode(m)) for m in data_messages))
    throughput(wire, raw=sum(m.raw_len for m in data_messages), frames=len(data_messages))


@pytest.mark.parametrize("read_size", [64 * 1024, 1 * MiB], ids=["64KiB", "1MiB"])
def test_frame_decode(benchmark, data_messages, throughput, read_size):
    """FrameDecoder.feed of a stream of Data frames, in reads of read_size (transport reads 1 MiB)."""
    stream = b"".join(frames.encode(m) for m in data_messages)
    reads = [stream[i:i + read_size] for i in range(0, len(stream), read_size)]

    def run() -> int:
        dec = frames.FrameDecoder()
        n = 0
        for r in reads:
            n += len(dec.feed(r))
        return n

    assert benchmark(run) == len(data_messages)
    throughput(len(stream), raw=sum(m.raw_len for m in data_messages), frames=len(data_messages))


# -- 5. scan ------------------------------------------------------------------

def _drain(fd: int, geo: Geometry, smap: bytearray, helper: HashHelper | None = None) -> tuple[int, int]:
    changed = zero = 0
    for _, _, content in scan(fd, geo, smap, helper=helper):
        changed += 1
        zero += content is None
    return changed, zero


@pytest.fixture
def image_fd(image_file):
    fd = os.open(image_file.path, os.O_RDONLY)
    yield fd
    os.close(fd)


def test_scan_seed(benchmark, image_file, image_fd, throughput):
    """The seeding scan: a zero map, so every non-zero block of the data regions is reported."""
    geo = image_file.geometry
    smap = zero_map(geo)
    changed, zero = benchmark(_drain, image_fd, geo, smap)
    assert changed > 0 and zero == 0
    throughput(image_file.data_bytes, logical=geo.size, changed_blocks=changed)


@pytest.mark.parametrize("cores", ["one core", "with the hash helper"])
def test_scan_unchanged(benchmark, image_file, image_fd, throughput, cores):
    """The rescan when nothing changed: the map already equals the image, nothing is reported.
    The source rescans with the hash helper (a second process) when there are two cores."""
    geo = image_file.geometry
    smap = zero_map(geo)
    for i, h, _ in scan(image_fd, geo, zero_map(geo)):
        smap[i * codec.HASH_LEN:(i + 1) * codec.HASH_LEN] = h
    helper = HashHelper() if cores != "one core" else None
    try:
        assert benchmark(_drain, image_fd, geo, smap, helper) == (0, 0)
    finally:
        if helper is not None:
            helper.close()
    throughput(image_file.data_bytes, logical=geo.size)


# -- 6. WAL append + apply ------------------------------------------------------

REPLICA_SIZE = 256 * MiB
EPOCH_BLOCKS = 1024  # 64 MiB logical per epoch


@pytest.fixture
def replica(tmp_path: Path):
    rep = Replica.open(tmp_path / "replicas", "v", Geometry(REPLICA_SIZE, BLOCK), create=True)
    rep.seeded(0)  # a whole replica: every epoch goes through the WAL (the seed: test_seed_path)
    yield rep
    rep.close()


def _epoch_ops(mixed, layout: str):
    """Data batches (indices, hashes, raw_len, zdata) and the Zero runs of one 64 MiB epoch."""
    nblocks = REPLICA_SIZE // BLOCK
    if layout == "contiguous":
        targets = list(range(EPOCH_BLOCKS))
    else:  # every 4th block: no two written blocks adjacent, one pwrite and fallocate each
        targets = list(range(0, nblocks, nblocks // EPOCH_BLOCKS))[:EPOCH_BLOCKS]
    zero = bytes(BLOCK)
    data = [(i, b) for i, b in zip(targets, mixed.blocks, strict=True) if b != zero]
    zeros = [i for i, b in zip(targets, mixed.blocks, strict=True) if b == zero]
    batches = []
    for s in range(0, len(data), BATCH_BLOCKS):
        chunk = data[s:s + BATCH_BLOCKS]
        raw = b"".join(b for _, b in chunk)
        batches.append((pack_u64(i for i, _ in chunk), b"".join(codec.block_hash(b) for _, b in chunk),
                        len(raw), codec.compress(raw, 1)))
    zero_runs = pack_u64(x for run in runs(zeros) for x in run)
    return batches, zero_runs, len(data) * BLOCK


@pytest.mark.parametrize("layout", ["contiguous", "scattered"])
def test_wal_epoch(benchmark, replica, mixed, throughput, layout):
    """One whole 64 MiB epoch into the WAL and applied: add_data per 2 MiB batch (decompress,
    verify hashes, append), add_zero for the zero blocks, commit (fsync WAL, reserve, apply,
    fsync image and hash map, state file). Each round is the next epoch."""
    batches, zero_runs, data_bytes = _epoch_ops(mixed, layout)

    def run():
        w = replica.begin(replica.state.epoch + 1, time.time())
        for b in batches:
            w.add_data(*b)
        w.add_zero(zero_runs)
        return w.commit(w.blocks)

    state = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    assert state is replica.state and state.epoch >= 1
    assert replica.stored_hashes(0, 1) in (codec.block_hash(mixed.blocks[0]), codec.zero_hash(BLOCK))
    throughput(EPOCH_BLOCKS * BLOCK, data=data_bytes, compressed=sum(len(b[3]) for b in batches))


# -- 7. the seed path, end to end in one process ------------------------------------

SEED_EPOCH = 64 * MiB  # the source's max_epoch_bytes


def _seed_round(blocks: list[bytes], rep: Replica, level: int = 1) -> int:
    """What a seed does with `blocks` (non-zero, realistic) at both ends, minus the socket and
    the scan: the source batches 2 MiB, compresses and frames (frames.encode); the receiver
    decodes the byte stream in 1 MiB reads (FrameDecoder), checks and stores each Data
    (EpochWriter.add_data), and commits an epoch every SEED_EPOCH bytes. Returns wire bytes."""
    dec = frames.FrameDecoder()
    wire = 0
    epoch = rep.state.epoch
    w = None
    pending = bytearray()
    for start in range(0, len(blocks), BATCH_BLOCKS):
        chunk = blocks[start:start + BATCH_BLOCKS]
        if w is None:
            epoch += 1
            w = rep.begin(epoch, time.time())
        raw = b"".join(chunk)
        msg = Data("v", epoch, pack_u64(range(start, start + len(chunk))),
                   b"".join(codec.block_hash(b) for b in chunk), len(raw), codec.compress(raw, level))
        pending += frames.encode(msg)
        wire += len(pending)
        while len(pending) >= MiB or (pending and start + BATCH_BLOCKS >= len(blocks)):
            for got in dec.feed(bytes(pending[:MiB])):
                assert isinstance(got, Data)
                w.add_data(got.indices, got.hashes, got.raw_len, got.zdata)
            del pending[:MiB]
        if w.blocks * BLOCK >= SEED_EPOCH or start + BATCH_BLOCKS >= len(blocks):
            w.commit(w.blocks)
            w = None
    return wire


@pytest.mark.parametrize("replica_kind", ["seeding", "whole"])
def test_seed_path(benchmark, tmp_path, mixed, throughput, replica_kind):
    """A 64 MiB first seed of the mixed set's non-zero blocks (zeros are never sent in a seed),
    encode to apply, into a new replica each round: "seeding" places the data in the image at
    receipt (a replica never yet whole), "whole" takes the WAL path every later epoch takes."""
    blocks = mixed.nonzero
    geo = Geometry(len(blocks) * BLOCK, BLOCK)
    made: list[Replica] = []

    def setup():
        for old in made:
            old.close()
        rep = Replica.open(tmp_path / f"r{len(made)}", "v", geo, create=True)
        if replica_kind == "whole":
            rep.seeded(0)
        made.append(rep)
        return (blocks, rep), {}

    try:
        wire = benchmark.pedantic(_seed_round, setup=setup, rounds=5, iterations=1, warmup_rounds=1)
        rep = made[-1]
        assert rep.state.seeding == (replica_kind == "seeding")
        assert rep.read_block(len(blocks) - 1) == blocks[-1] and rep.read_block(0) == blocks[0]
    finally:
        for old in made:
            old.close()
    throughput(len(blocks) * BLOCK, wire=wire)
