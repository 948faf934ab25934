"""Repository locks: runs share, prune is exclusive.

Each holder writes its own object ``locks/<uuid>`` (sealed msgpack: host,
pid, time, exclusive), then lists ``locks/``: if a live lock conflicts
(an exclusive one, or any other when we want exclusivity) it removes its own
and gives up, so two racing jobs may both back off but never both proceed.
Holders rewrite their lock every REFRESH_EVERY while they hold it (a task
beside the job); a lock is stale when it has not been rewritten for
STALE_AFTER, or its process, on this host, is gone (a job killed with
SIGKILL). Stale locks are ignored and removed. Verify and restore take the
shared lock too, so prune never deletes what they are reading; ls/get do
not (they write nothing and a prune under them fails them cleanly).

Ages are measured on the backend's clock only: the modification time `ls`
reports for a lock, against the one it reports for the lock we have just
written (the backend's "now"). The `time` inside a lock is its holder's
clock and is not trusted (it is still written, for older cdp versions): a
holder whose clock lags would look stale at once and have prune delete under
it, one whose clock runs ahead would never expire. A lock modified more than
STALE_AFTER after our own was not written through this backend's clock
(someone set its time) and is treated as stale.
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
LOCK_MAX = 1024  # a lock object is ~100 bytes


@dataclass(frozen=True)
class LockInfo:
    name: str
    host: str
    pid: int
    exclusive: bool
    age: float  # seconds since it was last written, on the backend's clock (negative: in the future)

    def stale(self) -> bool:
        if not -STALE_AFTER <= self.age <= STALE_AFTER:
            return True
        if self.host == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except (PermissionError, OverflowError, ValueError):
                return False
        return False

    def describe(self) -> str:
        kind = "exclusive" if self.exclusive else "shared"
        host = "".join(c if c.isprintable() else "?" for c in self.host[:64])
        return f"{kind} lock of pid {self.pid} on {host}, {self.age:.0f}s old"


class Lock:
    """A held lock; `refresh()` now and then, `release()` at the end (async context manager)."""

    def __init__(self, repo: Repository, exclusive: bool) -> None:
        self.repo = repo
        self.exclusive = exclusive
        self.name = f"locks/{uuid.uuid4().hex}"
        self.stamp = 0.0  # time.monotonic() of the last write
        self.backend_now: float | None = None  # our lock's modification time when acquired
        self._keeper: asyncio.Task[None] | None = None

    async def _write(self) -> None:
        self.stamp = time.monotonic()
        body = msgpack.packb({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
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
        self.backend_now, infos = await read_locks(self.repo, own=self.name)
        for info in infos:
            if f"locks/{info.name}" == self.name:
                continue
            if info.stale():
                log.info("removing stale %s", info.describe())
                await self.repo.backend.delete(f"locks/{info.name}")
                continue
            if self.exclusive or info.exclusive:
                return info
        return None

    async def refresh(self, force: bool = False) -> None:
        if force or time.monotonic() - self.stamp > REFRESH_EVERY:
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


async def read_locks(repo: Repository, own: str | None = None) -> tuple[float | None, list[LockInfo]]:
    """(the backend's now, every lock with its age); now is `own`'s modification time.

    Without `own` in the listing there is no backend clock to read, and ages
    fall back to our own clock.
    """
    listed = await repo.backend.ls("locks/")
    now = next((o.mtime for o in listed if o.name == own), None)
    ref = time.time() if now is None else now
    out = []
    for o in listed:
        name = o.name.rsplit("/", 1)[-1]
        try:
            raw = repo.keys.open(await repo.backend.get(o.name, limit=LOCK_MAX), AAD, "lock")
            d = msgpack.unpackb(raw, raw=False, max_str_len=LOCK_MAX, max_bin_len=LOCK_MAX)
            out.append(LockInfo(name, str(d["host"]), int(d["pid"]), bool(d["exclusive"]), ref - o.mtime))
        except ObjectMissing:
            continue  # released meanwhile
        except (ArchiveCorruptError, ValueError, TypeError, KeyError, OverflowError,
                msgpack.UnpackException):
            # unreadable: treat as a live exclusive lock until it is old, as the safe choice
            out.append(LockInfo(name, "?", 0, True, ref - o.mtime))
    return now, out


async def lock(repo: Repository, exclusive: bool, wait: float = 0.0) -> Lock:
    """Take the repository lock (shared for runs, exclusive for prune)."""
    return await Lock(repo, exclusive).acquire(wait)
