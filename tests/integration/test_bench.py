"""`cdp bench`: real processes, rsync side by side, every result checked byte for byte."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
from helpers import file_hash, make_image, run_cdp

from cdp.benchmark.rsync import RsyncDaemon


def _unequal(report: dict) -> list[tuple[str, str]]:
    """The (scenario, tool) results whose copy differs from the image, for a failure message."""
    return [(x["scenario"], x["tool"]) for x in report["results"] if not x["equal"]]


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed")
def test_bench_runs_every_scenario_beside_rsync(tmp_path) -> None:
    png = tmp_path / "bench.png"
    r = run_cdp("bench", "--size", "32MiB", "--compare", "rsync", "--steady-seconds", "3",
                "--steady-rate", "4MiB", "--json", "--plot", png, "--dir", tmp_path / "w",
                timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["all_equal"] is True, _unequal(report)
    got = {(x["scenario"], x["tool"]) for x in report["results"]}
    for scen in ("seed", "incremental 1%", "incremental 10%"):
        assert (scen, "cdp") in got and (scen, "rsync") in got
        assert scen in report["speedup_vs_rsync"]
    for x in (x for x in report["results"] if x["scenario"].startswith("incremental")):
        runs = x["extra"]["runs"]  # one change is one noisy sample: the median of three, each tool
        assert len(runs) == 3 and x["seconds"] == sorted(runs)[1], x
        if x["tool"] == "cdp":  # the replica held the change before (or when) the source knew
            assert 0 <= x["seconds"] <= x["extra"]["source_confirmed_s"], x
    steady = next(x for x in report["results"] if x["scenario"] == "steady")
    assert steady["extra"]["rpo_p99"] >= steady["extra"]["rpo_p50"] >= 0
    # the steady state only: samples every 0.1 s from 1 s into the 3-s load, not from its start
    assert steady["extra"]["sampled_from"] == 1.0 and 0 < steady["extra"]["samples"] <= 22
    assert steady["extra"]["cpu_share_source"] > 0 and steady["extra"]["cpu_share_receiver"] > 0
    assert {x["config"] for x in report["results"] if x["tool"] == "cdp"} == {"defaults"}
    assert {x["config"] for x in report["results"] if x["tool"] == "rsync"} == {
        "rsync --inplace --no-whole-file -B 65536 --times --ignore-times --stats"}
    assert [x["tool"] for x in report["results"]].count("fdatasync") == 1  # the disk's rate
    rescan = [x for x in report["results"] if x["tool"] == "scan"]  # the hot-cache rescan rate
    assert [x["scenario"] for x in rescan] == ["rescan (hot cache)"]
    runs = rescan[0]["extra"]["runs"]
    assert len(runs) == 5 and rescan[0]["seconds"] == sorted(runs)[2]
    assert 0 < rescan[0]["changed"] <= rescan[0]["image"]  # data read: holes are skipped
    assert rescan[0]["extra"]["gbps"] > 0 and rescan[0]["extra"]["one_core_gbps"] > 0
    for x in (x for x in report["results"] if x["tool"] not in ("fdatasync", "scan")):
        assert x["seconds"] > 0 and x["cpu_source"] >= 0 and x["peak_receiver"] > 0
        if x["tool"] == "cdp" and x["scenario"].startswith("incremental"):
            # only the rewritten blocks cross the wire (compressed), never the whole image
            assert 0 < x["wire"] < x["image"] / 4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_on_a_users_image_leaves_it_untouched(tmp_path) -> None:
    image = tmp_path / "mine.raw"
    make_image(image, 8 << 20, random.Random(5))
    before = file_hash(image)
    r = run_cdp("bench", "--image", image, "--scenarios", "seed,incremental", "--json",
                timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["all_equal"], _unequal(report)
    assert {x["scenario"] for x in report["results"] if x["tool"] == "cdp"} == {
        "seed", "incremental 1%", "incremental 10%"}
    assert file_hash(image) == before  # the benchmark rewrote its own copy


def test_bench_refuses_unknown_scenarios() -> None:
    r = run_cdp("bench", "--scenarios", "seed,warp")
    assert r.returncode == 2 and "warp" in r.stderr


@pytest.mark.skipif(shutil.which("qemu-nbd") is None or shutil.which("rsync") is None,
                    reason="qemu-nbd or rsync is not installed")
def test_bench_nbd_scenarios_beside_qemu_nbd_and_rsync(tmp_path) -> None:
    r = run_cdp("bench", "--size", "32MiB", "--scenarios", "nbd", "--compare", "rsync", "--json",
                "--steady-seconds", "3", "--steady-rate", "4MiB", "--dir", tmp_path / "w",
                timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["all_equal"] is True, _unequal(report)
    rows = {(x["scenario"], x["tool"]): x for x in report["results"]}
    for w in ("4k random", "64k random", "1M sequential"):
        base, ours = rows[(f"nbd {w}", "qemu-nbd")], rows[(f"nbd {w}", "cdp")]
        assert base["extra"]["iops"] > 0 and ours["extra"]["iops"] > 0
        assert ours["extra"]["of_baseline"] > 0
        assert ours["extra"]["rpo_p99"] >= ours["extra"]["rpo_p50"] >= 0
        assert ours["wire"] > 0  # the writes were replicated, not just served
        # realistic data: a constant pattern (qemu-img bench) showed dedup ratios of 16384x
        assert ours["dedup_ratio"] < 1.1, ours
        assert 1.1 < ours["compression_ratio"] < 4, ours
        assert ours["config"] == "defaults" and base["config"].startswith("qemu-nbd")
    steady = rows[("nbd steady", "cdp")]
    assert steady["extra"]["rpo_p99"] >= steady["extra"]["rpo_p50"] >= 0 and steady["wire"] > 0
    inc = rows[("incremental 1% (nbd)", "cdp")]
    assert 0 < inc["wire"] < inc["image"] / 4
    assert ("incremental 1% (nbd)", "rsync") in rows
    assert "incremental 1% (nbd)" in report["speedup_vs_rsync"]


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed")
def test_rsync_side_sends_an_image_rewritten_within_the_same_second(tmp_path) -> None:
    """rsync's quick check compares mtimes in whole seconds: without --ignore-times a rewrite
    in the second of the previous run is skipped and the comparison copy goes stale."""
    image = tmp_path / "image.raw"
    rng = random.Random(5)
    image.write_bytes(rng.randbytes(1 << 20))
    rs = RsyncDaemon(tmp_path / "rsync")
    try:
        rs.run(image)
        with open(image, "r+b") as fh:  # same size; mtime most likely within the same second
            fh.write(rng.randbytes(4096))
        os.utime(image, ns=(0, (rs.dest / image.name).stat().st_mtime_ns + 1))  # surely so
        run = rs.run(image)
    finally:
        rs.stop()
    assert file_hash(rs.dest / image.name) == file_hash(image)
    assert run.wire > 4096
