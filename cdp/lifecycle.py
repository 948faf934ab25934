"""How a daemon runs and stops: signals in, tasks out.

Both daemons run the same way: SIGTERM/SIGINT stop them, SIGHUP reloads the config,
SIGUSR1 writes where every task and thread is waiting to stderr (a daemon that seems
stuck: `kill -USR1 PID`, then read its log), and the handlers are removed again when the
daemon returns (an embedding process, or a test running a daemon in-process, gets its
own handling back). On the way out every task a daemon cancels is awaited, so its cleanup
(a lock released, a file closed, a temporary removed) runs before the daemon closes what
that task was using.

Timeouts are `asyncio.timeout`, never `asyncio.wait_for`: on Python 3.11 wait_for swallows
a cancellation that arrives as the awaited thing completes (python/cpython#86296), and a
task that ignores its TaskGroup's cancel holds the whole connection open forever.
"""

from __future__ import annotations

import asyncio
import io
import logging
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Coroutine
from typing import Any, Protocol


class Daemon(Protocol):
    def stop(self) -> None: ...
    def reload(self) -> None: ...
    async def run(self) -> None: ...


async def serve(daemon: Daemon) -> None:
    """Run `daemon` with its signal handlers installed for as long as it runs."""
    loop = asyncio.get_running_loop()
    handlers: dict[signal.Signals, Callable[[], object]] = {
        signal.SIGTERM: daemon.stop, signal.SIGINT: daemon.stop, signal.SIGHUP: daemon.reload,
        signal.SIGUSR1: dump_tasks}
    previous = {sig: signal.getsignal(sig) for sig in handlers}
    for sig, fn in handlers.items():
        loop.add_signal_handler(sig, fn)
    try:
        await daemon.run()
    finally:
        for sig, before in previous.items():
            loop.remove_signal_handler(sig)  # asyncio resets to the default...
            if before is not None:
                signal.signal(sig, before)  # ...we put back what was there


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel the tasks given (None is skipped) and wait until each has ended, whatever it
    raised: the caller's cleanup after this runs only once theirs is done."""
    live = [t for t in tasks if t is not None]
    for t in live:
        t.cancel()
    if live:
        await asyncio.gather(*live, return_exceptions=True)


def start_reload(background: set[asyncio.Task[None]], coro: Coroutine[Any, Any, None],
                 log: logging.Logger) -> None:
    """SIGHUP: run the daemon's reload in the background, kept in `background` (cancelled and
    awaited on the way out) until it ends; a reload that fails on a bug is logged (on the
    daemon's own logger) and the daemon goes on with the previous config."""
    task = asyncio.get_running_loop().create_task(coro)
    background.add(task)

    def reloaded(t: asyncio.Task[None]) -> None:
        background.discard(t)
        if not t.cancelled() and (exc := t.exception()) is not None:
            log.error("config reload failed (internal error), still running with the previous "
                      "config: %s: %s", type(exc).__name__, exc, exc_info=exc)

    task.add_done_callback(reloaded)


def dump_tasks(out: Any = None) -> str:
    """Write where every asyncio task and every thread is waiting to `out` (stderr); return
    the text. For a daemon that seems stuck: `kill -USR1 PID`, then read its log."""
    buf = io.StringIO()
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    buf.write(f"--- {len(tasks)} asyncio tasks ---\n")
    for t in tasks:
        state = "cancelling" if t.cancelling() else "pending"
        buf.write(f"task {t.get_name()} ({state})\n")
        buf.writelines(f"  {line}\n" for line in _awaiting(t.get_coro()))
    frames = sys._current_frames()
    buf.write(f"--- {len(frames)} threads ---\n")
    names = {th.ident: th.name for th in threading.enumerate()}
    for ident, frame in frames.items():
        buf.write(f"thread {names.get(ident, ident)}\n")
        buf.write("".join(traceback.format_stack(frame, limit=12)))
    text = buf.getvalue()
    print(text, file=out or sys.stderr, flush=True)
    return text


def _awaiting(coro: Any) -> list[str]:
    """The chain of coroutines `coro` is suspended in, outermost first (a task's own stack
    shows only its outermost frame)."""
    lines: list[str] = []
    while coro is not None and len(lines) < 40:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None) or getattr(
            coro, "ag_frame", None)
        if frame is not None:
            lines.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        nxt = (getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
               or getattr(coro, "ag_await", None))
        if nxt is None and frame is None:
            lines.append(repr(coro))  # a Future, a Task: what the chain ends on
        coro = nxt
    return lines
