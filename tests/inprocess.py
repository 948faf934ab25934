"""Daemons in the test's own process: a Receiver or a Source on an event loop in a thread.

`InProcessDaemon` has the interface of helpers.Daemon (start, stop, running, returncode,
log_text, tail, wait_port), so a test whose subject is not a crash, a kill or a real peer swaps
`daemons.receiver(env)` for `daemons.receiver(env, inprocess=True)` and keeps its assertions:
no interpreter start-up and no imports per start, no process to wait for. What it cannot do is
what needs a process: kill() (a crash), signals, a second interpreter's view of a lock.

Each daemon's records (DEBUG, logfmt, as `cdp --log-level debug` writes them) go to its own log
file. A record is told apart by a context variable that the daemon's tasks and the threads
asyncio.to_thread starts inherit; a record without one (a thread of the receiver's pool) goes
to every running daemon of the side its logger belongs to.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import threading
from pathlib import Path
from typing import Any

from helpers import scaled

from cdp.cli.logs import LogfmtFormatter
from cdp.errors import CdpError

_WHO: contextvars.ContextVar[InProcessDaemon | None] = contextvars.ContextVar(
    "cdp_test_daemon", default=None)
_RECEIVER_SIDE = ("cdp.receiver", "cdp.replica", "cdp.archive", "cdp.drills", "cdp.statuspage")
_running: list[InProcessDaemon] = []
_lock = threading.Lock()
_saved: tuple[int, bool] | None = None  # the cdp logger's level and propagate, while any run


class _Mine(logging.Filter):
    def __init__(self, daemon: InProcessDaemon) -> None:
        super().__init__()
        self.daemon = daemon

    def filter(self, record: logging.LogRecord) -> bool:
        who = _WHO.get()
        if who is not None:
            return who is self.daemon
        side = "receiver" if record.name.startswith(_RECEIVER_SIDE) else "source"
        return self.daemon.verb == side


def _logging_on(daemon: InProcessDaemon) -> None:
    """DEBUG records of the cdp loggers go to the daemons' files only (not to pytest's
    capture, which would keep every one of them), while any in-process daemon runs."""
    global _saved
    cdp = logging.getLogger("cdp")
    with _lock:
        if not _running:
            _saved = (cdp.level, cdp.propagate)
            cdp.setLevel(logging.DEBUG)
            cdp.propagate = False
        _running.append(daemon)
        cdp.addHandler(daemon.handler)


def _logging_off(daemon: InProcessDaemon) -> None:
    global _saved
    cdp = logging.getLogger("cdp")
    with _lock:
        cdp.removeHandler(daemon.handler)
        if daemon in _running:
            _running.remove(daemon)
        if not _running and _saved is not None:
            cdp.setLevel(_saved[0])
            cdp.propagate = _saved[1]
            _saved = None


class InProcessDaemon:
    """A `cdp receiver|source -c CONFIG` run in a thread of this process, logging to a file."""

    def __init__(self, verb: str, config: Path, log: Path, port: int | None = None) -> None:
        assert verb in ("receiver", "source"), verb
        self.verb, self.config, self.log, self.port = verb, config, log, port
        self.starts = 0
        self.daemon: Any = None  # the Receiver or Source of the current run
        self.handler = logging.FileHandler(log, delay=True)
        self.handler.setFormatter(LogfmtFormatter())
        self.handler.addFilter(_Mine(self))
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rc: int | None = None
        self._error = ""

    def start(self, wait: bool = True) -> InProcessDaemon:
        assert not self.running, f"{self.verb} is already running"
        with open(self.log, "ab") as fh:
            fh.write(f"---- start #{self.starts + 1} of {self.verb} (in-process) ----\n".encode())
        self._rc, self._error = None, ""
        made = threading.Event()
        _logging_on(self)
        self._thread = threading.Thread(target=self._main, args=(made,), daemon=True,
                                        name=f"inprocess-{self.verb}")
        self._thread.start()
        made.wait(scaled(30))
        self.starts += 1
        if wait and self.port is not None:
            self.wait_port()
        return self

    def _main(self, made: threading.Event) -> None:
        _WHO.set(self)
        try:
            asyncio.run(self._run(made))
            self._rc = 0
        except CdpError as exc:  # what `cdp receiver|source` prints and exits with
            self._error = f"cdp {self.verb}: {exc}"
            logging.getLogger("cdp").error("%s", self._error)
            self._rc = exc.exit_code
        except BaseException as exc:  # a crash of the daemon: exit status 1
            logging.getLogger("cdp").exception("in-process %s crashed", self.verb)
            self._error = repr(exc)
            self._rc = 1
        finally:
            made.set()
            _logging_off(self)
            self.handler.close()  # reopened by the next start's first record

    async def _run(self, made: threading.Event) -> None:
        if self.verb == "receiver":
            from cdp.config import load_receiver
            from cdp.receiver import Receiver

            self.daemon = Receiver(load_receiver(self.config))
        else:
            from cdp.config import load_source
            from cdp.source.daemon import Source

            self.daemon = Source(load_source(self.config))
        self._loop = asyncio.get_running_loop()
        made.set()
        await self.daemon.run()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def returncode(self) -> int | None:
        return None if self.running else self._rc

    def wait_port(self, timeout: float = 20) -> None:
        from helpers import Daemon

        Daemon.wait_port(self, timeout)  # type: ignore[arg-type]  # same duck: running, port

    def stop(self, timeout: float = 30, expect: int | None = 0) -> int:
        """What SIGTERM does (stop(), orderly shutdown); asserts the exit status (default 0)."""
        assert self._thread is not None
        if self.running and self._loop is not None and self.daemon is not None:
            try:
                self._loop.call_soon_threadsafe(self.daemon.stop)
            except RuntimeError:  # the loop has just closed: it ended by itself
                pass
        self._thread.join(scaled(timeout))
        if self._thread.is_alive():
            raise AssertionError(f"{self.verb} did not stop:\n{self.tail()}")
        rc = self._rc if self._rc is not None else 1
        if expect is not None:
            assert rc == expect, f"{self.verb} exited with {rc}, expected {expect}:\n{self.tail()}"
        return rc

    def kill(self) -> None:
        raise AssertionError("an in-process daemon cannot be killed: a crash test needs a "
                             "subprocess (helpers.Daemon)")

    def log_text(self) -> str:
        self.handler.flush()
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 40) -> str:
        text = "\n".join(self.log_text().splitlines()[-lines:])
        return text + (f"\n{self._error}" if self._error and self._error not in text else "")
