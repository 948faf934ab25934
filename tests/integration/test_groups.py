"""Consistency groups end to end: two nbd disks of one VM, one of them rate-limited so its
sender falls behind and merges epochs, while a writer writes both disks in lockstep.

Iteration j writes one 64 KiB slot of disk0, waits for it, then one slot of disk1; each
slot starts with j. A state both disks had together is therefore (a, a) or (a, a-1)
(disk0 is written first), and each disk's bytes are exactly the model of its counter
(every write replayed on zeros). Copies of both source images are kept at quiet moments;
every clone pair is compared with them, or with the model, byte for byte.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    CdpEnv,
    Daemons,
    bytes_hash,
    file_hash,
    run_cdp,
    scaled,
    wait_converged,
    wait_for,
)
from test_nbdmode import wait_port

from cdp.benchmark.nbdclient import NbdClient

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")

MiB = 1 << 20
SIZE = 4 * MiB
SLOT = 64 * 1024
SLOTS = SIZE // SLOT
DISKS = ("disk0", "disk1")
GROUP = "vm1"


def slot_data(disk: int, j: int) -> tuple[int, bytes]:
    """Where iteration j writes on a disk, and what: its number, then incompressible data."""
    head = struct.pack(">Q", j) * 512
    return (j * 7 % SLOTS) * SLOT, head + random.Random(disk * 1_000_003 + j).randbytes(SLOT - 4096)


def model(disk: int, n: int) -> bytes:
    """The disk after iterations 1..n."""
    img = bytearray(SIZE)
    for j in range(1, n + 1):
        off, data = slot_data(disk, j)
        img[off:off + SLOT] = data
    return bytes(img)


def counter(img: bytes) -> int:
    return max(struct.unpack_from(">Q", img, s * SLOT)[0] for s in range(SLOTS))


def check_pair(a_img: bytes, b_img: bytes, what: str) -> tuple[int, int]:
    """The pair is a state both disks had together, and each disk is exactly its model."""
    a, b = counter(a_img), counter(b_img)
    assert b in (a, a - 1), f"{what}: disk0 at iteration {a}, disk1 at {b}: never together"
    assert bytes_hash(a_img) == bytes_hash(model(0, a)), f"{what}: disk0 is not iteration {a}"
    assert bytes_hash(b_img) == bytes_hash(model(1, b)), f"{what}: disk1 is not iteration {b}"
    return a, b


def start_group(cdp_env, daemons: Daemons, rate: str) -> CdpEnv:
    env = cdp_env({"host1": list(DISKS)}, mode="nbd",
                  volume_extra=f'group = "{GROUP}"\nblock_size = "64KiB"\nepoch_interval = "0.5s"')
    toml = env.source.toml
    text = toml.read_text()
    text = text.replace('name = "disk0"', f'name = "disk0"\nrate_limit = "{rate}"', 1)
    toml.write_text(text)
    for img in env.source.images.values():
        with open(img, "wb") as fh:
            fh.truncate(SIZE)
    daemons.receiver(env, inprocess=True)
    daemons.source(env, inprocess=True)
    for d in DISKS:
        wait_port(port_of(env, d))
    settle(env)
    return env


def port_of(env: CdpEnv, disk: str) -> int:
    return int(env.source.nbd_urls[disk].rsplit(":", 1)[1].split("/")[0])


def settle(env: CdpEnv) -> float:
    since = time.time()
    for d in DISKS:
        wait_converged(env, d, since, timeout=60)
    return time.time()


class Writer:
    """Writes both disks in lockstep through their NBD exports."""

    def __init__(self, env: CdpEnv) -> None:
        self.clients = [NbdClient(("127.0.0.1", port_of(env, d)), d) for d in DISKS]
        self.j = 0
        self.moments: list[tuple[float, int]] = []  # (time, last whole iteration) mid-burst

    def burst(self, n: int, pause: float = 0.01) -> None:
        for _ in range(n):
            self.j += 1
            for k, c in enumerate(self.clients):
                off, data = slot_data(k, self.j)
                c.write(off, data)
                c.flush()  # the write is done before the other disk's starts (and a cut)
            if self.j % 5 == 0:
                self.moments.append((time.time(), self.j))
            time.sleep(pause)

    def close(self) -> None:
        for c in self.clients:
            c.close()


def clone_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


def group_drill_pair(env: CdpEnv, tmp_path: Path, *args: str) -> tuple[dict, list[bytes]]:
    """`cdp failover test --group` (raw clones, kept); the report and both clones' bytes."""
    r = run_cdp("failover", "test", "-c", env.receiver_toml, "--group", GROUP, "--format", "raw",
                "--keep", "--dir", tmp_path / "drills", "--json", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    by = {v["volume"]: v for v in rep["volumes"]}
    assert sorted(by) == list(DISKS)
    imgs = [clone_bytes(Path(by[d]["clone"])) for d in DISKS]
    for d in DISKS:
        shutil.rmtree(Path(by[d]["clone"]).parent)
    return rep, imgs


def test_a_group_with_a_member_behind_restores_pairs_that_existed_together(
        cdp_env, daemons, tmp_path: Path) -> None:
    from cdp.drills.drill import run_drill
    from cdp.drills.group import run_group_drill
    from cdp.drills.promote import connected_source

    env = start_group(cdp_env, daemons, rate="1MiB/s")
    src = daemons.all[1]
    w = Writer(env)
    kept: list[tuple[float, int, str, str]] = []  # (time, iteration, hash disk0, hash disk1)
    try:
        for _ in range(3):
            w.burst(30)
            t = settle(env)  # quiet, both replicated: keep copies of both images
            kept.append((t, w.j, file_hash(env.source.images["disk0"]),
                         file_hash(env.source.images["disk1"])))
        # a group checkpoint while disk0 is behind, the writer going on right after its cut
        w.burst(20, pause=0.0)
        base = {d: env.source.images[d].read_bytes() for d in DISKS}
        base_j = w.j
        ck = subprocess.Popen([sys.executable, "-m", "cdp", "checkpoint", "-c", env.source.toml,
                               "--group", GROUP, "--label", "base", "--json", "--timeout", "60s"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: "checkpoint cut group=vm1" in src.log_text(), 30, what="the group cut")
        w.burst(20, pause=0.0)
        out, err = ck.communicate(timeout=scaled(60))
        assert ck.returncode == 0, out + err
        answer = json.loads(out)
        assert sorted(answer["epochs"]) == list(DISKS)
        settle(env)
    finally:
        w.close()
    st = env.source.volume_status("disk0")
    assert st is not None and st["nbd"]["merged"] >= 1, st  # the slow member really merged
    drills = tmp_path / "drills"
    # each disk drilled alone at the same time: the pair must have existed together
    for t, j in w.moments:
        imgs = []
        for d in DISKS:
            rep = run_drill(env.data_dir, d, drills, "raw", at=t, keep=True)
            imgs.append(clone_bytes(rep.clone.raw))
            rep.clone.remove()
        a, _ = check_pair(imgs[0], imgs[1], f"--at {t:.3f} (iteration {j} written)")
        assert a <= j + 1
        group = run_group_drill(env.data_dir, GROUP, drills, "raw", at=t, keep=True)
        pair = [clone_bytes(d.clone.raw) for d in group.disks]
        assert [counter(x) for x in pair] == [counter(x) for x in imgs]  # the same cut
        check_pair(pair[0], pair[1], f"--group --at {t:.3f}")
        for d in group.disks:
            d.clone.remove()
    for t, j, h0, h1 in kept:
        for d, h in zip(DISKS, (h0, h1), strict=True):
            rep = run_drill(env.data_dir, d, drills, "raw", at=t, keep=True)
            assert file_hash(rep.clone.raw) == h, f"{d} --at a quiet moment after iteration {j}"
            rep.clone.remove()
        rep_json, imgs = group_drill_pair(env, tmp_path, "--at", f"{t:.6f}")
        assert [bytes_hash(x) for x in imgs] == [h0, h1], f"--group --at after iteration {j}"
        assert rep_json["ok"] and rep_json["cut"]["time"] <= t and rep_json["rto"] >= 0
    # the labelled checkpoint: both disks exactly as the writer left them at the cut
    rep_json, imgs = group_drill_pair(env, tmp_path, "--point", "base")
    assert counter(imgs[0]) == counter(imgs[1]) == base_j
    assert [bytes_hash(x) for x in imgs] == [bytes_hash(base[d]) for d in DISKS]
    assert {v["volume"]: v["point"]["epoch"] for v in rep_json["volumes"]} == answer["epochs"]
    r = run_cdp("points", "-c", env.receiver_toml, "--group", GROUP, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    listed = json.loads(r.stdout)["cuts"]
    assert {"time": answer["time"], "epochs": answer["epochs"]} in [
        {"time": c["time"], "epochs": c["epochs"]} for c in listed]
    # promote the VM at its checkpoint: both live disks are that pair
    src.stop()
    wait_for(lambda: all(connected_source(env.replica_dir(d)) is None for d in DISKS), 30,
             what="the receiver to see the source gone")
    r = run_cdp("failover", "promote", "-c", env.receiver_toml, "--group", GROUP, "--point",
                "base", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads(r.stdout)
    assert {m: v["epoch"] for m, v in rec["volumes"].items()} == answer["epochs"]
    for d in DISKS:
        assert bytes_hash(env.replica_image(d).read_bytes()) == bytes_hash(base[d])
