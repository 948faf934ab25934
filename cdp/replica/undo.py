"""One undo file: what an epoch overwrote, saved before it reached the image (journal.py).

Layout of an undo file (written as ``.undo.<E>.tmp``, fsync'd, renamed,
directory fsync'd: it exists whole or not at all)::

    "CDPUNDO1"
    frames        one zstd frame per saved block (old content), back to back
    index         count x (u64 block | u64 frame offset | u32 frame length
                           | 16-byte xxh3-128 of the old content)
                  frame length 0: the block was all zeros (hash = 16 zero bytes)
    meta          msgpack map: epoch, time, label, base_epoch, base_time,
                  base_until (point base_epoch holds no write that finished
                  later at the source), base_label, fingerprint (which WAL
                  epoch it belongs to), cut and base_cut (the Cut markers of
                  E and E-1, see groups.py), base_held, ...
    trailer       "CDPUNDO1" | u64 index offset | u32 count | u64 meta length
                  | 16-byte xxh3-128 of index + meta + these three numbers
"""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path
from typing import Any

import msgpack
import xxhash

from cdp.codec import HASH_LEN, block_hash, compress_many, decompress
from cdp.durable import create_private, fsync_dir
from cdp.errors import CdpError, ReplicaError

MAGIC = b"CDPUNDO1"
_ENTRY = struct.Struct(">QQI16s")
_TRAILER = struct.Struct(">8sQIQ16s")
NO_HASH = bytes(HASH_LEN)
QUEUE_BYTES = 8 * 1024 * 1024  # old blocks held for compression at most (compress_many)


class JournalCorrupt(Exception):
    """An undo file does not check out (internal)."""


def undo_name(epoch: int) -> str:
    return f"undo.{epoch:016d}"


def epoch_of(name: str) -> int | None:
    if not name.startswith("undo.") or len(name) != 21:
        return None
    try:
        return int(name[5:])
    except ValueError:
        return None


def undo_epochs(directory: Path) -> list[int]:
    """The epochs of the undo files in a journal folder, oldest first ([] if there is none)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(e for n in names if (e := epoch_of(n)) is not None)


class UndoWriter:
    """Streams one epoch's undo file; finish() makes it durable under its final name."""

    def __init__(self, directory: Path, epoch: int) -> None:
        self.final = directory / undo_name(epoch)
        self.tmp = directory / f".{undo_name(epoch)}.tmp"
        self._fh = create_private(self.tmp, buffering=1 << 20)
        self._fh.write(MAGIC)
        self._pos = len(MAGIC)
        self._index: list[bytes] = []
        self._queued: list[tuple[int, bytes | memoryview, bytes]] = []
        self._queued_bytes = 0

    def add(self, block: int, old: bytes | memoryview | None, old_hash: bytes) -> None:
        """Save a block's old content (None: it was all zeros)."""
        if old is None:
            self._index.append(_ENTRY.pack(block, 0, 0, NO_HASH))
            return
        self._queued.append((block, old, old_hash))
        self._queued_bytes += len(old)
        if self._queued_bytes >= QUEUE_BYTES:
            self._drain()

    @property
    def count(self) -> int:
        """Blocks saved so far."""
        return len(self._index) + len(self._queued)

    def _drain(self) -> None:
        """Compress the queued blocks (on two threads when there are many) and write them."""
        frames = compress_many([old for _, old, _ in self._queued])
        for (block, _, old_hash), frame in zip(self._queued, frames, strict=True):
            self._fh.write(frame)
            self._index.append(_ENTRY.pack(block, self._pos, len(frame), old_hash))
            self._pos += len(frame)
        self._queued = []
        self._queued_bytes = 0

    def finish(self, meta: dict[str, Any]) -> int:
        """Write index, meta and trailer; fsync; rename into place; returns the file size."""
        self._drain()
        index = b"".join(self._index)
        mbytes = msgpack.packb(meta, use_bin_type=True)
        nums = struct.pack(">QIQ", self._pos, len(self._index), len(mbytes))
        digest = xxhash.xxh3_128_digest(index + mbytes + nums)
        self._fh.write(index)
        self._fh.write(mbytes)
        self._fh.write(_TRAILER.pack(MAGIC, self._pos, len(self._index), len(mbytes), digest))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        size = self._fh.tell()
        self._fh.close()
        os.replace(self.tmp, self.final)
        fsync_dir(self.final.parent)
        return size

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


class UndoFile:
    """A checked undo file, open for reading; entries map block -> (offset, length, old hash)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            self.meta, self.entries = self._load()
        except BaseException:
            os.close(self.fd)
            raise
        self.size = os.fstat(self.fd).st_size

    def _load(self) -> tuple[dict[str, Any], dict[int, tuple[int, int, bytes]]]:
        size = os.fstat(self.fd).st_size
        if size < len(MAGIC) + _TRAILER.size:
            raise JournalCorrupt(f"{self.path}: too short")
        tr = os.pread(self.fd, _TRAILER.size, size - _TRAILER.size)
        magic, ioff, count, mlen, digest = _TRAILER.unpack(tr)
        if magic != MAGIC or ioff + count * _ENTRY.size + mlen + _TRAILER.size != size:
            raise JournalCorrupt(f"{self.path}: bad trailer")
        body = os.pread(self.fd, count * _ENTRY.size + mlen, ioff)
        nums = struct.pack(">QIQ", ioff, count, mlen)
        if xxhash.xxh3_128_digest(body + nums) != digest:
            raise JournalCorrupt(f"{self.path}: index does not match its checksum")
        try:
            meta = msgpack.unpackb(body[count * _ENTRY.size:], raw=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise JournalCorrupt(f"{self.path}: meta does not decode: {exc}") from None
        if not isinstance(meta, dict):
            raise JournalCorrupt(f"{self.path}: meta is not a map")
        entries = {}
        for k in range(count):
            block, off, n, h = _ENTRY.unpack_from(body, k * _ENTRY.size)
            entries[block] = (off, n, h)
        return meta, entries

    @property
    def epoch(self) -> int:
        return int(self.meta["epoch"])

    def read(self, entry: tuple[int, int, bytes], length: int) -> bytes:
        """A saved block's old content, checked against its hash."""
        off, n, h = entry
        if n == 0:
            return bytes(length)
        try:
            fd = self.fd if self.fd >= 0 else os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise ReplicaError(f"{self.path} was dropped (journaling switched off, or the "
                               "volume promoted): this point can no longer be read") from None
        try:
            blob = os.pread(fd, n, off)
        finally:
            if fd != self.fd:
                os.close(fd)
        try:
            data = decompress(blob, length)
        except CdpError as exc:
            raise ReplicaError(f"{self.path}: saved block is corrupt ({exc})") from None
        if block_hash(data) != h:
            raise ReplicaError(f"{self.path}: saved block does not match its hash; the journal "
                               "is damaged")
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_meta(path: Path) -> tuple[dict[str, Any], int]:
    """The meta map and size of an undo file, reading only its tail."""
    u = UndoFile(path)
    try:
        return u.meta, u.size
    finally:
        u.close()
