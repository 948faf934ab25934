"""One volume's replica: the image, its block-hash map, the epoch WAL and the state file.

Layout of ``<data_dir>/<volume>/``::

    image       the replica, a sparse raw file: what a DR machine boots
    hashes      16 bytes per block: xxh3-128 of the block as applied
                (16 zero bytes = never written, i.e. an all-zero block)
    wal.0 wal.1 the WAL of even / odd epochs (see wal.py): one epoch can be
                applied while the next one is received
    state.json  geometry, replica id, last applied epoch and its source time,
                cumulative counters, generation (a new one at each promote: recovery
                points and labels belong to one); replaced atomically after each epoch
    lock        flock'd while a process has the replica open: nobody else writes it
    journal/    undo files, one per epoch: the recovery points (see journal.py, undo.py)
    pins/ pins.lock   readers of earlier points (pointview.py) keep their undo files
    promoted.json     present once `cdp failover promote` took the volume over:
                the receiver accepts no more epochs for it
    held.json   consistency groups: through when the source said the newest epoch
                still held (groups.py); state.json "cut" and "group" keep the
                newest epoch's Cut marker and the group it named

Applying an epoch: every record goes to the WAL as it arrives; at commit the
space the epoch needs is reserved (seal: a full disk fails before the image is
touched). Before the first block reaches the image, the journal saves what the
epoch overwrites (an undo file, durable before any image write); then the
records are applied to the image and the hash map, and image, hash map and WAL
are fdatasync'd in one burst; only then the state file advances (apply), and
the epoch is acknowledged. The WAL needs no fsync of its own at seal: until
the image is synced, a crash that loses the WAL finds the undo file of an
epoch with no committed WAL and writes it back (the image returns to the epoch
before). Without an undo file (journal off) the WAL is fsync'd at seal, as the
only way forward. state.json is replaced atomically (its content fsync'd) but
its folder is fsync'd only before the next epoch that reuses the WAL file of
this one begins (or at close): until then a crash may bring back the state
before, and the WAL, still durable and whole, replays the epoch. Epochs apply
strictly in order. On open, WALs holding whole committed epochs next in line
after the state are replayed (idempotent; an undo file made before the crash
is reused, see journal.py); anything else in them is discarded.

Seeding (state.json "seeding"): block data goes into the image as it arrives, not
through the WAL; see writer.py.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cdp.replica.wal as wal
from cdp.blocks import Geometry, block_spans, data_extents, merge_runs, runs, unpack_u64
from cdp.codec import HASH_LEN, block_hash, decompress, zero_hash
from cdp.durable import (
    DIR_MODE,
    atomic_write_json,
    create_private,
    fdatasync_all,
    fsync_dir,
    make_private_dir,
    read_json,
    write_zeros,
)
from cdp.errors import DiskFullError, ReplicaError, VolumeError
from cdp.replica.journal import Journal, Retention, fingerprint
from cdp.replica.points import read_held
from cdp.replica.state import COUNTERS, NO_HASH, ReplicaState, is_enospc, zero_entry
from cdp.replica.undo import UndoFile
from cdp.replica.writer import EpochWriter

log = logging.getLogger(__name__)

PROMOTED = "promoted.json"


def promoted_message(volume: str, path: Path) -> str:
    return (f"volume {volume!r} was promoted to a live disk (cdp failover promote, see "
            f"{path / PROMOTED}); the receiver accepts no more epochs for it. To replicate it "
            f"again, move {path} away (or fail back) and restart the source")


class ReplicaBusy(ReplicaError):
    """Another process (the receiver) has the replica open."""


class WriterConflict(ReplicaError):
    """An epoch cannot begin: another is being received, or one is sealed and still applying."""


class Replica:
    """An open replica; holds its lock until close()."""

    def __init__(self, path: Path, state: ReplicaState, lock_fd: int,
                 retention: Retention | None = None) -> None:
        self.path = path
        self.state = state
        self.geometry = state.geometry
        self._lock_fd = lock_fd
        self.journal = Journal(path, self.geometry, retention or Retention())
        self.image_fd = os.open(path / "image", os.O_RDWR)
        self.hash_fd = os.open(path / "hashes", os.O_RDWR)
        self.hashes_reserved = False
        self._state_renamed = False  # state.json was replaced, its folder not fsync'd since
        # One writer per volume, always: at most one epoch being received, and sealed epochs
        # (durable in their WAL, not yet applied) are tracked so that no Begin reuses their WAL
        # file or their number, whichever connection it comes from.
        self._writers = threading.RLock()  # EpochWriter() may abort inside begin()
        self._receiving: EpochWriter | None = None
        self._sealed: set[int] = set()
        # sealed, unapplied epochs: the blocks each writes at apply, and whether it zeroes any
        self._inflight: dict[int, tuple[frozenset[int], bool]] = {}

    # -- opening -------------------------------------------------------------

    @classmethod
    def open(cls, root: Path, volume: str, geometry: Geometry | None = None,
             create: bool = False, retention: Retention | None = None,
             promoting: bool = False) -> Replica:
        """Open (and recover) the replica of `volume`; create it if asked and absent.

        A geometry that disagrees with the replica's is refused: the volume
        was resized or replaced, and overwriting would destroy the replica.
        A promoted volume is refused (only promote itself opens it).
        """
        path = root / volume
        if not promoting and (path / PROMOTED).exists():
            raise VolumeError(promoted_message(volume, path), code="promoted", volume=volume)
        try:
            if not path.exists():
                if not create or geometry is None:
                    raise ReplicaError(f"no replica of volume {volume!r} in {root}")
                cls._create(root, volume, geometry)
            lock_fd = cls._lock(path, volume)
            try:
                state = ReplicaState(**read_json(path / "state.json"))
            except (OSError, ValueError, TypeError) as exc:
                os.close(lock_fd)
                raise ReplicaError(
                    f"{path / 'state.json'} is unreadable ({exc}); the replica needs repair") from None
        except OSError as exc:
            if is_enospc(exc):
                raise DiskFullError(f"no space to create replica {volume!r} in {root}") from None
            raise ReplicaError(f"cannot open replica {path}: {exc.strerror}") from None
        if geometry is not None and (geometry.size, geometry.block_size) != (
                state.size, state.block_size):
            os.close(lock_fd)
            raise VolumeError(
                f"volume {volume!r} is {geometry.size} bytes in {geometry.block_size}-byte blocks "
                f"at the source but the replica is {state.size} bytes in {state.block_size}-byte "
                "blocks; if the volume really changed, move the old replica away first",
                code="geometry", volume=volume)
        rep = cls(path, state, lock_fd, retention)
        try:
            rep._recover()
        except OSError as exc:
            rep.close()
            if is_enospc(exc):
                raise DiskFullError(
                    f"replica {volume!r} has a committed epoch to finish but the disk is full; "
                    "free space and it is replayed on the next open") from None
            raise ReplicaError(f"cannot recover replica {path}: {exc}") from None
        return rep

    @staticmethod
    def _create(root: Path, volume: str, geo: Geometry) -> None:
        make_private_dir(root)
        tmp = root / f".{volume}.new"
        shutil.rmtree(tmp, ignore_errors=True)
        os.mkdir(tmp, DIR_MODE)  # the replica folder: cdp's user only, whatever the umask
        with create_private(tmp / "image") as fh:
            fh.truncate(geo.size)
            os.fsync(fh.fileno())
        with create_private(tmp / "hashes") as fh:
            fh.truncate(geo.blocks * HASH_LEN)
            os.fsync(fh.fileno())
        state = ReplicaState(volume, geo.size, geo.block_size, uuid.uuid4().hex, time.time(),
                             seeding=True)
        atomic_write_json(tmp / "state.json", asdict(state))
        os.rename(tmp, root / volume)
        fsync_dir(root)
        log.info("created replica volume=%s size=%d block_size=%d", volume, geo.size,
                 geo.block_size)

    @staticmethod
    def _lock(path: Path, volume: str) -> int:
        fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ReplicaBusy(
                f"replica {volume!r} is in use by another process (is a receiver running?)") from None
        return fd

    def wal_path(self, epoch: int) -> Path:
        return self.path / f"wal.{epoch % 2}"

    def _recover(self) -> None:
        logs = [p for p in (self.wal_path(0), self.wal_path(1))
                if p.exists() and p.stat().st_size > 0]
        commits = {p: wal.commit_record(p) for p in logs}
        found = {c[1]: p for p, c in commits.items() if c is not None}
        self.journal.recover(self.state.epoch,
                             {c[1]: fingerprint(c) for c in commits.values() if c is not None},
                             self.restore)
        while (nxt := self.state.epoch + 1) in found:
            log.warning("replaying committed epoch volume=%s epoch=%d", self.state.volume, nxt)
            path = found.pop(nxt)

            def records(p: Path = path) -> Iterator[wal.Record]:
                return wal.read_log(p)

            self._apply(records, None)
        if self.state.seeding:
            self._unplace()
        self.sync_state()  # the replayed state survives before its WALs are emptied
        for p in logs:
            wal.clear(p)
        if self.journal.retention.enabled:
            self.journal.journal_on()
        self.journal.applied(self.state.epoch)

    def _unplace(self) -> None:
        """Seeding: every block the hash map holds as zero reads as zero again, durably.

        Data placed at receipt (EpochWriter._placeable) by an epoch that was never
        committed, or was aborted, lies in blocks the map still holds as zero: zeroed
        here, the image is the state's epoch exactly, and the source, seeing zero in
        the map, sends those blocks again. Only the image's data extents are looked at."""
        geo = self.geometry
        step = 1 << 14  # blocks per hash-map read
        zeroed = 0
        for first, count in block_spans(data_extents(self.image_fd, geo.size), geo):
            for start in range(first, first + count, step):
                n = min(step, first + count - start)
                old = os.pread(self.hash_fd, n * HASH_LEN, start * HASH_LEN)
                old += bytes(n * HASH_LEN - len(old))
                zeros = [start + k for k in range(n)
                         if zero_entry(old[k * HASH_LEN:(k + 1) * HASH_LEN],
                                        geo.length(start + k))]
                for s, c in runs(zeros):
                    end = min(geo.size, (s + c) * geo.block_size)
                    write_zeros(self.image_fd, s * geo.block_size, end - s * geo.block_size)
                    zeroed += c
        if zeroed:
            os.fdatasync(self.image_fd)
            log.info("zeroed blocks placed by an unfinished seed epoch volume=%s blocks=%d",
                     self.state.volume, zeroed)

    def seeded(self, epoch: int) -> bool:
        """The source says the replica is whole as of `epoch` (message Current): seeding ends
        for good. Only between epochs; False if nothing changed (not seeding, or not now)."""
        with self._writers:
            st = self.state
            if (not st.seeding or epoch != st.epoch or self._receiving is not None
                    or self._sealed):
                return False
            new = ReplicaState(**{**asdict(st), "seeding": False})
            atomic_write_json(self.path / "state.json", asdict(new))
            self._state_renamed = False  # atomic_write_json synced the folder
            self.state = new
        log.info("replica whole volume=%s epoch=%d: seeding done", st.volume, epoch)
        return True

    def restore(self, undo: UndoFile) -> None:
        """Write back what an undo file saved (image and hash map), durably; idempotent."""
        geo = self.geometry
        for block, entry in sorted(undo.entries.items()):
            if block >= geo.blocks:
                raise ReplicaError(f"{undo.path}: block {block} is outside the volume")
            n = geo.length(block)
            if entry[1] == 0:
                write_zeros(self.image_fd, geo.offset(block), n)
                os.pwrite(self.hash_fd, NO_HASH, block * HASH_LEN)
            else:
                os.pwrite(self.image_fd, undo.read(entry, n), geo.offset(block))
                os.pwrite(self.hash_fd, entry[2], block * HASH_LEN)
        os.fdatasync(self.image_fd)
        os.fdatasync(self.hash_fd)

    def rollback(self, point: int) -> None:
        """Take the image back to epoch `point` with the journal, newest epoch first.

        Each step is durable before the next: restore epoch E's undo file,
        then the state says E-1, then the file goes. A crash in between is
        finished by the next open (an undo file newer than the state and
        with no WAL is written back again, which is idempotent). The WALs
        are emptied first so that nothing newer is replayed afterwards.
        """
        if point > self.state.epoch:
            raise ReplicaError(f"{self.state.volume}: cannot roll back to epoch {point}, the "
                               f"replica is at {self.state.epoch}")
        for p in (self.wal_path(0), self.wal_path(1)):
            wal.clear(p)
        while self.state.epoch > point:
            e = self.state.epoch
            path = self.journal.path(e)
            try:
                undo = UndoFile(path)
            except FileNotFoundError:
                raise ReplicaError(f"{self.state.volume}: the undo record of epoch {e} is "
                                   f"missing; cannot go back past epoch {e}") from None
            try:
                self.restore(undo)
                base_time = float(undo.meta.get("base_time", 0.0))
                base_until = float(undo.meta.get("base_until", 0.0))
            finally:
                undo.close()
            new = ReplicaState(**{**asdict(self.state), "epoch": e - 1, "epoch_time": base_time,
                                  "epoch_until": base_until, "applied_at": time.time(),
                                  "cut": undo.meta.get("base_cut")})
            atomic_write_json(self.path / "state.json", asdict(new))
            self.state = new
            os.unlink(path)
        fsync_dir(self.journal.dir)

    def sync_state(self) -> None:
        """Make the last state.json rename durable (its content is durable already).

        Each epoch's apply replaces state.json without fsyncing the folder: until
        then a crash may bring back the state before, and the epoch is replayed
        from its WAL, which is durable and kept until this runs (before the next
        epoch that reuses that WAL file begins, and at close)."""
        if self._state_renamed:
            fsync_dir(self.path)
            self._state_renamed = False

    def close(self) -> None:
        if self._lock_fd >= 0:
            try:
                self.sync_state()
            except OSError:
                pass
        for fd in (self.image_fd, self.hash_fd, self._lock_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        # a stale writer must fail (EBADF), never write through a recycled descriptor
        self.image_fd = self.hash_fd = self._lock_fd = -1

    # -- reading -------------------------------------------------------------

    def read_block(self, index: int) -> bytes:
        return os.pread(self.image_fd, self.geometry.length(index), self.geometry.offset(index))

    def stored_hashes(self, start: int, count: int) -> bytes:
        """Hashes of blocks [start, start+count) as recorded at apply time."""
        count = max(0, min(count, self.geometry.blocks - start))
        raw = os.pread(self.hash_fd, count * HASH_LEN, start * HASH_LEN)
        raw += bytes(count * HASH_LEN - len(raw))
        if NO_HASH not in raw:
            return raw
        out = bytearray(raw)
        for i in range(count):
            if out[i * HASH_LEN:(i + 1) * HASH_LEN] == NO_HASH:
                out[i * HASH_LEN:(i + 1) * HASH_LEN] = zero_hash(self.geometry.length(start + i))
        return bytes(out)

    def rehash(self, start: int, count: int) -> bytes:
        """Hashes of blocks [start, start+count) read from the image itself (for verify)."""
        count = max(0, min(count, self.geometry.blocks - start))
        return b"".join(block_hash(self.read_block(i)) for i in range(start, start + count))

    def begin(self, epoch: int, when: float) -> EpochWriter:
        """Start receiving `epoch`; the one before it may still be applying.

        One writer per volume: refused while another epoch is being received (a second
        connection must fence the first), and `epoch` must follow the newest epoch applied or
        sealed, so it never shares a number or a WAL file with an epoch still to be applied.
        """
        with self._writers:
            vol = self.state.volume
            if self._receiving is not None:
                raise WriterConflict(
                    f"{vol}: epoch {self._receiving.epoch} is still being received; epoch {epoch} "
                    "cannot begin until it is committed or aborted")
            newest = max(self._sealed, default=self.state.epoch)
            if epoch != newest + 1 or epoch > self.state.epoch + 2:
                held = (f"epoch {self.state.epoch} applied"
                        + (f", {sorted(self._sealed)} sealed and applying" if self._sealed else ""))
                raise WriterConflict(f"{vol}: epoch {epoch} cannot follow ({held})")
            try:
                self.sync_state()  # `epoch` overwrites the WAL of epoch-2: its state must hold
            except OSError as exc:
                raise ReplicaError(f"{vol}: cannot make the replica state durable: {exc}") from None
            w = EpochWriter(self, epoch, when)
            self._receiving = w
            return w

    def writers_idle(self) -> bool:
        """No epoch is being received and none is sealed but unapplied."""
        with self._writers:
            return self._receiving is None and not self._sealed

    def _writer_ended(self, w: EpochWriter, sealed: bool, applied: bool) -> None:
        """EpochWriter bookkeeping: receiving -> sealed -> applied (or aborted)."""
        with self._writers:
            if self._receiving is w:
                self._receiving = None
            if sealed and not applied:
                self._sealed.add(w.epoch)
                self._inflight[w.epoch] = (frozenset(w._touched), w.zeroes)
            else:
                self._sealed.discard(w.epoch)
                self._inflight.pop(w.epoch, None)

    # -- applying ------------------------------------------------------------

    def _apply(self, records: Callable[[], Iterable[wal.Record]],
               cache: dict[int, bytes] | None, bodies: Callable[[], Iterable[list]] | None = None,
               unsynced_wal: Path | None = None) -> None:
        """Journal, then apply a committed epoch's records to image and hash map, then advance
        the state. `records()` iterates the epoch (blobs included); `bodies()` its metadata.

        `unsynced_wal`: the epoch's WAL, written but not yet fdatasync'd (seal leaves that
        to here when an undo file is made first). With a durable undo file before the first
        image write, a crash before the WAL is durable rolls the image back (journal.recover);
        without one, the WAL is made durable before the image is touched."""
        saved = False
        if self.journal.retention.enabled:
            get_bodies = bodies or (lambda: (r.body for r in records()))
            tail = deque(get_bodies(), maxlen=2)  # [CUT,] COMMIT
            last = tail[-1] if tail else None
            if last is None or last[0] != wal.COMMIT:
                raise ReplicaError("WAL has no commit record")
            base = {**asdict(self.state), "held": read_held(self.path, self.state.epoch)}
            saved = self.journal.prepare(self.state.epoch + 1, last, get_bodies, self.image_fd,
                                         self.hash_fd, base, self.restore,
                                         cut=tail[0][1] if tail[0][0] == wal.CUT else None)
        wal_fd = -1
        if unsynced_wal is not None:
            wal_fd = os.open(unsynced_wal, os.O_RDONLY)
            if not saved:
                try:
                    os.fdatasync(wal_fd)
                finally:
                    os.close(wal_fd)
                wal_fd = -1
        try:
            commit, cut = self._write_records(records, cache)
            # one burst: image, hash map and (if still due) the WAL; an ack needs all three
            fdatasync_all([self.image_fd, self.hash_fd] + ([wal_fd] if wal_fd >= 0 else []))
        finally:
            if wal_fd >= 0:
                os.close(wal_fd)
        self._advance(commit, cut)

    def _write_records(self, records: Callable[[], Iterable[wal.Record]],
                       cache: dict[int, bytes] | None) -> tuple[list, dict[str, Any] | None]:
        """The epoch's records into image and hash map (not yet durable); (COMMIT, CUT)."""
        geo = self.geometry
        commit: list | None = None
        cut: dict[str, Any] | None = None
        for rec in records():
            kind = rec.body[0]
            if kind in (wal.DATA, wal.RAW):
                indices = unpack_u64(rec.body[1])
                hashes = rec.body[2]
                if rec.body[-1] is wal.PLACED:  # the data is in the image since its receipt
                    self._write_blocks(indices, hashes, None)
                    continue
                if kind == wal.DATA:
                    data = cache.pop(rec.offset, None) if cache is not None else None
                    if data is None:
                        data = decompress(rec.blob, rec.body[3])
                else:
                    data = rec.blob
                self._write_blocks(indices, hashes, data)
            elif kind == wal.COPY:
                self._copy_blocks(unpack_u64(rec.body[1]), rec.body[2],
                                  unpack_u64(rec.body[3]))
            elif kind == wal.ZERO:
                for start, count in merge_runs(unpack_u64(rec.body[1])):  # O(runs), not blocks
                    end = min(geo.size, (start + count) * geo.block_size)
                    write_zeros(self.image_fd, start * geo.block_size, end - start * geo.block_size)
                    write_zeros(self.hash_fd, start * HASH_LEN, count * HASH_LEN, punch=False)
            elif kind == wal.COMMIT:
                commit = rec.body
            elif kind == wal.CUT:
                cut = rec.body[1]
            elif kind == wal.BEGIN and rec.body[1] != self.state.epoch + 1:
                raise ReplicaError(f"{self.state.volume}: epoch {rec.body[1]} cannot be applied "
                                   f"after epoch {self.state.epoch}")
        if commit is None:  # pragma: no cover - callers checked
            raise ReplicaError("WAL has no commit record")
        return commit, cut

    def _advance(self, commit: list, cut: dict[str, Any] | None) -> None:
        """The state moves to the applied epoch (the folder's fsync waits: see sync_state)."""
        st = self.state
        delta = commit[4] if len(commit) > 4 and isinstance(commit[4], dict) else {}
        counters = {k: st.counters.get(k, 0) + int(delta.get(k, 0)) for k in COUNTERS}
        until = float(commit[5]) if len(commit) > 5 else 0.0  # older WALs: no until
        group = st.group if cut is None else (
            {"name": cut["group"], "members": cut["members"]} if cut.get("group") else None)
        new = ReplicaState(**{**asdict(st), "epoch": commit[1], "epoch_time": commit[2],
                              "epoch_until": max(float(commit[2]), until),
                              "applied_at": time.time(), "counters": counters,
                              "cut": cut, "group": group})
        atomic_write_json(self.path / "state.json", asdict(new), sync_dir=False)
        self._state_renamed = True
        self.state = new
        self.journal.applied(new.epoch)

    def _copy_blocks(self, indices, hashes: bytes, sources) -> None:
        """Repeats within an epoch: the source block was written by an earlier record of it."""
        for k, (dst, src) in enumerate(zip(indices, sources, strict=True)):
            h = hashes[k * HASH_LEN:(k + 1) * HASH_LEN]
            data = self.read_block(src)
            if block_hash(data) != h or len(data) != self.geometry.length(dst):
                # verified at receipt; a mismatch here means the image was changed under us
                raise ReplicaError(f"{self.state.volume}: block {src} no longer holds the content "
                                   f"block {dst} should copy; the replica needs a resync")
            os.pwrite(self.image_fd, data, self.geometry.offset(dst))
            os.pwrite(self.hash_fd, h, dst * HASH_LEN)

    def _write_blocks(self, indices, hashes: bytes, data: bytes | None) -> None:
        """Blocks into image and hash map; data None: the hash map only (placed data)."""
        geo = self.geometry
        mv = memoryview(data) if data is not None else None
        pos = 0  # byte position in data
        k = 0  # position in indices
        for start, count in runs(indices):
            end = min(geo.size, (start + count) * geo.block_size)
            n = end - start * geo.block_size
            if mv is not None:
                os.pwrite(self.image_fd, mv[pos:pos + n], start * geo.block_size)
            os.pwrite(self.hash_fd, hashes[k * HASH_LEN:(k + count) * HASH_LEN], start * HASH_LEN)
            pos += n
            k += count
