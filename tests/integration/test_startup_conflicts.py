"""What a daemon does at start when something it needs is taken: exit 2 (as for a
configuration error: systemd's RestartPreventExitStatus=2 does not loop on it) with a
message that names the address or folder and, for a folder, the pid that holds it.

Issue 15 items 12 and 14: a second receiver on one data_dir used to start and fail only
volume by volume later; a port already in use exited 1 ("a check failed").
"""

from __future__ import annotations

import random
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import CdpEnv, MiB, free_port, make_image, run_cdp, wait_for


def _start(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """A daemon expected to give up at once; one still running after 20 s is a failure."""
    try:
        return run_cdp(*args, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"cdp {args[0]} kept running: it should have refused to start")


@pytest.fixture
def taken() -> Iterator[int]:
    """A loopback TCP port that another process (here: this one) listens on."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def _lock_pid(path: Path) -> str:
    return path.read_text().strip() if path.exists() else ""


def test_second_receiver_on_one_data_dir_exits_2_naming_the_first(cdp_env, daemons) -> None:
    env: CdpEnv = cdp_env()
    rx = daemons.receiver(env)
    lock = env.data_dir / ".receiver.lock"
    wait_for(lambda: _lock_pid(lock) == str(rx.pid), 10, what="the receiver's lock file")
    other = env.root / "other.toml"
    other.write_text(env.receiver_toml.read_text().replace(f":{env.port}", f":{free_port()}"))
    r = _start("receiver", "-c", other)
    assert r.returncode == 2, r.stderr
    assert f"data_dir {env.data_dir} is in use by another receiver (pid {rx.pid}" in r.stderr
    assert rx.running
    rx.stop()
    assert _lock_pid(lock) == ""  # a clean stop leaves no pid behind; the lock is free again
    rx2 = daemons.receiver(env)
    wait_for(lambda: _lock_pid(lock) == str(rx2.pid), 10, what="the restarted receiver's lock")
    rx2.stop()


def test_second_source_on_one_state_dir_exits_2_naming_the_first(cdp_env, daemons) -> None:
    env: CdpEnv = cdp_env()
    make_image(env.source.images["vol1"], 1 * MiB, random.Random(3))
    src = daemons.source(env)  # no receiver: it keeps retrying, holding its state_dir
    lock = env.source.state_dir / ".source.lock"
    wait_for(lambda: _lock_pid(lock) == str(src.pid), 10, what="the source's lock file")
    r = _start("source", "-c", env.source.toml)
    assert r.returncode == 2, r.stderr
    assert f"state_dir {env.source.state_dir} is in use by another source (pid {src.pid}" in r.stderr
    assert src.running
    src.stop()


@pytest.mark.parametrize("key", ["listen", "metrics_listen", "status_listen"])
def test_receiver_port_in_use_exits_2(cdp_env, taken: int, key: str) -> None:
    if key == "listen":
        env: CdpEnv = cdp_env(port=taken)
    else:
        env = cdp_env(receiver_extra=f'{key} = "127.0.0.1:{taken}"')
    r = _start("receiver", "-c", env.receiver_toml)
    assert r.returncode == 2, r.stderr
    assert f"127.0.0.1:{taken}" in r.stderr and "Address already in use" in r.stderr
    if key == "listen":
        assert "receiver.listen" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("key", ["metrics_listen", "nbd_listen"])
def test_source_port_in_use_exits_2(cdp_env, taken: int, key: str, tmp_path: Path) -> None:
    if key == "metrics_listen":
        env: CdpEnv = cdp_env(source_extra=f'metrics_listen = "127.0.0.1:{taken}"')
    else:
        env = cdp_env(mode="nbd")
        toml = env.source.toml
        toml.write_text(re.sub(r'nbd_listen = "127\.0\.0\.1:\d+"', f'nbd_listen = "127.0.0.1:{taken}"',
                               toml.read_text()))
    make_image(env.source.images["vol1"], 1 * MiB, random.Random(4))
    r = _start("source", "-c", env.source.toml)
    assert r.returncode == 2, r.stderr
    assert f"127.0.0.1:{taken}" in r.stderr and "Address already in use" in r.stderr
    if key == "nbd_listen":
        assert "nbd_listen" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_data_dir_or_state_dir_that_cannot_be_made_exits_2(cdp_env) -> None:
    env: CdpEnv = cdp_env()
    env.data_dir.write_text("a file where the replicas should go")
    r = _start("receiver", "-c", env.receiver_toml)
    assert r.returncode == 2 and f"data_dir {env.data_dir}: cannot create it" in r.stderr, r.stderr
    env.source.state_dir.write_text("a file where the source's state should go")
    make_image(env.source.images["vol1"], 1 * MiB, random.Random(5))
    r = _start("source", "-c", env.source.toml)
    assert r.returncode == 2 and f"state_dir {env.source.state_dir}: cannot create it" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
