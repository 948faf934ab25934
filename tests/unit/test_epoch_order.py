"""A block added twice to one epoch ends as its later content on the receiver, whatever the kinds.

An NBD resync adds a block again when the guest changed it while the resync
read (a next pass, the closing cut's content and zero runs). The builder
batches data, zero runs and references separately, and at the commit sends
them as data, then zeros, then references: without care a zero run could land
after a block's newer data, or an older reference after a newer trim. These
tests replay what the builder emits, in wire order, into a model of the
receiver and compare it with the hashes the source believes the replica holds.
"""

from __future__ import annotations

import concurrent.futures
import random
from pathlib import Path

import pytest

from cdp.blocks import Geometry, unpack_u64
from cdp.codec import HASH_LEN, block_hash, zero_hash
from cdp.config import VolumeConfig
from cdp.source.volume import DedupIndex, EpochBuilder, VolumeState
from cdp.tracker.scan import zero_map
from cdp.wire.messages import Data, Ref, Zero

BS = 4096
GEO = Geometry(64 * BS, BS)
ZH = zero_hash(BS)


def _volume(tmp_path: Path) -> VolumeState:
    vs = VolumeState(VolumeConfig(name="v", path=tmp_path / "v.img"), tmp_path / "state")
    vs.geo = GEO
    vs.adopt("rid", 0, zero_map(GEO))
    return vs


def _replay(vs: VolumeState, index: DedupIndex, changes: list[tuple[int, bytes | None]],
            replica: dict[int, bytes], *, batch: int = 1 << 20) -> None:
    """Build one epoch of `changes` and apply its messages, in order, to `replica` (block -> hash)."""
    ops: list = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        b = EpochBuilder(vs, {vs.name: vs}, index, pool, ops.append, capture_time=1.0,
                         batch_bytes=batch, max_epoch_bytes=1 << 30, level=1)
        for i, data in changes:
            b.add(i, block_hash(data) if data is not None else ZH,
                  memoryview(data) if data is not None else None)
        b.commit()
        msgs = [op[1].result() if op[0] == "data" else op[1] for op in ops if op[0] in ("data", "msg")]
    for m in msgs:
        if isinstance(m, Data):
            for k, i in enumerate(unpack_u64(m.indices)):
                replica[i] = m.hashes[k * HASH_LEN:(k + 1) * HASH_LEN]
        elif isinstance(m, Zero):
            pairs = unpack_u64(m.runs)
            for start, count in zip(pairs[::2], pairs[1::2], strict=True):
                for i in range(start, start + count):
                    replica[i] = ZH
        elif isinstance(m, Ref):
            for k, i in enumerate(unpack_u64(m.indices)):
                replica[i] = m.hashes[k * HASH_LEN:(k + 1) * HASH_LEN]
    vs.acknowledged(max(vs.pending))


def _believed(vs: VolumeState) -> dict[int, bytes]:
    assert vs.smap is not None
    return {i: bytes(vs.smap[i * HASH_LEN:(i + 1) * HASH_LEN]) for i in range(GEO.blocks)}


@pytest.mark.parametrize("later", ["zero", "data"])
def test_a_reference_then_a_later_change_of_the_same_block(tmp_path: Path, later: str) -> None:
    vs = _volume(tmp_path)
    index = DedupIndex(1000)
    a, b = b"a" * BS, b"b" * BS
    replica = dict.fromkeys(range(GEO.blocks), ZH)
    _replay(vs, index, [(1, a)], replica)  # the replica holds `a` at block 1: a dedup source
    # block 5 is read as `a` (sent as a reference), then trimmed or rewritten during the resync
    _replay(vs, index, [(5, a), (5, None if later == "zero" else b)], replica)
    assert replica == _believed(vs)
    assert replica[5] == (ZH if later == "zero" else block_hash(b))


def test_a_zero_then_newer_data_of_the_same_block(tmp_path: Path) -> None:
    vs = _volume(tmp_path)
    index = DedupIndex(1000)
    replica = dict.fromkeys(range(GEO.blocks), ZH)
    _replay(vs, index, [(7, b"x" * BS)], replica)
    _replay(vs, index, [(7, None), (7, b"y" * BS)], replica)  # read as a hole, then written
    assert replica == _believed(vs) and replica[7] == block_hash(b"y" * BS)


def test_random_repeats_end_as_the_source_believes(tmp_path: Path) -> None:
    rng = random.Random(13)
    vs = _volume(tmp_path)
    index = DedupIndex(1000)
    replica = dict.fromkeys(range(GEO.blocks), ZH)
    contents = [bytes([c]) * BS for c in b"pqrs"]
    for _ in range(30):
        changes = [(rng.randrange(16), rng.choice([*contents, None])) for _ in range(40)]
        _replay(vs, index, changes, replica, batch=rng.choice([BS, 4 * BS, 1 << 20]))
        assert replica == _believed(vs)
