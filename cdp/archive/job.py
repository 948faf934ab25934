"""Archive runs: chunk each volume's point-in-time view, store what the repository lacks.

A run takes the shared lock, loads the index (adopting packs of interrupted
runs), then per volume reads fixed-size chunks (aligned to the volume's
blocks), names each by its keyed hash, skips all-zero chunks (a marker, not
data) and chunks the repository already holds (in any snapshot or volume),
and compresses and seals the rest into packs that upload a few at a time.
Only when every pack is stored is an index file written, and only then the
snapshot manifest: a crash at any point leaves a valid repository whose
next run re-uses what was already uploaded.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

import cdp.archive.lock as locks
from cdp.archive.backend import open_backend, run_sync
from cdp.archive.crypto import ID_LEN, ZERO_ID
from cdp.archive.pack import PackWriter, encode_blob
from cdp.archive.repo import Manifest, Repository, VolumeSnap
from cdp.archive.view import PointReader, open_replica
from cdp.codec import HASH_LEN, zero_hash
from cdp.config import ArchiveConfig, ReceiverConfig
from cdp.errors import ArchiveError, ConfigError
from cdp.schedule import is_due, parse_schedule

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (what, bytes done, bytes total)
Opener = Callable[[Path, str], PointReader]
READ_AHEAD = 4  # chunks read, hashed and compressed at once (zstd and hashing release the GIL)


@dataclass
class Options:
    chunk_size: int = 4 << 20
    pack_size: int = 32 << 20
    compress_level: int = 3
    uploads: int = 4
    archive: str = ""
    use_hash_map: bool = True  # skip chunks the replica's hash map shows unchanged (see fingerprints)

    @classmethod
    def of(cls, a: ArchiveConfig) -> Options:
        return cls(a.chunk_size, a.pack_size, a.compress_level, a.uploads, a.name)


@dataclass
class VolumeReport:
    volume: str
    size: int = 0
    chunks: int = 0
    zero_chunks: int = 0
    unread_chunks: int = 0  # unchanged since the previous snapshot by the hash map: not read
    new_chunks: int = 0
    new_bytes: int = 0  # plain bytes of the new chunks
    stored_bytes: int = 0  # what they became, compressed and sealed


@dataclass
class RunReport:
    snapshot: str = ""
    repository: str = ""
    archive: str = ""
    volumes: list[VolumeReport] = field(default_factory=list)
    packs_uploaded: int = 0
    bytes_uploaded: int = 0
    adopted_packs: int = 0  # packs of an interrupted run found and used
    files: int = 0  # protected file-set files in the snapshot
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["volumes"] = [vars(v) for v in self.volumes]
        return d


def read_password(a: ArchiveConfig) -> bytes | None:
    """The repository password from password_file (None when unencrypted); must be chmod 600."""
    if not a.encrypt or a.password_file is None:
        return None
    path = a.password_file
    try:
        st = path.stat()
        data = path.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise ConfigError(f"archive {a.name}: password_file {path}: cannot read: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"archive {a.name}: password_file {path} is readable by others; "
                          f"run `chmod 600 {path}`")
    if len(data) < 8:
        raise ConfigError(f"archive {a.name}: password in {path} is too short (need 8+ characters)")
    return data


async def open_repo(a: ArchiveConfig) -> Repository:
    """Open the repository of an [[archive]] table (writes nothing).

    Whether it must be encrypted comes from this table (encrypt, password_file),
    never from the repository, which whoever can write the bucket can change.
    """
    password = read_password(a)
    if a.encrypt and password is None:
        raise ConfigError(f"archive {a.name}: encrypt = true needs password_file")
    return await Repository.open(open_backend(a.repository, a.endpoint), password)


async def init_repo(a: ArchiveConfig, kdf_n: int | None = None) -> Repository:
    kw = {"kdf_n": kdf_n} if kdf_n else {}
    return await Repository.init(open_backend(a.repository, a.endpoint), read_password(a), **kw)


def chunk_size_for(requested: int, block_size: int) -> int:
    """Chunks are whole blocks: at least one block, a multiple of the block size."""
    if block_size <= 0:
        return requested
    return max(block_size, requested - requested % block_size)


class _Uploader:
    """Seals packs and uploads at most `limit` at once; remembers what it stored."""

    def __init__(self, repo: Repository, opts: Options, lock: locks.Lock | None) -> None:
        self.repo, self.opts, self.lock = repo, opts, lock
        self.writer = PackWriter(repo.keys)
        self.sem = asyncio.Semaphore(opts.uploads)
        self.tasks: set[asyncio.Task[None]] = set()
        self.pending: set[bytes] = set()
        self.new_packs: list[str] = []
        self.uploaded = 0
        self.bytes = 0

    def has(self, cid: bytes) -> bool:
        return cid in self.pending or cid in self.repo.index

    async def add(self, cid: bytes, blob: bytes, raw_len: int) -> None:
        self.pending.add(cid)
        self.writer.add(cid, blob, raw_len)
        if self.writer.size >= self.opts.pack_size:
            await self.flush()

    async def flush(self) -> None:
        self._check()
        if not len(self.writer):
            return
        writer, self.writer = self.writer, PackWriter(self.repo.keys)
        await self.sem.acquire()  # bounds the packs held in memory
        name, data, entries = await asyncio.to_thread(writer.seal)
        task = asyncio.create_task(self._upload(name, data, entries))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _upload(self, name: str, data: bytes, entries: list[tuple[bytes, int, int, int]]) -> None:
        try:
            if await self.repo.put_pack(name, data, entries):
                self.uploaded += 1
                self.bytes += len(data)
            self.new_packs.append(name)
            if self.lock is not None:
                await self.lock.refresh()
        finally:
            self.sem.release()

    def _check(self) -> None:
        for t in list(self.tasks):
            if t.done() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]

    async def finish(self) -> None:
        await self.flush()
        if self.tasks:
            await asyncio.gather(*self.tasks)


def _process(view: PointReader, guard: threading.Lock, repo: Repository, offset: int, length: int,
             level: int, known: Callable[[bytes], bool]) -> tuple[bytes, bytes | None]:
    """Read, hash and (when new) compress and seal one chunk: (id, blob or None).

    Reads are serialised (a view need not be thread-safe); hashing, compressing
    and sealing run in parallel.
    """
    with guard:
        data = view.read(offset, length)
    digest = xxhash.xxh3_128_digest(data)
    if digest == zero_hash(length):
        return ZERO_ID, None
    cid = repo.keys.chunk_id(data) if repo.keys.encrypted else digest
    if known(cid):
        return cid, None
    return cid, encode_blob(repo.keys, cid, data, level)


def fingerprints(view: PointReader, chunk: int) -> bytes | None:
    """Per chunk, xxh3-128 of its blocks' hashes in the replica's hash map (None: the view has none).

    Equal fingerprints mean equal content (at xxh3-128's collision level, the
    level cdp's replication trusts), so a chunk whose fingerprint matches the
    previous snapshot's is not read again.
    """
    get = getattr(view, "block_hashes", None)
    if get is None:
        return None
    raw = get()
    per = chunk // view.block_size * HASH_LEN
    return b"".join(xxhash.xxh3_128_digest(raw[i:i + per]) for i in range(0, len(raw), per))


def _previous(snaps: Sequence[Manifest], name: str, size: int, block_size: int, chunk: int
              ) -> VolumeSnap | None:
    """The newest earlier snapshot of this volume with the same geometry and fingerprints."""
    for m in reversed(snaps):
        v = m.volume(name)
        if v is not None and (v.size, v.block_size, v.chunk_size) == (size, block_size, chunk) \
                and len(v.fingerprints) == v.count * ID_LEN:
            return v
    return None


async def _archive_volume(repo: Repository, up: _Uploader, name: str, view: PointReader, opts: Options,
                          progress: Progress | None, history: Sequence[Manifest]
                          ) -> tuple[VolumeSnap, VolumeReport]:
    chunk = chunk_size_for(opts.chunk_size, view.block_size)
    size = view.size
    rep = VolumeReport(name, size)
    ids = bytearray()
    guard = threading.Lock()
    fps = await asyncio.to_thread(fingerprints, view, chunk) if opts.use_hash_map else None
    prev = _previous(history, name, size, view.block_size, chunk) if fps is not None else None
    prev_ids = prev.chunks if prev is not None else b""
    prev_fps = prev.fingerprints if prev is not None else b""
    offsets = iter(enumerate(range(0, size, chunk)))
    loop = asyncio.get_running_loop()
    window: collections.deque[tuple[int, bool, asyncio.Future[tuple[bytes, bytes | None]]]] = \
        collections.deque()

    def submit() -> bool:
        i, off = next(offsets, (-1, -1))
        if off < 0:
            return False
        n = min(chunk, size - off)
        at = slice(i * ID_LEN, (i + 1) * ID_LEN)
        if fps is not None and prev_fps[at] == fps[at] and (
                prev_ids[at] == ZERO_ID or up.has(prev_ids[at])):
            done_: asyncio.Future[tuple[bytes, bytes | None]] = loop.create_future()
            done_.set_result((prev_ids[at], None))  # unchanged since the previous snapshot: not read
            window.append((n, True, done_))
        else:
            window.append((n, False, asyncio.ensure_future(asyncio.to_thread(
                _process, view, guard, repo, off, n, opts.compress_level, up.has))))
        return True

    while len(window) < READ_AHEAD and submit():
        pass
    done = 0
    try:
        while window:
            n, skipped, fut = window.popleft()
            cid, blob = await fut
            submit()
            ids += cid
            done += n
            await _store(up, rep, cid, blob, n, skipped)
            if progress is not None:
                progress(name, done, size)
    finally:
        for _, _, fut in window:
            await asyncio.gather(fut, return_exceptions=True)
    snap = VolumeSnap(name, size, view.block_size, chunk, bytes(ids),
                      epoch=getattr(view, "epoch", None), point_time=getattr(view, "time", None),
                      fingerprints=fps or b"")
    return snap, rep


async def _store(up: _Uploader, rep: VolumeReport, cid: bytes, blob: bytes | None, n: int,
                 skipped: bool) -> None:
    """Count one chunk of `n` bytes in `rep`; a new one (not zero, not stored yet) is uploaded."""
    rep.chunks += 1
    rep.unread_chunks += skipped
    if cid == ZERO_ID:
        rep.zero_chunks += 1
    elif blob is not None and not up.has(cid):
        rep.new_chunks += 1
        rep.new_bytes += n
        rep.stored_bytes += len(blob)
        await up.add(cid, blob, n)


async def _archive_files(repo: Repository, up: _Uploader, data_dir: Path, opts: Options
                         ) -> list[dict[str, Any]]:
    """The newest version of every file of every protected file set, stored as chunks."""
    from cdp.replica.files import FileSets, iter_latest

    out: list[dict[str, Any]] = []
    sets = FileSets(data_dir)
    for name in sets.names():
        store = sets.existing(name)
        for v in iter_latest(store):
            if v.deleted:
                continue
            data = await asyncio.to_thread(store.content, v)
            ids = []
            for off in range(0, max(len(data), 1), opts.chunk_size):
                piece = data[off:off + opts.chunk_size]
                cid = repo.keys.chunk_id(piece) if repo.keys.encrypted else xxhash.xxh3_128_digest(piece)
                if not up.has(cid):
                    blob = await asyncio.to_thread(encode_blob, repo.keys, cid, piece,
                                                   opts.compress_level)
                    await up.add(cid, blob, len(piece))
                ids.append(cid)
            out.append({"set": name, "path": v.path, "version": v.version, "time": v.time,
                        "size": v.size, "mode": v.mode, "mtime": v.mtime, "hash": v.hash,
                        "chunks": ids})
    return out


async def backup(repo: Repository, volumes: Sequence[tuple[str, Callable[[], PointReader]]],
                 opts: Options, progress: Progress | None = None, *, lock_wait: float = 0.0,
                 data_dir: Path | None = None) -> RunReport:
    """Archive the given volumes into one snapshot (engine entry; the caller opened `repo`)."""
    t0 = time.monotonic()
    report = RunReport(repository=repo.url, archive=opts.archive)
    held = await locks.lock(repo, exclusive=False, wait=lock_wait)
    try:
        await repo.load_index()
        report.adopted_packs = len(repo.orphans)
        up = _Uploader(repo, opts, held)
        history = await repo.snapshots() if opts.use_hash_map else []
        snaps = []
        try:
            for name, opener in volumes:
                view = await asyncio.to_thread(opener)
                try:
                    snap, vr = await _archive_volume(repo, up, name, view, opts, progress, history)
                finally:
                    view.close()
                snaps.append(snap)
                report.volumes.append(vr)
            files = await _archive_files(repo, up, data_dir, opts) if data_dir is not None else []
            report.files = len(files)
            await up.finish()
        except BaseException:
            for t in list(up.tasks):
                t.cancel()
            await asyncio.gather(*up.tasks, return_exceptions=True)
            raise
        report.packs_uploaded, report.bytes_uploaded = up.uploaded, up.bytes
        fresh = up.new_packs + [p for p in repo.orphans if p in repo.pack_entries]
        if fresh:
            await repo.write_index(dict.fromkeys(fresh))
        manifest = Manifest(time.time(), socket.gethostname(), opts.archive, snaps, files=files)
        report.snapshot = await repo.write_snapshot(manifest)
    finally:
        await held.release()
    report.seconds = time.monotonic() - t0
    log.info("archive snapshot=%s volumes=%d uploaded=%d packs (%d bytes) in %.1fs", report.snapshot[:8],
             len(report.volumes), report.packs_uploaded, report.bytes_uploaded, report.seconds)
    return report


def archive_volumes(cfg: ReceiverConfig, a: ArchiveConfig, only: Sequence[str] | None) -> list[str]:
    """The volumes an archive covers: its `volumes`, else every client's, else those in data_dir."""
    names = list(a.volumes) or list(dict.fromkeys(v for c in cfg.clients for v in c.volumes))
    if not names and cfg.data_dir.is_dir():
        names = sorted(p.name for p in cfg.data_dir.iterdir() if (p / "image").exists())
    if only:
        unknown = [v for v in only if v not in names]
        if unknown:
            raise ConfigError(f"archive {a.name}: volume {unknown[0]!r} is not one it covers "
                              f"({', '.join(names) or 'none'})")
        names = list(only)
    if not names:
        raise ConfigError(f"{cfg.path}: archive {a.name}: no volumes to archive")
    return names


def pick_archive(cfg: ReceiverConfig, name: str | None) -> ArchiveConfig:
    if not cfg.archives:
        raise ConfigError(f"{cfg.path}: no [[archive]] table; add one (see docs/archives.md)")
    if name is None:
        if len(cfg.archives) > 1:
            raise ConfigError(f"{cfg.path}: several archives ({', '.join(a.name for a in cfg.archives)}); "
                              "choose one with --archive NAME")
        return cfg.archives[0]
    a = cfg.archive(name)
    if a is None:
        raise ConfigError(f"{cfg.path}: no archive named {name!r} "
                          f"(have {', '.join(x.name for x in cfg.archives)})")
    return a


def run_archive(cfg: ReceiverConfig, archive_name: str | None, volumes: Sequence[str] | None = None,
                progress: Progress | None = None, *, opener: Opener | None = None,
                lock_wait: float = 0.0, full_read: bool = False) -> RunReport:
    """One archive job: snapshot the archive's volumes (blocking; call from a thread in a daemon).

    full_read: read every chunk, even those the replica's hash map shows unchanged.
    """
    a = pick_archive(cfg, archive_name)
    names = archive_volumes(cfg, a, volumes)
    open_view = opener or open_replica

    async def main() -> RunReport:
        repo = await open_repo(a)
        jobs = [(n, (lambda n=n: open_view(cfg.data_dir, n))) for n in names]
        opts = Options.of(a)
        opts.use_hash_map = not full_read
        return await backup(repo, jobs, opts, progress, lock_wait=lock_wait, data_dir=cfg.data_dir)

    return run_sync(main())


def due(archive_cfg: ArchiveConfig, last_run_time: float | None, now: float) -> bool:
    """Whether the archive's schedule wants a run now (last_run_time None: never ran)."""
    return is_due(parse_schedule(archive_cfg.schedule), last_run_time, now)


def file_opener(paths: dict[str, Path], block_size: int = 64 * 1024) -> Opener:
    """An opener reading plain image files (tests, and archiving images outside a receiver)."""
    from cdp.archive.view import FileView

    def open_(_data_dir: Path, volume: str) -> PointReader:
        p = paths.get(volume)
        if p is None:
            raise ArchiveError(f"no image for volume {volume!r}")
        return FileView(p, block_size, epoch=0, time=os.stat(p).st_mtime)

    return open_
