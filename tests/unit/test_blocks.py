"""Block geometry, packed u64 arrays, runs and sparse-file extents (cdp.blocks)."""

from __future__ import annotations

import errno
import itertools
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp import blocks
from cdp.blocks import Geometry, block_spans, data_extents, pack_u64, runs, unpack_u64
from cdp.errors import RemoteProtocolError

KiB, MiB = 1024, 1024 * 1024

# ---------------------------------------------------------------- Geometry


def test_geometry_short_last_block():
    geo = Geometry(size=10, block_size=4)
    assert geo.blocks == 3
    assert [geo.length(i) for i in range(geo.blocks)] == [4, 4, 2]
    assert [geo.offset(i) for i in range(geo.blocks)] == [0, 4, 8]


def test_geometry_exact_multiple():
    geo = Geometry(size=3 * 64 * KiB, block_size=64 * KiB)
    assert geo.blocks == 3
    assert geo.length(2) == 64 * KiB
    assert geo.offset(2) == 128 * KiB


@pytest.mark.parametrize(("size", "bs", "blocks"),
                         [(0, 4096, 0), (1, 4096, 1), (4095, 4096, 1), (4096, 4096, 1),
                          (4097, 4096, 2), (10 * MiB + 1, MiB, 11)])
def test_geometry_block_count(size, bs, blocks):
    geo = Geometry(size, bs)
    assert geo.blocks == blocks
    if blocks:
        assert geo.length(blocks - 1) == size - (blocks - 1) * bs


@given(st.integers(0, 1 << 40), st.sampled_from([4096, 65536, 1 << 20, 4 << 20]))
def test_geometry_lengths_cover_size(size, bs):
    geo = Geometry(size, bs)
    if geo.blocks:
        last = geo.blocks - 1
        assert 0 < geo.length(last) <= bs
        assert geo.offset(last) + geo.length(last) == size
        assert all(geo.length(i) == bs for i in range(min(last, 3)))
    else:
        assert size == 0


def test_geometry_is_frozen():
    geo = Geometry(10, 4)
    with pytest.raises(AttributeError):
        geo.size = 11  # type: ignore[misc]


# ---------------------------------------------------------------- pack_u64


@pytest.mark.parametrize("values", [[], [0], [1, 2, 3], [2**64 - 1, 0, 2**63], list(range(1000))])
def test_pack_unpack_round_trip(values):
    blob = pack_u64(values)
    assert len(blob) == 8 * len(values)
    assert list(unpack_u64(blob)) == values


def test_pack_is_little_endian():
    assert pack_u64([1, 0x0102030405060708]) == (
        b"\x01\x00\x00\x00\x00\x00\x00\x00" + b"\x08\x07\x06\x05\x04\x03\x02\x01")
    assert list(unpack_u64(b"\x00\x01" + bytes(6))) == [256]


def test_pack_accepts_iterators():
    assert list(unpack_u64(pack_u64(iter(range(5))))) == [0, 1, 2, 3, 4]


@given(st.lists(st.integers(0, 2**64 - 1), max_size=200))
def test_pack_unpack_property(values):
    assert list(unpack_u64(pack_u64(values))) == values


@pytest.mark.parametrize("n", [1, 7, 9, 15, 17, 801])
def test_unpack_bad_length(n):
    with pytest.raises(RemoteProtocolError, match="multiple of 8"):
        unpack_u64(bytes(n))


def test_unpack_bad_length_names_what():
    with pytest.raises(RemoteProtocolError, match=r"Data\.indices"):
        unpack_u64(b"\x00" * 12, "Data.indices")


# ---------------------------------------------------------------- runs


@pytest.mark.parametrize(
    ("indices", "expected"),
    [([], []),
     ([0], [(0, 1)]),
     ([7], [(7, 1)]),
     ([0, 1, 2], [(0, 3)]),
     ([0, 1, 2, 5, 6, 9], [(0, 3), (5, 2), (9, 1)]),
     ([1, 3, 5], [(1, 1), (3, 1), (5, 1)]),
     ([5, 6, 1, 2], [(5, 2), (1, 2)]),
     ([3, 2, 1], [(3, 1), (2, 1), (1, 1)]),
     ([4, 4], [(4, 1), (4, 1)])],
)
def test_runs(indices, expected):
    assert list(runs(indices)) == expected
    assert list(runs(iter(indices))) == expected


@given(st.sets(st.integers(0, 2000), max_size=300))
def test_runs_property(index_set):
    indices = sorted(index_set)
    out = list(runs(indices))
    expanded = [i for start, count in out for i in range(start, start + count)]
    assert expanded == indices
    # maximal: consecutive runs never touch
    for (s1, c1), (s2, _) in itertools.pairwise(out):
        assert s1 + c1 < s2


# ---------------------------------------------------------------- block_spans


@pytest.mark.parametrize(
    ("extents", "size", "bs", "expected"),
    [([], 100, 10, []),
     ([(0, 1)], 100, 10, [(0, 1)]),
     ([(0, 10)], 100, 10, [(0, 1)]),
     ([(0, 11)], 100, 10, [(0, 2)]),
     ([(5, 20)], 100, 10, [(0, 3)]),
     ([(0, 10), (10, 10)], 100, 10, [(0, 2)]),  # adjacent blocks merge
     ([(0, 3), (5, 3)], 100, 10, [(0, 1)]),  # same block merges
     ([(0, 3), (9, 2)], 100, 10, [(0, 2)]),
     ([(0, 10), (30, 10)], 100, 10, [(0, 1), (3, 1)]),
     ([(0, 10), (20, 10)], 100, 10, [(0, 1), (2, 1)]),
     ([(15, 1), (19, 30), (60, 5), (99, 1)], 100, 10, [(1, 4), (6, 1), (9, 1)]),
     ([(90, 5)], 95, 10, [(9, 1)]),  # short last block
     ([(90, 100)], 95, 10, [(9, 1)]),  # clipped to the geometry
     ([(0, 95)], 95, 10, [(0, 10)])],
)
def test_block_spans(extents, size, bs, expected):
    assert block_spans(extents, Geometry(size, bs)) == expected


@st.composite
def extents_in(draw, size):
    """Sorted, disjoint (offset, length) extents inside [0, size)."""
    cuts = sorted(draw(st.sets(st.integers(0, size), max_size=20)))
    pairs = list(zip(cuts[::2], cuts[1::2], strict=False))
    return [(a, b - a) for a, b in pairs if b > a]


@settings(max_examples=200)
@given(st.data(), st.integers(1, 5000), st.sampled_from([1, 7, 64, 100, 512]))
def test_block_spans_matches_brute_force(data, size, bs):
    geo = Geometry(size, bs)
    extents = data.draw(extents_in(size))
    touched = sorted({off // bs for o, n in extents for off in range(o, o + n)})
    assert block_spans(extents, geo) == list(runs(touched))


# ---------------------------------------------------------------- data_extents


def _holes_supported(directory: Path) -> bool:
    probe = directory / "probe"
    with open(probe, "wb") as fh:
        os.truncate(fh.fileno(), 4 * MiB)
        fh.seek(2 * MiB)
        fh.write(b"x" * 4096)
        fh.flush()
        try:
            first = os.lseek(fh.fileno(), 0, os.SEEK_DATA)
        except OSError:
            return False
    probe.unlink()
    return first > 0


@pytest.fixture
def holes(tmp_path):
    if not _holes_supported(tmp_path):
        pytest.skip("the file system under tmp_path does not report holes")


def _sparse(path: Path, size: int, writes: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as fh:
        os.truncate(fh.fileno(), size)
        for off, data in writes:
            fh.seek(off)
            fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _extents(path: Path, size: int) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return data_extents(fd, size)
    finally:
        os.close(fd)


def _check_well_formed(extents, size):
    pos = 0
    for off, length in extents:
        assert length > 0
        assert off >= pos, "extents must be sorted and disjoint"
        pos = off + length
    assert pos <= size


def _covered(extents, off, length):
    """Every byte of [off, off+length) lies in some extent (probed every 512 bytes and the end)."""
    probes = [*range(off, off + length, 512), off + length - 1]
    return all(any(o <= b < o + n for o, n in extents) for b in probes)


def _touches(extents, off, length):
    return any(o < off + length and off < o + n for o, n in extents)


def test_data_extents_sparse_file(tmp_path, holes):
    size = 8 * MiB + 1000  # the last 64KiB block is short
    writes = [
        (1 * MiB, b"a" * 5000),
        (4 * MiB - 100, b"b" * 200),  # straddles a block boundary
        (size - 10, b"z" * 10),  # the very end
    ]
    path = tmp_path / "sparse.img"
    _sparse(path, size, writes)
    ext = _extents(path, size)
    _check_well_formed(ext, size)
    for off, data in writes:
        assert _covered(ext, off, len(data)), (off, ext)
    # far from any write: holes, skipped
    for hole_off, hole_len in [(0, 512 * KiB), (2 * MiB, MiB), (5 * MiB, 2 * MiB)]:
        assert not _touches(ext, hole_off, hole_len), (hole_off, ext)

    geo = Geometry(size, 64 * KiB)
    spans = block_spans(ext, geo)
    span_blocks = {b for s, c in spans for b in range(s, s + c)}
    written_blocks = {b for off, data in writes
                      for b in range(off // geo.block_size,
                                     (off + len(data) - 1) // geo.block_size + 1)}
    assert written_blocks <= span_blocks
    assert geo.blocks - 1 in span_blocks
    for hole_off, hole_len in [(0, 512 * KiB), (2 * MiB, MiB), (5 * MiB, 2 * MiB)]:
        hole_blocks = set(range(hole_off // geo.block_size,
                                (hole_off + hole_len) // geo.block_size))
        assert not hole_blocks & span_blocks
    # with file-system granularity (4KiB) below the block size the spans are exact
    assert spans == list(runs(sorted(written_blocks)))


def test_data_extents_all_hole(tmp_path, holes):
    path = tmp_path / "empty.img"
    _sparse(path, 16 * MiB, [])
    assert _extents(path, 16 * MiB) == []


def test_data_extents_data_only_at_start(tmp_path, holes):
    path = tmp_path / "head.img"
    _sparse(path, 16 * MiB, [(0, b"h" * 8192)])
    ext = _extents(path, 16 * MiB)
    _check_well_formed(ext, 16 * MiB)
    assert ext[0][0] == 0
    assert _covered(ext, 0, 8192)
    assert not _touches(ext, MiB, 15 * MiB)


def test_data_extents_clipped_to_size(tmp_path, holes):
    path = tmp_path / "clip.img"
    _sparse(path, 4 * MiB, [(MiB, b"c" * (2 * MiB))])
    ext = _extents(path, MiB + 4096)
    assert ext == [(MiB, 4096)]
    assert _extents(path, MiB) == []


def test_data_extents_dense_file(tmp_path):
    path = tmp_path / "dense.img"
    path.write_bytes(b"d" * 100_000)
    assert _extents(path, 100_000) == [(0, 100_000)]


def test_data_extents_zero_size(tmp_path):
    path = tmp_path / "zero.img"
    path.write_bytes(b"")
    assert _extents(path, 0) == []


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTTY])
def test_data_extents_falls_back_to_whole_range(tmp_path, monkeypatch, code):
    path = tmp_path / "f.img"
    _sparse(path, MiB, [])

    def no_seek_data(fd, pos, how):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(blocks.os, "lseek", no_seek_data)
    assert _extents(path, MiB) == [(0, MiB)]


def test_data_extents_other_errors_propagate(tmp_path, monkeypatch):
    path = tmp_path / "f.img"
    _sparse(path, MiB, [])

    def broken(fd, pos, how):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(blocks.os, "lseek", broken)
    with pytest.raises(OSError) as info:
        _extents(path, MiB)
    assert info.value.errno == errno.EIO
