"""`cdp status -c source.toml` says why the source is not connected (issue 15): the last
connection error, since when, and when it tries again; also in its metrics."""

from __future__ import annotations

import json
import random
import time

from helpers import MiB, free_port, make_image, run_cdp, wait_for
from test_metrics import scrape, val, wait_metrics_port

VOL = "vol1"


def test_status_says_why_the_source_is_not_connected(cdp_env, daemons):
    mport = free_port()
    env = cdp_env(source_extra=f'metrics_listen = "127.0.0.1:{mport}"')
    make_image(env.source.images[VOL], 2 * MiB, random.Random(4))
    t0 = time.time()
    src = daemons.source(env, inprocess=True)  # no receiver yet
    st = wait_for(lambda: (env.source.status() or {}).get("link_error") and env.source.status(),
                  20, what=lambda: f"a connection error in status.json\n{src.tail()}")
    assert "cannot connect to receiver" in st["link_error"], st
    assert t0 <= st["link_error_since"] <= time.time()
    assert st["next_connect"] >= st["link_error_since"]

    r = run_cdp("status", "-c", env.source.toml, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["running"] and not rep["connected"]
    assert "cannot connect to receiver" in rep["link_error"]
    assert rep["link_error_since"] >= t0 and rep["next_connect"] >= rep["link_error_since"]
    r = run_cdp("status", "-c", env.source.toml)
    assert r.returncode == 0, r.stderr
    assert "not connected since" in r.stdout, r.stdout
    assert "next attempt in" in r.stdout or "trying again now" in r.stdout, r.stdout
    assert "Connect call failed" in " ".join(r.stdout.split()), r.stdout
    row = next(line for line in r.stdout.splitlines() if VOL in line)
    assert "not connected:" in row, r.stdout  # the error column says why

    wait_metrics_port(mport)
    m = scrape(mport)
    assert val(m, "cdp_source_connected") == 0
    assert val(m, "cdp_source_connection_failing_since_timestamp_seconds") == \
        st["link_error_since"]
    assert val(m, "cdp_source_next_connect_timestamp_seconds") >= st["link_error_since"]
    assert val(m, "cdp_source_errors_total", kind="transport") >= 1

    rx = daemons.receiver(env, inprocess=True)  # once connected, the error is gone
    wait_for(lambda: (env.source.status() or {}).get("connected"), 20,
             what=lambda: f"the source to connect\n{src.tail()}")
    rep = json.loads(run_cdp("status", "-c", env.source.toml, "--json").stdout)
    assert rep["connected"] and rep["link_error"] == "" and rep["next_connect"] is None
    m = scrape(mport)
    assert val(m, "cdp_source_connection_failing_since_timestamp_seconds") == 0
    assert val(m, "cdp_source_next_connect_timestamp_seconds") == 0
    src.stop()
    rx.stop()
