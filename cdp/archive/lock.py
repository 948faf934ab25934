"""Repository locks: runs share, prune is exclusive.

Each holder writes its own object ``locks/<uuid>`` (sealed msgpack: host,
pid, time, exclusive), then lists ``locks/``: if a live lock conflicts
(an exclusive one, or any other when we want exclusivity) it removes its own
and gives up, so two racing jobs may both back off but never both proceed.
Holders refresh the time every REFRESH_EVERY while they hold it (a task
beside the job); a lock is stale when it has not been refreshed for
STALE_AFTER, or its process, on this host, is gone (a job killed with
SIGKILL). Stale locks are ignored and removed. Verify and restore take the
shared lock too, so prune never deletes what they are reading; ls/get do
not (they write nothing and a prune under them fails them cleanly).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

import msgpack

from cdp.archive.backend import ObjectMissing
from cdp.archive.repo import Repository
from cdp.errors import ArchiveCorruptError, ArchiveLockedError

log = logging.getLogger(__name__)

STALE_AFTER = 30 * 60.0
REFRESH_EVERY = 5 * 60.0
AAD = b"lock"


@dataclass(frozen=True)
class LockInfo:
    name: str
    host: str
    pid: int
    time: float
    exclusive: bool

    def stale(self, now: float) -> bool:
        if now - self.time > STALE_AFTER:
            return True
        if self.host == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False

    def describe(self) -> str:
        kind = "exclusive" if self.exclusive else "shared"
        return f"{kind} lock of pid {self.pid} on {self.host}, {time.time() - self.time:.0f}s old"


class Lock:
    """A held lock; `refresh()` now and then, `release()` at the end (async context manager)."""

    def __init__(self, repo: Repository, exclusive: bool) -> None:
        self.repo = repo
        self.exclusive = exclusive
        self.name = f"locks/{uuid.uuid4().hex}"
        self.stamp = 0.0
        self._keeper: asyncio.Task[None] | None = None

    async def _write(self) -> None:
        self.stamp = time.time()
        body = msgpack.packb({"host": socket.gethostname(), "pid": os.getpid(), "time": self.stamp,
                              "exclusive": self.exclusive})
        await self.repo.backend.put(self.name, self.repo.keys.seal(body, AAD))

    async def acquire(self, wait: float = 0.0) -> Lock:
        deadline = time.monotonic() + wait
        while True:
            await self._write()
            conflict = await self._conflict()
            if conflict is None:
                self._keeper = asyncio.create_task(self._keepalive())
                return self
            await self.repo.backend.delete(self.name)
            if time.monotonic() >= deadline:
                raise ArchiveLockedError(
                    f"{self.repo.url}: locked by another job ({conflict.describe()}); try again when "
                    "it has finished (a lock whose job died is ignored once stale)")
            await asyncio.sleep(min(5.0, max(0.1, deadline - time.monotonic())))

    async def _conflict(self) -> LockInfo | None:
        now = time.time()
        for info in await read_locks(self.repo):
            if f"locks/{info.name}" == self.name:
                continue
            if info.stale(now):
                log.info("removing stale %s", info.describe())
                await self.repo.backend.delete(f"locks/{info.name}")
                continue
            if self.exclusive or info.exclusive:
                return info
        return None

    async def refresh(self, force: bool = False) -> None:
        if force or time.time() - self.stamp > REFRESH_EVERY:
            await self._write()

    async def _keepalive(self) -> None:
        """Refresh the lock while it is held, so a long job never looks stale to others."""
        while True:
            await asyncio.sleep(REFRESH_EVERY)
            try:
                await self._write()
            except Exception as exc:  # the job itself will hit the same storage problem
                log.warning("could not refresh the repository lock: %s", exc)

    async def release(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
            self._keeper = None
        await self.repo.backend.delete(self.name)

    async def __aenter__(self) -> Lock:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


async def read_locks(repo: Repository) -> list[LockInfo]:
    out = []
    for o in await repo.backend.ls("locks/"):
        name = o.name.rsplit("/", 1)[-1]
        try:
            d = msgpack.unpackb(repo.keys.open(await repo.backend.get(o.name), AAD, "lock"), raw=False)
            out.append(LockInfo(name, str(d["host"]), int(d["pid"]), float(d["time"]),
                                bool(d["exclusive"])))
        except ObjectMissing:
            continue  # released meanwhile
        except (ArchiveCorruptError, ValueError, TypeError, KeyError, msgpack.UnpackException):
            # unreadable: treat as a live exclusive lock until it is old, as the safe choice
            out.append(LockInfo(name, "?", 0, o.mtime, True))
    return out


async def lock(repo: Repository, exclusive: bool, wait: float = 0.0) -> Lock:
    """Take the repository lock (shared for runs, exclusive for prune)."""
    return await Lock(repo, exclusive).acquire(wait)
