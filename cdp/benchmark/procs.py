"""Child processes of `cdp demo` and `cdp bench`, and what they cost (CPU, peak memory from /proc).

Every child is started through `spawn` (or `run`): it leads its own process
group, so a terminal's Ctrl-C reaches only us and we stop the children in
order (SIGTERM to the group, SIGKILL after a grace); it is tracked here, so
`stop_children` finds whatever is still running when the run ends, however it
ends; and on Linux it dies with us (PR_SET_PDEATHSIG = SIGKILL), so a SIGKILL
of the demo or benchmark, which runs no cleanup, leaves no daemon behind.
The death signal follows the thread that started the child: start children
from the main thread. Grandchildren (e.g. a drill's check script) are not
covered by it; they stop with their group when we stop it ourselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

_children: list[tuple[str, subprocess.Popen[Any]]] = []  # (name, process), in start order
_hold = {"depth": 0}  # > 0: a signal handler must not raise now (see `guarded`)
_pending: list[int] = []  # signals that arrived meanwhile


def _die_with(parent: int) -> None:
    """In the child, before exec: SIGKILL when the parent goes; gone already if it went."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died between fork and prctl
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Code a signal must not break into (e.g. between starting a child and tracking it): a
    handler that calls `defer` holds its signal until the outermost guard is left, and it is
    raised again there."""
    _hold["depth"] += 1
    try:
        yield
    finally:
        _hold["depth"] -= 1
        if _hold["depth"] == 0 and _pending:
            signum = _pending[0]
            _pending.clear()
            signal.raise_signal(signum)


def defer(signum: int) -> bool:
    """For a signal handler: True if the signal was held for later (inside `guarded`)."""
    if _hold["depth"] > 0:
        _pending.append(signum)
        return True
    return False


def take_pending() -> list[int]:
    """The signals held so far, which will then not be raised again."""
    out = list(_pending)
    _pending.clear()
    return out


def spawn(argv: Sequence[str | Path], *, name: str | None = None,
          **kwargs: Any) -> subprocess.Popen[Any]:
    """Popen in its own process group, tracked, dying with us; stdin from /dev/null by default."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    with guarded():  # a signal now would leave a child started but not tracked
        _children[:] = [(n, p) for n, p in _children if p.returncode is None]
        p = subprocess.Popen([str(a) for a in argv], process_group=0,
                             preexec_fn=functools.partial(_die_with, os.getpid()), **kwargs)
        _children.append((name or Path(str(argv[0])).name, p))
    return p


def run(argv: Sequence[str | Path], *, timeout: float, name: str | None = None,
        **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Like subprocess.run(capture_output=True, text=True), through `spawn`."""
    p = spawn(argv, name=name, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
              **kwargs)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_all([p], timeout=0)
        raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _signal_group(p: subprocess.Popen[Any], sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all(procs: Sequence[subprocess.Popen[Any]], timeout: float = 20) -> list[int]:
    """SIGTERM each process group in reverse start order, wait; SIGKILL what does not stop.
    Exit codes in the order given."""
    for p in reversed(procs):
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
    end = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(0.0, end - time.monotonic())))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            codes.append(p.wait())
        _signal_group(p, signal.SIGKILL)  # what the leader left behind in its group
    return codes


def running() -> list[str]:
    """Names of the tracked children still running."""
    return [n for n, p in _children if p.poll() is None]


def stop_children(timeout: float = 10) -> list[str]:
    """Stop every tracked child still running (see stop_all); the names of those stopped."""
    live = [(n, p) for n, p in _children if p.poll() is None]
    stop_all([p for _, p in live], timeout)
    _children[:] = [(n, p) for n, p in _children if p.returncode is None]
    return [n for n, _ in live]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def peak_rss(pid: int) -> int:
    """Peak resident memory in bytes (VmHWM) since start or the last reset_peak()."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak(pid: int) -> None:
    """Start a new peak-memory window (Linux: write 5 to clear_refs); silently a no-op if refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
