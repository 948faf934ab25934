"""Archive runs killed with SIGKILL leave a repository that verifies; the next run resumes.

The job runs as a real separate process (the engine with a file-backed
reader: `cdp archive run` needs the replica's point-in-time view, see
test_archive_cli_run.py), against a directory repository.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from archive_fixtures import disk_image, receiver_with_archive
from helpers import MiB, file_hash, run_cdp, scaled, wait_for

from cdp.archive.job import file_opener, open_repo, run_archive
from cdp.archive.maint import verify
from cdp.config import load_receiver

JOB = """
import sys
from pathlib import Path
from cdp.archive.job import file_opener, run_archive
from cdp.config import load_receiver
cfg = load_receiver(sys.argv[1])
run_archive(cfg, "offsite", opener=file_opener({"vol1": Path(sys.argv[2])}))
print("done", flush=True)
"""


def _start(toml: Path, img: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", JOB, str(toml), str(img)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _kill(p: subprocess.Popen[bytes]) -> bool:
    """SIGKILL; True if the job was still running (it was cut short)."""
    alive = p.poll() is None
    if alive:
        p.send_signal(signal.SIGKILL)
    p.wait()
    return alive


def _verify(toml: Path, read_data: bool) -> dict:
    cfg = load_receiver(toml)

    async def go() -> dict:
        return await verify(await open_repo(cfg.archives[0]), read_data)

    return asyncio.run(go())


def _packs(repo: Path) -> set[str]:
    return {p.name for p in (repo / "data").rglob("*") if p.is_file() and not p.name.startswith(".")}


def test_sigkill_at_random_points_leaves_a_valid_repository(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("CDP_TEST_SEED", "0")) or None)
    img = disk_image(tmp_path / "vol1.img", 40 * MiB, seed=21)
    repo = tmp_path / "repo"
    toml = receiver_with_archive(tmp_path / "rx", str(repo), chunk_size="256KiB", pack_size="1MiB")
    r = run_cdp("archive", "init", "-c", toml)
    assert r.returncode == 0, r.stderr
    cut = 0
    for round_ in range(5):
        if round_:
            with open(img, "r+b") as fh:  # the image moves on between attempts: 8 MiB of new data
                os.pwrite(fh.fileno(), rng.randbytes(8 * MiB), rng.randrange(0, 32) * MiB)
        have = len(_packs(repo)) if (repo / "data").is_dir() else 0
        target = have + rng.randint(0, 6)  # a random point: after some packs, then a random instant
        p = _start(toml, img)
        wait_for(lambda t=target, p=p: p.poll() is not None or (
            (repo / "data").is_dir() and len(_packs(repo)) >= t), 60, 0.002, "the job to progress")
        time.sleep(rng.uniform(0, 0.03))
        cut += _kill(p)
        rep = _verify(toml, read_data=round_ == 4)
        assert rep["ok"], rep["problems"]
    assert cut >= 2, "the job finished before most kills; make the image bigger"
    final = run_archive(load_receiver(toml), "offsite", opener=file_opener({"vol1": img}))
    rep = _verify(toml, read_data=True)
    assert rep["ok"], rep["problems"]
    out = tmp_path / "restored.img"
    r = run_cdp("archive", "restore", "-c", toml, final.snapshot[:12], "vol1", "--to", out)
    assert r.returncode == 0, r.stderr
    assert file_hash(out) == file_hash(img)


def test_resumed_run_does_not_upload_packs_again(tmp_path: Path) -> None:
    img = disk_image(tmp_path / "vol1.img", 32 * MiB, seed=22)
    repo = tmp_path / "repo"
    toml = receiver_with_archive(tmp_path / "rx", str(repo), chunk_size="256KiB", pack_size="1MiB")
    assert run_cdp("archive", "init", "-c", toml).returncode == 0
    p = _start(toml, img)
    try:
        wait_for(lambda: len(_packs(repo)) >= 4 if (repo / "data").is_dir() else False, 60, 0.005,
                 "the job to store a few packs")
    finally:
        assert _kill(p), "the job finished before it could be killed"
    before = _packs(repo)
    assert not (repo / "snapshots").exists() and not (repo / "index").exists()
    final = run_archive(load_receiver(toml), "offsite", opener=file_opener({"vol1": img}))
    after = _packs(repo)
    assert final.adopted_packs >= len(before) >= 4
    assert before <= after and len(after) == len(before) + final.packs_uploaded  # none sent twice
    v = final.volumes[0]
    assert v.new_chunks < v.chunks - v.zero_chunks  # the adopted packs' chunks were not stored again
    rep = _verify(toml, read_data=True)
    assert rep["ok"] and rep["orphan_packs"] == 0, rep
    out = tmp_path / "restored.img"
    assert run_cdp("archive", "restore", "-c", toml, "latest", "vol1", "--to", out,
                   timeout=scaled(60)).returncode == 0
    assert file_hash(out) == file_hash(img)
