"""Rehash a replica image and compare every block with the replica's block-hash map.

Reads ``<data_dir>/<volume>/`` (layout in store.py) and nothing else::

    state.json  size, block_size, epoch: the geometry of image and hash map
    image       rehashed in large spans (SPAN bytes, one reused buffer); holes
                (SEEK_HOLE) are zeros: only their hash entries are looked at
    hashes      16 bytes per block; 16 zero bytes = never written = all zeros

Read-only and lock-free, so it runs beside a live receiver, which holds the
replica's flock: the files are opened O_RDONLY, nothing is created or
written in the folder, the lock file is never touched.

Live safety. The receiver writes a block's image bytes, then its hash entry,
microseconds apart (state.json advances after both are fsync'd), so one read
can catch a block between the two. A mismatch is therefore only a suspect:
suspects are re-read together (image bytes and hash entry) every
SETTLE / CONFIRM seconds. A suspect that matches on any re-read is equal (it
was caught mid-write). One whose (image hash, hash entry) pair stays the same
and mismatched over CONFIRM re-reads in a row, about SETTLE seconds, is a
real difference: nothing was writing it. One still neither after
MAX_ROUNDS re-reads (~10 s) kept changing: it is being written (the receiver
hashes what it writes), not corrupt, so it is listed under `changing`, not
`differing`, and does not fail the check.
Each block is checked against its own hash entry; blocks are not read at one
instant, so the check says image and hash map agree, not that the image is
the copy of one particular epoch.

An offline replica whose committed epoch was not applied yet (a crash mid-apply;
the next open replays it) can hold stable differences that the replay fixes:
the result's note says so.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cdp.replica.wal as wal
from cdp.blocks import Geometry, block_spans, data_extents, runs
from cdp.codec import HASH_LEN, block_hash, zero_hash
from cdp.durable import read_json
from cdp.errors import ReplicaError
from cdp.replica.state import NO_HASH
from cdp.replica.store import PROMOTED

SPAN = 8 * 1024 * 1024  # bytes read per call; at least one block
SETTLE = 1.0  # seconds a mismatch must hold still to count
CONFIRM = 4  # identical re-reads in a row (SETTLE / CONFIRM apart) that confirm a difference
MAX_ROUNDS = 40  # re-reads before a still-changing block is called "being written"

Progress = Callable[[int, int], None]  # (bytes done, bytes in total)
Sample = tuple[bytes, bytes]  # (hash of the image bytes, hash-map entry) of one block


@dataclass(frozen=True)
class CheckResult:
    """What one replica's check found; `differing` fails it, `changing` does not."""

    volume: str
    path: Path
    epoch: int  # state.json's epoch when the check began
    epoch_end: int  # ... and when it ended (a live receiver applies epochs meanwhile)
    size: int
    block_size: int
    blocks: int
    differing: tuple[int, ...] = ()  # stable mismatches: real differences
    changing: tuple[int, ...] = ()  # kept changing while re-read: being written, not compared
    skipped: str = ""  # why the replica was not checked (promoted)
    error: str = ""  # why the check could not be done (unreadable files, bad geometry)
    note: str = ""
    seconds: float = 0.0

    @property
    def equal(self) -> bool | None:
        """True if image and hash map agree; None if not checked."""
        if self.skipped:
            return None
        return not self.error and not self.differing

    @property
    def failed(self) -> bool:
        return bool(self.error or self.differing)

    def to_json(self) -> dict[str, Any]:
        return {"volume": self.volume, "path": str(self.path), "epoch": self.epoch,
                "epoch_end": self.epoch_end, "size": self.size, "block_size": self.block_size,
                "blocks": self.blocks, "equal": self.equal, "differing": list(self.differing),
                "changing": list(self.changing), "skipped": self.skipped, "error": self.error,
                "note": self.note, "seconds": round(self.seconds, 3)}


def replica_dirs(data_dir: Path) -> list[Path]:
    """Volume folders under data_dir that hold a replica (state.json), by name.

    Names start with a letter or digit (config.valid_name), which leaves out
    `.drills`, `_files` and the `.<volume>.new` folder of a replica being created.
    """
    try:
        entries = sorted(data_dir.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ReplicaError(f"cannot list {data_dir}: {exc.strerror}") from None
    return [p for p in entries if p.name[:1].isalnum() and (p / "state.json").is_file()]


def check_replica(path: Path, progress: Progress | None = None, *,
                  sleep: Callable[[float], None] = time.sleep) -> CheckResult:
    """Rehash the replica in `path` (a `<data_dir>/<volume>` folder) against its hash map.

    Raises ReplicaError only if `path` holds no replica; everything else that
    stops the check (unreadable files, a wrong-sized image) is the result's
    error. `sleep` paces the re-reads of suspects (see the module docstring).
    """
    t0 = time.monotonic()
    volume = path.name
    if not (path / "state.json").is_file():
        raise ReplicaError(f"no replica in {path} (no state.json)")
    try:
        state = _state(path)
    except ReplicaError as exc:
        return CheckResult(volume, path, 0, 0, 0, 0, 0, error=str(exc))
    geo = Geometry(state["size"], state["block_size"])
    found = CheckResult(volume, path, state["epoch"], state["epoch"], geo.size, geo.block_size,
                        geo.blocks)
    if (path / PROMOTED).exists():
        return replace(found, skipped=f"promoted (see {path / PROMOTED}): the image is a live "
                       "disk now and its hash map no longer describes it")
    try:
        with _Files(path, geo) as files:
            suspects = files.scan(progress)
            differing, changing = files.settle(suspects, sleep)
    except ReplicaError as exc:
        return replace(found, error=str(exc), seconds=time.monotonic() - t0)
    try:
        epoch_end = _state(path)["epoch"]
    except ReplicaError:  # damaged since we began: report the epoch we began with
        epoch_end = state["epoch"]
    return replace(found, epoch_end=epoch_end, differing=tuple(differing),
                   changing=tuple(changing), note=_pending(path, epoch_end) if differing else "",
                   seconds=time.monotonic() - t0)


def _state(path: Path) -> dict[str, int]:
    """Geometry and epoch from state.json, checked (a torn or edited file is an error)."""
    file = path / "state.json"
    try:
        raw = read_json(file)
        out = {k: raw[k] for k in ("size", "block_size", "epoch")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReplicaError(f"{file} is unreadable ({exc}); the replica needs repair") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in out.values()):
        raise ReplicaError(f"{file}: size, block_size and epoch must be whole numbers >= 0")
    bs = out["block_size"]
    if bs <= 0 or bs & (bs - 1):
        raise ReplicaError(f"{file}: block_size {bs} is not a power of two")
    return out


def _pending(path: Path, epoch: int) -> str:
    """A note if a WAL holds a committed epoch newer than the state (applied on next open)."""
    for p in (path / "wal.0", path / "wal.1"):
        commit = wal.commit_record(p)
        if commit is not None and commit[1] > epoch:
            return (f"epoch {commit[1]} is committed in {p.name} but not applied yet (the next "
                    "open of the replica, e.g. by the receiver, replays it); the differing "
                    "blocks may be that epoch half-applied")
    return ""


class _Files:
    """The image and hash map opened read-only, and one reused read buffer."""

    def __init__(self, path: Path, geo: Geometry) -> None:
        self.geo = geo
        self.path = path
        self.fds: list[int] = []
        try:
            self.image = self._open("image")
            self.hashes = self._open("hashes")
            size = os.fstat(self.image).st_size
        except OSError as exc:
            self.close()
            raise ReplicaError(f"cannot read {path}: {exc.strerror or exc}") from None
        if size != geo.size:
            self.close()
            raise ReplicaError(f"{path / 'image'} is {size} bytes but state.json says {geo.size}; "
                               "the image was truncated or replaced")
        self.per_span = max(1, SPAN // geo.block_size)
        self.buf = bytearray(self.per_span * geo.block_size)

    def _open(self, name: str) -> int:
        fd = os.open(self.path / name, os.O_RDONLY | os.O_CLOEXEC)
        self.fds.append(fd)
        return fd

    def __enter__(self) -> _Files:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def scan(self, progress: Progress | None) -> dict[int, Sample]:
        """One pass over the whole volume; the blocks that mismatched, with what was read."""
        geo = self.geo
        suspects: dict[int, Sample] = {}
        try:
            os.posix_fadvise(self.image, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (OSError, AttributeError):
            pass
        try:
            spans = block_spans(data_extents(self.image, geo.size), geo)
        except OSError as exc:
            raise ReplicaError(f"cannot map {self.path / 'image'}: {exc.strerror}") from None
        done = 0
        for first, count, data in _with_holes(spans, geo.blocks):
            for start in range(first, first + count, self.per_span):
                n = min(self.per_span, first + count - start)
                if data:
                    suspects.update(self._compare(start, n))
                else:
                    suspects.update(self._compare_hole(start, n))
                done = min(geo.size, (start + n) * geo.block_size)
                if progress is not None:
                    progress(done, geo.size)
        return suspects

    def settle(self, suspects: dict[int, Sample],
               sleep: Callable[[float], None]) -> tuple[list[int], list[int]]:
        """Re-read suspects until each matches, holds still (differing) or runs out of rounds."""
        last = dict(suspects)
        streak = dict.fromkeys(suspects, 0)
        differing: list[int] = []
        for _ in range(MAX_ROUNDS):
            if not last:
                break
            sleep(SETTLE / CONFIRM)
            for i, sample in self.sample(sorted(last)):
                if _agrees(sample, self.geo.length(i)):
                    del last[i], streak[i]
                elif sample == last[i]:
                    streak[i] += 1
                    if streak[i] >= CONFIRM:
                        differing.append(i)
                        del last[i], streak[i]
                else:
                    last[i], streak[i] = sample, 0
        return sorted(differing), sorted(last)

    def sample(self, blocks: list[int]) -> Iterator[tuple[int, Sample]]:
        """(block, sample) for sorted `blocks`, reading runs of them in spans."""
        for first, count in runs(blocks):
            for start in range(first, first + count, self.per_span):
                n = min(self.per_span, first + count - start)
                yield from self._read(start, n)

    def _compare(self, start: int, n: int) -> Iterator[tuple[int, Sample]]:
        return ((i, s) for i, s in self._read(start, n) if not _agrees(s, self.geo.length(i)))

    def _compare_hole(self, start: int, n: int) -> Iterator[tuple[int, Sample]]:
        """Blocks in a hole of the image read as zeros: only their hash entries need a look."""
        entries = self._entries(start, n)
        if entries.count(0) == len(entries):  # never written, all of them: agree
            return iter(())
        geo = self.geo
        bad = [(start + k, (zero_hash(geo.length(start + k)), entries[k * HASH_LEN:(k + 1) * HASH_LEN]))
               for k in range(n)]
        return ((i, s) for i, s in bad if not _agrees(s, geo.length(i)))

    def _read(self, start: int, n: int) -> list[tuple[int, Sample]]:
        """Samples of blocks [start, start+n): image span first, then its hash entries."""
        geo = self.geo
        offset = geo.offset(start)
        length = min(geo.size, geo.offset(start + n)) - offset
        view = memoryview(self.buf)[:length]
        got = 0
        try:
            while got < length:
                r = os.preadv(self.image, [view[got:]], offset + got)
                if r == 0:
                    break  # shrank under us: what is missing hashes differently
                got += r
        except OSError as exc:
            raise ReplicaError(f"cannot read {self.path / 'image'} at {offset + got}: "
                               f"{exc.strerror}") from None
        entries = self._entries(start, n)
        out = []
        for k in range(n):
            pos = k * geo.block_size
            end = min(pos + geo.length(start + k), got)
            digest = block_hash(view[pos:max(pos, end)])
            out.append((start + k, (digest, entries[k * HASH_LEN:(k + 1) * HASH_LEN])))
        view.release()
        return out

    def _entries(self, start: int, n: int) -> bytes:
        """Hash-map entries of blocks [start, start+n); missing ones read as never written."""
        try:
            raw = os.pread(self.hashes, n * HASH_LEN, start * HASH_LEN)
        except OSError as exc:
            raise ReplicaError(f"cannot read {self.path / 'hashes'}: {exc.strerror}") from None
        return raw + bytes(n * HASH_LEN - len(raw))


def _agrees(sample: Sample, length: int) -> bool:
    digest, entry = sample
    return digest == (zero_hash(length) if entry == NO_HASH else entry)


def _with_holes(spans: Iterable[tuple[int, int]], blocks: int) -> Iterator[tuple[int, int, bool]]:
    """(first, count, has_data) covering all blocks: the data spans and the holes between."""
    pos = 0
    for first, count in spans:
        if first > pos:
            yield pos, first - pos, False
        yield first, count, True
        pos = first + count
    if pos < blocks:
        yield pos, blocks - pos, False
