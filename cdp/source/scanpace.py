"""When a scan volume's next scan may start: soon after a change, never too often.

A scan rereads the whole volume, so how often scans start decides both the RPO and the
CPU a written volume costs. The rules, in order:

1. A scan starts when the volume's file changed (a file event), or `scan_interval` after
   the last scan ended without one (writes through mmap or to a block device raise no
   event).
2. A burst of events is coalesced: after the first, the scan waits until no event came
   for `SETTLE` (5 ms), but never longer than `SETTLE_MAX` (50 ms) after the first, so a
   writer that never pauses does not hold scans back.
3. `min_scan_interval` bounds how often scans *start* (time since the previous start, not
   a delay after each wake): under continuous writes scans run back to back at most that
   often. Events that arrive during a scan start the next one as soon as this allows.
4. A volume's scans take at most `DUTY` (half) of one core, averaged: a CPU budget fills
   at DUTY seconds per second up to `BURST` seconds, each rescan spends what it cost, and
   no scan starts while the budget is spent. A large volume under continuous writes is
   scanned less often instead of taking a core for itself, yet the rescan that follows a
   scan begun in the middle of a burst need not wait twice that scan's cost: after a quiet
   spell the budget holds it.

`ScanPacer` is the pure bookkeeping (tested with a fake clock); `next_scan` is the
asyncio wait that applies it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

SETTLE = 0.005
SETTLE_MAX = 0.05
DUTY = 0.5
BURST = 0.5  # CPU seconds a quiet volume may spend on scans at once (rule 4)


@dataclass
class ScanPacer:
    """The last scan's start and the CPU budget (rule 4), and so the earliest next start."""

    min_interval: float
    last_start: float = -math.inf
    budget: float = BURST  # CPU seconds that scans may still spend now
    budget_at: float = -math.inf  # when `budget` was last brought up to date

    def _refill(self, now: float) -> None:
        if self.budget_at > -math.inf:
            self.budget = min(BURST, self.budget + (now - self.budget_at) * DUTY)
        self.budget_at = max(self.budget_at, now)

    def started(self, now: float) -> None:
        self._refill(now)
        self.last_start = now

    def finished(self, cpu_seconds: float, now: float) -> None:
        """A scan that cost `cpu_seconds` ended at `now`."""
        self._refill(now)
        self.budget -= max(0.0, cpu_seconds)

    def earliest(self) -> float:
        """No scan may start before this (monotonic seconds)."""
        t = self.last_start + self.min_interval
        if self.budget < 0:  # spent: wait until it has filled back to zero
            t = max(t, self.budget_at - self.budget / DUTY)
        return t


async def next_scan(wake: asyncio.Event, pacer: ScanPacer, scan_interval: float, *,
                    clock: Callable[[], float] = time.monotonic) -> str:
    """Wait for the next scan's turn; return why it runs ("event" or "timer").

    Clears `wake` just before returning, so an event that comes during the scan starts
    the next one.
    """
    reason = "event"
    if not wake.is_set():
        try:
            async with asyncio.timeout(scan_interval):
                await wake.wait()
        except TimeoutError:
            reason = "timer"
    if reason == "event":  # settle: let the burst finish, within bounds
        first = clock()
        while True:
            wake.clear()
            left = min(SETTLE, first + SETTLE_MAX - clock())
            if left <= 0:
                break
            try:
                async with asyncio.timeout(left):
                    await wake.wait()
            except TimeoutError:
                break
    delay = pacer.earliest() - clock()
    if delay > 0:
        await asyncio.sleep(delay)
    wake.clear()
    return reason


@contextlib.contextmanager
def cpu_meter(pacer: ScanPacer, other: Callable[[], float] | None = None) -> Iterator[None]:
    """Count the CPU time of the calling thread (the scan's reader) into the pacer, and that
    of `other` (a helper process's CPU seconds so far) if given."""
    t0, o0 = time.thread_time(), other() if other else 0.0
    try:
        yield
    finally:
        spent = time.thread_time() - t0 + (other() - o0 if other else 0.0)
        pacer.finished(spent, time.monotonic())
