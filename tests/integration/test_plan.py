"""`cdp plan`: a volume written at a scripted rate reports that rate (within 10%), and the link,
seeding and archive figures follow from the measured ones as documented."""

from __future__ import annotations

import importlib.util
import json
import random
import threading
import time

import pytest
from helpers import BS, MiB, run_cdp

from cdp.planner import Pass, percentile, seeding_seconds, summarize, window_rates

RATE = 2 * MiB  # bytes per second the writer thread changes
LINK = 100e6 / 8  # --link 100Mbit


class Writer(threading.Thread):
    """Writes RATE bytes/s of random whole blocks, each block once (a rescan sees every one)."""

    def __init__(self, path, blocks: int) -> None:
        super().__init__(daemon=True)
        self.path, self.blocks = path, blocks
        self.stop = threading.Event()
        self.written = 0

    def run(self) -> None:
        rng = random.Random(3)
        order = rng.sample(range(self.blocks), self.blocks)
        per_s = RATE // BS
        t0 = time.monotonic()
        with open(self.path, "r+b", buffering=0) as fh:
            for k, b in enumerate(order):
                if self.stop.is_set():
                    return
                delay = t0 + k / per_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                fh.seek(b * BS)
                fh.write(rng.randbytes(BS))
                self.written += BS


def test_plan_reports_the_scripted_rate_and_the_sizing_follows(cdp_env, tmp_path):
    env = cdp_env()
    image = env.source.images["vol1"]
    blocks = 1024  # 64 MiB: the writer never comes back to a block within the run
    with open(image, "wb") as fh:
        fh.truncate(blocks * BS)
        for b in range(0, blocks, 4):  # a quarter of the volume holds data (text-like: compresses)
            fh.seek(b * BS)
            fh.write((b"volume data %d " % b) * (BS // 16) + bytes(BS - (BS // 16) * 16))
    w = Writer(image, blocks)
    plot = tmp_path / "plan.png"
    args = ["plan", "-c", env.source.toml, "--duration", "8s", "--interval", "0.5s",
            "--rpo", "2s", "--link", "100Mbit", "--json"]
    if importlib.util.find_spec("matplotlib"):
        args += ["--plot", plot]
    w.start()
    try:
        r = run_cdp(*args, timeout=60)
    finally:
        w.stop.set()
        w.join()
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    total, vol = rep["total"], rep["volumes"][0]
    assert vol["name"] == "vol1" and rep["link"] == LINK
    assert abs(vol["rate_mean"] - RATE) <= 0.1 * RATE, (vol["rate_mean"], RATE)
    assert abs(total["rate_mean"] - RATE) <= 0.1 * RATE
    assert abs(vol["rate_p95"] - RATE) <= 0.25 * RATE  # short windows: noisier
    assert 0.97 <= vol["wire_ratio"] <= 1.05  # random blocks: neither compress nor repeat
    assert vol["dedup"] == pytest.approx(1.0) and vol["compression"] <= 1.01
    # the sizing, computed here the documented way from the measured figures
    assert vol["link_needed"] == pytest.approx(vol["rate_p95_rpo"] * vol["wire_ratio"])
    assert abs(vol["link_needed"] - RATE * vol["wire_ratio"]) <= 0.25 * RATE
    # the data at the first pass: the initial quarter, plus what the writer had written by then
    assert blocks // 4 * BS <= vol["data_bytes"] <= blocks // 4 * BS + w.written
    assert vol["seed_compression"] > 2  # the text-like data compresses
    assert vol["seed_seconds"] == pytest.approx(
        vol["data_bytes"] / (LINK * vol["seed_compression"]))
    assert vol["archive_seconds"] == pytest.approx(vol["archive_bytes"] / LINK)
    assert vol["cpu_s_per_gib"] > 0
    assert "short" in " ".join(rep["notes"]) and rep["window"] < 60
    if "--plot" in args:
        assert plot.read_bytes()[:4] == b"\x89PNG"


def test_summary_arithmetic():
    passes = [Pass(t, changed=c, unique=c // 2, dup=c // 4, zero=c - c // 2 - c // 4,
                   compressed=c // 8) for t, c in [(1, 100), (2, 300), (3, 100), (4, 500)]]
    assert window_rates(passes, 2, 0, 4) == [200.0, 300.0]
    assert percentile([1, 2, 3, 4, 100], 95) == 100 and percentile([], 95) == 0
    f = summarize("v", [passes], start=0, end=4, window=2, rpo=1, link=1000, size=10_000,
                  data_bytes=4000, seed_compression=2, archive_every=10)
    assert f.rate_mean == 250 and f.rate_p95 == 300 and f.rate_p95_rpo == 500
    comp = sum(p.compressed for p in passes)
    assert f.wire_ratio == comp / 1000 and f.link_needed == 500 * f.wire_ratio
    assert f.compression == 500 / comp and f.dedup == 750 / 500
    assert f.seed_seconds == seeding_seconds(4000, 1000, 2) == 2.0
    assert f.archive_bytes == int(2500 * f.wire_ratio)
