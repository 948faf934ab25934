"""Staggered scans: with max_concurrent_scans = 1, no two scans of a source's volumes overlap
(proved from the start/end events in its log), waiting volumes queue, and all converge."""

from __future__ import annotations

import itertools
import random
import re
import time

from helpers import MiB, assert_replica_equal, make_image, wait_converged, write_random_blocks

VOLS = ["v1", "v2", "v3", "v4"]
EVENT = re.compile(r"(scan) (start|end) volume=(\S+) t=([\d.]+)")


def intervals(log: str) -> list[tuple[float, float, str]]:
    open_: dict[str, float] = {}
    out = []
    for _kind, what, vol, t in EVENT.findall(log):
        if what == "start":
            assert vol not in open_, f"{vol} started twice"
            open_[vol] = float(t)
        else:
            out.append((open_.pop(vol), float(t), vol))
    return sorted(out)


def test_four_volumes_limit_one_never_overlap_and_converge(cdp_env, daemons):
    env = cdp_env({"host1": VOLS}, scan_interval="0.2s", min_scan_interval="0s",
                  source_extra="max_concurrent_scans = 1")
    rng = random.Random(9)
    for v in VOLS:
        make_image(env.source.images[v], 24 * MiB, rng)
    rx = daemons.receiver(env, inprocess=True)
    t0 = time.time()
    src = daemons.source(env, inprocess=True)
    for v in VOLS:
        wait_converged(env, v, t0, src, rx, timeout=90)
    for _ in range(2):
        t1 = time.time()
        for v in VOLS:
            write_random_blocks(env.source.images[v], rng.sample(range(384), 8), rng)
        for v in VOLS:
            wait_converged(env, v, t1, src, rx, timeout=90)
    src.stop()
    rx.stop()
    for v in VOLS:
        assert_replica_equal(env, v)
    log = src.log_text()
    spans = intervals(log)
    assert {v for _, _, v in spans} == set(VOLS)
    assert len(spans) >= 3 * len(VOLS)
    for (a0, a1, va), (b0, b1, vb) in itertools.pairwise(spans):
        assert b0 >= a1, f"scans of {va} ({a0:.3f}-{a1:.3f}) and {vb} ({b0:.3f}-{b1:.3f}) overlap"
    assert "scan queued volume=" in log  # someone waited its turn
