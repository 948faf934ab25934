"""One conformance suite for every archive backend (directory, S3), and repository locks over them."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from pathlib import Path

import msgpack
import pytest
from archive_fixtures import S3Server

from cdp.archive import lock as locks
from cdp.archive.backend import Backend, ObjectExists, ObjectMissing, ObjectTooLarge, open_backend
from cdp.archive.repo import Repository
from cdp.errors import ArchiveLockedError


@pytest.fixture(params=["dir", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "dir":
        (tmp_path / "b").mkdir()
        return open_backend(f"file://{tmp_path / 'b'}")
    s3: S3Server = request.getfixturevalue("s3_env")
    return open_backend(f"s3://cdp-test/conf-{uuid.uuid4().hex}", s3.endpoint)


def test_backend_contract(backend: Backend) -> None:
    async def go() -> None:
        assert await backend.ls("") == [] and not await backend.exists("a/b")
        data = os.urandom(100_000)
        await backend.put("data/ab/abc", data)
        await backend.put("index/x", b"1")
        assert await backend.get("data/ab/abc") == data
        assert await backend.get_range("data/ab/abc", 1000, 5000) == data[1000:6000]
        listed = {o.name: o for o in await backend.ls("data/")}
        assert set(listed) == {"data/ab/abc"} and listed["data/ab/abc"].size == len(data)
        assert abs(listed["data/ab/abc"].mtime - time.time()) < 120
        assert {o.name for o in await backend.ls("")} == {"data/ab/abc", "index/x"}
        await backend.put("index/x", b"2")  # overwrite
        assert await backend.get("index/x") == b"2"
        await backend.put("locks/one", b"a", create=True)
        with pytest.raises(ObjectExists):
            await backend.put("locks/one", b"b", create=True)  # If-None-Match: * on S3
        assert await backend.get("locks/one") == b"a"
        with pytest.raises(ObjectMissing):
            await backend.get("nope")
        with pytest.raises(ObjectMissing):
            await backend.get("nope", limit=10)
        with pytest.raises(ObjectTooLarge):  # refused from its size, not read into memory
            await backend.get("data/ab/abc", limit=len(data) - 1)
        assert await backend.get("data/ab/abc", limit=len(data)) == data
        with pytest.raises(ObjectMissing):
            await backend.get_range("nope", 0, 1)
        await backend.delete("index/x")
        await backend.delete("index/x")  # absent: not an error
        assert not await backend.exists("index/x") and await backend.exists("locks/one")

    asyncio.run(go())


def test_locks_shared_exclusive_and_stale(backend: Backend) -> None:
    async def go() -> None:
        repo = await Repository.init(backend, b"lock test password", kdf_n=1 << 10)
        a = await locks.lock(repo, exclusive=False)
        b = await locks.lock(repo, exclusive=False)  # runs share
        with pytest.raises(ArchiveLockedError, match="shared lock of pid"):
            await locks.lock(repo, exclusive=True)  # prune waits for runs
        await a.release()
        await b.release()
        p = await locks.lock(repo, exclusive=True)
        with pytest.raises(ArchiveLockedError, match="exclusive"):
            await locks.lock(repo, exclusive=False)
        await p.release()
        assert await backend.ls("locks/") == []
        # a lock whose process is gone (SIGKILL) is stale (one not rewritten for long: see
        # test_archive_hostile_repo.py, ages are the backend's)
        dead = msgpack.packb({"host": socket.gethostname(), "pid": 2**22 + 12345, "time": time.time(),
                              "exclusive": True})
        await backend.put("locks/dead", repo.keys.seal(dead, locks.AAD))
        live = msgpack.packb({"host": "elsewhere", "pid": 1, "time": time.time(), "exclusive": True})
        await backend.put("locks/live", repo.keys.seal(live, locks.AAD))
        with pytest.raises(ArchiveLockedError, match="elsewhere"):
            await locks.lock(repo, exclusive=False)
        await backend.delete("locks/live")
        held = await locks.lock(repo, exclusive=False)
        assert {o.name for o in await backend.ls("locks/")} == {held.name}  # stale ones removed
        await held.release()

    asyncio.run(go())
