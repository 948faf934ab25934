"""House rules that CI enforces through the test command: ruff clean, mypy clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_ruff_is_clean() -> None:
    r = _run("ruff", "check", "cdp", "tests", "bench")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]


def test_mypy_is_clean() -> None:
    r = _run("mypy", "cdp")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
