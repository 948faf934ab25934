"""The write-ahead log of one epoch.

Layout of ``<data_dir>/<volume>/wal.<epoch % 2>``: a sequence of records,
appended while an epoch arrives, made durable with one fdatasync (at commit, or
with the image at apply when an undo file protects the apply: see store.py)::

    record := u32 meta_len | u32 blob_len | u64 epoch (big-endian)
              | 16-byte xxh3-128 of meta+blob, seeded with the epoch
              | meta | blob
    meta   := msgpack array, one of                              blob
        [BEGIN,  epoch, time]                                    -
        [DATA,   indices:u64[], hashes:16B[], raw_len]           zstd frame (verified wire data)
        [RAW,    indices:u64[], hashes:16B[]]                    block bytes (resolved references)
        [DATA,   indices, hashes, raw_len, PLACED]               -   (data in the image already:
        [RAW,    indices, hashes, PLACED]                        -    a seeding replica, writer.py)
        [ZERO,   runs:(u64 start, u64 count)[]]                  -
        [COPY,   indices:u64[], hashes:16B[], sources:u64[]]     -
                 (block indices[i] gets the content that block sources[i]
                  received earlier in this epoch: repeats within an epoch)
        [CUT,    {time, since, group, members}]                  -
                 (optional, right before COMMIT: the epoch ends at a cut of
                  an nbd volume, see replica/groups.py; time is its time)
        [COMMIT, epoch, time, block_count, counters, until]      -
                 (until: no write that finished later at the source is in
                  the epoch; absent in logs of older versions: time)

Block data stays out of msgpack (the blob), so appending it costs one write,
not a copy into a packer. The file is overwritten in place from offset 0 by
the next epoch that uses it (no truncate, no re-allocation); every record
carries its epoch and a checksum seeded with it, so leftovers of an older
epoch past the end can never be read as part of a newer one.

A log holds an epoch only if it starts with BEGIN, every record up to a
COMMIT checks out, and all carry that epoch; anything else (a torn tail, a
missing commit) is an epoch that was never acknowledged, and is discarded on
open. Borg's legacy repository log (PUT / COMMIT, drop everything after the
last commit) is the model.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import xxhash

BEGIN, DATA, RAW, ZERO, COMMIT, COPY, CUT = 1, 2, 3, 4, 5, 6, 7
PLACED = True  # last item of a DATA or RAW record whose data went into the image at receipt
_HEAD = struct.Struct(">IIQ16s")
MAX_RECORD = 1 << 30


class WalCorrupt(Exception):
    """The log does not hold a whole committed epoch (internal; never leaves replica/)."""


@dataclass(frozen=True)
class Record:
    offset: int
    body: list[Any]
    blob: bytes


def _digest(epoch: int, meta: bytes, blob: bytes | memoryview) -> bytes:
    h = xxhash.xxh3_128(meta, seed=epoch)
    h.update(blob)
    return h.digest()


class WalWriter:
    """Appends one epoch's records from offset 0 through a buffered file; sync() fsyncs."""

    def __init__(self, path: str | os.PathLike[str], epoch: int) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._fh = os.fdopen(fd, "r+b", buffering=1 << 20)
        self.epoch = epoch
        self.offset = 0

    def append(self, body: list[Any], blob: bytes = b"") -> int:
        """Write one record; returns its offset in the log."""
        meta = msgpack.packb(body, use_bin_type=True)
        off = self.offset
        self._fh.write(_HEAD.pack(len(meta), len(blob), self.epoch,
                                  _digest(self.epoch, meta, blob)))
        self._fh.write(meta)
        if blob:
            self._fh.write(blob)
        self.offset += _HEAD.size + len(meta) + len(blob)
        return off

    def sync(self) -> None:
        self._fh.flush()
        os.fdatasync(self._fh.fileno())

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_record(fd: int, offset: int, epoch: int | None = None) -> tuple[list[Any], bytes, int]:
    """The record at `offset`: (meta, blob, offset of the next record).

    With `epoch` given, a record of any other epoch is an error (a leftover).
    """
    head = os.pread(fd, _HEAD.size, offset)
    if len(head) != _HEAD.size:
        raise WalCorrupt(f"short record header at {offset}")
    mlen, blen, rec_epoch, digest = _HEAD.unpack(head)
    if epoch is not None and rec_epoch != epoch:
        raise WalCorrupt(f"record at {offset} belongs to epoch {rec_epoch}, not {epoch}")
    if mlen > MAX_RECORD or blen > MAX_RECORD:
        raise WalCorrupt(f"record lengths {mlen}+{blen} at {offset} are implausible")
    payload = os.pread(fd, mlen + blen, offset + _HEAD.size)
    mv = memoryview(payload)
    if len(payload) != mlen + blen or _digest(rec_epoch, payload[:mlen], mv[mlen:]) != digest:
        raise WalCorrupt(f"record at {offset} is torn or corrupt")
    try:
        body = msgpack.unpackb(payload[:mlen], raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise WalCorrupt(f"record at {offset} does not decode: {exc}") from None
    if not isinstance(body, list) or not body:
        raise WalCorrupt(f"record at {offset} is not a record")
    return body, payload[mlen:], offset + _HEAD.size + mlen + blen


def read_log(path: str | os.PathLike[str]) -> Iterator[Record]:
    """The records of the epoch in a log, BEGIN to COMMIT; WalCorrupt where it breaks."""
    fd = os.open(path, os.O_RDONLY)
    try:
        body, blob, nxt = read_record(fd, 0)
        if body[0] != BEGIN or len(body) < 2 or type(body[1]) is not int:
            raise WalCorrupt("log does not start with BEGIN")
        epoch = body[1]
        yield Record(0, body, blob)
        off = nxt
        while True:
            body, blob, nxt = read_record(fd, off, epoch)
            yield Record(off, body, blob)
            if body[0] == COMMIT:
                return
            off = nxt
    finally:
        os.close(fd)


def committed_epoch(path: str | os.PathLike[str]) -> int | None:
    """The epoch number if the log holds one whole committed epoch, else None.

    Reads and checks every record but keeps none: memory stays flat whatever
    the epoch's size.
    """
    commit = commit_record(path)
    return None if commit is None else commit[1]


def commit_record(path: str | os.PathLike[str]) -> list[Any] | None:
    """The COMMIT record's body if the log holds one whole committed epoch, else None."""
    first = last = None
    try:
        for rec in read_log(path):
            if first is None:
                first = rec.body
            last = rec.body
    except (WalCorrupt, OSError):
        return None
    if first is None or last is None or last[0] != COMMIT:
        return None
    if len(last) < 3 or first[1] != last[1]:
        return None
    return last


def clear(path: str | os.PathLike[str]) -> None:
    """Make the log hold no epoch (one small write, durable), keeping its space for reuse."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return
    try:
        os.pwrite(fd, bytes(_HEAD.size), 0)
        os.fdatasync(fd)
    finally:
        os.close(fd)
