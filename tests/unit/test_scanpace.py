"""Scan pacing: a burst of file events becomes one scan, soon; starts are spaced by
min_scan_interval measured from the previous start; events during a scan start the next
one; a costly scan spaces the next by twice its CPU time."""

from __future__ import annotations

import asyncio
import itertools
import random
import time

import pytest

from cdp.source.scanpace import BURST, DUTY, SETTLE_MAX, ScanPacer, cpu_meter, next_scan


def test_earliest_counts_from_the_last_start_and_the_cpu_budget() -> None:
    p = ScanPacer(min_interval=0.25)
    assert p.earliest() == float("-inf")  # the first scan waits for nothing
    p.started(100.0)
    assert p.earliest() == 100.25
    p.finished(0.05, 100.1)  # a cheap scan: the interval rules
    assert p.earliest() == 100.25
    p.started(100.25)
    p.finished(0.3, 100.6)  # the budget (BURST) still covers it: only the interval
    assert p.budget == pytest.approx(BURST - 0.3)  # the cheap scan's cost had refilled
    assert p.earliest() == 100.5
    p.started(101.0)
    p.finished(2.0, 103.0)  # two seconds of CPU: the budget is spent, and the next scan
    owed = -p.budget       # waits until it has filled back to zero at DUTY per second
    assert owed > 0
    assert p.earliest() == pytest.approx(103.0 + owed / DUTY)
    p.finished(-1.0, 103.0)  # a clock that went backwards costs nothing
    assert p.budget == pytest.approx(-owed)


def test_scans_average_at_most_duty_of_a_core() -> None:
    """Continuous events, scans of random cost started as early as allowed: over every
    window the CPU spent is at most DUTY per second plus the burst and one scan."""
    rng = random.Random(5)
    p = ScanPacer(min_interval=0.01)
    now, spans = 0.0, []
    for _ in range(2000):
        now = max(now, p.earliest())
        p.started(now)
        cost = rng.choice([0.001, 0.05, 0.2, 0.8])
        spans.append((now, cost))
        now += cost  # the scan runs for its CPU time
        p.finished(cost, now)
    worst = 0.0
    for i, (a, _) in enumerate(spans):
        for b, cost in spans[i:i + 200]:
            spent = sum(c for t, c in spans[i:] if t <= b)
            worst = max(worst, spent - DUTY * (b + cost - a) - BURST)
    assert worst <= 0.8 + 1e-9  # never more than the one scan that overdraws
    total = sum(c for _, c in spans)
    assert total / (now - spans[0][0]) <= DUTY + BURST / now + 1e-9


def test_cpu_meter_measures_this_threads_cpu() -> None:
    p = ScanPacer(min_interval=0.0)
    with cpu_meter(p):
        t = time.thread_time()
        while time.thread_time() - t < 0.02:
            pass
    assert BURST - p.budget >= 0.02


async def _run(coro):  # type: ignore[no-untyped-def]
    async with asyncio.timeout(5):
        return await coro


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on a fake clock: where it would wait for its next timer, the clock jumps
    there instead, so timers fire in order, exactly on time, whatever the machine's load."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        real_select = self._selector.select  # type: ignore[attr-defined]

        def select(timeout: float | None = None) -> list[object]:
            if timeout is not None and timeout > 0:
                self.now += timeout
            return real_select(None if timeout is None else 0)

        self._selector.select = select  # type: ignore[attr-defined]

    def time(self) -> float:
        return self.now


def test_a_burst_of_events_is_one_scan_that_does_not_wait_for_the_burst_to_end() -> None:
    """Events every 2 ms for 3 s: the scan lets the burst settle up to the cap, then starts
    while the writer is still writing (it does not wait for a pause that never comes).
    On a fake clock: under load, real 2 ms sleeps leave gaps over SETTLE that end the settle."""

    async def main() -> tuple[float, str, bool]:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        pacer = ScanPacer(min_interval=0.0)

        async def writer() -> None:
            end = loop.time() + 3.0
            while loop.time() < end:
                wake.set()
                await asyncio.sleep(0.002)

        w = asyncio.create_task(writer())
        await asyncio.sleep(0.001)
        t0 = loop.time()
        reason = await _run(next_scan(wake, pacer, 10.0, clock=loop.time))
        waited = loop.time() - t0
        still_writing = not w.done()
        w.cancel()
        return waited, reason, still_writing

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        waited, reason, still_writing = runner.run(main())
    assert reason == "event"
    assert waited >= SETTLE_MAX * 0.9  # the burst was given time to settle ...
    assert waited <= SETTLE_MAX + 0.002  # ... up to the cap (and a writer's tick) ...
    assert still_writing               # ... but the scan did not wait for its end


def test_quiet_after_one_event_scans_after_the_settle_only() -> None:
    async def main() -> tuple[str, bool]:
        wake = asyncio.Event()
        wake.set()
        reason = await _run(next_scan(wake, ScanPacer(min_interval=0.0), 10.0))
        return reason, wake.is_set()

    reason, pending = asyncio.run(main())
    assert reason == "event" and not pending


def test_no_event_scans_on_the_timer() -> None:
    async def main() -> str:
        return await _run(next_scan(asyncio.Event(), ScanPacer(min_interval=0.0), 0.05))

    assert asyncio.run(main()) == "timer"


def test_starts_are_spaced_by_min_interval_from_the_previous_start() -> None:
    """Continuous events and scans of ~30 ms: starts come every min_interval (not
    min_interval after each scan's end), and never closer."""

    async def main() -> list[float]:
        wake = asyncio.Event()
        pacer = ScanPacer(min_interval=0.1)
        starts: list[float] = []
        stop = False

        async def writer() -> None:
            while not stop:
                wake.set()
                await asyncio.sleep(0.003)

        w = asyncio.create_task(writer())
        for _ in range(5):
            await _run(next_scan(wake, pacer, 10.0))
            now = time.monotonic()
            pacer.started(now)
            starts.append(now)
            await asyncio.sleep(0.03)  # the scan
        stop = True
        await w
        return starts

    starts = asyncio.run(main())
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(g >= 0.1 for g in gaps), gaps  # the bound holds whatever the load


def test_an_event_during_a_scan_starts_the_next_one() -> None:
    async def main() -> tuple[str, str]:
        wake = asyncio.Event()
        pacer = ScanPacer(min_interval=0.0)
        wake.set()
        first = await _run(next_scan(wake, pacer, 10.0))
        pacer.started(time.monotonic())
        wake.set()  # a write lands while the scan runs
        second = await _run(next_scan(wake, pacer, 0.5))
        return first, second

    assert asyncio.run(main()) == ("event", "event")


def test_a_scan_loop_cancelled_as_its_event_lands_is_cancelled() -> None:
    """The connection ends (its TaskGroup cancels the volume's task) in the instant a change
    wakes the scan loop: the task must end, not scan into a dead link (see WriteJournal.take)."""
    async def main() -> bool:
        wake = asyncio.Event()
        task = asyncio.ensure_future(next_scan(wake, ScanPacer(min_interval=0.0), 30.0))
        for _ in range(3):
            await asyncio.sleep(0)
        wake.set()
        task.cancel()
        await asyncio.wait({task}, timeout=5)
        return task.cancelled()

    assert asyncio.run(main()), "next_scan swallowed its cancellation"
