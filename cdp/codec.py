"""Content hashing and compression: pure functions over bytes.

xxh3-128 identifies block content (dedup, change detection, verification);
zstd compresses batches of blocks. Both are thread-safe to call from worker
threads; zstd releases the GIL, so batches compress on both cores.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Sequence
from functools import lru_cache

import xxhash
import zstandard

from cdp.errors import RemoteProtocolError

HASH_LEN = 16
block_hash = xxhash.xxh3_128_digest

_local = threading.local()


@lru_cache(maxsize=64)
def zero_hash(length: int) -> bytes:
    """Hash of an all-zero block of `length` bytes (compare hashes, not bytes, to spot zeros)."""
    return block_hash(bytes(length))


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(level=level)
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def compress(data: bytes | bytearray | memoryview, level: int = 1) -> bytes:
    """One zstd frame holding `data` (content size recorded, so decompression is bounded)."""
    return _compressor(level).compress(data)


_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
PARALLEL_MIN = 1 << 20  # below this, one thread compresses faster than two hand off


def compress_many(chunks: Sequence[bytes | bytearray | memoryview], level: int = 1) -> list[bytes]:
    """compress() of each chunk, in order; a large batch is split between this thread and a
    helper (zstd releases the GIL), so it takes about half the time where a core is free."""
    if len(chunks) < 2 or sum(len(c) for c in chunks) < PARALLEL_MIN:
        return [compress(c, level) for c in chunks]
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cdp-zstd")
    half = len(chunks) // 2
    rest = _pool.submit(lambda: [compress(c, level) for c in chunks[half:]])
    first = [compress(c, level) for c in chunks[:half]]
    return first + rest.result()


def decompress(blob: bytes, expected_len: int) -> bytes:
    """Inverse of compress; the output must be exactly `expected_len` bytes.

    The length is checked before and after: a frame claiming more is refused
    before any memory is allocated (no decompression bombs).
    """
    try:
        params = zstandard.get_frame_parameters(blob)
    except zstandard.ZstdError as exc:
        raise RemoteProtocolError(f"compressed data is not a zstd frame: {exc}") from None
    if params.content_size == zstandard.CONTENTSIZE_UNKNOWN:
        raise RemoteProtocolError("compressed data does not record its size; refusing it")
    if params.content_size != expected_len:
        raise RemoteProtocolError(
            f"compressed data holds {params.content_size} bytes, expected {expected_len}"
        )
    try:
        out = _decompressor().decompress(blob, max_output_size=expected_len)
    except zstandard.ZstdError as exc:
        raise RemoteProtocolError(f"corrupt compressed data: {exc}") from None
    if len(out) != expected_len:
        raise RemoteProtocolError(f"compressed data holds {len(out)} bytes, expected {expected_len}")
    return out


def compressed_digest(blob: bytes, expected_len: int, chunk: int = 1 << 20) -> bytes:
    """xxh3-128 of what `blob` decompresses to, which must be exactly `expected_len` bytes.

    Streamed: memory stays at one chunk whatever the frame claims, so a small frame that
    expands to a gigabyte costs time bounded by the caller's size limit, never memory.
    """
    try:
        params = zstandard.get_frame_parameters(blob)
    except zstandard.ZstdError as exc:
        raise RemoteProtocolError(f"compressed data is not a zstd frame: {exc}") from None
    if params.content_size not in (zstandard.CONTENTSIZE_UNKNOWN, expected_len):
        raise RemoteProtocolError(
            f"compressed data holds {params.content_size} bytes, expected {expected_len}")
    h = xxhash.xxh3_128()
    n = 0
    try:
        with _decompressor().stream_reader(blob, read_across_frames=False) as reader:
            while part := reader.read(chunk):
                n += len(part)
                if n > expected_len:
                    break
                h.update(part)
    except zstandard.ZstdError as exc:
        raise RemoteProtocolError(f"corrupt compressed data: {exc}") from None
    if n != expected_len:
        raise RemoteProtocolError(f"compressed data holds {'more than ' if n > expected_len else ''}"
                                  f"{n} bytes, expected {expected_len}")
    return h.digest()
