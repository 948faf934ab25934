"""`cdp bench` measures what users get: the daemons run with the shipped defaults, tuned knobs
only add rows that say so, the seed is set against the disk's measured rate, and --replica-dir
or tmpfs moves the replicas (and leaves nothing behind)."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from cdp.benchmark.disk import fstype
from cdp.config.keys import TABLES
from tests.conftest import run_cdp

# what a config must say besides its required keys: where things are, never how they run
PLACES = {"receiver": {"listen", "data_dir"}, "volume": {"mode", "nbd_listen"}}


def _required(table: str) -> set[str]:
    return {k for k, spec in TABLES[table].items() if spec.required}


def _tuning(cfg: dict, table: str, allowed: set[str]) -> dict:
    """The keys of `cfg` (one table) that are neither required nor a place: tuning knobs."""
    return {k: v for k, v in cfg.items() if k not in _required(table) | PLACES.get(table, set())
            | allowed}


def test_bench_runs_its_daemons_with_the_defaults_and_labels_tuned_rows(tmp_path) -> None:
    work = tmp_path / "w"
    r = run_cdp("bench", "--size", "4MiB", "--scenarios", "seed,incremental", "--tuned",
                "--json", "--keep", "--dir", work, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    for folder, knobs in (("cdp", {}), ("cdp-tuned", {"min_scan_interval": "0.02s"})):
        src = tomllib.loads((work / folder / "source.toml").read_text())
        rcv = tomllib.loads((work / folder / "receiver.toml").read_text())
        assert _tuning(src["source"], "source", set()) == {}, src
        assert [_tuning(v, "volume", set()) for v in src["volume"]] == [knobs], src
        assert _tuning(rcv["receiver"], "receiver", {"client"}) == {}, rcv
        assert [_tuning(c, "receiver.client", set()) for c in rcv["receiver"]["client"]] == [{}]
    rows = report["results"]
    cdp = [x for x in rows if x["tool"] == "cdp"]
    plain = {x["scenario"] for x in cdp if x["config"] == "defaults"}
    assert plain == {"seed", "incremental 1%", "incremental 10%"}, cdp
    tuned = [x for x in cdp if x["config"] != "defaults"]
    assert {x["config"] for x in tuned} == {"tuned: min_scan_interval=0.02s"}
    assert sorted(x["scenario"] for x in tuned) == sorted(
        f"{s} (tuned: min_scan_interval=0.02s)" for s in plain)
    assert all(x["equal"] for x in cdp) and all("config" in x for x in rows)


def test_bench_sets_the_seed_against_the_disks_measured_rate(tmp_path) -> None:
    r = run_cdp("bench", "--size", "8MiB", "--scenarios", "seed", "--json", "--dir",
                tmp_path / "w", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)["results"]
    probe = next(x for x in rows if x["tool"] == "fdatasync")
    seed = next(x for x in rows if x["scenario"] == "seed")
    assert probe["changed"] >= 64 << 20 and probe["mbps"] > 0
    assert probe["extra"]["fstype"] == fstype(tmp_path)
    assert seed["extra"]["device_mbps"] == pytest.approx(probe["mbps"])
    assert seed["extra"]["of_device"] == pytest.approx(seed["mbps"] / probe["mbps"])
    assert 0 < seed["extra"]["written_mbps"] <= seed["mbps"]  # a quarter of the image is holes
    r = run_cdp("bench", "--size", "8MiB", "--scenarios", "seed", "--dir", tmp_path / "w2",
                timeout=300)
    assert r.returncode == 0 and "of the disk's" in r.stdout, r.stdout


def test_replica_dir_holds_the_replicas_and_is_left_as_found(tmp_path) -> None:
    elsewhere = tmp_path / "fast"
    elsewhere.mkdir()
    (elsewhere / "mine").write_text("the user's")
    r = run_cdp("bench", "--size", "4MiB", "--scenarios", "seed,steady", "--steady-seconds", "2",
                "--steady-rate", "1MiB", "--replica-dir", elsewhere, "--json", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)["results"]
    probe = next(x for x in rows if x["tool"] == "fdatasync")
    assert Path(probe["extra"]["folder"]).parent == elsewhere  # measured where the replica was
    assert all(x["equal"] for x in rows)
    assert sorted(os.listdir(elsewhere)) == ["mine"]


@pytest.mark.skipif(fstype(Path("/dev/shm")) != "tmpfs", reason="/dev/shm is not a tmpfs")
def test_seed_tmpfs_seeds_onto_dev_shm_and_frees_it(tmp_path) -> None:
    def ours() -> set[str]:
        return {e for e in os.listdir("/dev/shm") if e.startswith("cdp-bench-")}

    before = ours()
    r = run_cdp("bench", "--size", "8MiB", "--scenarios", "seed-tmpfs", "--json", "--dir",
                tmp_path / "w", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {x["scenario"]: x for x in json.loads(r.stdout)["results"]}
    assert rows["disk write (tmpfs)"]["extra"]["fstype"] == "tmpfs"
    seed = rows["seed (replica on tmpfs)"]
    assert seed["equal"] and seed["extra"]["device_fstype"] == "tmpfs"
    assert ours() == before


def test_bench_refuses_a_tuned_key_that_is_not_a_knob() -> None:
    r = run_cdp("bench", "--tuned", "path=/etc/passwd")
    assert r.returncode == 2 and "not a tuning knob" in r.stderr, r.stderr
    r = run_cdp("bench", "--tuned", "min_scan_interval")
    assert r.returncode == 2 and "KEY=VALUE" in r.stderr, r.stderr
    r = run_cdp("bench", "--size", "2MiB", "--tuned", "min_scan_interval=soon")
    assert r.returncode == 2 and "min_scan_interval" in r.stderr, r.stderr


def test_bench_daemons_start_compiled_where_bytecode_writing_is_off(tmp_path, monkeypatch) -> None:
    """PYTHONDONTWRITEBYTECODE would make every daemon compile all of cdp inside the timed
    seed; the bench compiles once into its own cache instead, as an installed package is."""
    from cdp.benchmark.pair import daemon_env

    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    env = dict(daemon_env(tmp_path / "pyc"))
    assert "PYTHONDONTWRITEBYTECODE" not in env and env["PYTHONPYCACHEPREFIX"] == str(tmp_path / "pyc")
    assert any(p.name.startswith("store.") for p in (tmp_path / "pyc").rglob("*.pyc"))
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE")
    env = dict(daemon_env(tmp_path / "other"))
    assert "PYTHONPYCACHEPREFIX" not in env and not (tmp_path / "other").exists()
