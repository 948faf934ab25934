"""`cdp demo`, the README's first command: everything on loopback, checked end to end."""

from __future__ import annotations

import json

from tests.conftest import run_cdp


def test_demo_replicates_drills_and_archives(tmp_path) -> None:
    r = run_cdp("demo", "--size", "32MiB", "--json", "--dir", tmp_path / "demo", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    assert s["replica_equal"] is True and s["daemon_exit_codes"] == [0, 0]
    assert s["seed_seconds"] > 0 and 0 < s["wire"] < s["logical"]
    assert [x["fraction"] for x in s["incremental"]] == [0.01, 0.05]
    drill = s["drill"]
    assert drill["ok"] is True and drill["rto"] > 0 and drill["rpo"] >= 0
    assert drill["checks"] and all(c["result"] in ("pass", "skip") for c in drill["checks"])
    assert not (tmp_path / "demo" / "replicas" / ".drills").exists() or not any(
        (tmp_path / "demo" / "replicas" / ".drills").iterdir())  # the clone was removed
    archive = s["archive"]
    assert archive["verified"] is True and 0 < archive["stored"] <= 32 << 20
    assert (tmp_path / "demo" / "archive" / "config").exists()
