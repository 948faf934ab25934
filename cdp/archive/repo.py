"""An archive repository: config, key, index, snapshots and chunk reads over one backend.

Layout (object names; the same in a directory and under an S3 prefix)::

    config              msgpack, plain: format version, repository id, encrypted or not
    key                 the master key wrapped with the password (crypto.py); absent if unencrypted
    data/<xx>/<sha256>  pack files (pack.py), named by the hash of their content
    index/<sha256>      sealed msgpack {"packs": {pack: [[chunk id, offset, length, raw length]]}}
    snapshots/<sha256>  sealed msgpack manifests (see Manifest), written last
    locks/<uuid>        sealed msgpack {host, pid, time, exclusive} (lock.py)

Write order makes every crash safe: packs first, then an index file naming
them, then the manifest that references their chunks. A pack that no index
names (a run died before writing its index) is found by listing data/ and
reading its trailer, so its chunks are used, not uploaded again. Prune
deletes packs only after writing the index that no longer names them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack

import cdp.archive.crypto as crypto
import cdp.archive.pack as pack
from cdp.archive.backend import Backend, LocalBackend, ObjectExists, ObjectMissing
from cdp.archive.crypto import ID_LEN, ZERO_ID, Keys
from cdp.archive.pack import Entry
from cdp.errors import ArchiveAccessError, ArchiveCorruptError, ArchiveError, UsageError

log = logging.getLogger(__name__)

FORMAT = 1
READ_CONCURRENCY = 8
T = TypeVar("T")


async def gather_limited(aws: Iterable[Awaitable[T]], limit: int = READ_CONCURRENCY) -> list[T]:
    """asyncio.gather with at most `limit` awaiting at once."""
    sem = asyncio.Semaphore(limit)

    async def one(aw: Awaitable[T]) -> T:
        async with sem:
            return await aw

    return list(await asyncio.gather(*(one(a) for a in aws)))


@dataclass
class VolumeSnap:
    """One volume in a snapshot: geometry, where the image came from and its chunk ids."""

    volume: str
    size: int
    block_size: int
    chunk_size: int
    chunks: bytes  # ID_LEN bytes per chunk; ZERO_ID = all zeros, not stored
    epoch: int | None = None
    point_time: float | None = None
    files: list[Any] = field(default_factory=list)  # file-set files (hook; empty for now)
    fingerprints: bytes = b""  # per chunk, xxh3-128 of the replica's block hashes (job.fingerprints)

    def ids(self) -> list[bytes]:
        return [self.chunks[i:i + ID_LEN] for i in range(0, len(self.chunks), ID_LEN)]

    @property
    def count(self) -> int:
        return len(self.chunks) // ID_LEN


@dataclass
class Manifest:
    """A snapshot: the volumes one run archived, and when and where from."""

    time: float
    hostname: str
    archive: str
    volumes: list[VolumeSnap]
    id: str = ""  # object name hash, filled in when read or written
    # protected file sets, newest version of each file: {set, path, version, time, size, mode,
    # mtime, hash (xxh3-128 hex of the content), chunks (ids, chunk_size bytes each but the last)}
    files: list[dict[str, Any]] = field(default_factory=list)

    @property
    def short(self) -> str:
        return self.id[:8]

    def volume(self, name: str) -> VolumeSnap | None:
        return next((v for v in self.volumes if v.volume == name), None)

    def chunk_users(self) -> Iterator[tuple[str, bytes]]:
        """(what, chunk id) for every stored chunk this snapshot needs: its volumes' and its files'."""
        for v in self.volumes:
            for cid in set(v.ids()):
                if cid != ZERO_ID:
                    yield v.volume, cid
        for f in self.files:
            for cid in f["chunks"]:
                yield f"{f['set']}:{f['path']}", bytes(cid)

    def encode(self) -> bytes:
        return msgpack.packb({"v": FORMAT, "time": self.time, "hostname": self.hostname,
                              "archive": self.archive, "volumes": [vars(v) for v in self.volumes],
                              "files": self.files})

    @classmethod
    def decode(cls, raw: bytes, sid: str) -> Manifest:
        try:
            d = msgpack.unpackb(raw, raw=False, max_bin_len=1 << 30)
            vols = [VolumeSnap(**v) for v in d["volumes"]]
            for v in vols:
                if len(v.chunks) % ID_LEN or v.count * v.chunk_size < v.size:
                    raise ValueError(f"volume {v.volume}: chunk list does not cover the volume")
            files = list(d.get("files", []))
            for f in files:
                if not isinstance(f, dict) or not {"set", "path", "size", "chunks"} <= f.keys():
                    raise ValueError("a file-set entry lacks set, path, size or chunks")
            return cls(float(d["time"]), str(d["hostname"]), str(d["archive"]), vols, sid, files)
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
            raise ArchiveCorruptError(f"snapshot {sid[:8]}: manifest is malformed: {exc}") from None


class Repository:
    """An opened (unlocked) repository. Loads the index on demand."""

    def __init__(self, backend: Backend, keys: Keys, repo_id: str) -> None:
        self.backend = backend
        self.keys = keys
        self.id = repo_id
        self.index: dict[bytes, Entry] = {}
        self.pack_entries: dict[str, list[tuple[bytes, Entry]]] = {}
        self.pack_sizes: dict[str, int] = {}
        self.pack_mtimes: dict[str, float] = {}
        self.index_files: list[str] = []
        self.orphans: list[str] = []  # packs no index file names (a run died before its index)

    @property
    def url(self) -> str:
        return self.backend.url

    # -- creating and opening --------------------------------------------------

    @classmethod
    async def init(cls, backend: Backend, password: bytes | None, *, kdf_n: int = crypto.SCRYPT_N
                   ) -> Repository:
        """Create a repository; encrypted unless `password` is None."""
        if isinstance(backend, LocalBackend):
            try:
                backend.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ArchiveAccessError(f"{backend.url}: cannot create: {exc.strerror}") from None
        if await backend.exists("config"):
            raise ArchiveAccessError(f"{backend.url}: a repository is already there; nothing changed")
        repo_id = uuid.uuid4().hex
        keys = crypto.PLAIN
        if password is not None:
            key_file, keys = crypto.new_key_file(password, repo_id, n=kdf_n)
            await backend.put("key", key_file)
        cfg = msgpack.packb({"v": FORMAT, "id": repo_id, "encrypted": password is not None,
                             "created": time.time()})
        try:
            await backend.put("config", cfg, create=True)
        except ObjectExists:
            raise ArchiveAccessError(f"{backend.url}: a repository is already there") from None
        return cls(backend, keys, repo_id)

    @classmethod
    async def open(cls, backend: Backend, password: bytes | None) -> Repository:
        """Open and unlock; writes nothing. Missing, unreachable or wrong password: ArchiveAccessError."""
        try:
            raw = await backend.get("config")
        except ObjectMissing:
            raise ArchiveAccessError(
                f"{backend.url}: no archive repository here; create it with `cdp archive init`"
            ) from None
        except ArchiveAccessError:
            raise
        except ArchiveError as exc:
            raise ArchiveAccessError(f"cannot open the repository: {exc}") from None
        try:
            cfg = msgpack.unpackb(raw, raw=False, max_bin_len=1024, max_str_len=1024)
            repo_id, encrypted, version = str(cfg["id"]), bool(cfg["encrypted"]), int(cfg["v"])
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
            raise ArchiveCorruptError(f"{backend.url}: config is unreadable: {exc}") from None
        if version != FORMAT:
            raise ArchiveAccessError(f"{backend.url}: repository format {version} is not supported "
                                     f"by this cdp (knows {FORMAT}); upgrade cdp")
        if not encrypted:
            return cls(backend, crypto.PLAIN, repo_id)
        if password is None:
            raise ArchiveAccessError(f"{backend.url}: the repository is encrypted; set password_file")
        try:
            key_file = await backend.get("key")
        except ObjectMissing:
            raise ArchiveCorruptError(f"{backend.url}: the key file is missing") from None
        keys = await asyncio.to_thread(crypto.unlock, key_file, password, repo_id, backend.url)
        return cls(backend, keys, repo_id)

    # -- sealed objects ---------------------------------------------------------

    async def _put_sealed(self, prefix: str, raw: bytes, aad: bytes) -> str:
        blob = self.keys.seal(raw, aad)
        name = hashlib.sha256(blob).hexdigest()
        await self.backend.put(f"{prefix}/{name}", blob)
        return name

    async def _get_sealed(self, prefix: str, name: str, aad: bytes, what: str) -> bytes:
        blob = await self.backend.get(f"{prefix}/{name}")
        return self.keys.open(blob, aad, what)

    # -- index ------------------------------------------------------------------

    async def load_index(self) -> None:
        """Every index file, plus the trailers of packs no index file names."""
        self.index.clear()
        self.pack_entries.clear()
        listed = await self.backend.ls("data/")
        self.pack_sizes = {o.name.rsplit("/", 1)[-1]: o.size for o in listed}
        self.pack_mtimes = {o.name.rsplit("/", 1)[-1]: o.mtime for o in listed}
        self.index_files = [o.name.rsplit("/", 1)[-1] for o in await self.backend.ls("index/")]
        bodies = await gather_limited(
            self._get_sealed("index", n, b"index", f"index file {n[:8]}") for n in self.index_files)
        for n, raw in zip(self.index_files, bodies, strict=True):
            try:
                d = msgpack.unpackb(raw, raw=False, max_bin_len=ID_LEN)
                for p, items in d["packs"].items():
                    if p in self.pack_entries:
                        continue
                    self._add_pack(p, [(cid, Entry(p, off, ln, rl)) for cid, off, ln, rl in items])
            except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
                raise ArchiveCorruptError(f"index file {n[:8]} is malformed: {exc}") from None
        self.orphans = sorted(set(self.pack_sizes) - set(self.pack_entries))
        results = await gather_limited(self._read_trailer(p) for p in self.orphans)
        for p, entries in zip(self.orphans, results, strict=True):
            if entries is not None:
                self._add_pack(p, entries)
        if self.orphans:
            log.info("found %d pack(s) no index names (an interrupted run); their chunks are used",
                     len(self.orphans))

    def _add_pack(self, name: str, entries: list[tuple[bytes, Entry]]) -> None:
        self.pack_entries[name] = entries
        for cid, e in entries:
            self.index.setdefault(cid, e)

    async def _read_trailer(self, name: str) -> list[tuple[bytes, Entry]] | None:
        size = self.pack_sizes[name]
        try:
            obj = pack.pack_name(name)
            if size < len(pack.MAGIC) + pack.TAIL:
                raise ArchiveCorruptError(f"pack {name[:8]} is truncated")
            off, n = pack.trailer_span(await self.backend.get_range(obj, size - pack.TAIL, pack.TAIL),
                                       size, f"pack {name[:8]}")
            return pack.parse_trailer(self.keys, name, await self.backend.get_range(obj, off, n), size)
        except ArchiveCorruptError as exc:
            log.warning("ignoring unreadable pack %s: %s", name[:8], exc)
            return None

    async def write_index(self, packs: Iterable[str]) -> str:
        """An index file naming these packs (with all their entries); returns its name."""
        body = {"v": FORMAT, "packs": {p: [[cid, e.offset, e.length, e.raw_length]
                                           for cid, e in self.pack_entries[p]] for p in packs}}
        name = await self._put_sealed("index", msgpack.packb(body), b"index")
        self.index_files.append(name)
        return name

    async def put_pack(self, name: str, data: bytes, entries: list[tuple[bytes, int, int, int]]) -> bool:
        """Store a sealed pack unless the same pack is already there; True if uploaded."""
        uploaded = False
        if name not in self.pack_sizes:
            await self.backend.put(pack.pack_name(name), data)
            uploaded = True
        self.pack_sizes[name] = len(data)
        self.pack_mtimes[name] = time.time()
        self._add_pack(name, [(cid, Entry(name, o, ln, rl)) for cid, o, ln, rl in entries])
        return uploaded

    async def read_chunk(self, cid: bytes, size: int) -> bytes:
        """The plain bytes of a chunk, checked against its id."""
        if cid == ZERO_ID:
            return bytes(size)
        e = self.index.get(cid)
        if e is None:
            raise ArchiveCorruptError(f"chunk {cid.hex()} is not in the index: the repository lost "
                                      "it; run `cdp archive verify`")
        try:
            blob = await self.backend.get_range(pack.pack_name(e.pack), e.offset, e.length)
        except ObjectMissing:
            raise ArchiveCorruptError(f"chunk {cid.hex()}: pack {e.pack[:8]} is missing") from None
        return await asyncio.to_thread(pack.decode_blob, self.keys, cid, blob, e.raw_length)

    # -- snapshots -------------------------------------------------------------

    async def snapshots(self) -> list[Manifest]:
        """All snapshots, oldest first."""
        names = [o.name.rsplit("/", 1)[-1] for o in await self.backend.ls("snapshots/")]
        raws = await gather_limited(self._get_sealed("snapshots", n, b"snapshot", f"snapshot {n[:8]}")
                                    for n in names)
        snaps = [Manifest.decode(r, n) for n, r in zip(names, raws, strict=True)]
        return sorted(snaps, key=lambda m: (m.time, m.id))

    async def write_snapshot(self, m: Manifest) -> str:
        m.id = await self._put_sealed("snapshots", m.encode(), b"snapshot")
        return m.id

    async def delete_snapshot(self, sid: str) -> None:
        await self.backend.delete(f"snapshots/{sid}")

    async def find_snapshot(self, ref: str) -> Manifest:
        """A snapshot by id prefix, or 'latest'."""
        snaps = await self.snapshots()
        if ref == "latest":
            if not snaps:
                raise ArchiveError(f"{self.url}: no snapshots yet; run `cdp archive run`")
            return snaps[-1]
        hits = [s for s in snaps if s.id.startswith(ref.lower())] if ref else []
        if len(hits) != 1:
            why = "no" if not hits else "more than one"
            raise UsageError(f"{self.url}: {why} snapshot matches {ref!r}; see `cdp archive list`")
        return hits[0]
