"""Interrupting `cdp demo` or `cdp bench` (issue 15, item 7): SIGINT, SIGTERM or SIGHUP stops its
daemons, removes what it made (keeps it with --keep) and says so, exit 128 + the signal; a
SIGKILLed run's children die with it, and the next run removes its abandoned work folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import scaled, wait_for

DEMO = ["demo", "--size", "32MiB"]  # the demo's smallest useful image; it has no duration option
BENCH = ["bench", "--size", "1MiB", "--scenarios", "steady", "--steady-seconds", "600",
         "--steady-rate", "256KiB"]  # runs until interrupted


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    state: str
    start: int
    argv: tuple[str, ...]


def _table() -> dict[int, Proc]:
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                f = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{d}/cmdline", "rb") as fh:
                argv = tuple(a.decode(errors="replace") for a in fh.read().split(b"\0") if a)
        except OSError:
            continue
        out[int(d)] = Proc(int(d), int(f[1]), int(f[2]), f[0], int(f[19]), argv)
    return out


def _descendants(root: int) -> list[Proc]:
    table = _table()
    found, todo = [], [root]
    while todo:
        parent = todo.pop()
        for p in table.values():
            if p.ppid == parent:
                found.append(p)
                todo.append(p.pid)
    return found


def _left(recorded: list[Proc], groups: set[int]) -> list[Proc]:
    """Of the recorded processes, those still alive (same pid and start, not a zombie), and any
    live process in one of their process groups."""
    table = _table()
    alive = [table[p.pid] for p in recorded if p.pid in table and table[p.pid].start == p.start]
    alive += [p for p in table.values() if p.pgid in groups and p not in alive]
    return [p for p in alive if p.state != "Z"]


class Run:
    """`python -m cdp ARGS` in its own session, TMPDIR pointed at a folder of the test."""

    def __init__(self, args: list[str | Path], tmp: Path) -> None:
        tmp.mkdir(exist_ok=True)
        self.tmp = tmp
        self.proc = subprocess.Popen([sys.executable, "-m", "cdp", *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     env={**os.environ, "TMPDIR": str(tmp)})

    def daemons_running(self) -> list[Proc]:
        """Wait until its receiver and source run (mid-run); all its descendants then."""
        def both() -> list[Proc] | None:
            assert self.proc.poll() is None, self.proc.communicate()[1][-2000:]
            kids = _descendants(self.proc.pid)
            verbs = {a for p in kids for a in p.argv[-3:-2]}
            return kids if {"receiver", "source"} <= verbs else None
        return wait_for(both, timeout=120, what="the receiver and source of the run")

    def signal(self, sig: int) -> tuple[int, str]:
        os.kill(self.proc.pid, sig)
        _, err = self.proc.communicate(timeout=scaled(120))
        return self.proc.returncode, err


def _interrupt(run: Run, sig: int) -> tuple[int, str, list[Proc]]:
    kids = run.daemons_running()
    code, err = run.signal(sig)
    groups = {run.proc.pid} | {p.pgid for p in kids}
    # no polling: the run stops its children before it exits
    assert _left(kids, groups) == [], (err, _left(kids, groups))
    return code, err, kids


def _workdirs(tmp: Path, verb: str) -> list[Path]:
    return sorted(tmp.glob(f"cdp-{verb}-*"))


def test_demo_sigint_stops_daemons_and_removes_its_temp_folder(tmp_path) -> None:
    run = Run(DEMO, tmp_path / "tmp")
    code, err, _ = _interrupt(run, signal.SIGINT)
    assert code == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("cdp demo: interrupted by SIGINT: stopped ") and "receiver" in last \
        and "source" in last and f"removed {tmp_path / 'tmp'}" in last, err
    assert "Traceback" not in err and _workdirs(tmp_path / "tmp", "demo") == []


def test_demo_sigterm_removes_only_what_it_made_in_the_users_folder(tmp_path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's, not the demo's\n")
    run = Run([*DEMO, "--dir", mine], tmp_path / "tmp")
    code, err, _ = _interrupt(run, signal.SIGTERM)
    assert code == 143, err
    assert f"removed what it made in {mine}" in err, err
    assert sorted(os.listdir(mine)) == ["notes.txt"]  # the folder and the user's file stay
    assert (mine / "notes.txt").read_text() == "the user's, not the demo's\n"


def test_demo_sighup_with_keep_keeps_the_folder_and_says_where(tmp_path) -> None:
    run = Run([*DEMO, "--keep"], tmp_path / "tmp")
    code, err, _ = _interrupt(run, signal.SIGHUP)
    assert code == 129, err
    [kept] = _workdirs(tmp_path / "tmp", "demo")
    assert f"kept {kept}" in err.strip().splitlines()[-1], err
    assert (kept / "receiver.log").exists() and (kept / "source.toml").exists()
    assert not (kept / ".cdp-run.json").exists()  # kept for the user: no owner marker left


def test_demo_sigkilled_takes_its_daemons_along_and_the_next_run_sweeps(tmp_path) -> None:
    tmp = tmp_path / "tmp"
    run = Run(DEMO, tmp)
    kids = run.daemons_running()
    run.proc.kill()  # nothing runs in the demo after this: the children must go by themselves
    run.proc.communicate(timeout=scaled(30))
    groups = {run.proc.pid} | {p.pgid for p in kids}
    wait_for(lambda: not _left(kids, groups), timeout=20,
             what=lambda: f"the killed demo's children to exit: {_left(kids, groups)}")
    [abandoned] = _workdirs(tmp, "demo")
    assert (abandoned / ".cdp-run.json").exists()
    # the next demo or bench recognises the folder as an abandoned run of its own, removes it
    r = subprocess.run([sys.executable, "-m", "cdp", "bench", "--size", "1MiB", "--scenarios",
                        "seed", "--json"], capture_output=True, text=True, timeout=scaled(120),
                       stdin=subprocess.DEVNULL, env={**os.environ, "TMPDIR": str(tmp)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert not abandoned.exists() and _workdirs(tmp, "bench") == []


def test_bench_sigint_stops_daemons_and_removes_its_temp_folder(tmp_path) -> None:
    run = Run(BENCH, tmp_path / "tmp")
    code, err, _ = _interrupt(run, signal.SIGINT)
    assert code == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("cdp bench: interrupted by SIGINT: stopped ") and "source" in last, err
    assert _workdirs(tmp_path / "tmp", "bench") == [] and "Traceback" not in err


@pytest.mark.parametrize("keep", [False, True], ids=["no-keep", "keep"])
def test_bench_sigterm_with_dir(tmp_path, keep) -> None:
    work = tmp_path / "work"  # did not exist: the run made it, so it goes whole
    run = Run([*BENCH, "--dir", work, *(["--keep"] if keep else [])], tmp_path / "tmp")
    code, err, _ = _interrupt(run, signal.SIGTERM)
    assert code == 143, err
    if keep:
        assert f"kept {work}" in err and (work / "cdp" / "source.log").exists(), err
    else:
        assert f"removed {work}" in err and not work.exists(), err
