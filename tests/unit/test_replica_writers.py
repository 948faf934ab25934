"""One writer per volume, always: two connections racing on one replica never mix.

The store refuses a Begin while another epoch is being received, and any Begin whose number
or WAL file belongs to a sealed epoch still applying. After every step the image and the hash
map must agree (what `cdp verify --replica` checks).
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.blocks import Geometry, pack_u64
from cdp.codec import block_hash, compress
from cdp.replica import EpochWriter, Replica
from cdp.replica.store import WriterConflict

BS = 4096
GEO = Geometry(256 * BS, BS)


def add(w: EpochWriter, idx: list[int], blocks: list[bytes]) -> None:
    data = b"".join(blocks)
    w.add_data(pack_u64(idx), b"".join(block_hash(b) for b in blocks), len(data), compress(data))


def agree(r: Replica) -> None:
    assert r.rehash(0, GEO.blocks) == r.stored_hashes(0, GEO.blocks), "image and hash map differ"


@pytest.fixture
def rep(tmp_path: Path):
    r = Replica.open(tmp_path, "v", GEO, create=True)
    yield r
    r.close()


def test_second_begin_while_receiving_is_refused(rep: Replica) -> None:
    a = rep.begin(1, 1.0)
    with pytest.raises(WriterConflict, match="still being received"):
        rep.begin(1, 1.0)
    with pytest.raises(WriterConflict):
        rep.begin(2, 1.0)
    a.abort()  # fenced: its unsealed epoch is discarded
    b = rep.begin(1, 2.0)
    add(b, [0], [b"b" * BS])
    b.commit(1)
    agree(rep)
    assert rep.writers_idle()


def test_begin_of_a_sealed_epoch_still_applying_is_refused(rep: Replica) -> None:
    """The reported race: connection A sealed epoch 1; B must not begin 1 again (same number,
    same WAL file) until it is applied, and after it only 2 follows."""
    a = rep.begin(1, 1.0)
    add(a, list(range(128)), [bytes([7]) * BS] * 128)
    a.seal(128)
    with pytest.raises(WriterConflict, match="sealed and applying"):
        rep.begin(1, 2.0)
    with pytest.raises(WriterConflict):
        rep.begin(3, 2.0)
    assert not rep.writers_idle()
    a.apply()
    assert rep.writers_idle()
    with pytest.raises(WriterConflict):
        rep.begin(1, 2.0)
    b = rep.begin(2, 2.0)
    add(b, list(range(64, 192)), [bytes([9]) * BS] * 128)
    b.commit(128)
    agree(rep)
    assert rep.state.epoch == 2


def test_pipelined_epoch_may_begin_while_the_previous_applies(rep: Replica) -> None:
    a = rep.begin(1, 1.0)
    add(a, [1], [b"1" * BS])
    a.seal(1)
    b = rep.begin(2, 2.0)  # e+1 while e is sealed: uses the other WAL file
    add(b, [1], [b"2" * BS])
    a.apply()
    b.seal(1)
    b.apply()
    agree(rep)
    assert rep.read_block(1) == b"2" * BS


def test_racing_begin_during_a_threaded_apply(rep: Replica) -> None:
    """B hammers Begin while A's sealed epoch applies in another thread: every attempt before
    the apply finishes is refused, none corrupts the WAL A's apply reads from."""
    rng = random.Random(1)
    a = rep.begin(1, 1.0)
    blocks = [rng.randbytes(BS) for _ in range(GEO.blocks)]
    add(a, list(range(GEO.blocks)), blocks)
    a.seal(GEO.blocks)
    t = threading.Thread(target=a.apply)
    refused = 0
    t.start()
    while t.is_alive():
        try:
            w = rep.begin(1, 2.0)
        except WriterConflict:
            refused += 1
            continue
        w.abort()  # pragma: no cover - a refusal is the only right answer
        pytest.fail("epoch 1 began again while it was applying")
    t.join()
    assert rep.state.epoch == 1 and refused > 0
    agree(rep)
    assert all(rep.read_block(i) == blocks[i] for i in range(GEO.blocks))


OPS = st.lists(st.tuples(st.sampled_from(["begin", "data", "seal", "apply", "abort"]),
                         st.integers(0, 1), st.integers(0, 3)), max_size=40)


@pytest.mark.parametrize("seeding", [False, True])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(OPS)
def test_two_connections_in_any_order_never_mix(tmp_path_factory: pytest.TempPathFactory,
                                                 seeding: bool,
                                                 ops: list[tuple[str, int, int]]) -> None:
    """Two writers ("connections") issue begin/data/seal/apply/abort in any order, each with
    its own idea of the next epoch; the store accepts only what keeps one writer, and image and
    hash map agree after every step (a seeding replica places data in the image at receipt:
    they agree whenever no epoch is being received, an aborted one's data zeroed again)."""
    r = Replica.open(tmp_path_factory.mktemp("w"), "v", GEO, create=True)
    if not seeding:
        assert r.seeded(0) and not r.state.seeding
    try:
        writers: dict[int, EpochWriter | None] = {0: None, 1: None}
        sealed: list[EpochWriter] = []
        for op, who, arg in ops:
            w = writers[who]
            if op == "begin" and w is None:
                try:
                    writers[who] = r.begin(r.state.epoch + 1 + (arg % 2), float(arg))
                except WriterConflict:
                    pass
            elif op == "data" and w is not None:
                idx = [(who * 97 + arg * 31 + k) % GEO.blocks for k in range(8)]
                add(w, idx, [bytes([who * 16 + arg]) * BS for _ in idx])
            elif op == "seal" and w is not None:
                w.seal(w.blocks)
                sealed.append(w)
                writers[who] = None
            elif op == "apply" and sealed:
                sealed.pop(0).apply()
            elif op == "abort" and w is not None:
                w.abort()
                writers[who] = None
            if not sealed and (not seeding or all(x is None for x in writers.values())):
                agree(r)
        for w in sealed:
            w.apply()
        if seeding:  # the connections go away: what they were receiving is dropped
            for x in writers.values():
                if x is not None:
                    x.abort()
        agree(r)
    finally:
        r.close()
