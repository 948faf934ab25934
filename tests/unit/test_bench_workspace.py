"""The work folder of `cdp demo`/`cdp bench` (cdp.benchmark.workspace), the guard that holds a
signal while a child is started and tracked, and the benchmark's comparison wording."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from cdp.benchmark import procs
from cdp.benchmark.report import versus
from cdp.benchmark.workspace import MARKER, Interrupted, Workspace, _start_time, session, sweep_abandoned
from cdp.errors import UsageError


@pytest.mark.parametrize("ratio, text", [
    (2.3, "2.3x faster"), (0.4, "2.5x slower"), (1 / 1.7, "1.7x slower"), (10.0, "10.0x faster"),
    (1.02, "as fast (within 5%)"), (0.98, "as fast (within 5%)"), (1.06, "1.1x faster"),
])
def test_versus_says_faster_or_slower_the_right_way_round(ratio, text) -> None:
    # ratio = rsync's time / cdp's time: 0.4 means cdp took 2.5 times as long
    assert versus(ratio) == text


def _marker(root: Path, **fields) -> None:
    root.mkdir(parents=True, exist_ok=True)
    data = {"verb": "demo", "pid": os.getpid(), "start": _start_time(os.getpid()), "keep": False,
            "made": True, "before": []}
    (root / MARKER).write_text(json.dumps({**data, **fields}))
    (root / "image.raw").write_bytes(b"x" * 100)


def test_sweep_removes_only_abandoned_runs_of_ours(tmp_path) -> None:
    dead = tmp_path / "cdp-demo-dead"  # our pid, another start time: a reused pid, owner gone
    _marker(dead, start=(_start_time(os.getpid()) or 0) - 1)
    live = tmp_path / "cdp-bench-live"
    _marker(live)  # this process owns it, and runs
    kept = tmp_path / "cdp-demo-kept"
    _marker(kept, start=1, keep=True)
    unmarked = tmp_path / "cdp-demo-unmarked"  # not recognisably ours: left alone
    unmarked.mkdir()
    other = tmp_path / "something-else"
    _marker(other, start=1)
    assert sweep_abandoned(tmp_path) == [dead]
    assert not dead.exists() and live.exists() and kept.exists() and unmarked.exists()
    assert other.exists()


def test_a_users_dir_keeps_what_was_there(tmp_path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    ws = Workspace.open("bench", mine, keep=False)
    assert not ws.made and json.loads((mine / MARKER).read_text())["before"] == ["notes.txt"]
    (mine / "image.raw").write_bytes(b"made by the run")
    (mine / "cdp").mkdir()
    assert ws.close() == f"removed what it made in {mine}"
    assert sorted(os.listdir(mine)) == ["notes.txt"]


def test_a_users_dir_left_by_a_killed_run_is_cleaned_and_a_live_one_refused(tmp_path) -> None:
    mine = tmp_path / "mine"
    _marker(mine, made=False, before=["notes.txt"], start=1)  # a killed run; it made image.raw
    (mine / "notes.txt").write_text("mine")
    ws = Workspace.open("demo", mine, keep=False)
    assert ws.swept == [mine] and sorted(os.listdir(mine)) == [MARKER, "notes.txt"]
    with pytest.raises(UsageError, match="is running there"):  # ws's marker names us, alive
        Workspace.open("demo", mine, keep=False)
    ws.close()
    assert sorted(os.listdir(mine)) == ["notes.txt"]


def test_a_signal_while_guarded_waits_for_the_guard(tmp_path) -> None:
    steps = []
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as info, session("demo", tmp_path / "w", keep=False):
        with procs.guarded():
            os.kill(os.getpid(), signal.SIGTERM)
            steps.append("guarded work finished")
        steps.append("after the guard")  # never: the held signal is raised at its end
    assert steps == ["guarded work finished"]
    assert info.value.exit_code == 143 and f"removed {tmp_path / 'w'}" in str(info.value)
    assert not (tmp_path / "w").exists()
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored
