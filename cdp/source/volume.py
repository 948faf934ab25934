"""Per-volume source state and the epoch builder.

The source keeps, per volume, the hash of every block as it believes the
replica holds it once everything sent is applied (`smap`). Each epoch
records what it overwrote (undo), so that when the receiver reports a
different last epoch after a reconnect, or drops an epoch (Need), the map is
rolled back to exactly what the receiver holds and the next scan re-sends
the difference. When that memory is gone (a source restart), the map is
fetched from the receiver instead: never a whole-volume resend.

Saved state, ``<state_dir>/<volume>/``::

    hashes      smap as of `epoch` (16 bytes per block)
    meta.json   {replica_id, epoch, size, block_size}
    paused.json {since}: present while `cdp pause` holds the volume (survives restarts)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdp.blocks import Geometry, pack_u64, runs
from cdp.codec import HASH_LEN, compress
from cdp.config import VolumeConfig
from cdp.durable import atomic_write, atomic_write_json, make_private_dir, read_json
from cdp.errors import CdpError
from cdp.ratelimit import TokenBucket
from cdp.source.phase import Phase, check
from cdp.status import SourceVolumeStatus
from cdp.wire.messages import Cut, Data, Ref, Zero
from cdp.wire.session import MAX_ZERO_RUNS

MAX_REFS_PER_FRAME = 32768
MAX_ZERO_RUNS_PER_FRAME = MAX_ZERO_RUNS  # the receiver refuses more in one frame
MAX_BATCHED = 1 << 18  # blocks remembered per epoch to keep repeats in order; then batches flush


class Cancelled(Exception):
    """A producer of changed blocks stops early (Need, error, shutdown)."""


@dataclass
class Pending:
    """An epoch sent (or being sent) and not yet acknowledged."""

    epoch: int
    time: float
    undo: list[tuple[int, bytes]] = field(default_factory=list)
    ref_hashes: list[bytes] = field(default_factory=list)
    committed: bool = False


@dataclass
class ResyncState:
    """`cdp resync` requests of one volume (this run): numbered as asked, the one being served,
    the last one finished (compared, differing blocks sent and acknowledged)."""

    asked: int = 0
    running: int = 0  # the request the resync under way serves (0: none)
    done: int = 0
    changed_before: float = 0  # vs.stats["changed"] when the running one began
    blocks: int = 0  # blocks the last finished one found differing (and sent)
    epoch: int = 0  # the acknowledged epoch that holds them

    @property
    def wanted(self) -> bool:
        """A request waits that no resync under way serves."""
        return self.asked > max(self.done, self.running)

    def status(self) -> str:
        return "running" if self.running else ("queued" if self.wanted else "")


class DedupIndex:
    """hash -> (volume, block, epoch) of content the replica holds or will hold.

    Bounded: past `cap` entries the oldest are forgotten (dedup degrades,
    correctness does not: every reference is checked by the receiver).
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._d: dict[bytes, tuple[str, int, int]] = {}
        self._lock = threading.Lock()

    def add(self, h: bytes, volume: str, block: int, epoch: int) -> None:
        if self.cap <= 0:
            return
        with self._lock:
            d = self._d
            if h in d:
                return
            if len(d) >= self.cap:
                del d[next(iter(d))]
            d[h] = (volume, block, epoch)

    def get(self, h: bytes) -> tuple[str, int, int] | None:
        return self._d.get(h)

    def discard(self, h: bytes) -> None:
        with self._lock:
            self._d.pop(h, None)

    def __len__(self) -> int:
        return len(self._d)


class VolumeState:
    """What the source knows about one volume and its replica."""

    def __init__(self, cfg: VolumeConfig, state_dir: Path) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.dir = state_dir / cfg.name
        self.geo: Geometry | None = None
        self.smap: bytearray | None = None
        self.replica_id = ""
        self.acked = 0
        self.pending: dict[int, Pending] = {}
        self.lock = threading.Lock()
        self.stats: dict[str, float] = dict.fromkeys(  # bytes; changed: blocks; the rest: counts
            ("scanned", "skipped", "changed", "logical", "data", "compressed", "zero", "dedup",
             "wire", "epochs", "scans", "needs"), 0)
        self._phase = Phase.STARTING  # see cdp/source/phase.py: the life cycle
        self.progress = (0, 0)
        self.current_as_of = 0.0  # source time of the newest state the replica is known to hold
        self.confirmed_at = 0.0  # when that became known (ack, or a scan that found nothing)
        self.last_ack = 0.0
        self.error = ""
        self.seeded = False
        self.saved_at = 0.0
        self.need: int | None = None
        self.indexed = False  # smap's blocks are in the dedup index
        self.rate_window: list[tuple[float, int]] = []
        self.bucket = TokenBucket(cfg.rate_limit)  # paces what is sent for this volume
        self.status_extra: Callable[[], dict[str, Any]] | None = None  # mode-specific status
        self.on_adopt: Callable[[bytearray], None] | None = None  # sees each map taken (failback)
        self.paused_since = self._paused_since()  # `cdp pause`: 0.0 while not paused
        self.resync = ResyncState()  # `cdp resync`


    @property
    def phase(self) -> Phase:
        return self._phase

    @phase.setter
    def phase(self, new: Phase) -> None:
        check(self.name, self._phase, new, seeded=self.seeded)
        self._phase = new
    def configure(self, cfg: VolumeConfig) -> None:
        """Take a reloaded config (same volume, same path and geometry)."""
        self.cfg = cfg
        self.bucket.set_rate(cfg.rate_limit)

    # -- pause (`cdp pause` / `cdp resume`) ----------------------------------

    def _paused_since(self) -> float:
        try:
            return float(read_json(self.dir / "paused.json")["since"])
        except FileNotFoundError:
            return 0.0
        except (OSError, ValueError, KeyError, TypeError):
            return time.time()  # unreadable: stay paused (a maintenance window is not undone)

    def pause(self) -> bool:
        """Hold the volume: nothing more is shipped until resume(); recorded on disk first, so
        a restart keeps it. False if it already was paused."""
        if self.paused_since:
            return False
        since = time.time()
        try:
            make_private_dir(self.dir)
            atomic_write_json(self.dir / "paused.json", {"since": since})
        except OSError as exc:
            raise CdpError(f"cannot record the pause of {self.name} in {self.dir}: {exc}") from exc
        self.paused_since = since
        return True

    def resume(self) -> bool:
        """Ship again (the changes made meanwhile first). False if it was not paused."""
        if not self.paused_since:
            return False
        try:
            (self.dir / "paused.json").unlink(missing_ok=True)
        except OSError as exc:
            raise CdpError(f"cannot remove {self.dir / 'paused.json'}: {exc}") from exc
        self.paused_since = 0.0
        return True

    # -- persistence ---------------------------------------------------------

    def load(self, geo: Geometry) -> None:
        """Load the saved map if it matches this geometry; else start with no memory."""
        self.geo = geo
        try:
            meta = read_json(self.dir / "meta.json")
            if (meta.get("size"), meta.get("block_size")) != (geo.size, geo.block_size):
                return
            smap = bytearray(geo.blocks * HASH_LEN)  # read in place: one copy of the map
            with open(self.dir / "hashes", "rb") as fh:
                if fh.readinto(smap) != len(smap) or fh.read(1):
                    return
        except (OSError, ValueError):
            return
        self.smap = smap
        self.replica_id = str(meta.get("replica_id", ""))
        self.acked = int(meta.get("epoch", 0))
        self.seeded = bool(meta.get("seeded", False))

    def save(self) -> bool:
        """Persist the map as of the acknowledged epoch; only when nothing is pending.

        The map is copied under the lock an epoch must take before it changes the
        map (EpochBuilder._begin), so a scan starting meanwhile cannot leak
        unacknowledged hashes into the saved file. Hashes are written before the
        meta that names their epoch: a crash in between is a mismatch (the map
        is fetched from the receiver), never a wrong map.
        """
        with self.lock:
            if self.smap is None or self.geo is None or self.pending:
                return False
            snapshot = bytes(self.smap)
            meta = {"replica_id": self.replica_id, "epoch": self.acked, "size": self.geo.size,
                    "block_size": self.geo.block_size, "seeded": self.seeded}
        make_private_dir(self.dir)
        atomic_write(self.dir / "hashes", snapshot)
        atomic_write_json(self.dir / "meta.json", {**meta, "saved": time.time()})
        self.saved_at = time.time()
        return True

    # -- epochs --------------------------------------------------------------

    def next_epoch(self) -> int:
        with self.lock:
            return max([self.acked, *self.pending]) + 1

    def undo_from(self, epoch: int, index: DedupIndex | None = None) -> None:
        """Roll smap back to before `epoch`: drop that epoch and every later one."""
        assert self.smap is not None
        with self.lock:
            for e in sorted((e for e in self.pending if e >= epoch), reverse=True):
                p = self.pending.pop(e)
                for block, old in reversed(p.undo):
                    self.smap[block * HASH_LEN:(block + 1) * HASH_LEN] = old
                if index is not None:
                    for h in p.ref_hashes:
                        index.discard(h)

    def reconcile(self, replica_id: str, epoch: int) -> bool:
        """Make smap describe the receiver's epoch `epoch`; False if we cannot know it."""
        if self.smap is None or replica_id != self.replica_id or epoch < self.acked:
            return False
        with self.lock:
            ok = all(e in self.pending and self.pending[e].committed
                     for e in range(self.acked + 1, epoch + 1))
        if not ok:
            return False
        self.undo_from(epoch + 1)
        with self.lock:
            for e in [e for e in self.pending if e <= epoch]:
                del self.pending[e]
        self.acked = epoch
        return True

    def adopt(self, replica_id: str, epoch: int, smap: bytearray) -> None:
        """Take the receiver's own hash map as the truth (memory lost, or a new replica)."""
        with self.lock:
            self.pending.clear()
        if self.on_adopt is not None:
            self.on_adopt(smap)  # before any epoch changes it
        self.smap = smap
        self.replica_id = replica_id
        self.acked = epoch

    def acknowledged(self, epoch: int) -> Pending | None:
        with self.lock:
            p = self.pending.pop(epoch, None)
        if p is not None:
            self.acked = epoch
            self.last_ack = time.time()
        return p

    def unacked_committed(self) -> int:
        with self.lock:
            return sum(1 for p in self.pending.values() if p.committed)

    def status(self) -> SourceVolumeStatus:
        """This volume's part of the source's status snapshot (Source.status)."""
        now = time.time()
        self.rate_window = [w for w in self.rate_window if now - w[0] <= 10]
        rate = sum(w[1] for w in self.rate_window) / 10.0
        extra = self.status_extra() if self.status_extra is not None else {}
        return SourceVolumeStatus(
            volume=self.name, path=str(self.cfg.path), phase=self.phase,
            acked_epoch=self.acked, pending_epochs=len(self.pending),
            replica_id=self.replica_id, seeded=self.seeded,
            progress_done=self.progress[0], progress_total=self.progress[1],
            current_as_of=self.current_as_of, confirmed_at=self.confirmed_at,
            lag=(now - self.current_as_of) if self.current_as_of else None,
            last_ack=self.last_ack, rate=rate, error=self.error, stats=dict(self.stats),
            size=self.geo.size if self.geo else 0,
            block_size=self.geo.block_size if self.geo else self.cfg.block_size,
            rate_limit=self.bucket.rate, mode=self.cfg.mode,
            paused=bool(self.paused_since), paused_since=self.paused_since or None,
            resync=self.resync.status(), resync_blocks=self.resync.blocks,
            nbd=extra.get("nbd"))


Emit = Callable[[tuple[Any, ...]], None]


def make_data(volume: str, epoch: int, indices: list[int], hashes: list[bytes],
              raw: bytearray, level: int) -> Data:
    """Build a Data message: runs in a worker thread (zstd releases the GIL)."""
    return Data(volume, epoch, pack_u64(indices), b"".join(hashes), len(raw), compress(raw, level))


class EpochBuilder:
    """Turns a stream of changed blocks into epochs of Data/Zero/Ref operations.

    Runs in the scan thread. Emits ("begin", epoch, time), ("msg", message),
    ("data", future_of_Data), ("commit", epoch, block_count) in wire order.
    """

    def __init__(self, vs: VolumeState, volumes: dict[str, VolumeState], index: DedupIndex,
                 pool: Executor, emit: Emit, *, capture_time: float, batch_bytes: int,
                 max_epoch_bytes: int, level: int) -> None:
        assert vs.smap is not None and vs.geo is not None
        self.vs, self.volumes, self.index, self.pool, self.emit = vs, volumes, index, pool, emit
        self.geo = vs.geo
        self.smap = vs.smap
        self.time = capture_time
        self.batch_bytes = batch_bytes
        self.max_epoch_bytes = max_epoch_bytes
        self.level = level
        self.cur: Pending | None = None
        self.cut: Cut | None = None  # said before the current epoch's Commit (mark_cut)
        self.epoch_bytes = 0
        self.blocks = 0
        self.batched: set[int] = set()  # blocks of this epoch that may sit in an unsent batch
        self._reset_batches()

    def _reset_batches(self) -> None:
        self.d_idx: list[int] = []
        self.d_hash: list[bytes] = []
        self.d_buf = bytearray()  # the batch's blocks, copied once out of the read buffer
        self.d_bytes = 0
        self.zeros: list[int] = []
        self.refs: dict[str, list[tuple[int, bytes, int]]] = {}
        self.nrefs = 0

    def _begin(self) -> Pending:
        epoch = self.vs.next_epoch()
        p = Pending(epoch, self.time)
        with self.vs.lock:
            self.vs.pending[epoch] = p
        self.cur = p
        self.epoch_bytes = 0
        self.blocks = 0
        self.emit(("begin", epoch, self.time))
        return p

    def add(self, block: int, h: bytes, content: memoryview | None) -> None:
        p = self.cur or self._begin()
        if block in self.batched or len(self.batched) >= MAX_BATCHED:
            # Batches go out as data, zeros, then references: a block added again (an NBD resync
            # rereads what the guest changed meanwhile) must not be overtaken by its older self.
            self._flush_data()
            self._flush_zeros()
            self._flush_refs()
            self.batched.clear()
        self.batched.add(block)
        n = self.geo.length(block)
        old = bytes(self.smap[block * HASH_LEN:(block + 1) * HASH_LEN])
        st = self.vs.stats
        if content is None:
            self.zeros.append(block)
            st["zero"] += n
        else:
            hit = self.index.get(h)
            if hit is not None and self._usable(hit, h):
                self.refs.setdefault(hit[0], []).append((block, h, hit[1]))
                p.ref_hashes.append(h)
                self.nrefs += 1
                st["dedup"] += n
            else:
                self.d_idx.append(block)
                self.d_hash.append(h)
                self.d_buf += content
                self.d_bytes += n
                st["data"] += n
                self.index.add(h, self.vs.name, block, p.epoch)
        self.smap[block * HASH_LEN:(block + 1) * HASH_LEN] = h
        p.undo.append((block, old))
        self.blocks += 1
        self.epoch_bytes += n
        st["changed"] += 1
        st["logical"] += n
        if self.d_bytes >= self.batch_bytes:
            self._flush_data()
        if self.nrefs >= MAX_REFS_PER_FRAME:
            self._flush_refs()
        if len(self.zeros) >= MAX_ZERO_RUNS_PER_FRAME:
            self._flush_zeros()
        if self.epoch_bytes >= self.max_epoch_bytes:
            self.commit()

    def _usable(self, hit: tuple[str, int, int], h: bytes) -> bool:
        """A reference is worth sending only if the receiver will hold that content when it reads it."""
        vol, block, epoch = hit
        other = self.volumes.get(vol)
        if other is None or other.smap is None:
            return False
        if other.smap[block * HASH_LEN:(block + 1) * HASH_LEN] != h:
            self.index.discard(h)
            return False
        # same volume: earlier epochs apply first; other volumes: only what is acknowledged
        return other is self.vs or epoch <= other.acked

    def _flush_data(self) -> None:
        if not self.d_idx:
            return
        assert self.cur is not None
        fut: Future[Data] = self.pool.submit(make_data, self.vs.name, self.cur.epoch, self.d_idx,
                                             self.d_hash, self.d_buf, self.level)
        self.emit(("data", fut))
        self.d_idx, self.d_hash, self.d_buf, self.d_bytes = [], [], bytearray(), 0

    def _flush_zeros(self) -> None:
        if not self.zeros:
            return
        assert self.cur is not None
        pairs = [x for r in runs(sorted(self.zeros)) for x in r]
        self.emit(("msg", Zero(self.vs.name, self.cur.epoch, pack_u64(pairs))))
        self.zeros = []

    def _flush_refs(self) -> None:
        if not self.refs:
            return
        assert self.cur is not None
        self._flush_data()  # a reference may point at a block still in the data batch
        for vol, items in self.refs.items():
            self.emit(("msg", Ref(self.vs.name, self.cur.epoch, vol,
                                  pack_u64(i for i, _, _ in items),
                                  b"".join(h for _, h, _ in items),
                                  pack_u64(f for _, _, f in items))))
        self.refs = {}
        self.nrefs = 0

    def mark_cut(self, when: float, since: float, group: str, members: list[str],
                 force: bool = False) -> None:
        """The epoch being built ends at a cut (nbd): the volume's state at `when`, which
        becomes its capture time; a Cut message says so before its Commit. `force`: begin
        an epoch with no blocks if none is open, so that the cut is a point at the receiver."""
        if self.cur is None:
            if not force:
                return
            self.time = when
            self._begin()
        assert self.cur is not None
        self.cur.time = self.time = when
        self.cut = Cut(self.vs.name, self.cur.epoch, when, since, group, members)

    def commit(self) -> None:
        """Close the current epoch (if any blocks went into it)."""
        if self.cur is None:
            return
        self._flush_data()
        self._flush_zeros()
        self._flush_refs()
        self.batched.clear()
        if self.cut is not None and self.cut.epoch == self.cur.epoch:
            self.emit(("msg", self.cut))
        self.cut = None
        self.emit(("commit", self.cur.epoch, self.blocks))
        self.cur = None
