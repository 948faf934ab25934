"""The receiver's status page: real daemons, the JSON compared with the replica on disk,
the HTML rendered by headless Chromium (skipped only when no Chromium is installed)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import (
    MiB,
    assert_replica_equal,
    free_port,
    make_image,
    scaled,
    wait_converged,
    wait_for,
    write_random_blocks,
)

from cdp.replica.points import list_points
from cdp.statuspage import svg_chart

VOL = "vol1"


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def get(port: int, path: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        assert r.status == 200
        return r.headers["Content-Type"], r.read()


def chromium_args(exe: str, profile: Path) -> list[str]:
    return [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}"]


def test_status_page_shows_what_the_replica_holds(cdp_env, daemons, tmp_path: Path) -> None:
    port = free_port()
    env = cdp_env(receiver_extra=f'status_listen = "127.0.0.1:{port}"')
    image = env.source.images[VOL]
    rng = random.Random(11)
    make_image(image, 16 * MiB, rng)
    rx = daemons.receiver(env, inprocess=True)
    src = daemons.source(env, inprocess=True)
    wait_converged(env, VOL, time.time(), src, rx)
    for _ in range(3):  # a few seconds of changes: samples with throughput in them
        write_random_blocks(image, rng.sample(range(256), 8), rng)
        wait_converged(env, VOL, time.time(), src, rx)
        time.sleep(0.5)
    assert_replica_equal(env, VOL)

    def report() -> dict:
        ctype, body = get(port, "/status.json")
        assert ctype == "application/json"
        return json.loads(body)

    # wait for a sample taken after the last epoch, so the ring buffer has the final state
    last_applied = env.replica_state(VOL)["applied_at"]
    rep = wait_for(lambda: (r := report())["volumes"] and r["volumes"][0]["history"]["time"][-1]
                   > last_applied + 1.5 and r, 15, what="a sample after the last epoch")
    state = env.replica_state(VOL)
    (v,) = rep["volumes"]
    assert v["volume"] == VOL and v["epoch"] == state["epoch"] >= 4
    assert v["counters"] == state["counters"]
    assert v["size"] == state["size"] and v["block_size"] == state["block_size"]
    assert v["points"] == len(list_points(env.replica_dir(VOL)))
    assert v["connected"] is True and v["client"] == "host1" and not v["error"]
    assert 0 <= v["lag"] < 30
    hist = v["history"]
    assert len(hist["time"]) >= 3 and hist["time"] == sorted(hist["time"])
    assert max(hist["rate"]) > 0  # the epochs above show up as throughput
    assert all(lag is not None and lag >= 0 for lag in hist["lag"][-3:])
    ctype, _ = get(port, "/status.json?history=0")
    assert "history" not in json.loads(get(port, "/status.json?history=0")[1])["volumes"][0]

    ctype, page = get(port, "/")
    assert ctype.startswith("text/html")
    text = page.decode()
    assert VOL in text and text.count("<svg") == 2 and "<polyline" in text
    assert "<script" not in text and 'src="http' not in text and "<link" not in text

    exe = chromium()
    if exe is None:
        pytest.skip("chromium not installed (Debian package: chromium)")
    shot = tmp_path / "statuspage.png"
    r = subprocess.run([*chromium_args(exe, tmp_path / "profile"), "--window-size=1200,900",
                        f"--screenshot={shot}", f"http://127.0.0.1:{port}/"],
                       capture_output=True, text=True, timeout=scaled(90))
    assert shot.exists(), r.stdout[-2000:] + r.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    if art := os.environ.get("CDP_TEST_ARTIFACTS"):
        Path(art).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(art) / "statuspage.png")
    # what Chromium rendered is our page, charts included (nothing needed from elsewhere)
    dom = subprocess.run([*chromium_args(exe, tmp_path / "profile2"), "--dump-dom",
                          f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                         timeout=scaled(90)).stdout
    assert "cdp receiver" in dom and VOL in dom and dom.count("<svg") == 2
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(shot) as img:
        assert img.size == (1200, 900)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20) or []
        assert len(colours) > 20, "the screenshot is (nearly) blank"
    src.stop()
    rx.stop()


def test_svg_chart_breaks_lines_at_gaps_and_scales() -> None:
    now = 10_000.0
    times = [now - 100 + i for i in range(10)] + [now - 50 + i for i in range(10)]
    values: list[float | None] = [float(i) for i in range(20)]
    values[3] = None
    svg = svg_chart(times, [("x", values, "#000")], now, unit=lambda v: f"{v:.0f}")
    # three runs: before the None, after it up to the gap, after the gap
    assert svg.count("<polyline") == 3
    assert "-60 min" in svg and "now" in svg
    # an hour of 1-s samples: at most two points (low, high) per pixel column, peaks kept
    hour = [now - 3600 + i for i in range(3601)]
    spiky = [100.0 if i == 1800 else 1.0 for i in range(3601)]
    big = svg_chart(hour, [("x", spiky, "#000")], now, width=520)
    points = big.split('points="')[1].split('"')[0].split()
    assert len(points) <= 2 * 520 and len(big) < 20_000
    assert min(float(p.split(",")[1]) for p in points) < 20  # the spike reaches the top
    empty = svg_chart([], [("x", [], "#000")], now)
    assert "<polyline" not in empty and empty.startswith("<svg")
