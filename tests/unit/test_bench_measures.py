"""The measuring parts of `cdp bench`: steady-state RPO statistics, the disk probe, the nbd
writer's data, the configs it writes and the knobs `--tuned` takes."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
import zstandard

from cdp.benchmark import disk, nbdload
from cdp.benchmark.minimal import describe, parse_knobs, source_config
from cdp.benchmark.runner import WARMUP, rpo_stats
from cdp.errors import UsageError


def test_steady_rpo_leaves_out_the_first_second_of_the_load() -> None:
    # the idle volume's last scan is 8 s old when the load starts; once the load runs the
    # replica keeps within 0.2 s
    samples = [(t / 10, 8.0 + t / 10) for t in range(10)]
    samples += [(1.0 + t / 10, 0.1 + (t % 3) * 0.05) for t in range(50)]
    stats = rpo_stats(samples, WARMUP)
    assert WARMUP == 1.0 and stats["sampled_from"] == 1.0 and stats["samples"] == 50
    assert stats["rpo_max"] == pytest.approx(0.2) and stats["rpo_p99"] <= 0.2
    assert rpo_stats(samples, 0.0)["rpo_max"] > 8  # what the old sampling reported


def test_disk_probe_writes_durably_and_leaves_nothing(tmp_path: Path) -> None:
    rate = disk.measure(tmp_path, 8 << 20)
    assert rate.nbytes == 8 << 20 and rate.seconds > 0 and rate.mbps > 0
    assert os.listdir(tmp_path) == []
    assert disk.probe_bytes(1 << 20) == 64 << 20 and disk.probe_bytes(8 << 30) == 1 << 30
    assert disk.probe_bytes(300 << 20) == 300 << 20
    assert disk.fstype(tmp_path) != ""


@pytest.mark.parametrize("block", [4096, 65536, 1 << 20])
def test_nbd_writer_data_neither_dedups_nor_compresses_trivially(block: int) -> None:
    blocks = nbdload.Blocks(seed=3, size=block)
    bufs = [bytes(blocks.next()) for _ in range(max(64, (48 << 20) // block))]  # wraps the pool
    stream = b"".join(bufs)
    pieces = [stream[i:i + 4096] for i in range(0, len(stream), 4096)]
    assert len(set(pieces)) == len(pieces)  # no 4 KiB alike, so no block of any size alike
    zc = zstandard.ZstdCompressor(level=1)
    chunk = 2 << 20  # as the source compresses: batches of 2 MiB
    ratio = len(stream) / sum(len(zc.compress(stream[i:i + chunk]))
                              for i in range(0, len(stream), chunk))
    assert 1.2 < ratio < 3.0, ratio  # half text (3-4x), half random (1x): not a pattern


def test_bench_source_config_has_only_places_unless_tuned(tmp_path: Path) -> None:
    text = source_config(7400, "bench", tmp_path / "a b.raw", "scan", None, {})
    cfg = tomllib.loads(text)
    assert set(cfg["source"]) == {"name", "receiver", "token_file"}
    assert cfg["volume"] == [{"name": "bench", "path": str(tmp_path / "a b.raw")}]
    knobs = parse_knobs("min_scan_interval=0.02s, window=4,rate_limit=50MiB/s")
    cfg = tomllib.loads(source_config(7400, "bench", tmp_path / "x", "nbd", "unix:s", knobs))
    assert cfg["source"]["window"] == 4 and cfg["volume"][0]["rate_limit"] == "50MiB/s"
    assert cfg["volume"][0]["min_scan_interval"] == "0.02s" and cfg["volume"][0]["mode"] == "nbd"
    assert describe(knobs) == "tuned: min_scan_interval=0.02s, window=4, rate_limit=50MiB/s"
    assert describe({}) == "defaults"


@pytest.mark.parametrize("text", ["path=/x", "name=y", "nbd_listen=unix:z", "tls=1", "bogus=1",
                                  "min_scan_interval", ""])
def test_tuned_takes_only_tuning_knobs(text: str) -> None:
    with pytest.raises(UsageError):
        parse_knobs(text)
