"""A reader that closes the pipe early (`cdp ... | head -3`) ends any command quietly with 141
(128 + SIGPIPE), never with a BrokenPipeError traceback (issue 15)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cdp, scaled


def _closed_pipe_run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """`python -m cdp ARGS` writing into a pipe whose reader is already gone."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([sys.executable, "-m", "cdp", *map(str, args)], stdout=w,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                              timeout=scaled(60))
    finally:
        os.close(w)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("site")
    assert run_cdp("init", d / "cfg").returncode == 0
    return d


@pytest.mark.parametrize("args", [
    ["init", "{site}/again"],  # plain print
    ["status", "-c", "{site}/cfg/receiver.toml"],  # a rich table
    ["status", "-c", "{site}/cfg/receiver.toml", "--json"],
    ["points", "-c", "{site}/cfg/receiver.toml", "nothing-here"],  # an error on stderr too
], ids=lambda a: " ".join(a[:2]))
def test_a_closed_pipe_ends_quietly(site, args):
    res = _closed_pipe_run(*(a.format(site=site) for a in args))
    assert "Traceback" not in res.stderr and "BrokenPipeError" not in res.stderr, res.stderr
    assert "Exception ignored" not in res.stderr, res.stderr
    if args[0] == "points":  # nothing for stdout: its error goes to stderr as always
        assert res.returncode == 2 and "nothing-here" in res.stderr, res.stderr
    else:
        assert res.returncode == 141, res.stderr


def test_help_into_a_closed_pipe():
    res = _closed_pipe_run("--help")  # argparse ignores the failed write itself
    assert res.returncode == 0 and not res.stderr, res.stderr
