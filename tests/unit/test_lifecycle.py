"""cdp.lifecycle: daemons take their signals while they run, give them back, and await
what they cancel."""

from __future__ import annotations

import asyncio
import os
import signal

from cdp.lifecycle import cancel_and_wait, serve


class _Daemon:
    def __init__(self) -> None:
        self.stopped = asyncio.Event()
        self.reloads = 0

    def stop(self) -> None:
        self.stopped.set()

    def reload(self) -> None:
        self.reloads += 1

    async def run(self) -> None:
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)
        async with asyncio.timeout(10):
            await self.stopped.wait()


def test_signals_reach_the_daemon_while_it_runs_and_are_given_back() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    d = _Daemon()

    async def main() -> None:
        await serve(d)
        loop = asyncio.get_running_loop()
        assert not getattr(loop, "_signal_handlers", {})  # none left on the loop

    asyncio.run(main())
    assert d.stopped.is_set() and d.reloads == 2
    assert {s: signal.getsignal(s) for s in before} == before


def test_cancelled_tasks_finish_their_cleanup_before_it_returns() -> None:
    cleaned: list[str] = []

    async def worker(name: str) -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.01)  # cleanup that itself waits
            cleaned.append(name)

    async def failing() -> None:
        raise ValueError("already failed")

    async def main() -> None:
        tasks = [asyncio.create_task(worker(n)) for n in "abc"]
        bad = asyncio.create_task(failing())
        await asyncio.sleep(0)
        await cancel_and_wait(*tasks, None, bad)
        assert sorted(cleaned) == ["a", "b", "c"]
        assert all(t.done() for t in (*tasks, bad))

    asyncio.run(main())


def test_dump_tasks_shows_where_each_task_waits() -> None:
    """SIGUSR1's dump names the innermost coroutine a task waits in, and a task told to
    cancel that has not ended yet shows as cancelling: what a stuck daemon needs."""
    from io import StringIO

    from cdp.lifecycle import dump_tasks

    async def inner_wait(ev: asyncio.Event) -> None:
        await ev.wait()

    async def outer(ev: asyncio.Event) -> None:
        await inner_wait(ev)

    async def main() -> str:
        ev = asyncio.Event()
        t = asyncio.create_task(outer(ev), name="stuck-one")
        await asyncio.sleep(0)
        t.cancel()  # requested, not yet delivered: the dump runs first
        text = dump_tasks(StringIO())
        await asyncio.gather(t, return_exceptions=True)
        return text

    text = asyncio.run(main())
    assert "task stuck-one (cancelling)" in text
    block = text.split("task stuck-one")[1].split("\ntask ")[0]
    assert "outer" in block and "inner_wait" in block and "locks.py" in block
