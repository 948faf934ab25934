"""Zero runs from a peer: merged and swept in O(runs), with the same result as block by block."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from cdp.blocks import Geometry, keys_in_runs, merge_runs, pack_u64
from cdp.codec import block_hash, compress
from cdp.replica import Replica
from cdp.wire.session import MAX_ZERO_RUNS

RUNS = st.lists(st.tuples(st.integers(0, 300), st.integers(0, 80)), max_size=40)


@given(RUNS, st.sets(st.integers(0, 400)))
def test_merge_and_sweep_match_the_naive_answer(runs: list[tuple[int, int]], keys: set[int]) -> None:
    flat = [x for r in runs for x in r]
    merged = merge_runs(flat)
    covered = {i for s, c in runs for i in range(s, s + c)}
    assert {i for s, c in merged for i in range(s, s + c)} == covered
    assert all(c > 0 for _, c in merged)
    assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(merged))  # disjoint, apart
    assert list(keys_in_runs(sorted(keys), merged)) == sorted(keys & covered)


def test_a_flood_of_whole_volume_runs_applies_right(tmp_path: Path) -> None:
    """The reported abuse: the same (0, N) run over and over, after data, in one epoch."""
    bs = 4096
    geo = Geometry(4096 * bs, bs)
    rep = Replica.open(tmp_path, "v", geo, create=True)
    try:
        rng = random.Random(5)
        blocks = [rng.randbytes(bs) for _ in range(64)]
        w = rep.begin(1, 1.0)
        data = b"".join(blocks)
        w.add_data(pack_u64(range(64)), b"".join(block_hash(b) for b in blocks), len(data),
                   compress(data))
        for _ in range(20):
            w.add_zero(pack_u64([0, geo.blocks] * MAX_ZERO_RUNS))
        w.add_data(pack_u64([7]), block_hash(blocks[7]), bs, compress(blocks[7]))
        w.commit(w.blocks)
        assert rep.rehash(0, geo.blocks) == rep.stored_hashes(0, geo.blocks)
        assert rep.read_block(7) == blocks[7] and rep.read_block(8) == bytes(bs)
    finally:
        rep.close()

