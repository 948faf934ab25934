"""The receiver's archive scheduler: due [[archive]] jobs run from the daemon, at most
max_concurrent_archives at once (queued in order), and their last runs are recorded."""

from __future__ import annotations

import itertools
import json
import random
import re
import time
from pathlib import Path

from helpers import Daemon, free_port, read_json, run_cdp, wait_for

from cdp.blocks import Geometry, pack_u64
from cdp.codec import block_hash, compress
from cdp.replica import Replica

BS = 64 * 1024
EVENT = re.compile(r"archive (start|end) name=(\S+) t=([\d.]+)")


def make_replica(data_dir: Path) -> None:
    rng = random.Random(2)
    rep = Replica.open(data_dir, "vm1", Geometry(64 * BS, BS), create=True)
    try:
        w = rep.begin(1, time.time())
        blocks = {i: rng.randbytes(BS) for i in range(0, 64, 2)}
        idx = sorted(blocks)
        data = b"".join(blocks[i] for i in idx)
        w.add_data(pack_u64(idx), b"".join(block_hash(blocks[i]) for i in idx), len(data),
                   compress(data))
        w.seal(w.blocks)
        w.apply()
    finally:
        rep.close()


def test_scheduled_archives_run_one_at_a_time_and_record_their_runs(tmp_path, daemons):
    data_dir = tmp_path / "replicas"
    make_replica(data_dir)
    lines = ["[receiver]", f'listen = "127.0.0.1:{free_port()}"',
             f"data_dir = {json.dumps(str(data_dir))}", "max_concurrent_archives = 1", ""]
    for name in ("a", "b", "c"):
        lines += ["[[archive]]", f'name = "{name}"',
                  f"repository = {json.dumps(str(tmp_path / f'repo-{name}'))}",
                  "encrypt = false", 'schedule = "daily 00:00"', 'chunk_size = "256KiB"',
                  'pack_size = "2MiB"', ""]
    lines += ["[[archive]]", 'name = "m"', f"repository = {json.dumps(str(tmp_path / 'repo-m'))}",
              "encrypt = false", ""]  # manual: never run by the scheduler
    toml = tmp_path / "receiver.toml"
    toml.write_text("\n".join(lines))
    for name in ("a", "b", "c", "m"):
        r = run_cdp("archive", "init", "-c", toml, "--archive", name)
        assert r.returncode == 0, r.stderr
    d = Daemon("receiver", toml, tmp_path / "receiver.log")
    daemons.all.append(d)  # killed at the end of the test whatever happens
    d.start(wait=False)

    def done() -> dict | None:
        st = read_json(data_dir / ".archive-state.json")
        arch = (st or {}).get("archives", {})
        return st if all(arch.get(n, {}).get("ok") for n in "abc") else None

    st = wait_for(done, 60, what=lambda: f"the archives to run: {d.tail()}")
    assert "m" not in st["archives"] and st["limit"] == 1
    d.stop()
    spans: dict[str, list[float]] = {}
    for _what, name, t in EVENT.findall(d.log_text()):
        spans.setdefault(name, []).append(float(t))
    assert sorted(spans) == ["a", "b", "c"] and all(len(v) == 2 for v in spans.values())
    order = sorted(spans.values())
    for (_, end), (start, _) in itertools.pairwise(order):
        assert start >= end, f"archive runs overlap: {spans}"
    assert "archive queued name=b" in d.log_text()
    for name in "abc":
        r = run_cdp("archive", "list", "-c", toml, "--archive", name, "--json")
        assert r.returncode == 0 and len(json.loads(r.stdout)) == 1, r.stdout + r.stderr
        assert st["archives"][name]["last_run"] <= time.time()
