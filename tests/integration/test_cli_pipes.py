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


@pytest.mark.parametrize(("argv", "code"), [(["--version"], 0), (["points", "-c", "/nonexistent.toml"], 2)])
def test_after_s3_the_exit_skips_finalizing_but_keeps_code_atexit_and_output(argv, code, tmp_path):
    """Once obstore is loaded, cdp leaves with os._exit (its tokio threads can abort the process
    during Py_Finalize, seen in CI as exit -6 after a correct message). The exit code, the
    atexit handlers, and everything printed must survive that shortcut, even into a pipe."""
    marker = tmp_path / "atexit-ran"
    prog = ("import atexit, pathlib, sys, obstore.store\n"
            f"atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text('yes'))\n"
            f"sys.argv = ['cdp', *{argv!r}]\n"
            "print('buffered before exit', end='')\n"
            "from cdp.cli.main import entry\n"
            "entry()\n")
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=scaled(60))
    assert r.returncode == code, r.stderr
    assert r.stdout.startswith("buffered before exit")
    assert marker.read_text() == "yes"
    if code:
        assert "nonexistent.toml" in r.stderr
