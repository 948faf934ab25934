"""`cdp demo`, the README's first command: everything on loopback, checked end to end."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from helpers import run_cdp

from cdp.demo import DemoDisk

E2FSPROGS = all(shutil.which(t) for t in ("mkfs.ext4", "debugfs", "e2fsck"))


def test_demo_replicates_drills_and_archives(tmp_path) -> None:
    # --keep: a --dir is cleaned at the end too (issue 15), and this test looks inside it
    r = run_cdp("demo", "--size", "32MiB", "--json", "--dir", tmp_path / "demo", "--keep",
                timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    assert s["replica_equal"] is True and s["daemon_exit_codes"] == [0, 0]
    assert s["seed_seconds"] > 0 and 0 < s["wire"] < s["logical"]
    assert [x["fraction"] for x in s["incremental"]] == [0.01, 0.05]
    drill = s["drill"]
    assert drill["ok"] is True and drill["rto"] > 0 and drill["rpo"] >= 0
    assert drill["checks"] and all(c["result"] in ("pass", "skip") for c in drill["checks"])
    if E2FSPROGS:
        # an ext4 image changed while replicating: the drill's point passes e2fsck, and the
        # newest file written is in the clone, equal to the demo's kept copy (cmp)
        assert s["filesystem"] == "ext4" and s["files"] > 3 and s["note"] is None
        fsck = [c for c in drill["checks"] if c["name"].startswith("e2fsck")]
        assert fsck and all(c["result"] == "pass" for c in fsck), drill["checks"]
        newest = [c for c in drill["checks"] if "check-newest-file" in c["name"]]
        assert [c["result"] for c in newest] == ["pass"], drill["checks"]
    assert not (tmp_path / "demo" / "replicas" / ".drills").exists() or not any(
        (tmp_path / "demo" / "replicas" / ".drills").iterdir())  # the clone was removed
    archive = s["archive"]
    assert archive["verified"] is True and 0 < archive["stored"] <= 32 << 20
    assert (tmp_path / "demo" / "archive" / "config").exists()


@pytest.mark.skipif(not E2FSPROGS, reason="needs e2fsprogs (mkfs.ext4, debugfs, e2fsck)")
def test_demo_disk_files_change_and_the_check_sees_them(tmp_path) -> None:
    disk = DemoDisk(tmp_path / "disk.img", 8 << 20, tmp_path)
    disk.build()
    first = list(disk.files)
    assert disk.change(0.05, seed=1) > 0 and disk.files[-1] not in first
    assert subprocess.run(["e2fsck", "-fn", str(disk.image)], capture_output=True).returncode == 0
    script = disk.check_script()
    assert script is not None
    env = {"PATH": "/usr/sbin:/sbin:/usr/bin:/bin", "CDP_CLONE_RAW": str(disk.image)}
    assert subprocess.run(["sh", str(script)], env=env, capture_output=True).returncode == 0
    assert disk.newest is not None
    disk.newest.write_bytes(b"not what the image holds")  # the check compares bytes
    assert subprocess.run(["sh", str(script)], env=env, capture_output=True).returncode != 0


def test_demo_disk_without_e2fsprogs_is_raw_data_and_says_so(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("cdp.demo.shutil.which", lambda name: None)
    disk = DemoDisk(tmp_path / "disk.img", 4 << 20, tmp_path)
    disk.build()
    assert disk.filesystem is None and "e2fsprogs" in (disk.note or "")
    assert disk.image.stat().st_size == 4 << 20 and disk.change(0.05, seed=1) > 0
    assert disk.check_script() is None
