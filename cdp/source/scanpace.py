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
4. A volume's scans take at most `DUTY` (half) of one core: the next start also waits
   until twice the previous scan's CPU time has passed since it started. A large volume
   under continuous writes is scanned less often, instead of taking a core for itself.

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


@dataclass
class ScanPacer:
    """The last scan's start and CPU cost, and so the earliest next start."""

    min_interval: float
    last_start: float = -math.inf
    last_cpu: float = 0.0

    def started(self, now: float) -> None:
        self.last_start = now

    def finished(self, cpu_seconds: float) -> None:
        self.last_cpu = max(0.0, cpu_seconds)

    def earliest(self) -> float:
        """No scan may start before this (monotonic seconds)."""
        return self.last_start + max(self.min_interval, self.last_cpu / DUTY)


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
def cpu_meter(pacer: ScanPacer) -> Iterator[None]:
    """Count the CPU time of the calling thread (the scan's reader) into the pacer."""
    t0 = time.thread_time()
    try:
        yield
    finally:
        pacer.finished(time.thread_time() - t0)
