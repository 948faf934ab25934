"""The write-ahead log of one epoch.

Layout of ``<data_dir>/<volume>/wal``: a sequence of records, appended while
an epoch arrives, made durable with one fsync at commit::

    record := u32 meta_len | u32 blob_len (big-endian) | 16-byte xxh3-128 of meta+blob
              | meta | blob
    meta   := msgpack array, one of                              blob
        [BEGIN,  epoch, time]                                    -
        [DATA,   indices:u64[], hashes:16B[], raw_len]           zstd frame (verified wire data)
        [RAW,    indices:u64[], hashes:16B[]]                    block bytes (resolved references)
        [ZERO,   runs:(u64 start, u64 count)[]]                  -
        [COMMIT, epoch, time, block_count, counters]             -

Block data stays out of msgpack (the blob), so appending it costs one write,
not a copy into a packer.

A log is valid only if every record checks out and the last one is COMMIT;
anything else (a torn tail, a missing commit) is an epoch that was never
acknowledged, and is discarded on open. Borg's legacy repository log (PUT /
COMMIT, drop everything after the last commit) is the model.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import xxhash

from cdp.codec import block_hash

BEGIN, DATA, RAW, ZERO, COMMIT = 1, 2, 3, 4, 5
_HEAD = struct.Struct(">II16s")
MAX_RECORD = 1 << 30


class WalCorrupt(Exception):
    """The log does not hold a whole committed epoch (internal; never leaves replica/)."""


@dataclass(frozen=True)
class Record:
    offset: int
    body: list[Any]
    blob: bytes


class WalWriter:
    """Appends records to the log through one buffered file; fsync happens in sync()."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fh = open(path, "wb", buffering=1 << 20)  # truncates any earlier log
        self.offset = 0

    def append(self, body: list[Any], blob: bytes = b"") -> int:
        """Write one record; returns its offset in the log."""
        meta = msgpack.packb(body, use_bin_type=True)
        h = xxhash.xxh3_128(meta)
        h.update(blob)
        off = self.offset
        self._fh.write(_HEAD.pack(len(meta), len(blob), h.digest()))
        self._fh.write(meta)
        if blob:
            self._fh.write(blob)
        self.offset += _HEAD.size + len(meta) + len(blob)
        return off

    def sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_record(fd: int, offset: int) -> tuple[list[Any], bytes, int]:
    """The record at `offset`: (meta, blob, offset of the next record)."""
    head = os.pread(fd, _HEAD.size, offset)
    if len(head) != _HEAD.size:
        raise WalCorrupt(f"short record header at {offset}")
    mlen, blen, digest = _HEAD.unpack(head)
    if mlen > MAX_RECORD or blen > MAX_RECORD:
        raise WalCorrupt(f"record lengths {mlen}+{blen} at {offset} are implausible")
    payload = os.pread(fd, mlen + blen, offset + _HEAD.size)
    if len(payload) != mlen + blen or block_hash(payload) != digest:
        raise WalCorrupt(f"record at {offset} is torn or corrupt")
    body = msgpack.unpackb(payload[:mlen], raw=False)
    if not isinstance(body, list) or not body:
        raise WalCorrupt(f"record at {offset} is not a record")
    return body, payload[mlen:], offset + _HEAD.size + mlen + blen


def read_log(path: str | os.PathLike[str]) -> Iterator[Record]:
    """Every record of a log, in order; raises WalCorrupt at the first bad one."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        off = 0
        while off < size:
            body, blob, nxt = read_record(fd, off)
            yield Record(off, body, blob)
            off = nxt
    finally:
        os.close(fd)


def committed_epoch(path: str | os.PathLike[str]) -> int | None:
    """The epoch number if the log holds one whole committed epoch, else None.

    Reads and checks every record but keeps none: memory stays flat whatever
    the epoch's size.
    """
    first = last = None
    try:
        for rec in read_log(path):
            if first is None:
                first = rec.body
            last = rec.body
    except (WalCorrupt, OSError, ValueError, msgpack.UnpackException):
        return None
    if first is None or last is None or first[0] != BEGIN or last[0] != COMMIT:
        return None
    if len(first) < 2 or len(last) < 2 or first[1] != last[1] or type(last[1]) is not int:
        return None
    return last[1]
