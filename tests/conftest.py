"""Fixtures for cdp tests: config factories, real daemons that never outlive a test, proxies, S3.

The helpers these use (configs, daemons, hashing, waiting) live in helpers.py; test files
import them from there (`from helpers import wait_for, ...`). They are re-exported here
too, so older `from conftest import ...` lines keep working.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# An illegal change of a source volume's phase (cdp/source/phase.py) is raised, not only logged,
# in this process and in every daemon the tests start.
os.environ["CDP_STRICT_PHASES"] = "1"

# -- archive tests: a SeaweedFS S3 server for the session (see archive_fixtures.py) --------------
from archive_fixtures import s3_env, s3_server  # noqa: F401
from faultproxy import FaultProxy
from helpers import (  # noqa: F401  (re-exported for `from conftest import ...`)
    BS,
    TIMEOUT_FACTOR,
    WORDS,
    CdpEnv,
    Daemon,
    Daemons,
    MiB,
    SourceFiles,
    add_fileset,
    assert_replica_equal,
    bytes_hash,
    file_hash,
    files_list,
    free_port,
    make_image,
    read_json,
    replace_atomically,
    run_cdp,
    scaled,
    text_block,
    wait_converged,
    wait_for,
    write_blocks,
    write_env,
    write_random_blocks,
)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """Workers for `-n auto` (pyproject's addopts): twice the CPUs, 4 to 8, since most tests
    wait on daemons, subprocesses and sockets rather than compute. CDP_TEST_WORKERS overrides."""
    if want := os.environ.get("CDP_TEST_WORKERS"):
        return int(want)
    return min(8, max(4, 2 * (os.cpu_count() or 1)))


@pytest.fixture
def cdp_env(tmp_path: Path) -> Callable[..., CdpEnv]:
    """Factory: cdp_env(clients=None, **options) -> CdpEnv in tmp_path (see write_env)."""
    counter = iter(range(1000))

    def make(clients: dict[str, list[str]] | None = None, **kw: Any) -> CdpEnv:
        return write_env(tmp_path / f"env{next(counter)}", clients, **kw)

    return make


@pytest.fixture
def daemons(request: pytest.FixtureRequest) -> Iterator[Daemons]:
    """Starts daemons for a test; kills any left running, and prints their logs' tails on failure."""
    ds = Daemons()
    try:
        yield ds
    finally:
        ds.cleanup()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print("\n" + ds.tails())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    """Factory: fault_proxy(target_port, **options) -> a FaultProxy (tests/faultproxy.py: byte
    counts each way, faults on demand), closed after the test."""
    made: list[FaultProxy] = []

    def make(target_port: int, **kw: Any) -> FaultProxy:
        p = FaultProxy(target_port, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
