"""Hashing and compression (cdp.codec)."""

from __future__ import annotations

import os
import random
import threading

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp.codec import HASH_LEN, block_hash, compress, compress_many, decompress, zero_hash
from cdp.errors import RemoteProtocolError

SAMPLES = [
    b"",
    b"x",
    b"hello world" * 1000,
    bytes(65536),
    os.urandom(65536),
    bytes(range(256)) * 257,
]


@pytest.mark.parametrize("data", SAMPLES, ids=lambda d: f"len{len(d)}")
@pytest.mark.parametrize("level", [-7, 1, 3, 19])
def test_round_trip(data, level):
    blob = compress(data, level)
    assert decompress(blob, len(data)) == data


def test_compress_accepts_buffers():
    data = b"abc" * 5000
    assert decompress(compress(bytearray(data)), len(data)) == data
    assert decompress(compress(memoryview(data)), len(data)) == data


def test_compress_records_content_size():
    data = b"q" * 12345
    assert zstandard.get_frame_parameters(compress(data)).content_size == len(data)


def test_compression_compresses():
    data = bytes(1 << 20)
    assert len(compress(data)) < 1024


@settings(max_examples=100)
@given(st.binary(max_size=20000), st.integers(-5, 9))
def test_round_trip_property(data, level):
    assert decompress(compress(data, level), len(data)) == data


@pytest.mark.parametrize("delta", [-1, -100, 1, 100])
def test_wrong_expected_len(delta):
    data = b"some block content " * 300
    blob = compress(data)
    with pytest.raises(RemoteProtocolError, match=str(len(data) + delta)):
        decompress(blob, len(data) + delta)


def test_wrong_expected_len_zero_and_empty():
    with pytest.raises(RemoteProtocolError):
        decompress(compress(b"abc"), 0)
    with pytest.raises(RemoteProtocolError):
        decompress(compress(b""), 1)
    assert decompress(compress(b""), 0) == b""


def _frame_without_size(data: bytes) -> bytes:
    blob = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    assert (zstandard.get_frame_parameters(blob).content_size
            == zstandard.CONTENTSIZE_UNKNOWN)
    return blob


@pytest.mark.parametrize("delta", [-1, 1, 4096])
def test_wrong_expected_len_without_content_size(delta):
    data = b"z" * 10000
    with pytest.raises(RemoteProtocolError):
        decompress(_frame_without_size(data), len(data) + delta)


def test_unknown_content_size_does_not_allocate_expected_len():
    with pytest.raises(RemoteProtocolError):
        decompress(_frame_without_size(b"tiny"), 1 << 62)


@pytest.mark.parametrize(
    "blob",
    [b"", b"\x00", b"garbage", b"\x28\xb5\x2f", bytes(64), os.urandom(100),
     b"\x28\xb5\x2f\xfd" + os.urandom(60)],
    ids=["empty", "one", "text", "short-magic", "zeros", "random", "magic+random"],
)
def test_garbage_refused(blob):
    with pytest.raises(RemoteProtocolError):
        decompress(blob, 100)


def test_truncated_frame_refused():
    data = os.urandom(5000)
    blob = compress(data)
    for cut in (len(blob) - 1, len(blob) // 2, 6):
        with pytest.raises(RemoteProtocolError):
            decompress(blob[:cut], len(data))


def test_corrupted_frame_refused():
    data = os.urandom(5000)  # incompressible: stored raw, so flip a checksum-covered byte
    blob = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(data))
    blob[-1] ^= 0xFF
    with pytest.raises(RemoteProtocolError):
        decompress(bytes(blob), len(data))


@settings(max_examples=200)
@given(st.binary(max_size=300), st.integers(0, 1 << 20))
def test_random_input_only_protocol_errors(blob, expected_len):
    try:
        out = decompress(blob, expected_len)
    except RemoteProtocolError:
        return
    assert len(out) == expected_len


# ---------------------------------------------------------------- hashing


@pytest.mark.parametrize("n", [0, 1, 4096, 65536, 4 << 20, 65536 + 17])
def test_zero_hash(n):
    assert zero_hash(n) == block_hash(bytes(n))
    assert len(zero_hash(n)) == HASH_LEN


def test_zero_hash_differs_by_length_and_content():
    assert zero_hash(4096) != zero_hash(4097)
    assert zero_hash(4096) != block_hash(b"\x00" * 4095 + b"\x01")


def test_block_hash():
    h = block_hash(b"abc")
    assert isinstance(h, bytes)
    assert len(h) == HASH_LEN
    assert h == block_hash(bytearray(b"abc"))
    assert h != block_hash(b"abd")


def test_compress_thread_safe():
    inputs = [os.urandom(1000) + bytes(50000) + bytes([i]) for i in range(8)]
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(20):
                blob = compress(inputs[i], 1 + i % 3)
                assert decompress(blob, len(inputs[i])) == inputs[i]
            results[i] = blob
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 8


@pytest.mark.parametrize("n", [0, 1, 3, 40])
def test_compress_many_keeps_order_small_and_large(n: int) -> None:
    """A large batch is split between two threads; the frames still come back in order."""
    rng = random.Random(n)
    chunks = [rng.randbytes(65536) if k % 2 else bytes([k]) * 65536 for k in range(n)]
    frames = compress_many(chunks)
    assert len(frames) == n
    assert [decompress(f, 65536) for f in frames] == chunks
