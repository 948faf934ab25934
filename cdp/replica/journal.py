"""The recovery-point journal: undo records that let the replica be read at earlier epochs.

Before epoch E overwrites blocks of the image, what those blocks held at
epoch E-1 is saved in ``<volume>/journal/undo.<E, 16 digits>``. Point P (the
image as of epoch P) is the current image with, for each block, the content
from the *oldest* undo file with epoch > P that holds it. Point P is kept
while undo files P+1 .. current all exist; dropping the oldest file drops
the oldest point and never touches the image.

The format of one undo file is in undo.py; which points a replica folder
holds, their labels and the pins of their readers in points.py.

Crash safety rests on one ordering: the undo file of E is durable before the
first byte of E reaches the image. So on replay, an existing undo file for
the WAL's epoch was made from the untouched image and is reused; a missing
one means the image is still at E-1 and it is made again. An undo file newer
than the state that belongs to no committed WAL is an orphan (or a rollback
cut short): its content is written back, restoring E-1 exactly, then it goes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from cdp.blocks import Geometry, keys_in_runs, merge_runs, runs, unpack_u64
from cdp.codec import HASH_LEN, zero_hash
from cdp.durable import fsync_dir, make_private_dir
from cdp.replica.points import keep_time, label_floor, min_pin, pins_locked
from cdp.replica.undo import NO_HASH, JournalCorrupt, UndoFile, UndoWriter, read_meta, undo_epochs, undo_name

log = logging.getLogger(__name__)

READ_SPAN = 4 * 1024 * 1024  # old blocks are read in runs of at most this
OFF = "OFF"  # present while the journal is switched off
DATA, RAW, ZERO, COPY = 2, 3, 4, 6  # WAL record kinds (wal.py), repeated to keep this module leaf


@dataclass(frozen=True)
class Retention:
    """How many recovery points to keep: by age (seconds) and by journal bytes; None = no bound."""

    max_age: float | None = 24 * 3600.0
    max_bytes: int | None = 10 * 1024**3

    @property
    def enabled(self) -> bool:
        return self.max_age != 0 and self.max_bytes != 0


def fingerprint(commit: list[Any]) -> str:
    """Identifies one committed WAL epoch: its number, capture time, block count, counters."""
    counters = commit[4] if len(commit) > 4 and isinstance(commit[4], dict) else {}
    text = repr((commit[1], float(commit[2]), commit[3], sorted(counters.items())))
    return xxhash.xxh3_64_hexdigest(text.encode())


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
        return undo_epochs(self.dir)

    def kept(self) -> tuple[int, int | None, float, int]:
        """(undo files kept, epoch of the oldest, its base time, their bytes) from the in-memory
        index: cheap enough for every status snapshot (no directory listing)."""
        with self._mutex:
            infos = dict(self._infos)
        if not infos:
            return 0, None, 0.0, 0
        oldest = min(infos)
        return len(infos), oldest, infos[oldest][0], sum(size for _, size in infos.values())

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
        need: list[tuple[int, bytes]] = []  # (block, its hash in the map: no need to rehash it)
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
                need.append((i, oh))
        if not need:
            return
        first, last = need[0][0], need[-1][0]
        off = geo.offset(first)
        end = geo.offset(last) + geo.length(last)
        data = os.pread(image_fd, end - off, off)
        data += bytes(end - off - len(data))
        mv = memoryview(data)
        for i, oh in need:
            a = geo.offset(i) - off
            w.add(i, mv[a:a + geo.length(i)], oh)

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
