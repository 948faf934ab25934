"""The scan queue: at most `max_concurrent_scans` scans or resyncs run at once.

The others wait in arrival order (FIFO) with phase "queued"; a slot freed goes straight to the
next in line. Each start and end is logged with a time stamp (at info when the scan had to
queue or ran long).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from cdp.source.phase import Phase
from cdp.source.volume import VolumeState

log = logging.getLogger("cdp.source.control")  # the logger these lines always had


class FairGate:
    """At most `limit` holders at once; waiters are served first come, first served."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.busy = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._waited: dict[str, bool] = {}  # volumes whose next slot came after a wait

    @contextlib.asynccontextmanager
    async def slot(self, vs: VolumeState, what: str) -> AsyncIterator[None]:
        if self.busy < self.limit and not self._waiters:
            self.busy += 1
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            before = vs.phase
            vs.phase = Phase.QUEUED
            log.info("%s queued volume=%s ahead=%d", what, vs.name, len(self._waiters) - 1)
            self._waited[vs.name] = True
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._release()  # the slot was handed to us: pass it on
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(fut)
                raise
            finally:
                if vs.phase == Phase.QUEUED:
                    vs.phase = before
        # quiet by default: a written scan volume rescans up to four times a second; a scan
        # that had to queue, and one that ran long, are worth an info line
        waited = self._waited.pop(vs.name, False)
        t0 = time.time()
        log.log(logging.INFO if waited else logging.DEBUG, "%s start volume=%s t=%.3f", what,
                vs.name, t0)
        try:
            yield
        finally:
            t1 = time.time()
            log.log(logging.INFO if waited or t1 - t0 > 5 else logging.DEBUG,
                    "%s end volume=%s t=%.3f seconds=%.3f", what, vs.name, t1, t1 - t0)
            self._release()

    def _release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot goes straight to the next in line
                return
        self.busy -= 1

    @property
    def queued(self) -> int:
        return sum(1 for f in self._waiters if not f.done())
