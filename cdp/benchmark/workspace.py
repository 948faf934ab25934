"""The work folder of `cdp demo` and `cdp bench`, and how a run ends: nothing it made outlives it.

`session(verb, workdir, keep)` wraps a run. Inside it, SIGINT, SIGTERM and
SIGHUP become `Interrupted` (raised in the main thread, so `finally` blocks
run); however the run ends, its children are stopped (cdp.benchmark.procs)
and what it made is removed unless `keep`:

- no --dir: a new temp folder `cdp-<verb>-*`, removed whole;
- --dir that did not exist: made by us, removed whole;
- --dir that existed: only the entries that were not there before; never
  the folder itself, never what the user had in it.

A marker `.cdp-run.json` at the top of the work folder names the owner
(pid and its start time in clock ticks since boot, so a reused pid does not
pass for it), the entries there before, and whether to keep:

    {"verb": "demo", "pid": 4242, "start": 1234567, "keep": false, "made": true,
     "before": []}

A run that was SIGKILLed runs no cleanup (its children die with it, see
procs): the next demo or bench removes such abandoned temp folders of the
same user (marker present, owner gone, keep false), and a run given the same
--dir removes what the dead run had made there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from cdp.benchmark import procs
from cdp.errors import UsageError

MARKER = ".cdp-run.json"
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PREFIXES = ("cdp-demo-", "cdp-bench-")
SHM = Path("/dev/shm")


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP: the run stops and cleans up; exit 128 + the signal's number.

    A BaseException, like KeyboardInterrupt, so that `except Exception` in the run's own
    error handling does not take it for a failure and carry on."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.running: list[str] = []  # the children running when it came
        self.report = ""  # what was stopped and removed (or kept), filled in by `session`

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        return f"interrupted by {name}" + (f": {self.report}" if self.report else "")


def _start_time(pid: int) -> int | None:
    """Clock ticks after boot at which `pid` started (None: no such process)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(owner: dict[str, Any]) -> bool:
    start = _start_time(int(owner.get("pid", 0)))
    return start is not None and start == owner.get("start")


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _rmtree(path: Path, errors: list[str]) -> None:
    def onerror(_func: Any, p: str, exc: Any) -> None:
        if not isinstance(exc[1], FileNotFoundError):
            errors.append(f"{p}: {exc[1].strerror or exc[1]}")

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, onerror=onerror)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            errors.append(f"{path}: {exc.strerror or exc}")


def _remove_made(root: Path, made: bool, before: set[str], errors: list[str]) -> None:
    if made:
        _rmtree(root, errors)
        return
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(root):
            if entry not in before:
                _rmtree(root / entry, errors)


def sweep_abandoned(tmp: Path | None = None) -> list[Path]:
    """Remove temp work folders of demo/bench runs whose owner is gone (SIGKILLed); the paths."""
    tmp = Path(tmp or tempfile.gettempdir())
    removed: list[Path] = []
    try:
        entries = list(os.scandir(tmp))
    except OSError:
        return removed
    for e in entries:
        if not e.name.startswith(PREFIXES):
            continue
        try:
            if not e.is_dir(follow_symlinks=False) or e.stat().st_uid != os.geteuid():
                continue
        except OSError:
            continue
        marker = _read_marker(Path(e.path))
        if marker is None or marker.get("keep") or not marker.get("made") or _alive(marker):
            continue
        errors: list[str] = []
        _rmtree(Path(e.path), errors)
        if not errors:
            removed.append(Path(e.path))
    return removed


@dataclass
class Workspace:
    """One run's work folder: what it made, and whether to keep it."""

    verb: str
    root: Path
    keep: bool
    made: bool
    before: set[str] = field(default_factory=set)
    swept: list[Path] = field(default_factory=list)  # abandoned folders removed at the start
    elsewhere: list[Path] = field(default_factory=list)  # folders of ours outside `root`

    @classmethod
    def open(cls, verb: str, workdir: Path | None, keep: bool) -> Workspace:
        swept = sweep_abandoned()
        if SHM.is_dir() and Path(tempfile.gettempdir()).resolve() != SHM:
            swept += sweep_abandoned(SHM)  # replicas seeded onto tmpfs by a killed bench
        if workdir is None:
            ws = cls(verb, Path(tempfile.mkdtemp(prefix=f"cdp-{verb}-")), keep, made=True)
        else:
            workdir = workdir.absolute()
            made = not workdir.exists()
            if not made and not workdir.is_dir():
                raise UsageError(f"--dir {workdir}: not a folder")
            old = None if made else _read_marker(workdir)
            if old is not None and _alive(old):
                raise UsageError(f"--dir {workdir}: cdp {old.get('verb')} (pid {old.get('pid')}) "
                                 "is running there; wait for it or choose another folder")
            if old is not None:  # an earlier run there was killed: remove what it had made
                if not old.get("keep"):
                    _remove_made(workdir, False, set(old.get("before", [])) - {MARKER}, [])
                (workdir / MARKER).unlink(missing_ok=True)
                swept.append(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            before = set() if made else set(os.listdir(workdir))
            ws = cls(verb, workdir, keep, made, before)
        ws.swept = swept
        ws._mark()
        return ws

    def _mark(self, root: Path | None = None, made: bool | None = None) -> None:
        data = {"verb": self.verb, "pid": os.getpid(), "start": _start_time(os.getpid()),
                "keep": self.keep, "made": self.made if made is None else made,
                "before": sorted(self.before) if root is None else []}
        root = root or self.root
        tmp = root / (MARKER + ".tmp")
        tmp.write_text(json.dumps(data) + "\n")
        os.replace(tmp, root / MARKER)

    def folder_in(self, parent: Path) -> Path:
        """A new folder of this run under `parent` (another file system: a --replica-dir, a
        tmpfs), marked like the work folder and removed with it; abandoned ones swept first."""
        self.swept += sweep_abandoned(parent)
        with procs.guarded():  # no folder made and left untracked
            try:
                path = Path(tempfile.mkdtemp(prefix=f"cdp-{self.verb}-", dir=parent))
            except OSError as exc:
                raise UsageError(f"{parent}: cannot make a folder there "
                                 f"({exc.strerror or exc})") from None
            self.elsewhere.append(path)
            self._mark(path, made=True)
        return path

    def close(self) -> str:
        """Remove what the run made (unless keep); a phrase saying what became of it."""
        errors: list[str] = []
        for path in self.elsewhere:
            (path / MARKER).unlink(missing_ok=True)
        (self.root / MARKER).unlink(missing_ok=True)
        if self.keep:
            return f"kept {', '.join(map(str, [self.root, *self.elsewhere]))}"
        for path in self.elsewhere:
            _rmtree(path, errors)
        _remove_made(self.root, self.made, self.before, errors)
        if errors:
            return (f"could not remove all of {self.root} ({'; '.join(errors[:3])}"
                    f"{' ...' if len(errors) > 3 else ''})")
        also = "".join(f" and {p}" for p in self.elsewhere)
        if self.made:
            return f"removed {self.root}{also}"
        return f"removed what it made in {self.root}{also}"

    def log_tails(self, lines: int = 8) -> str:
        """The last lines of each daemon log in the folder: for a failure, before removal."""
        out = []
        for log in sorted(self.root.rglob("*.log")):
            try:
                text = log.read_text(errors="replace").strip().splitlines()[-lines:]
            except OSError:
                continue
            if text:
                out.append(f"--- {log.relative_to(self.root)} (last lines)\n" + "\n".join(text))
        return "\n".join(out)


@contextlib.contextmanager
def session(verb: str, workdir: Path | None, keep: bool) -> Iterator[Workspace]:
    """Run a demo or benchmark in a Workspace; see the module docstring.

    On SIGINT/SIGTERM/SIGHUP, raises Interrupted whose `report` says what was stopped and
    removed (or kept, and where); a signal during the cleanup is held until it is done."""
    def handler(signum: int, _frame: FrameType | None) -> None:
        if not procs.defer(signum):
            exc = Interrupted(signum)
            exc.running = procs.running()  # the run's own cleanup may stop some before we do
            raise exc

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    ws: Workspace | None = None
    interrupted: Interrupted | None = None
    try:
        with procs.guarded():  # no temp folder made and left unmarked
            ws = Workspace.open(verb, workdir, keep)
        yield ws
    except Interrupted as exc:
        interrupted = exc
    finally:
        with procs.guarded():  # a signal now waits until the cleanup is done
            stopped = procs.stop_children()
            what = ws.close() if ws is not None else ""
            late = procs.take_pending()
            for s, h in previous.items():
                signal.signal(s, h)
        if interrupted is None and late:
            interrupted = Interrupted(late[0])
        if interrupted is not None:
            stopped = list(dict.fromkeys([*interrupted.running, *stopped]))
            parts = [f"stopped {', '.join(stopped)}"] if stopped else []
            interrupted.report = "; ".join([*parts, what] if what else parts)
            raise interrupted
