"""Where a repository's objects live: a local (or mounted) directory, or S3-compatible storage.

One small async interface with one contract, which every backend passes in
the same conformance tests (tests/integration/test_archive_backends.py):

- names are relative, '/'-separated (``data/ab/abcd...``); a name never starts with '.';
- ``put`` is atomic: readers see the whole object or nothing (directory: temp + fsync +
  rename + directory fsync; S3: a single PUT); ``create=True`` fails with
  ObjectExists when the name is taken (``If-None-Match: *`` on S3, link(2) locally);
- ``get``/``get_range`` raise ObjectMissing for an absent object; ``get(name, limit=n)``
  raises ObjectTooLarge, without reading it, for an object larger than n bytes (small
  metadata objects come from an untrusted bucket and must not fill memory);
- ``ls(prefix)`` gives every object under the prefix with size and modification time;
- ``delete`` of an absent object is not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import gc
import os
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlparse

from cdp.durable import create_private, fsync_dir, make_private_dir
from cdp.errors import ArchiveAccessError, ArchiveCorruptError, ArchiveError

T = TypeVar("T")


class ObjectMissing(ArchiveError):
    """The named object is not in the repository."""


class ObjectExists(ArchiveError):
    """A create-only put found the name taken."""


class ObjectTooLarge(ArchiveCorruptError):
    """An object is larger than anything cdp writes under its name: it was replaced."""


def _too_large(url: str, name: str, size: int, limit: int) -> ObjectTooLarge:
    return ObjectTooLarge(f"{url}: {name} is {size} bytes, more than the {limit} cdp ever writes "
                          "there: it was not written by cdp; restore it from a copy")


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int
    mtime: float  # seconds since the epoch


class Backend(Protocol):
    url: str

    async def get(self, name: str, *, limit: int | None = None) -> bytes: ...
    async def get_range(self, name: str, offset: int, length: int) -> bytes: ...
    async def put(self, name: str, data: bytes, *, create: bool = False) -> None: ...
    async def ls(self, prefix: str) -> list[ObjectInfo]: ...
    async def delete(self, name: str) -> None: ...
    async def exists(self, name: str) -> bool: ...


class LocalBackend:
    """A directory; never created implicitly except by `init` (mkdir=True)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)

    def _path(self, name: str) -> Path:
        if not name or name.startswith(("/", ".")) or ".." in name.split("/"):
            raise ArchiveError(f"invalid object name {name!r}")
        return self.root / name

    def _err(self, op: str, name: str, exc: OSError) -> ArchiveError:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return ObjectMissing(f"{self.url}: {name}: no such object")
        return ArchiveError(f"{self.url}: cannot {op} {name}: {exc.strerror or exc}")

    async def get(self, name: str, *, limit: int | None = None) -> bytes:
        return await asyncio.to_thread(self._get, name, 0, -1, limit)

    async def get_range(self, name: str, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(self._get, name, offset, length)

    def _get(self, name: str, offset: int, length: int, limit: int | None = None) -> bytes:
        try:
            with open(self._path(name), "rb") as fh:
                if length < 0:
                    if limit is None:
                        return fh.read()
                    size = os.fstat(fh.fileno()).st_size
                    data = fh.read(limit + 1) if size <= limit else b""
                    if size > limit or len(data) > limit:
                        raise _too_large(self.url, name, max(size, len(data)), limit)
                    return data
                data = os.pread(fh.fileno(), length, offset)
        except OSError as exc:
            raise self._err("read", name, exc) from None
        if len(data) != length:
            raise ArchiveError(f"{self.url}: {name}: short read at {offset} (object truncated?)")
        return data

    async def put(self, name: str, data: bytes, *, create: bool = False) -> None:
        await asyncio.to_thread(self._put, name, data, create)

    def _put(self, name: str, data: bytes, create: bool) -> None:
        path = self._path(name)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            make_private_dir(path.parent)
            with create_private(tmp) as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if create:
                try:
                    os.link(tmp, path)  # atomic, and fails if the name is taken
                except FileExistsError:
                    raise ObjectExists(f"{self.url}: {name} already exists") from None
                finally:
                    os.unlink(tmp)
            else:
                os.replace(tmp, path)
            fsync_dir(path.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise self._err("write", name, exc) from None

    async def ls(self, prefix: str) -> list[ObjectInfo]:
        return await asyncio.to_thread(self._ls, prefix)

    def _ls(self, prefix: str) -> list[ObjectInfo]:
        base = self.root / prefix if prefix else self.root
        out: list[ObjectInfo] = []
        if not base.is_dir():
            if not self.root.is_dir():
                raise ArchiveAccessError(f"{self.url}: no such directory")
            return out
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for f in filenames:
                if f.startswith("."):
                    continue  # temp files of writes in progress or interrupted
                p = Path(dirpath) / f
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                out.append(ObjectInfo(p.relative_to(self.root).as_posix(), st.st_size, st.st_mtime))
        return out

    async def delete(self, name: str) -> None:
        await asyncio.to_thread(self._delete, name)

    def _delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._err("delete", name, exc) from None

    async def exists(self, name: str) -> bool:
        return await asyncio.to_thread(self._path(name).exists)

    def clean_temp(self, older_than: float) -> int:
        """Remove temp files left by interrupted writes (prune calls it); returns how many."""
        n = 0
        for dirpath, _dirs, filenames in os.walk(self.root):
            for f in filenames:
                p = Path(dirpath) / f
                if f.startswith(".") and f.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        if p.stat().st_mtime < older_than:
                            p.unlink()
                            n += 1
        return n


class S3Backend:
    """An S3 bucket and prefix through obstore (async, concurrent, retried)."""

    def __init__(self, bucket: str, prefix: str, endpoint: str | None) -> None:
        try:
            from obstore.store import S3Store
        except ImportError:
            raise ArchiveAccessError("S3 repositories need obstore: pip install obstore") from None

        self.url = f"s3://{bucket}/{prefix}".rstrip("/")
        where = f" at {endpoint}" if endpoint else ""
        self.where = f"{self.url}{where}"
        kw: dict[str, Any] = {}
        if endpoint:
            kw["endpoint"] = endpoint
            kw["allow_http"] = endpoint.startswith("http://")
            kw["virtual_hosted_style_request"] = False
        if not os.environ.get("AWS_REGION") and not os.environ.get("AWS_DEFAULT_REGION"):
            kw["region"] = "us-east-1"
        self.store = S3Store(
            bucket, prefix=prefix or None,
            client_options={"connect_timeout": "5s", "timeout": "120s"},
            retry_config={"max_retries": 3, "backoff": {
                "init_backoff": dt.timedelta(milliseconds=200), "max_backoff": dt.timedelta(seconds=5),
                "base": 2}, "retry_timeout": dt.timedelta(seconds=30)},
            **kw)

    def _err(self, op: str, name: str, exc: Exception) -> ArchiveError:
        import obstore.exceptions as oe

        if isinstance(exc, FileNotFoundError | oe.NotFoundError):
            return ObjectMissing(f"{self.url}: {name}: no such object")
        if isinstance(exc, oe.AlreadyExistsError | oe.PreconditionError):
            return ObjectExists(f"{self.url}: {name} already exists")
        text = str(exc).split("\n", 1)[0]
        if "169.254.169.254" in text:
            return ArchiveAccessError(f"{self.where}: no S3 credentials: set AWS_ACCESS_KEY_ID and "
                                      "AWS_SECRET_ACCESS_KEY (or run where an instance role provides them)")
        if isinstance(exc, oe.PermissionDeniedError | oe.UnauthenticatedError):
            return ArchiveAccessError(f"{self.where}: access denied ({op} {name}): check "
                                      "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        if "error sending request" in text or "connect" in text.lower():
            return ArchiveAccessError(f"{self.where}: cannot reach the S3 endpoint ({op} {name}): "
                                      "check `endpoint` and the network")
        return ArchiveError(f"{self.where}: {op} {name} failed: {text[:300]}")

    async def get(self, name: str, *, limit: int | None = None) -> bytes:
        import obstore

        try:
            res = await obstore.get_async(self.store, name)
            if limit is not None and res.meta["size"] > limit:
                raise _too_large(self.url, name, res.meta["size"], limit)
            data = bytes(await res.bytes_async())
        except ObjectTooLarge:
            raise
        except Exception as exc:
            raise self._err("get", name, exc) from None
        if limit is not None and len(data) > limit:
            raise _too_large(self.url, name, len(data), limit)
        return data

    async def get_range(self, name: str, offset: int, length: int) -> bytes:
        import obstore

        try:
            data = bytes(await obstore.get_range_async(self.store, name, start=offset, length=length))
        except Exception as exc:
            raise self._err("get", name, exc) from None
        if len(data) != length:
            raise ArchiveError(f"{self.url}: {name}: short read at {offset} (object truncated?)")
        return data

    async def put(self, name: str, data: bytes, *, create: bool = False) -> None:
        import obstore

        try:
            await obstore.put_async(self.store, name, data, mode="create" if create else "overwrite",
                                    use_multipart=False)
        except Exception as exc:
            raise self._err("put", name, exc) from None

    async def ls(self, prefix: str) -> list[ObjectInfo]:
        import obstore

        out: list[ObjectInfo] = []
        try:
            async for batch in obstore.list(self.store, prefix=prefix or None, chunk_size=1000):
                for m in batch:
                    out.append(ObjectInfo(m["path"], m["size"], m["last_modified"].timestamp()))
        except Exception as exc:
            raise self._err("list", prefix or "/", exc) from None
        return out

    async def delete(self, name: str) -> None:
        import obstore

        try:
            await obstore.delete_async(self.store, name)
        except Exception as exc:
            err = self._err("delete", name, exc)
            if not isinstance(err, ObjectMissing):
                raise err from None

    async def exists(self, name: str) -> bool:
        import obstore

        try:
            await obstore.head_async(self.store, name)
            return True
        except Exception as exc:
            err = self._err("head", name, exc)
            if isinstance(err, ObjectMissing):
                return False
            raise err from None


def drop_traceback(exc: BaseException) -> None:
    """Forget the frames an error holds (and so the S3 clients they reference)."""
    exc.__traceback__ = None
    exc.__context__ = None


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, then let go of every S3 client while Python is fully alive.

    obstore's clients (Rust, tokio) abort the process when their last
    reference goes during interpreter shutdown, which a traceback kept
    until exit would cause.
    """
    try:
        return asyncio.run(coro)
    except BaseException as exc:
        drop_traceback(exc)
        raise
    finally:
        gc.collect()


def open_backend(repository: str, endpoint: str | None = None) -> Backend:
    """The backend for a repository URL: a directory path, file:///path or s3://bucket/prefix."""
    if repository.startswith("s3://"):
        u = urlparse(repository)
        if not u.netloc:
            raise ArchiveAccessError(f"{repository}: no bucket name (expected s3://bucket/prefix)")
        return S3Backend(u.netloc, u.path.strip("/"), endpoint)
    if repository.startswith("file://"):
        repository = urlparse(repository).path
    if "://" in repository:
        raise ArchiveAccessError(f"{repository}: unsupported repository URL (use a directory path, "
                                 "file:///path or s3://bucket/prefix)")
    return LocalBackend(Path(repository))
