"""The receiver's store of file sets: every version of every file, content-addressed.

Layout of ``<data_dir>/_files/<fileset>/``::

    blobs/<h[:2]>/<h>.zst   one zstd frame per distinct content; h = xxh3-128 hex of the
                            raw content; written to a temp name, fsync'd, renamed, dir fsync'd
    log/<p>.jsonl           the version log of one file, p = xxh3-128 hex of its path;
                            one JSON object per line, appended and fsync'd:
                            {"path", "version" (1, 2, ...), "time" (read at the source),
                             "stored" (receiver clock), "hash", "size", "mtime", "mode",
                             "deleted"}

A version is durable (blob, then log line, each fsync'd) before the receiver
acknowledges it. A torn last line (a crash mid-append) was never acknowledged
and is ignored on reading. ``path`` is relative to the set root: the source's
absolute path without its leading "/" (see cdp/source/filesets.py).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import xxhash

from cdp.codec import compressed_digest, decompress
from cdp.durable import atomic_write, fsync_dir, make_private_dir
from cdp.errors import CdpError, DiskFullError, ReplicaError, UsageError

log = logging.getLogger(__name__)
FILES_DIR = "_files"


@dataclass(frozen=True)
class Version:
    path: str
    version: int
    time: float
    stored: float
    hash: str  # hex; "" for a deletion
    size: int
    mtime: float
    mode: int
    deleted: bool


class FileVersionError(CdpError):
    """A stored version does not check out (missing blob, wrong hash): the store needs repair."""


class FileTooLarge(ReplicaError):
    """A source sent a file bigger than this receiver takes; the file is refused, the set goes on."""

    wire_code = "too_big"


DEFAULT_MAX_FILE = 32 * 1024 * 1024  # the receiver's default max_frame: what one FilePut can carry


def files_root(data_dir: Path) -> Path:
    return data_dir / FILES_DIR


def _path_key(path: str) -> str:
    return xxhash.xxh3_128_hexdigest(path.encode("utf-8", "surrogateescape"))


class FilesetStore:
    """One file set's versions; safe to use from several threads of one process."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.root.name

    def _blob(self, digest: str) -> Path:
        return self.root / "blobs" / digest[:2] / f"{digest}.zst"

    def _log(self, path: str) -> Path:
        return self.root / "log" / f"{_path_key(path)}.jsonl"

    # -- reading -------------------------------------------------------------

    def versions(self, path: str) -> list[Version]:
        return _read_log(self._log(path))

    def latest(self) -> dict[str, Version]:
        """The newest version of every file the set ever had (deletions included)."""
        out: dict[str, Version] = {}
        d = self.root / "log"
        if not d.is_dir():
            return out
        for f in sorted(d.glob("*.jsonl")):
            vs = _read_log(f)
            if vs:
                out[vs[-1].path] = vs[-1]
        return out

    def content(self, v: Version) -> bytes:
        """The bytes of version `v`, checked against its hash."""
        if v.deleted:
            raise UsageError(f"version {v.version} of {v.path} records its deletion: there is "
                             "nothing to restore; pick another version")
        try:
            blob = self._blob(v.hash).read_bytes()
            data = decompress(blob, v.size)
        except (OSError, CdpError) as exc:
            raise FileVersionError(f"{self.name}/{v.path} version {v.version}: stored content "
                                   f"unreadable ({exc})") from None
        if xxhash.xxh3_128_hexdigest(data) != v.hash:
            raise FileVersionError(f"{self.name}/{v.path} version {v.version}: stored content "
                                   "does not match its hash")
        return data

    # -- writing (the receiver) ----------------------------------------------

    def put(self, path: str, digest: bytes, size: int, mtime: float, mode: int, when: float,
            zdata: bytes, max_size: int = DEFAULT_MAX_FILE) -> int:
        """Store a new version after checking it; returns its number. Durable on return.

        The size a source claims is checked against `max_size` before anything is
        decompressed, and the content is hashed as a stream: what is stored is the compressed
        blob as it came, so a small frame claiming a huge file costs no memory."""
        if size > max_size:
            raise FileTooLarge(f"{self.name}/{path}: {size} bytes, over the receiver's limit of "
                               f"{max_size} (its max_frame); the source's max_file_size should be "
                               "below that")
        # RemoteProtocolError if it does not hold exactly `size` bytes
        if compressed_digest(zdata, size) != digest:
            raise ReplicaError(f"{self.name}/{path}: content does not match its hash; the "
                               "source will send it again")
        hexd = digest.hex()
        with self._lock:
            prev = self.versions(path)
            if prev and not prev[-1].deleted and prev[-1].hash == hexd and prev[-1].mode == mode \
                    and prev[-1].mtime == mtime:
                return prev[-1].version  # the same version again (an unacknowledged resend)
            blob = self._blob(hexd)
            if not blob.exists():
                _write_durably(blob, zdata)
            return self._append(path, prev, Version(
                path, len(prev) + 1, when, time.time(), hexd, size, mtime, mode, False))

    def delete(self, path: str, when: float) -> int:
        with self._lock:
            prev = self.versions(path)
            if not prev or prev[-1].deleted:
                return prev[-1].version if prev else 0
            return self._append(path, prev, Version(
                path, len(prev) + 1, when, time.time(), "", 0, 0.0, 0, True))

    def _append(self, path: str, prev: list[Version], v: Version) -> int:
        f = self._log(path)
        line = (json.dumps(asdict(v), separators=(",", ":")) + "\n").encode()
        try:
            make_private_dir(f.parent)
            fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                if prev and f.stat().st_size and not _ends_with_newline(f):
                    os.write(fd, b"\n")  # after a torn line: start a fresh one
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            if not prev:
                fsync_dir(f.parent)
        except OSError as exc:
            raise _store_error(exc, f) from None
        return v.version


def _ends_with_newline(f: Path) -> bool:
    with open(f, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def _store_error(exc: OSError, where: Path) -> ReplicaError:
    if exc.errno in (28, 122):  # ENOSPC, EDQUOT
        return DiskFullError(f"no space left to store {where}")
    return ReplicaError(f"cannot write {where}: {exc.strerror}")


def _write_durably(dest: Path, data: bytes) -> None:
    try:
        make_private_dir(dest.parent)
        atomic_write(dest, data)
    except OSError as exc:
        raise _store_error(exc, dest) from None


def _read_log(f: Path) -> list[Version]:
    try:
        raw = f.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ReplicaError(f"cannot read {f}: {exc.strerror}") from None
    out: list[Version] = []
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            out.append(Version(**json.loads(line)))
        except (ValueError, TypeError):
            continue  # a torn line: never acknowledged
    return out


class FileSets:
    """The file sets under one data_dir, each opened once per process."""

    def __init__(self, data_dir: Path) -> None:
        self.root = files_root(data_dir)
        self._stores: dict[str, FilesetStore] = {}
        self._lock = threading.Lock()

    def open(self, name: str) -> FilesetStore:
        with self._lock:
            st = self._stores.get(name)
            if st is None:
                st = self._stores[name] = FilesetStore(self.root / name)
            return st

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(d.name for d in self.root.iterdir() if d.is_dir())

    def existing(self, name: str) -> FilesetStore:
        """A set that has something stored; UsageError (exit 2) otherwise."""
        if name not in self.names():
            known = ", ".join(self.names()) or "none yet"
            raise UsageError(f"no file set {name!r} in {self.root} (known: {known})")
        return self.open(name)


def iter_latest(store: FilesetStore, prefix: str = "") -> Iterator[Version]:
    """Newest versions of files whose path is `prefix` or under it, sorted by path."""
    prefix = prefix.strip("/")
    for path, v in sorted(store.latest().items()):
        if not prefix or path == prefix or path.startswith(prefix + "/"):
            yield v
