"""Recovery points and failover drills with real daemons, real ext4 images and real tools.

Source images change only by atomic renames of whole versions (like
test_crash.py), so every epoch the receiver applies is one of the versions,
and every recovery point must hash as one. Converging after a change pins
down which epoch holds which version exactly.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import (
    BS,
    MiB,
    assert_replica_equal,
    bytes_hash,
    file_hash,
    make_image,
    replace_atomically,
    run_cdp,
    wait_converged,
    wait_for,
    write_random_blocks,
)

from cdp.replica import Replica
from cdp.replica.points import list_points
from cdp.replica.pointview import open_view

VOL = "vol1"
pytestmark = pytest.mark.skipif(shutil.which("mkfs.ext4") is None or shutil.which("e2fsck")
                                is None or shutil.which("debugfs") is None,
                                reason="needs e2fsprogs (mkfs.ext4, e2fsck, debugfs)")


def view_hash(data_dir: Path, epoch: int | None = None) -> str:
    with open_view(data_dir, VOL, epoch) as v:
        return bytes_hash(v.read(0, v.size))


def mkfs(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True, capture_output=True)


def debugfs_write(image: Path, name: str, data: bytes) -> None:
    src = image.with_name(f"{name}.src")
    src.write_bytes(data)
    r = subprocess.run(["debugfs", "-w", "-R", f"write {src} {name}", str(image)],
                       capture_output=True, text=True)
    src.unlink()
    assert "Allocated inode" in r.stdout + r.stderr, r.stdout + r.stderr


def corrupt_superblock(image: Path) -> None:
    """Damage the primary superblock (magic kept, so it is still found as ext4)."""
    fd = os.open(image, os.O_RDWR)
    try:
        os.pwrite(fd, (123457).to_bytes(4, "little"), 1024)  # s_inodes_count
        os.pwrite(fd, (9999999).to_bytes(4, "little"), 1028)  # s_blocks_count_lo
    finally:
        os.close(fd)


class Versions:
    """Publishes whole versions of the source image and remembers (epoch -> hash)."""

    def __init__(self, env, src, rx) -> None:
        self.env, self.src, self.rx = env, src, rx
        self.image = env.source.images[VOL]
        self.all: set[str] = set()
        self.at: dict[int, str] = {}

    def publish(self, data: bytes) -> str:
        h = bytes_hash(data)
        self.all.add(h)
        replace_atomically(self.image, data)
        return h

    def settle(self) -> int:
        """Wait until the replica holds the current version; record and return its epoch."""
        wait_converged(self.env, VOL, time.time(), self.src, self.rx)
        epoch = self.env.replica_state(VOL)["epoch"]
        h = assert_replica_equal(self.env, VOL)
        assert self.at.setdefault(epoch, h) == h
        return epoch


def drill(env, *args: str) -> tuple[int, dict]:
    r = run_cdp("failover", "test", "-c", env.receiver_toml, VOL, "--json", *args)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


def test_ext4_points_drills_and_a_corrupt_point(cdp_env, daemons, tmp_path):
    env = cdp_env(scan_interval="0.5s")
    work = tmp_path / "work.img"
    mkfs(work, 32 * MiB)
    rng = random.Random(21)
    rx = daemons.receiver(env, inprocess=True)
    vs = Versions(env, None, rx)
    vs.publish(work.read_bytes())
    src = vs.src = daemons.source(env, inprocess=True)
    good = [vs.settle()]
    # replicated while it changes: a new file per version, some versions settle
    for k in range(6):
        debugfs_write(work, f"file{k}", rng.randbytes(rng.randint(50, 300) * 1024))
        vs.publish(work.read_bytes())
        if k % 2:
            good.append(vs.settle())
        else:
            time.sleep(rng.uniform(0.0, 0.6))
    bad_image = tmp_path / "bad.img"
    shutil.copyfile(work, bad_image)
    corrupt_superblock(bad_image)
    vs.publish(bad_image.read_bytes())
    bad = vs.settle()
    debugfs_write(work, "after", rng.randbytes(64 * 1024))
    vs.publish(work.read_bytes())
    good.append(vs.settle())

    # cdp points lists every epoch, in order, each point one whole version
    r = run_cdp("points", "-c", env.receiver_toml, VOL, "--json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)["points"]
    epochs = [p["epoch"] for p in listed]
    assert epochs == list(range(epochs[0], epochs[-1] + 1)) and listed[-1]["current"]
    assert set(vs.at) <= set(epochs)
    assert all(a["time"] <= b["time"] for a, b in itertools.pairwise(listed))
    for e in epochs:
        h = view_hash(env.data_dir, e)
        assert h in vs.all, f"point {e} is not a whole version"
        assert vs.at.get(e, h) == h, f"point {e} differs from the source at that epoch"

    # drills on several good points pass e2fsck on a qcow2 overlay (qemu-img) or a raw copy
    for e in (good[0], good[-1]):
        rc, rep = drill(env, "--point", str(e))
        assert rc == 0, rep
        assert rep["point"]["epoch"] == e and rep["ok"] and rep["rto"] > 0
        assert rep["rpo"] >= 0 and not Path(rep["clone"]).exists()
        names = [c["name"] for c in rep["checks"]]
        assert any(n.startswith("e2fsck disk") for n in names), names
        assert all(c["result"] == "pass" for c in rep["checks"]), rep["checks"]
    # the corrupt point fails its check, and the command says so with exit 1
    rc, rep = drill(env, "--point", str(bad))
    assert rc == 1 and not rep["ok"]
    fsck = next(c for c in rep["checks"] if c["name"].startswith("e2fsck"))
    assert fsck["result"] == "fail" and "exit status 4" in fsck["output"]
    # a raw clone kept, a user check with the path, --at choosing by time
    # a scan without a hook reads over a period: --at finds its point once its reads ended
    at = next(p["until"] for p in listed if p["epoch"] == good[1])
    rc, rep = drill(env, "--at", repr(at + 0.001), "--format", "raw", "--keep",
                    "--check", 'test -s "$CDP_CLONE" && test -s')
    assert rc == 0, rep
    assert rep["point"]["epoch"] == good[1] and rep["clone_format"] == "raw"
    assert file_hash(rep["clone"]) == vs.at[good[1]]
    assert rep["checks"][-1]["result"] == "pass"
    shutil.rmtree(Path(rep["clone"]).parent)
    r = run_cdp("failover", "test", "-c", env.receiver_toml, VOL, "--point", "999999")
    assert r.returncode == 2 and "not kept" in r.stderr
    src.stop()
    rx.stop()


def test_views_and_drills_stay_on_their_point_while_epochs_apply(cdp_env, daemons):
    env = cdp_env(scan_interval="0.5s")
    image = env.source.images[VOL]
    rng = random.Random(22)
    size = 32 * MiB
    make_image(image, size, rng, zero=0.3, text=0.3)
    rx = daemons.receiver(env, inprocess=True)
    src = daemons.source(env, inprocess=True)
    vs = Versions(env, src, rx)
    vs.all.add(file_hash(image))
    p1 = vs.settle()
    write_random_blocks(image, rng.sample(range(size // BS), 40), rng)
    vs.all.add(file_hash(image))
    p2 = vs.settle()

    stop = threading.Event()

    def load() -> None:
        r = random.Random(23)
        while not stop.is_set():
            write_random_blocks(image, r.sample(range(size // BS), 16), r)
            time.sleep(0.05)

    writer = threading.Thread(target=load)
    writer.start()
    try:
        e0 = env.replica_state(VOL)["epoch"]
        reads = 0
        with open_view(env.data_dir, VOL, p1) as v1, open_view(env.data_dir, VOL, p2) as v2:
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline or env.replica_state(VOL)["epoch"] < e0 + 3:
                assert bytes_hash(v1.read(0, size)) == vs.at[p1]
                assert bytes_hash(v2.read(0, size)) == vs.at[p2]
                reads += 1
                assert rx.running and src.running
        assert env.replica_state(VOL)["epoch"] >= e0 + 3, "no epochs applied during the reads"
        rc, rep = drill(env, "--point", str(p2), "--keep", "--format", "raw")
        assert rc == 0, rep
        first = file_hash(rep["clone"])
        time.sleep(0.5)  # epochs keep landing in the replica
        assert file_hash(rep["clone"]) == first == vs.at[p2]
        shutil.rmtree(Path(rep["clone"]).parent)
    finally:
        stop.set()
        writer.join()
    vs.settle()  # the replica still converges
    src.stop()
    rx.stop()
    print(f"{reads} full reads of two views while epochs applied")


def test_retention_keeps_journal_within_bounds_under_load(cdp_env, daemons):
    env = cdp_env(receiver_extra='keep_points = "forever"\nkeep_points_size = "2MiB"',
                  scan_interval="0.5s")
    image = env.source.images[VOL]
    rng = random.Random(24)
    size = 16 * MiB
    make_image(image, size, rng, zero=0.2, text=0.2)
    rx = daemons.receiver(env, inprocess=True)
    src = daemons.source(env, inprocess=True)
    vs = Versions(env, src, rx)
    first = vs.settle()
    for _ in range(9):
        write_random_blocks(image, rng.sample(range(size // BS), 6), rng)  # ~384 KiB of undo
        vs.settle()
        journal = env.replica_dir(VOL) / "journal"
        total = sum(p.stat().st_size for p in journal.iterdir())
        assert total <= 2 * MiB, f"journal holds {total} bytes, bound 2 MiB"
    points = list_points(env.replica_dir(VOL))
    epochs = [p.epoch for p in points]
    assert len(points) >= 3, epochs
    assert epochs[0] > first, "the oldest points must have been dropped"
    assert epochs == list(range(epochs[0], epochs[-1] + 1))
    checked = 0
    for e in epochs:
        if e in vs.at:
            assert view_hash(env.data_dir, e) == vs.at[e], e
            checked += 1
    assert checked >= 3
    assert_replica_equal(env, VOL)
    src.stop()
    rx.stop()


def test_promote_refuses_a_connected_source_then_rolls_back(cdp_env, daemons):
    env = cdp_env(scan_interval="0.5s")
    image = env.source.images[VOL]
    rng = random.Random(25)
    size = 8 * MiB
    make_image(image, size, rng, zero=0.2, text=0.3)
    rx = daemons.receiver(env, inprocess=True)
    src = daemons.source(env, inprocess=True)
    vs = Versions(env, src, rx)
    e1 = vs.settle()
    write_random_blocks(image, rng.sample(range(size // BS), 20), rng)
    vs.settle()
    write_random_blocks(image, rng.sample(range(size // BS), 20), rng)
    e3 = vs.settle()
    assert e3 > e1

    wait_for(lambda: (env.replica_dir(VOL) / "status.json").exists(), 10)
    r = run_cdp("failover", "promote", "-c", env.receiver_toml, VOL, "--point", str(e1))
    assert r.returncode == 1 and "still connected" in r.stderr, r.stderr
    assert not (env.replica_dir(VOL) / "promoted.json").exists()
    src.stop()
    wait_for(lambda: not json.loads((env.replica_dir(VOL) / "status.json").read_text())[
        "connected"], 10, what="the receiver to notice the source left")
    r = run_cdp("failover", "promote", "-c", env.receiver_toml, VOL, "--point", str(e1),
                "--json", timeout=90)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["state"] == "promoted" and rec["epoch"] == e1 and rec["previous_epoch"] == e3
    assert file_hash(env.replica_image(VOL)) == vs.at[e1]
    assert json.loads((env.replica_dir(VOL) / "promoted.json").read_text())["epoch"] == e1
    assert os.access(env.replica_image(VOL), os.W_OK)
    # a source that opens the promoted volume gets a clear, permanent refusal
    src.start()
    wait_for(lambda: "promoted" in ((env.source.volume_status(VOL) or {}).get("error") or ""),
             30, what="the source to be refused")
    write_random_blocks(image, range(4), rng)
    time.sleep(1.0)
    assert file_hash(env.replica_image(VOL)) == vs.at[e1]
    r = run_cdp("failover", "promote", "-c", env.receiver_toml, VOL)
    assert r.returncode == 1 and "already promoted" in r.stderr
    src.stop()
    rx.stop()


def test_forced_promote_cuts_off_a_connected_source(cdp_env, daemons):
    env = cdp_env(scan_interval="0.5s")
    image = env.source.images[VOL]
    rng = random.Random(26)
    make_image(image, 4 * MiB, rng)
    rx = daemons.receiver(env, inprocess=True)
    src = daemons.source(env, inprocess=True)
    vs = Versions(env, src, rx)
    e1 = vs.settle()
    r = run_cdp("failover", "promote", "-c", env.receiver_toml, VOL, "--force", "--json",
                timeout=90)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["epoch"] == e1
    assert file_hash(env.replica_image(VOL)) == vs.at[e1]
    wait_for(lambda: "promoted" in src.log_text(), 30, what="the source to hear of it")
    assert rx.running
    src.stop()
    rx.stop()


def test_receiver_sigkill_with_journal_keeps_points_right(cdp_env, daemons):
    env = cdp_env(scan_interval="0.5s")
    image = env.source.images[VOL]
    rng = random.Random(27)
    size = 16 * MiB
    blocks = size // BS
    make_image(image, size, rng, zero=0.2, text=0.2)
    current = bytearray(image.read_bytes())
    rx = daemons.receiver(env)
    src = daemons.source(env)
    vs = Versions(env, src, rx)
    vs.all.add(bytes_hash(current))
    vs.settle()
    seen: dict[int, str] = {}  # a point's content never changes once applied
    for r in range(6):
        for i in rng.sample(range(blocks), int(blocks * rng.uniform(0.1, 0.3))):
            current[i * BS:(i + 1) * BS] = rng.randbytes(BS)
        vs.publish(bytes(current))
        time.sleep(rng.uniform(0.05, 0.8))
        rx.kill()
        rep = Replica.open(env.data_dir, VOL)  # the receiver's own recovery
        rep.close()
        points = list_points(env.replica_dir(VOL))
        old = [p for p in points if p.epoch in seen]
        for p in [p for p in points if p.epoch not in seen] + rng.sample(old, min(2, len(old))):
            h = view_hash(env.data_dir, p.epoch)
            assert h in vs.all, f"round {r}: point {p.epoch} is not a whole version"
            assert seen.setdefault(p.epoch, h) == h, f"round {r}: point {p.epoch} changed"
        assert file_hash(env.replica_image(VOL)) == seen[points[-1].epoch]
        rx.start()
        log_start = f"---- start #{rx.starts} of receiver ----"
        wait_for(lambda s=log_start: f"volume opened client=host1 volume={VOL}" in
                 rx.log_text().split(s)[-1], 30, interval=0.02, what="the source to reconnect")
    vs.settle()
    for p in list_points(env.replica_dir(VOL)):
        h = view_hash(env.data_dir, p.epoch)
        assert h in vs.all and seen.setdefault(p.epoch, h) == h
    assert len(seen) >= 4
    src.stop()
    rx.stop()
