"""FairGate: at most N holders, waiters served in arrival order, phase "queued" meanwhile."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from cdp.source.scangate import FairGate


def test_fifo_limit_and_queued_phase():
    async def main() -> tuple[list[str], int, dict[str, str]]:
        gate = FairGate(2)
        vols = {n: SimpleNamespace(name=n, phase="idle") for n in "abcdef"}
        order: list[str] = []
        seen_phase: dict[str, str] = {}
        running = peak = 0
        release = asyncio.Event()

        async def job(n: str) -> None:
            nonlocal running, peak
            async with gate.slot(vols[n], "scan"):  # type: ignore[arg-type]
                order.append(n)
                running += 1
                peak = max(peak, running)
                await (release.wait() if n in "ab" else asyncio.sleep(0.01))
                running -= 1

        tasks = []
        for n in "abcdef":
            tasks.append(asyncio.create_task(job(n)))
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        seen_phase = {n: v.phase for n, v in vols.items()}
        tasks[3].cancel()  # "d" gives up while queued: it must not hold a slot
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert gate.busy == 0 and gate.queued == 0
        return order, peak, seen_phase

    order, peak, phases = asyncio.run(main())
    assert order == ["a", "b", "c", "e", "f"]
    assert peak == 2
    assert [phases[n] for n in "abcdef"] == ["idle", "idle", "queued", "queued", "queued", "queued"]
