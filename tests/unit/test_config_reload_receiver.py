"""Merging a reloaded receiver config (cdp.config.reload_receiver): what applies live, what
waits for a restart, whose connections end; and reload lines that read like the config file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cdp.config import load_receiver, load_source, reload_receiver, reload_source

MiB = 1024 * 1024


@pytest.fixture
def cfg_dir(tmp_path: Path) -> Path:
    for name in ("a", "b", "c"):
        fd = os.open(tmp_path / f"{name}.token", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, f"{name * 32}".encode())
        os.close(fd)
    return tmp_path


def client(name: str, volumes: str, extra: str = "") -> str:
    return (f'[[receiver.client]]\nname = "{name}"\ntoken_file = "{name}.token"\n'
            f"volumes = {volumes}\n{extra}")


def write(cfg_dir: Path, receiver: str = "", clients: str = "", tail: str = "") -> Path:
    path = cfg_dir / "receiver.toml"
    path.write_text('[receiver]\nlisten = "127.0.0.1:7400"\ndata_dir = "replicas"\n' + receiver
                    + (clients or client("a", '["v1"]') + client("b", '["v2", "v3"]')) + tail)
    return path


def test_nothing_changed(cfg_dir):
    cfg = load_receiver(write(cfg_dir))
    plan = reload_receiver(cfg, load_receiver(cfg.path))
    assert plan.applied == plan.restart == plan.dropped == ()
    assert plan.cfg == cfg


def test_clients_volumes_and_tokens(cfg_dir):
    old = load_receiver(write(cfg_dir))
    (cfg_dir / "a.token").write_text("another-token-for-a-" * 2)
    new = load_receiver(write(cfg_dir, clients=client("a", '["v1"]') + client("b", '["v2"]')
                              + client("c", '["v9"]', 'filesets = ["etc"]\n')))
    plan = reload_receiver(old, new)
    assert plan.restart == ()
    assert plan.dropped == ("a",)  # b keeps its connection: only its volume v3 stops
    assert ("client a: the token changed: its connections are closed; it reconnects with the "
            "new token") in plan.applied
    assert "client b: volumes v2, v3 -> v2 (its writes to v3 stop now)" in plan.applied
    assert "client c added: volumes v9" in plan.applied
    assert not any("another-token" in line for line in plan.applied)
    assert plan.cfg == new


def test_removed_client_is_dropped(cfg_dir):
    old = load_receiver(write(cfg_dir))
    plan = reload_receiver(old, load_receiver(write(cfg_dir, clients=client("a", '["v1"]'))))
    assert plan.dropped == ("b",)
    assert "client b removed: its connections are closed" in plan.applied
    assert plan.cfg.client("b") is None


def test_retention_applies_live(cfg_dir):
    old = load_receiver(write(cfg_dir, tail='[[receiver.volume]]\nname = "v2"\n'
                                           'keep_points = "2h"\n'))
    new = load_receiver(write(cfg_dir, 'keep_points = "1h"\nkeep_points_size = "1KiB"\n',
                              tail='[[receiver.volume]]\nname = "v2"\nkeep_points = "30min"\n'))
    plan = reload_receiver(old, new)
    assert plan.restart == ()
    assert "receiver.keep_points: 1d -> 1h" in plan.applied
    assert "receiver.keep_points_size: 10.0 GiB -> 1.0 KiB" in plan.applied
    assert "receiver.volume[v2].keep_points: 2h -> 30min" in plan.applied
    assert plan.cfg.keep_for("v1").max_bytes == 1024
    assert plan.cfg.keep_for("v2").max_age == 1800


def test_what_needs_a_restart_keeps_its_running_value(cfg_dir):
    old = load_receiver(write(cfg_dir, 'metrics_listen = "127.0.0.1:9740"\n'))
    text = write(cfg_dir).read_text().replace("127.0.0.1:7400", "127.0.0.1:7401").replace(
        'data_dir = "replicas"', 'data_dir = "elsewhere"\nmax_frame = "64MiB"\n'
        'idle_timeout = "30s"\nstatus_listen = "[::1]:9741"\nmax_connections = 8')
    (cfg_dir / "receiver.toml").write_text(text)
    plan = reload_receiver(old, load_receiver(cfg_dir / "receiver.toml"))
    assert "receiver.listen: 127.0.0.1:7400 -> 127.0.0.1:7401" in plan.restart  # not a repr
    assert "receiver.max_frame: 32.0 MiB -> 64.0 MiB" in plan.restart
    assert any(line.startswith("receiver.data_dir: ") for line in plan.restart)
    assert "receiver.idle_timeout: 10s -> 30s" in plan.applied
    assert "receiver.metrics_listen: 127.0.0.1:9740 -> none" in plan.applied
    assert "receiver.status_listen: none -> [::1]:9741" in plan.applied
    assert "receiver.max_connections: 64 -> 8" in plan.applied
    cfg = plan.cfg
    assert (cfg.listen, cfg.data_dir, cfg.max_frame) == (old.listen, old.data_dir, old.max_frame)
    assert (cfg.idle_timeout, cfg.max_connections, cfg.metrics_listen) == (30.0, 8, None)


def test_archives(cfg_dir):
    arch = '[[archive]]\nname = "{}"\nrepository = "arch-{}"\nencrypt = false\nschedule = "{}"\n'
    old = load_receiver(write(cfg_dir, tail=arch.format("one", "one", "manual")
                              + arch.format("two", "two", "manual")))
    new = load_receiver(write(cfg_dir, 'max_concurrent_archives = 2\n',
                              tail=arch.format("one", "one", "daily 02:00")
                              + arch.format("three", "three", "hourly")))
    plan = reload_receiver(old, new)
    assert plan.restart == ()
    assert "archive one: schedule manual -> daily 02:00 (from its next run)" in plan.applied
    assert "archive three added: schedule hourly" in plan.applied
    assert "archive two removed (a run in progress finishes)" in plan.applied
    assert "receiver.max_concurrent_archives: 1 -> 2" in plan.applied
    assert [a.name for a in plan.cfg.archives] == ["one", "three"]


def test_source_reload_lines_read_like_the_config(tmp_path):
    """Issue 15: a reload warning was printed as a Python repr ("('127.0.0.1', 7400)")."""
    fd = os.open(tmp_path / "t.token", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"t" * 32)
    os.close(fd)
    src = tmp_path / "source.toml"
    text = ('[source]\nname = "h"\nreceiver = "127.0.0.1:7400"\ntoken_file = "t.token"\n'
            '[[volume]]\nname = "v"\npath = "v.raw"\n')
    src.write_text(text)
    old = load_source(src)
    src.write_text(text.replace("127.0.0.1:7400", "[::1]:7401").replace(
        'token_file = "t.token"', 'token_file = "t.token"\nmax_frame = "8MiB"\n'
        'reconnect_max = "1min"\n[source.tls]\nca = "ca.pem"'))
    plan = reload_source(old, load_source(src))
    assert "source.receiver: 127.0.0.1:7400 -> [::1]:7401" in plan.restart
    assert "source.max_frame: 32.0 MiB -> 8.0 MiB" in plan.restart
    assert "source.reconnect_max: 5s -> 1min" in plan.restart
    tls = next(line for line in plan.restart if line.startswith("source.tls:"))
    assert tls == (f"source.tls: none -> ca={tmp_path / 'ca.pem'} cert=none key=none "
                   "server_name=none")
    assert not any("(" in line or "PosixPath" in line for line in plan.restart + plan.applied)
