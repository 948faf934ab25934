"""Prometheus metrics of both daemons: real processes, scraped over HTTP, parsed with
prometheus_client's own parser, compared with the replica's state on disk."""

from __future__ import annotations

import random
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import (
    MiB,
    assert_replica_equal,
    free_port,
    make_image,
    read_json,
    wait_converged,
    wait_for,
    write_random_blocks,
)
from prometheus_client.parser import text_string_to_metric_families

from cdp.config import load_receiver, load_source
from cdp.errors import ConfigError
from cdp.replica.points import list_points

VOL = "vol1"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def val(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}; have {sorted(k[0] for k in samples)}"
    return samples[key]


def wait_metrics_port(port: int) -> None:
    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            return False

    wait_for(up, 20, what=f"the metrics endpoint on port {port}")


def test_metrics_match_the_replica_state(cdp_env, daemons) -> None:
    rx_port, src_port = free_port(), free_port()
    env = cdp_env(receiver_extra=f'metrics_listen = "127.0.0.1:{rx_port}"',
                  source_extra=f'metrics_listen = "127.0.0.1:{src_port}"')
    image = env.source.images[VOL]
    rng = random.Random(7)
    make_image(image, 16 * MiB, rng)
    rx = daemons.receiver(env, inprocess=True)
    src = daemons.source(env, inprocess=True)
    wait_metrics_port(rx_port)
    wait_metrics_port(src_port)
    wait_converged(env, VOL, time.time(), src, rx)
    for _ in range(3):  # a few more epochs, each applied and acknowledged
        write_random_blocks(image, rng.sample(range(256), 6), rng)
        wait_converged(env, VOL, time.time(), src, rx)
    assert_replica_equal(env, VOL)

    state = env.replica_state(VOL)
    assert state is not None
    m = scrape(rx_port)
    assert val(m, "cdp_receiver_epoch", volume=VOL) == state["epoch"]
    assert val(m, "cdp_receiver_epochs_applied_total", volume=VOL) == state["counters"]["epochs"]
    assert val(m, "cdp_receiver_blocks_applied_total", volume=VOL) == state["counters"]["blocks"]
    for kind in ("logical", "data", "compressed", "dedup", "zero", "wire"):
        assert val(m, "cdp_receiver_bytes_total", volume=VOL, kind=kind) == \
            state["counters"][kind], kind
    assert state["counters"]["wire"] > 0 and state["counters"]["data"] > 0
    # every epoch of this run was applied once and timed
    assert val(m, "cdp_receiver_apply_seconds_count", volume=VOL) == state["counters"]["epochs"]
    points = list_points(env.replica_dir(VOL))
    assert val(m, "cdp_receiver_recovery_points", volume=VOL) == len(points) >= 4
    window = val(m, "cdp_receiver_recovery_window_seconds", volume=VOL)
    assert 0 < window <= time.time() - points[0].time + 5
    assert val(m, "cdp_receiver_journal_bytes", volume=VOL) == sum(p.size for p in points)
    lag = val(m, "cdp_receiver_lag_seconds", volume=VOL)
    assert 0 <= lag < 30
    assert val(m, "cdp_receiver_pending_epochs", volume=VOL) == 0
    assert val(m, "cdp_receiver_volume_connected", volume=VOL) == 1
    assert val(m, "cdp_receiver_volume_size_bytes", volume=VOL) == 16 * MiB
    assert val(m, "cdp_receiver_connections_total") >= 1
    assert val(m, "cdp_receiver_open_connections") >= 1
    assert val(m, "process_resident_memory_bytes") > 0

    s = scrape(src_port)
    vstat = env.source.volume_status(VOL)
    assert vstat is not None
    assert val(s, "cdp_source_acked_epoch", volume=VOL) == state["epoch"]
    assert val(s, "cdp_source_pending_epochs", volume=VOL) == 0
    assert val(s, "cdp_source_connected") == 1
    assert val(s, "cdp_source_connections_total") >= 1
    assert val(s, "cdp_source_epochs_acked_total", volume=VOL) == state["counters"]["epochs"]
    assert val(s, "cdp_source_bytes_total", volume=VOL, kind="scanned") + val(
        s, "cdp_source_bytes_total", volume=VOL, kind="skipped") >= 16 * MiB  # read + holes
    # what the source sent is what the receiver counted on the wire
    assert val(s, "cdp_source_bytes_total", volume=VOL, kind="wire") >= state["counters"]["wire"]
    # exactly one phase is 1; status.json is rewritten once a second while the gauge is live and
    # a scan starts every second, so the two are compared at a moment when both show the same
    live = {dict(k[1])["phase"] for k, v in s.items()
            if k[0] == "cdp_source_volume_phase" and dict(k[1])["volume"] == VOL and v == 1}
    assert len(live) == 1, live

    def phases_agree() -> bool:
        written = (env.source.volume_status(VOL) or {}).get("phase")
        return val(scrape(src_port), "cdp_source_volume_phase", volume=VOL, phase=written) == 1

    wait_for(phases_agree, 10, what="the phase gauge to show status.json's phase")
    assert 0 <= val(s, "cdp_source_lag_seconds", volume=VOL) < 30

    # hostile input counts as an error of its kind and changes nothing
    before = sum(v for (n, _), v in m.items() if n == "cdp_receiver_errors_total")
    with socket.create_connection(("127.0.0.1", env.port), 5) as sock:
        sock.sendall(b"\xff" * 64)
        sock.settimeout(5)
        with pytest.raises(OSError):
            while sock.recv(4096):
                pass
            raise OSError("closed")
    wait_for(lambda: sum(v for (n, _), v in scrape(rx_port).items()
                         if n == "cdp_receiver_errors_total") > before, 10,
             what="the receiver's error counter to move")
    assert val(scrape(rx_port), "cdp_receiver_epoch", volume=VOL) == state["epoch"]

    # only GET on known paths
    with pytest.raises(urllib.error.HTTPError) as e404:
        urllib.request.urlopen(f"http://127.0.0.1:{rx_port}/nope", timeout=10)
    assert e404.value.code == 404
    req = urllib.request.Request(f"http://127.0.0.1:{rx_port}/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e405:
        urllib.request.urlopen(req, timeout=10)
    assert e405.value.code == 405

    src.stop()
    wait_for(lambda: val(scrape(rx_port), "cdp_receiver_volume_connected", volume=VOL) == 0, 10,
             what="the volume to show disconnected")
    rx.stop()


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io not installed")
def test_nbd_pull_ahead_state_is_exported(cdp_env, daemons) -> None:
    import subprocess

    src_port = free_port()
    env = cdp_env(mode="nbd", source_extra=f'metrics_listen = "127.0.0.1:{src_port}"')
    img = env.source.images[VOL]
    with open(img, "wb") as fh:
        fh.truncate(8 * MiB)
    rx = daemons.receiver(env, inprocess=True)
    src = daemons.source(env, inprocess=True)
    wait_metrics_port(src_port)
    url = env.source.nbd_urls[VOL]
    wait_for(lambda: (env.source.volume_status(VOL) or {}).get("nbd"), 20,
             what="the nbd status")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    wait_metrics_port(port)
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 256k", "-c", "flush", url],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    v = wait_converged(env, VOL, time.time(), src, rx)
    assert_replica_equal(env, VOL)
    nbd = v["nbd"]
    s = scrape(src_port)
    assert val(s, "cdp_source_nbd_mode", volume=VOL, mode=nbd["mode"]) == 1
    assert val(s, "cdp_source_nbd_mode", volume=VOL,
               mode="tracking" if nbd["mode"] == "capture" else "capture") == 0
    # the counters only grow: at least what the status file showed a moment earlier
    assert val(s, "cdp_source_nbd_writes_total", volume=VOL) >= nbd["writes"] >= 1
    assert val(s, "cdp_source_nbd_resyncs_total", volume=VOL) >= nbd["resyncs"] >= 1
    assert val(s, "cdp_source_nbd_cuts_total", volume=VOL) >= nbd["cuts"] >= 1
    assert val(s, "cdp_source_nbd_dirty_regions", volume=VOL) >= 0


def test_http_listen_keys_are_validated(tmp_path: Path) -> None:
    token = tmp_path / "t.token"
    token.write_text("x" * 32)
    token.chmod(0o600)
    rx = tmp_path / "rx.toml"
    rx.write_text(f'[receiver]\nmetrics_listen = "127.0.0.1:9740"\nstatus_listen = "[::1]:0"\n'
                  f'max_connections = 5\n[[receiver.client]]\nname = "a"\n'
                  f'token_file = "{token}"\nvolumes = ["v"]\n')
    cfg = load_receiver(rx)
    assert cfg.metrics_listen == ("127.0.0.1", 9740)
    assert cfg.status_listen == ("::1", 0)
    assert cfg.max_connections == 5
    assert load_receiver(rx.with_name("rx.toml")).max_connections == 5
    for bad, key in (('metrics_listen = "9740"', "metrics_listen"),
                     ('status_listen = 9741', "status_listen"),
                     ("max_connections = 0", "max_connections")):
        rx.write_text(f"[receiver]\n{bad}\n")
        with pytest.raises(ConfigError, match=rf"receiver\.{key}"):
            load_receiver(rx)
    src = tmp_path / "src.toml"
    src.write_text(f'[source]\nname = "a"\nreceiver = "127.0.0.1:7400"\ntoken_file = "{token}"\n'
                   f'metrics_listen = "127.0.0.1:9750"\n[[volume]]\nname = "v"\npath = "v.raw"\n')
    assert load_source(src).metrics_listen == ("127.0.0.1", 9750)
    src.write_text(src.read_text().replace('"127.0.0.1:9750"', '"nowhere"'))
    with pytest.raises(ConfigError, match=r"source\.metrics_listen"):
        load_source(src)
    assert read_json(tmp_path / "missing.json") is None
