"""Output into a pipe (issue 15, item 13): tables at full width (no cell cut to "volu…"), no
progress redraws, a bounded number of progress lines."""

from __future__ import annotations

import subprocess
import sys

from helpers import MiB, scaled, write_env


def _piped(*args: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """stdout and stderr are pipes, as in `cdp ... | tee log` or a CI job."""
    return subprocess.run([sys.executable, "-m", "cdp", *map(str, args)], capture_output=True,
                          text=True, timeout=scaled(timeout), stdin=subprocess.DEVNULL)


def test_plan_table_is_whole_in_a_pipe(tmp_path) -> None:
    env = write_env(tmp_path / "site")
    image = env.source.images["vol1"]
    image.parent.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as fh:
        fh.truncate(4 * MiB)
        fh.write(b"some data " * 1000)
    r = _piped("plan", "-c", env.source.toml, "--duration", "1s", "--interval", "0.5s",
               "--link", "100Mbit")
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout, r.stdout
    header = next(line for line in r.stdout.splitlines() if "volume" in line)
    for col in ("volume", "rate mean", "link for RPO", "seeding", "archive window"):
        assert col in header, r.stdout
    assert any("vol1" in line and "total" not in line for line in r.stdout.splitlines())
    assert "\r" not in r.stderr and "watching" not in r.stderr  # no live progress off a TTY


def test_bench_in_a_pipe_prints_phases_not_redraws(tmp_path) -> None:
    r = _piped("bench", "--size", "1MiB", "--scenarios", "seed,incremental,steady",
               "--steady-seconds", "3", "--steady-rate", "256KiB", "--dir", tmp_path / "w")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stderr.splitlines()
    # generating, seed, incremental 1% and 10%, steady: a line each (the steady loop alone
    # redraws ten times a second on a terminal)
    assert "\r" not in r.stderr and "\033[" not in r.stderr, r.stderr
    assert 1 <= len(lines) <= 8, r.stderr
    assert "…" not in r.stdout and "incremental 10%" in r.stdout, r.stdout
    assert "RPO p50" in r.stdout  # the widest column, whole


def test_demo_in_a_pipe_prints_steps_not_redraws(tmp_path) -> None:
    r = _piped("demo", "--size", "32MiB", "--dir", tmp_path / "d")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "\r" not in r.stderr and "\033[" not in r.stderr, r.stderr
    # a line when each step starts and one when it ends: image, seed, two incrementals, drill,
    # archive
    assert len(r.stderr.splitlines()) <= 14, r.stderr
    assert "…" not in r.stdout and "replica equals source" in r.stdout, r.stdout
    assert "verify --read-data ok" in r.stdout  # a long cell, on one line
