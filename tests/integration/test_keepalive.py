"""Quiet connections: the receiver drops idle ones; the source's keepalive keeps its own open."""

from __future__ import annotations

import random
import time

from helpers import make_image, scaled, wait_converged


def _run(cdp_env, daemons, keepalive: str) -> tuple[str, str]:
    env = cdp_env(scan_interval="30s", receiver_extra='idle_timeout = "2s"',
                  source_extra=f'keepalive = "{keepalive}"')
    make_image(env.source.images["vol1"], 1 << 20, random.Random(1))
    rx = daemons.receiver(env, inprocess=True)
    t0 = time.time()
    src = daemons.source(env, inprocess=True)
    wait_converged(env, "vol1", t0, src, rx)
    time.sleep(scaled(6))  # three idle timeouts, no scan due (scan_interval 30s)
    src.stop()
    rx.stop()
    return rx.log_text(), src.log_text()


def test_keepalive_holds_a_quiet_connection(cdp_env, daemons) -> None:
    rx_log, src_log = _run(cdp_env, daemons, "0.5s")
    assert "idle for" not in rx_log
    assert src_log.count("connected to receiver") == 1


def test_receiver_drops_connections_that_stay_silent(cdp_env, daemons) -> None:
    rx_log, src_log = _run(cdp_env, daemons, "60s")  # keepalive longer than idle_timeout
    assert "idle for" in rx_log
    assert src_log.count("connected to receiver") >= 2  # and the source simply reconnects
