"""An archive repository: config, key, index, snapshots and chunk reads over one backend.

Layout (object names; the same in a directory and under an S3 prefix)::

    config              msgpack, plain but authenticated (see RepoConfig)
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

Whoever can write the bucket is not trusted. The config object says whether
the repository is encrypted and how (``params``: cipher, chunk-id scheme, pack
format); receiver.toml says whether it must be. An open refuses, before it
writes anything, a repository that is not encrypted when receiver.toml has
encrypt = true, a config whose MAC (HMAC-SHA256 with a key derived from the
master key) does not match, a key file of another repository, and parameters
it does not know. Config format 1 (written before the MAC) is still read: all
it says is checked anyway (encrypted must match receiver.toml, its id is
bound to the key file by the key wrap, its parameters are those of format 1)
and it is left as it is, so older cdp versions keep reading the repository.
A bucket writer can still delete objects (verify reports what is missing)
and roll objects back to older authentic versions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
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
from cdp.archive.crypto import ID_LEN, ZERO_ID, Keys, TamperedError
from cdp.archive.pack import Entry
from cdp.durable import make_private_dir
from cdp.errors import ArchiveAccessError, ArchiveCorruptError, ArchiveError, UsageError

log = logging.getLogger(__name__)

FORMAT = 1  # of index files and manifests
CONFIG_FORMAT = 2  # of the config object; 1 (no params, no MAC) is still read
CONFIG_MAX = 4096  # a config is ~200 bytes
SEALED_MAX = 1 << 30  # an index file or manifest; bounds what a replaced object can make us hold
ENCRYPTED_PARAMS: dict[str, str | int] = {"cipher": "aes-256-gcm", "ids": "hmac-sha256-xxh3-128",
                                          "pack": 1}
PLAIN_PARAMS: dict[str, str | int] = {"cipher": "none", "ids": "xxh3-128", "pack": 1}
READ_CONCURRENCY = 8
HEX = "0123456789abcdef"
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


@dataclass(frozen=True)
class RepoConfig:
    """The config object: msgpack map {v, id, encrypted, created, params, mac}.

    `mac` = HMAC-SHA256(config key, signed()) for an encrypted repository and
    None otherwise (there is no key to make one with, and nothing to protect).
    Format 1 configs have only v, id, encrypted and created.
    """

    version: int
    id: str
    encrypted: bool
    created: float
    params: dict[str, str | int]
    mac: bytes | None = None

    def signed(self) -> bytes:
        """The canonical bytes the MAC covers: every field but the MAC, in a fixed order."""
        return msgpack.packb([b"cdp-archive config", self.version, self.id, self.encrypted,
                              float(self.created), sorted(self.params.items())])

    def encode(self) -> bytes:
        return msgpack.packb({"v": self.version, "id": self.id, "encrypted": self.encrypted,
                              "created": self.created, "params": self.params, "mac": self.mac})


def parse_config(raw: bytes, where: str) -> RepoConfig:
    """A config object's fields, each type-checked (not yet authenticated: see Repository.open).

    Malformed: ArchiveCorruptError; a format this cdp does not know: ArchiveAccessError.
    """
    try:
        if len(raw) > CONFIG_MAX:
            raise ValueError(f"{len(raw)} bytes, more than a config can be")
        d = msgpack.unpackb(raw, raw=False, max_bin_len=CONFIG_MAX, max_str_len=CONFIG_MAX)
        if not isinstance(d, dict):
            raise ValueError("not a map")
        version = d.get("v")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError("no format version")
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise ArchiveCorruptError(f"{where}: config is unreadable: {exc}") from None
    if version not in (1, CONFIG_FORMAT):
        raise ArchiveAccessError(f"{where}: repository format {version} is not supported by this cdp "
                                 f"(knows 1-{CONFIG_FORMAT}); upgrade cdp")
    try:
        repo_id, encrypted, created = d.get("id"), d.get("encrypted"), d.get("created", 0.0)
        if not isinstance(repo_id, str) or len(repo_id) != 32 or repo_id.strip(HEX):
            raise ValueError("id is not a repository id (32 hex digits)")
        if not isinstance(encrypted, bool):
            raise ValueError("encrypted is not true or false")
        if not isinstance(created, float | int) or isinstance(created, bool):
            raise ValueError("created is not a time")
        if version == 1:  # what format 1 means; it had no MAC
            return RepoConfig(version, repo_id, encrypted, float(created),
                              dict(ENCRYPTED_PARAMS if encrypted else PLAIN_PARAMS))
        params, mac = d.get("params"), d.get("mac")
        if not isinstance(params, dict) or len(params) > 16 or not all(
                isinstance(k, str) and isinstance(v, str | int) and not isinstance(v, bool)
                for k, v in params.items()):
            raise ValueError("params is not a map of names to values")
        if mac is not None and (not isinstance(mac, bytes) or len(mac) != 32):
            raise ValueError("mac is not 32 bytes")
        return RepoConfig(version, repo_id, encrypted, float(created), params, mac)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ArchiveCorruptError(f"{where}: config is unreadable: {exc}") from None


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
                make_private_dir(backend.root)
            except OSError as exc:
                raise ArchiveAccessError(f"{backend.url}: cannot create: {exc.strerror}") from None
        if await backend.exists("config"):
            raise ArchiveAccessError(f"{backend.url}: a repository is already there; nothing changed")
        if await backend.exists("key"):
            raise ArchiveAccessError(
                f"{backend.url}: a key file is there but no config (an interrupted init, or a "
                "damaged repository whose key must not be overwritten); nothing changed: restore "
                "`config`, or remove `key` if nothing else is there")
        repo_id = uuid.uuid4().hex
        keys = crypto.PLAIN
        if password is not None:
            key_file, keys = crypto.new_key_file(password, repo_id, n=kdf_n)
            await backend.put("key", key_file, create=True)
        cfg = RepoConfig(CONFIG_FORMAT, repo_id, password is not None, time.time(),
                         dict(ENCRYPTED_PARAMS if password is not None else PLAIN_PARAMS))
        if keys.encrypted:
            cfg = dataclasses.replace(cfg, mac=keys.mac(cfg.signed()))
        try:
            await backend.put("config", cfg.encode(), create=True)
        except ObjectExists:
            raise ArchiveAccessError(f"{backend.url}: a repository is already there") from None
        return cls(backend, keys, repo_id)

    @classmethod
    async def open(cls, backend: Backend, password: bytes | None) -> Repository:
        """Open and unlock; writes nothing. Missing, unreachable or wrong password: ArchiveAccessError.

        `password` is None exactly when receiver.toml says encrypt = false; with
        a password the repository must be encrypted, whatever its config says
        (TamperedError otherwise), because the config is in the bucket.
        """
        try:
            raw = await backend.get("config", limit=CONFIG_MAX)
        except ObjectMissing:
            raise ArchiveAccessError(
                f"{backend.url}: no archive repository here; create it with `cdp archive init`"
            ) from None
        except (ArchiveAccessError, ArchiveCorruptError):
            raise
        except ArchiveError as exc:
            raise ArchiveAccessError(f"cannot open the repository: {exc}") from None
        cfg = parse_config(raw, backend.url)
        if not cfg.encrypted:
            if password is not None:
                raise TamperedError(
                    f"{backend.url}: the repository's config says it is not encrypted, but receiver.toml "
                    "has encrypt = true: refusing to store or read anything in clear text. cdp never "
                    "makes an encrypted repository unencrypted, so someone who can write the repository "
                    "has altered its config; nothing was written. Restore `config` from a copy, or "
                    "create a new repository elsewhere")
            cls._check_params(cfg, PLAIN_PARAMS, backend.url)
            return cls(backend, crypto.PLAIN, cfg.id)
        if password is None:
            raise ArchiveAccessError(f"{backend.url}: the repository is encrypted; set password_file")
        try:
            key_file = await backend.get("key", limit=crypto.KEY_FILE_MAX)
        except ObjectMissing:
            raise ArchiveCorruptError(f"{backend.url}: the key file is missing; restore `key` from "
                                      "your copy of it") from None
        keys = await asyncio.to_thread(crypto.unlock, key_file, password, cfg.id, backend.url)
        if cfg.version >= 2:
            if cfg.mac is None or not hmac.compare_digest(cfg.mac, keys.mac(cfg.signed())):
                raise TamperedError(
                    f"{backend.url}: the repository's config does not authenticate with its key: "
                    "someone who can write the repository altered it; nothing was written. Restore "
                    "`config` from a copy")
        else:
            log.debug("%s: config format 1 (no MAC): encrypted, and bound to the key by its id",
                      backend.url)
        cls._check_params(cfg, ENCRYPTED_PARAMS, backend.url)
        return cls(backend, keys, cfg.id)

    @staticmethod
    def _check_params(cfg: RepoConfig, known: dict[str, str | int], where: str) -> None:
        if cfg.params != known:
            raise ArchiveAccessError(f"{where}: the repository uses {cfg.params} where this cdp knows "
                                     f"only {known}; upgrade cdp")

    # -- sealed objects ---------------------------------------------------------

    async def _put_sealed(self, prefix: str, raw: bytes, aad: bytes) -> str:
        blob = self.keys.seal(raw, aad)
        name = hashlib.sha256(blob).hexdigest()
        await self.backend.put(f"{prefix}/{name}", blob)
        return name

    async def _get_sealed(self, prefix: str, name: str, aad: bytes, what: str) -> bytes:
        blob = await self.backend.get(f"{prefix}/{name}", limit=SEALED_MAX)
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
