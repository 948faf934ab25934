"""The write-ahead log of one epoch.

Layout of ``<data_dir>/<volume>/wal``: a sequence of records, appended while
an epoch arrives, made durable with one fsync at commit::

    record := u32 body_len (big-endian) | 16-byte xxh3-128 of body | body
    body   := msgpack array, one of
        [BEGIN,  epoch, time]
        [DATA,   indices:u64[], hashes:16B[], raw_len, zstd frame]   verified wire data
        [RAW,    indices:u64[], hashes:16B[], bytes]                 resolved references
        [ZERO,   runs:(u64 start, u64 count)[]]
        [COMMIT, epoch, time, block_count]

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

from cdp.codec import block_hash

BEGIN, DATA, RAW, ZERO, COMMIT = 1, 2, 3, 4, 5
_HEAD = struct.Struct(">I16s")
MAX_RECORD = 1 << 30


class WalCorrupt(Exception):
    """The log does not hold a whole committed epoch (internal; never leaves replica/)."""


@dataclass(frozen=True)
class Record:
    offset: int
    body: list[Any]


class WalWriter:
    """Appends records to the log through one buffered file; fsync happens in sync()."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fh = open(path, "wb", buffering=1 << 20)  # truncates any earlier log
        self.offset = 0

    def append(self, body: list[Any]) -> int:
        """Write one record; returns its offset in the log."""
        payload = msgpack.packb(body, use_bin_type=True)
        off = self.offset
        self._fh.write(_HEAD.pack(len(payload), block_hash(payload)))
        self._fh.write(payload)
        self.offset += _HEAD.size + len(payload)
        return off

    def sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_record(fd: int, offset: int) -> tuple[list[Any], int]:
    """The record at `offset` and the offset of the next one."""
    head = os.pread(fd, _HEAD.size, offset)
    if len(head) != _HEAD.size:
        raise WalCorrupt(f"short record header at {offset}")
    length, digest = _HEAD.unpack(head)
    if length > MAX_RECORD:
        raise WalCorrupt(f"record length {length} at {offset} is implausible")
    payload = os.pread(fd, length, offset + _HEAD.size)
    if len(payload) != length or block_hash(payload) != digest:
        raise WalCorrupt(f"record at {offset} is torn or corrupt")
    body = msgpack.unpackb(payload, raw=False)
    if not isinstance(body, list) or not body:
        raise WalCorrupt(f"record at {offset} is not a record")
    return body, offset + _HEAD.size + length


def read_log(path: str | os.PathLike[str]) -> Iterator[Record]:
    """Every record of a log, in order; raises WalCorrupt at the first bad one."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        off = 0
        while off < size:
            body, nxt = read_record(fd, off)
            yield Record(off, body)
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
