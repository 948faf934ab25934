"""The recovery-point journal: undo records that let the replica be read at earlier epochs.

Before epoch E overwrites blocks of the image, what those blocks held at
epoch E-1 is saved in ``<volume>/journal/undo.<E, 16 digits>``. Point P (the
image as of epoch P) is the current image with, for each block, the content
from the *oldest* undo file with epoch > P that holds it. Point P is kept
while undo files P+1 .. current all exist; dropping the oldest file drops
the oldest point and never touches the image.

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

Crash safety rests on one ordering: the undo file of E is durable before the
first byte of E reaches the image. So on replay, an existing undo file for
the WAL's epoch was made from the untouched image and is reused; a missing
one means the image is still at E-1 and it is made again. An undo file newer
than the state that belongs to no committed WAL is an orphan (or a rollback
cut short): its content is written back, restoring E-1 exactly, then it goes.

Readers in other processes (pointview.py) pin the point they read: a pin is
a file ``pins/<P>.<pid>.<nonce>`` they hold a shared flock on; retention
never drops an undo file a live pin needs. ``pins.lock`` (flock'd briefly)
orders pin creation against pruning.

Labels (``cdp checkpoint``): ``labels.json`` beside ``journal/`` maps epoch
numbers to labels, ``{"<epoch>": {"label": TEXT, "time": T, "generation": G}}``
(plus ``"moved_from": [EPOCH, CAPTURE_TIME]`` when ``--move`` took it off another
point); rewritten atomically under ``pins.lock``. A label names one point: set_label
refuses a label that names another kept point unless told to move it. (The undo files'
own ``label`` meta field stays unset: undo files are immutable and a label can be removed.) A labelled point
holds retention back like a pin: its undo files and every newer one are
kept until ``cdp points --unlabel``. Keeping point L therefore costs every
undo file after L, i.e. the old content of every block rewritten since L,
once per epoch that rewrote it; see docs/recovery.md.

Generations: promote rolls the image back, drops the journal and starts a new
generation (state.json ``generation``, 1 if absent); replication after failback
then reuses epoch numbers for another history. Undo files (meta ``generation``)
and labels belong to the generation they were made in: points of another one are
not listed and labels of another one name nothing (promote drops them; records
without the field are generation 1). A label whose point is no longer kept holds
nothing back and is dropped at the next prune.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import xxhash

from cdp.blocks import Geometry, keys_in_runs, merge_runs, runs, unpack_u64
from cdp.codec import HASH_LEN, block_hash, compress_many, decompress, zero_hash
from cdp.durable import atomic_write_json, create_private, fsync_dir, make_private_dir, read_json
from cdp.errors import CdpError, LabelTakenError, PointError, ReplicaError

log = logging.getLogger(__name__)

MAGIC = b"CDPUNDO1"
_ENTRY = struct.Struct(">QQI16s")
_TRAILER = struct.Struct(">8sQIQ16s")
NO_HASH = bytes(HASH_LEN)
READ_SPAN = 4 * 1024 * 1024  # old blocks are read in runs of at most this
QUEUE_BYTES = 8 * 1024 * 1024  # old blocks held for compression at most (compress_many)
OFF = "OFF"  # present while the journal is switched off
LABELS = "labels.json"
DATA, RAW, ZERO, COPY = 2, 3, 4, 6  # WAL record kinds (wal.py), repeated to keep this module leaf


class JournalCorrupt(Exception):
    """An undo file does not check out (internal)."""


@dataclass(frozen=True)
class Retention:
    """How many recovery points to keep: by age (seconds) and by journal bytes; None = no bound."""

    max_age: float | None = 24 * 3600.0
    max_bytes: int | None = 10 * 1024**3

    @property
    def enabled(self) -> bool:
        return self.max_age != 0 and self.max_bytes != 0


@dataclass(frozen=True)
class Point:
    """A recovery point: the replica as of `epoch`."""

    epoch: int
    time: float  # the epoch's capture time at the source: what finished before is in
    size: int  # journal bytes that only this point needs (dropping it frees them)
    keep_bytes: int  # journal bytes needed to read this point
    label: str | None = None
    current: bool = False
    until: float = 0.0  # no write that finished after it at the source is in (0: `time`)
    group: str | None = None  # a cut of this consistency group (cdp.replica.groups)
    held: float = 0.0  # a group cut: the volume is known to have held it through this time


def undo_name(epoch: int) -> str:
    return f"undo.{epoch:016d}"


def epoch_of(name: str) -> int | None:
    if not name.startswith("undo.") or len(name) != 21:
        return None
    try:
        return int(name[5:])
    except ValueError:
        return None


def fingerprint(commit: list[Any]) -> str:
    """Identifies one committed WAL epoch: its number, capture time, block count, counters."""
    counters = commit[4] if len(commit) > 4 and isinstance(commit[4], dict) else {}
    text = repr((commit[1], float(commit[2]), commit[3], sorted(counters.items())))
    return xxhash.xxh3_64_hexdigest(text.encode())


# -- one undo file ---------------------------------------------------------------


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


# -- what an epoch changes --------------------------------------------------------


def epoch_changes(bodies: Iterable[list[Any]]) -> tuple[dict[int, bytes], list[tuple[int, int]]]:
    """From an epoch's WAL records: block -> final new hash, and zero runs (start, count).

    A block in a zero run and not in the dict ends up all zeros.
    """
    new: dict[int, bytes] = {}
    zeros: list[tuple[int, int]] = []
    for body in bodies:
        kind = body[0]
        if kind in (DATA, RAW, COPY):
            hashes = body[2]
            for k, i in enumerate(unpack_u64(body[1])):
                new[i] = hashes[k * HASH_LEN:(k + 1) * HASH_LEN]
        elif kind == ZERO:
            merged = merge_runs(unpack_u64(body[1]))  # a peer's runs: O(runs), however they repeat
            zeros.extend(merged)
            if new:
                for i in list(keys_in_runs(sorted(new), merged)):
                    new[i] = NO_HASH
    return new, merge_runs(x for run in zeros for x in run)


def _is_zero(h: bytes, length: int) -> bool:
    return h == NO_HASH or h == zero_hash(length)


# -- the journal of one volume, as the receiver keeps it ---------------------------


class Journal:
    """Undo files of one replica: made before each apply, pruned by retention, rolled back."""

    def __init__(self, vol_dir: Path, geometry: Geometry, retention: Retention) -> None:
        self.vol_dir = vol_dir
        self.dir = vol_dir / "journal"
        self.geo = geometry
        self.retention = retention
        self._mutex = threading.Lock()
        self._infos: dict[int, tuple[float, int]] = {}  # epoch -> (base_time, size)
        self._untrusted: int | None = None  # replayed without an undo file (see recover)

    def path(self, epoch: int) -> Path:
        return self.dir / undo_name(epoch)

    def epochs(self) -> list[int]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return sorted(e for n in names if (e := epoch_of(n)) is not None)

    # -- open / recovery ---------------------------------------------------------

    def recover(self, state_epoch: int, committed: dict[int, str],
                restore: Callable[[UndoFile], None]) -> None:
        """Make the journal agree with the state after a crash (before any WAL replay).

        `committed` maps the epochs of whole committed WALs to their fingerprints.
        """
        if self.dir.is_dir():
            for name in os.listdir(self.dir):
                if name.endswith(".tmp"):
                    os.unlink(self.dir / name)
        for e in sorted((e for e in self.epochs() if e > state_epoch), reverse=True):
            p = self.path(e)
            try:
                u = UndoFile(p)
            except JournalCorrupt as exc:  # cannot be (atomic rename); never trust it
                log.error("dropping unreadable undo file %s: %s", p, exc)
                os.unlink(p)
                continue
            try:
                keep = e == state_epoch + 1 and committed.get(e) == u.meta.get("fingerprint")
                if not keep:
                    log.warning("undo file %s belongs to no committed epoch: writing back what "
                                "it saved", p.name)
                    restore(u)
            finally:
                u.close()
            if not keep:
                os.unlink(p)
                fsync_dir(self.dir)
        self._load(state_epoch)
        off = self.dir / OFF
        if not self.retention.enabled:
            self.drop_all()
            make_private_dir(self.dir)
            off.touch(mode=0o600)  # a later run with the journal on must not trust a half-applied image
            fsync_dir(self.dir)
        elif off.exists():
            # The last run applied without undo files: a crash may have left the image half
            # way into the next epoch, so its replay makes no undo file (no point before it).
            self._untrusted = state_epoch + 1

    def journal_on(self) -> None:
        """Called after recovery: from now on every epoch gets its undo file."""
        self._untrusted = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / OFF)

    def _load(self, state_epoch: int) -> None:
        """Index the chain of undo files that ends at the state; drop what lies beyond a gap."""
        eps = [e for e in self.epochs() if e <= state_epoch]
        chain: list[int] = []
        want = state_epoch
        for e in reversed(eps):
            if e != want:
                break
            chain.append(e)
            want -= 1
        infos: dict[int, tuple[float, int]] = {}
        for e in chain:
            try:
                meta, size = read_meta(self.path(e))
            except (JournalCorrupt, OSError) as exc:
                log.error("undo file %s is unreadable (%s): older points are dropped",
                          self.path(e).name, exc)
                break
            infos[e] = (keep_time(meta), size)
        stale = [e for e in eps if e not in infos]
        if stale:
            log.warning("dropping %d undo file(s) cut off from the current epoch", len(stale))
            for e in stale:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path(e))
        with self._mutex:
            self._infos = infos

    # -- before and after an apply ------------------------------------------------

    def prepare(self, epoch: int, commit: list[Any], bodies: Callable[[], Iterable[list[Any]]],
                image_fd: int, hash_fd: int, base: dict[str, Any],
                restore: Callable[[UndoFile], None], cut: dict[str, Any] | None = None) -> bool:
        """Save what `epoch` will overwrite, durably, unless a matching undo file already exists.
        True when an undo file of `epoch` is durable (False: the journal is off for it).

        Called with the image at epoch-1 (or, on replay, possibly partly at
        epoch, in which case the undo file exists and is reused). `cut`: the
        epoch's Cut marker (groups.py); base["held"]: how long epoch-1 is known to
        have held (groups.py, held.json).
        """
        if not self.saves(epoch):
            return False
        fp = fingerprint(commit)
        p = self.path(epoch)
        if p.exists():
            try:
                u = UndoFile(p)
            except JournalCorrupt:
                u = None
            if u is not None:
                try:
                    if u.meta.get("fingerprint") == fp:
                        # made before a crash or failure: the image may be half new, keep it
                        with self._mutex:
                            self._infos[epoch] = (keep_time(u.meta), u.size)
                        return True
                    restore(u)  # an orphan of another epoch E: back to E-1 first
                finally:
                    u.close()
            os.unlink(p)
        make_private_dir(self.dir)
        meta = {"epoch": epoch, "time": float(commit[2]), "label": None,
                "fingerprint": fp, "created": time.time(), "generation": base.get("generation", 1),
                "base_epoch": base["epoch"], "base_time": base["epoch_time"],
                "base_until": max(base["epoch_time"], base.get("epoch_until", 0.0)),
                "base_label": base.get("label"), "size": self.geo.size,
                "block_size": self.geo.block_size, "cut": cut, "base_cut": base.get("cut"),
                "base_held": float(base.get("held", 0.0))}
        new, zeros = epoch_changes(bodies())
        while True:
            try:
                size = self._write(epoch, new, zeros, image_fd, hash_fd, meta)
                break
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not self._drop_oldest():
                    raise
        with self._mutex:
            self._infos[epoch] = (keep_time(meta), size)
        return True

    def saves(self, epoch: int) -> bool:
        """Whether applying `epoch` makes (or reuses) an undo file first."""
        return self.retention.enabled and epoch != self._untrusted

    def _write(self, epoch: int, new: dict[int, bytes], zeros: list[tuple[int, int]],
               image_fd: int, hash_fd: int, meta: dict[str, Any]) -> int:
        geo = self.geo
        w = UndoWriter(self.dir, epoch)
        try:
            zero_only = set()
            step = READ_SPAN // HASH_LEN
            for run_start, run_count in zeros:  # the hash map in bounded slices
                for start in range(run_start, run_start + run_count, step):
                    count = min(step, run_start + run_count - start)
                    old = os.pread(hash_fd, count * HASH_LEN, start * HASH_LEN)
                    if not old.strip(b"\0"):
                        continue  # zero already: zeroing changes nothing
                    old += bytes(count * HASH_LEN - len(old))
                    for k in range(count):
                        i = start + k
                        if i not in new and not _is_zero(old[k * HASH_LEN:(k + 1) * HASH_LEN],
                                                         geo.length(i)):
                            zero_only.add(i)
            blocks = sorted(set(new) | zero_only)
            for start, count in runs(blocks):
                while count > 0:
                    n = max(1, min(count, READ_SPAN // geo.block_size))
                    self._save_run(w, start, n, new, image_fd, hash_fd)
                    start += n
                    count -= n
            meta["count"] = w.count
            return w.finish(meta)
        except BaseException:
            w.abort()
            raise

    def _save_run(self, w: UndoWriter, start: int, count: int, new: dict[int, bytes],
                  image_fd: int, hash_fd: int) -> None:
        geo = self.geo
        old_hashes = os.pread(hash_fd, count * HASH_LEN, start * HASH_LEN)
        old_hashes += bytes(count * HASH_LEN - len(old_hashes))
        need: list[int] = []
        for k in range(count):
            i = start + k
            oh = old_hashes[k * HASH_LEN:(k + 1) * HASH_LEN]
            nh = new.get(i, NO_HASH)
            old_zero = _is_zero(oh, geo.length(i))
            if old_zero and _is_zero(nh, geo.length(i)):
                continue
            if not old_zero and oh == nh:
                continue  # rewritten with the same content
            if old_zero:
                w.add(i, None, NO_HASH)
            else:
                need.append(i)
        if not need:
            return
        first, last = need[0], need[-1]
        off = geo.offset(first)
        end = geo.offset(last) + geo.length(last)
        data = os.pread(image_fd, end - off, off)
        data += bytes(end - off - len(data))
        mv = memoryview(data)
        for i in need:
            a = geo.offset(i) - off
            blk = mv[a:a + geo.length(i)]
            w.add(i, blk, block_hash(blk))

    def applied(self, epoch: int) -> None:
        """The state reached `epoch`: drop points the retention no longer keeps."""
        try:
            self.prune()
        except OSError as exc:
            log.warning("journal: pruning failed (%s); it is retried after the next epoch", exc)

    # -- retention ---------------------------------------------------------------

    def prune(self, now: float | None = None) -> list[int]:
        """Drop the oldest undo files the retention does not keep (never one a pin needs)."""
        r = self.retention
        now = time.time() if now is None else now
        with self._mutex:
            infos = sorted(self._infos.items())
        total = sum(size for _, (_, size) in infos)
        drop: list[int] = []
        for e, (base_time, size) in infos:
            too_old = r.max_age is not None and base_time < now - r.max_age
            too_big = r.max_bytes is not None and total > r.max_bytes
            if not (too_old or too_big):
                break
            drop.append(e)
            total -= size
        if not drop:
            return []
        return self._unlink(drop)

    def _drop_oldest(self) -> bool:
        with self._mutex:
            oldest = min(self._infos, default=None)
        return oldest is not None and bool(self._unlink([oldest], "disk full, to make room"))

    def _unlink(self, drop: list[int], why: str = "retention") -> list[int]:
        with pins_locked(self.vol_dir):
            floor = min_pin(self.vol_dir)
            with self._mutex:
                oldest = min(self._infos, default=None)
            labelled = label_floor(self.vol_dir, None if oldest is None else oldest - 1)
            if labelled is not None and (floor is None or labelled < floor):
                floor = labelled  # a labelled point keeps its undo files, like a reader's pin
            done = []
            for e in drop:
                if floor is not None and e > floor:
                    break  # a reader of point `floor` needs this one and all newer
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path(e))
                done.append(e)
        with self._mutex:
            times = {e - 1: self._infos.pop(e, (0.0, 0))[0] for e in done}
        _log_dropped(self.vol_dir.name, times, why)
        return done

    def drop_all(self) -> None:
        """Journaling is off (or a promote): no undo file may outlive an apply that makes none."""
        for e in self.epochs():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(e))
        with self._mutex:
            self._infos.clear()


def _log_dropped(volume: str, times: dict[int, float], why: str) -> None:
    """Say which points went. Point 0, the empty replica before the first epoch, is not
    one: nothing was replicated into it, nothing can be restored from it (a first seed
    drops it at once, its time being 0), so it goes without a word."""
    points = sorted(p for p in times if p > 0)
    if not points:
        if times:
            log.debug("journal: volume=%s dropped point 0 (the empty replica before the first "
                      "epoch)", volume)
        return

    def at(p: int) -> str:
        t = times[p]
        return f"epoch {p} ({time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t)) if t else '?'})"

    span = at(points[0]) if len(points) == 1 else f"{at(points[0])} to {at(points[-1])}"
    level = logging.WARNING if why != "retention" else logging.INFO
    log.log(level, "journal: volume=%s dropped %d oldest recovery point(s) (%s): %s", volume,
            len(points), why, span)


# -- pins: readers keep the undo files they need ------------------------------------


@contextlib.contextmanager
def pins_locked(vol_dir: Path) -> Iterator[None]:
    """Briefly serialize pin creation against pruning (an flock on pins.lock)."""
    fd = os.open(vol_dir / "pins.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def live_pins(vol_dir: Path) -> list[int]:
    """Points pinned by live readers; pins of dead processes are removed (call under the lock)."""
    d = vol_dir / "pins"
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        p = d / name
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                with contextlib.suppress(ValueError):
                    out.append(int(name.split(".")[0]))
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)  # its reader is gone
        finally:
            os.close(fd)
    return out


def min_pin(vol_dir: Path) -> int | None:
    return min(live_pins(vol_dir), default=None)


# -- labels: named points that outlive retention ------------------------------------------


def generation(vol_dir: Path) -> int:
    """The replica's generation (state.json; 1 before promote ever ran, or if unreadable)."""
    try:
        return int(read_json(vol_dir / "state.json").get("generation", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return 1


def _label_records(vol_dir: Path, strict: bool = False) -> dict[int, dict[str, Any]]:
    """Every record of labels.json, any generation; unreadable: {} (logged) or, if strict,
    ReplicaError (a rewrite must not lose the labels it cannot read)."""
    try:
        raw = read_json(vol_dir / LABELS)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        if strict:
            raise ReplicaError(f"{vol_dir / LABELS} is unreadable ({exc}): fix or remove it, "
                               "then label again") from None
        log.error("%s is unreadable (%s): labels are ignored until it is fixed",
                  vol_dir / LABELS, exc)
        return {}
    out: dict[int, dict[str, Any]] = {}
    if isinstance(raw, dict):
        for k, v in raw.items():
            with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
                out[int(k)] = {**v, "label": str(v["label"]),
                               "generation": int(v.get("generation", 1))}
    return out


def read_labels(vol_dir: Path) -> dict[int, str]:
    """epoch -> label of the replica's points ({} if none; an unreadable file counts as none).

    Only labels of the current generation count: an epoch number of an earlier one (before
    a promote) names another history, whatever number the replica has reached since.
    """
    gen = generation(vol_dir)
    return {e: r["label"] for e, r in _label_records(vol_dir).items() if r["generation"] == gen}


def _write_labels(vol_dir: Path, labels: dict[int, dict[str, Any]]) -> None:
    atomic_write_json(vol_dir / LABELS, {str(e): v for e, v in sorted(labels.items())})


def _current_records(vol_dir: Path) -> dict[int, dict[str, Any]]:
    gen = generation(vol_dir)
    return {e: r for e, r in _label_records(vol_dir, strict=True).items()
            if r["generation"] == gen}


def set_label(vol_dir: Path, epoch: int, label: str, now: float | None = None, *,
              move: bool = False) -> tuple[int, float] | None:
    """Label point `epoch` durably. A label names one point: if it names another point that
    is still kept, LabelTakenError unless `move` (then it moves). Returns (point, capture
    time) it moved from, None if it moved from nowhere. Checked and written under
    pins.lock, so of two racing checkpoints with one label only one takes it."""
    with pins_locked(vol_dir):
        recs = _current_records(vol_dir)
        mine = recs.get(epoch)
        if mine is not None and mine["label"] == label:  # again (a resend after a reconnect)
            frm = mine.get("moved_from")
            return (int(frm[0]), float(frm[1])) if isinstance(frm, list) and len(frm) == 2 else None
        other = next((e for e, r in recs.items() if r["label"] == label), None)
        moved: tuple[int, float] | None = None
        if other is not None:
            when = {p.epoch: p.time for p in list_points(vol_dir)}.get(other)
            if when is None:  # its point is gone: the label names nothing (prune drops it)
                log.info("label %r named point %d of %s, no longer kept: it names point %d now",
                         label, other, vol_dir.name, epoch)
            elif not move:
                raise LabelTakenError(vol_dir.name, label, other, when)
            else:
                moved = (other, when)
            del recs[other]
        recs[epoch] = {"label": label, "time": time.time() if now is None else now,
                       "generation": generation(vol_dir)}
        if moved is not None:
            recs[epoch]["moved_from"] = list(moved)
        _write_labels(vol_dir, recs)  # labels of earlier generations go
    return moved


def remove_label(vol_dir: Path, epoch: int) -> str | None:
    """Unlabel point `epoch`; returns the label it had (None: it had none)."""
    with pins_locked(vol_dir):
        recs = _current_records(vol_dir)
        gone = recs.pop(epoch, None)
        if gone is not None:
            _write_labels(vol_dir, recs)
    return None if gone is None else str(gone["label"])


def drop_labels(vol_dir: Path) -> dict[int, str]:
    """Remove every label (promote: no point of the old history survives); returns them."""
    with pins_locked(vol_dir):
        recs = _label_records(vol_dir)
        if recs or (vol_dir / LABELS).exists():
            _write_labels(vol_dir, {})
    return {e: r["label"] for e, r in recs.items()}


def label_floor(vol_dir: Path, oldest: int | None) -> int | None:
    """The oldest labelled point retention must keep (call under pins_locked).

    `oldest` is the oldest point still kept (None: only the current one). Labels of
    points already gone (journaling was switched off, a damaged undo file) hold nothing
    back: they are dropped here, with a warning.
    """
    gen = generation(vol_dir)
    recs = _label_records(vol_dir)
    mine = {e: r for e, r in recs.items() if r["generation"] == gen}
    gone = [e for e in mine if oldest is not None and e < oldest]
    if gone:
        log.warning("labels %s name points that are no longer kept: dropped",
                    ", ".join(f"{mine[e]['label']!r} (epoch {e})" for e in gone))
        with contextlib.suppress(OSError):
            _write_labels(vol_dir, {e: r for e, r in mine.items() if e not in gone})
    return min((e for e in mine if e not in gone), default=None)


def resolve_point(vol_dir: Path, text: str) -> int:
    """--point: an epoch number, or the label of a point; PointError if no point has it."""
    if text.isdigit():
        return int(text)
    for epoch, label in read_labels(vol_dir).items():
        if label == text:
            return epoch
    gen = generation(vol_dir)
    for epoch, rec in _label_records(vol_dir).items():
        if rec["label"] == text and rec["generation"] != gen:
            raise PointError(f"label {text!r} named point {epoch} of {vol_dir.name} before it "
                             "was promoted: that point is gone (`cdp points` lists the points "
                             "and labels kept now)")
    for path in sorted(vol_dir.glob("promoted*.json")):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            dropped = read_json(path).get("labels_dropped") or {}
            for epoch, label in dropped.items():
                if label == text:
                    raise PointError(
                        f"label {text!r} named point {epoch} of {vol_dir.name}, dropped when "
                        f"the volume was promoted ({path.name}): the replica no longer holds "
                        "that point (`cdp points` lists the points and labels kept now)")
    raise PointError(f"no point of {vol_dir.name} is labelled {text!r} (`cdp points` lists "
                     "the labels)")


# -- listing points (any process) -----------------------------------------------------


def list_points(vol_dir: Path) -> list[Point]:
    """The recovery points kept for a replica folder, oldest first; the last is the current."""
    try:
        st = read_json(vol_dir / "state.json")
    except (OSError, ValueError) as exc:
        raise ReplicaError(f"{vol_dir}: no readable replica state ({exc})") from None
    n = int(st["epoch"])
    gen = int(st.get("generation", 1))
    j = Journal(vol_dir, Geometry(st["size"], st["block_size"]), Retention())
    eps = set(j.epochs())
    chain: list[tuple[int, dict[str, Any], int]] = []
    e = n
    while e in eps:
        try:
            meta, size = read_meta(j.path(e))
        except (JournalCorrupt, FileNotFoundError):
            break  # dropped meanwhile, or damaged: older points are not readable
        if int(meta.get("generation", 1)) != gen:
            break  # made before a promote: another history under the same epoch numbers
        chain.append((e, meta, size))
        e -= 1
    labels = read_labels(vol_dir)
    t = float(st.get("epoch_time", 0.0))
    group = _group_of(st.get("cut"))
    points = [Point(n, t, 0, 0, labels.get(n), True, max(t, float(st.get("epoch_until", 0.0))),
                    group, max(t, read_held(vol_dir, n)) if group else 0.0)]
    keep = 0
    for e, meta, size in chain:
        keep += size
        t = float(meta.get("base_time", 0.0))
        group = _group_of(meta.get("base_cut"))
        points.append(Point(e - 1, t, size, keep, labels.get(e - 1), False,
                            max(t, float(meta.get("base_until", 0.0))), group,
                            keep_time(meta) if group else 0.0))
    points.reverse()
    return points


# -- cuts of consistency groups (groups.py): how long a point is known to have held -----------

HELD = "held.json"


def _group_of(cut: Any) -> str | None:
    return (cut.get("group") or None) if isinstance(cut, dict) else None


def keep_time(meta: dict[str, Any]) -> float:
    """Until when point E-1 of undo file E's meta is needed, for retention by age: its capture
    time, or for a group cut the last instant it is known to have held (so a group's cuts
    age out together, whichever member captured its state earlier)."""
    t = float(meta.get("base_time", 0.0))
    if _group_of(meta.get("base_cut")) is None:
        return t
    cut = meta.get("cut")
    since = float(cut.get("since", 0.0)) if isinstance(cut, dict) else 0.0
    return max(t, since, float(meta.get("base_held", 0.0)))


def read_held(vol_dir: Path, epoch: int) -> float:
    """When the source last said the replica still equalled `epoch` (0: never, or not that epoch)."""
    try:
        raw = read_json(vol_dir / HELD)
        return float(raw["time"]) if int(raw["epoch"]) == epoch else 0.0
    except (OSError, ValueError, TypeError, KeyError):
        return 0.0


def note_held(vol_dir: Path, epoch: int, when: float) -> None:
    """Record that the source held epoch `epoch` through `when` (message Current). Not fsync'd:
    losing it only makes the group's newest common cut older until the next note."""
    if read_held(vol_dir, epoch) < when:
        try:
            atomic_write_json(vol_dir / HELD, {"epoch": epoch, "time": when}, sync=False)
        except OSError as exc:
            log.warning("%s: cannot record that epoch %d held (%s)", vol_dir / HELD, epoch, exc)


def find_point(points: list[Point], at: float) -> Point | None:
    """The newest point captured at or before `at`: none of its writes finished after `at`.

    A point read over a period (a scan without snapshot or quiesce hook) qualifies once its
    reads ended (`until`), not at its start. Point 0 is the empty replica before the first
    epoch: nothing was captured, so it is never the answer (`--at` before the first epoch
    finds no point).
    """
    best = None
    for p in points:
        if p.epoch > 0 and max(p.time, p.until) <= at:
            best = p
    return best


def empty_point_message(volume: str, points: list[Point]) -> str:
    """Why point 0 cannot be drilled or promoted: it is the replica before the first epoch,
    nothing was replicated into it."""
    first = next((p for p in points if p.epoch > 0), None)
    then = ("nothing is replicated yet: wait for the first seed to finish (`cdp status`)"
            if first is None else f"the first restorable point is {first.epoch}, captured "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(first.time))}")
    return (f"point 0 of {volume} is the empty replica before the first epoch: nothing was "
            f"replicated into it; {then}")
