"""`cdp mount`: real FUSE mounts of a replica point (while the receiver's store goes on applying
epochs) and of an archived snapshot, read with ordinary file calls, compared byte for byte."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from archive_fixtures import receiver_with_archive
from helpers import BS, MiB, bytes_hash, file_hash, run_cdp, scaled, wait_for

from cdp.archive.backend import run_sync
from cdp.archive.job import init_repo, run_archive
from cdp.blocks import Geometry, pack_u64
from cdp.codec import block_hash, compress
from cdp.config import load_receiver
from cdp.mount.serve import is_mounted, unmount
from cdp.replica import Replica
from cdp.replica.journal import Retention
from cdp.replica.points import list_points, live_pins, set_label

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"),
                                reason="/dev/fuse is absent: no FUSE on this machine (modprobe fuse)")

SIZE = 16 * MiB
T0 = time.time() - 600
SECRET = b"root:x:0:0:guest's own passwd, not the host's\n"


def ext4_with(path: Path, hostname: bytes, blob: bytes) -> bytes:
    """A real ext4 image (mkfs.ext4 -d) with a file, a setuid file and a symlink out; its bytes."""
    mkfs = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
    if not os.path.exists(mkfs):
        pytest.skip("mkfs.ext4 not installed (apt-get install e2fsprogs)")
    src = path.parent / f"{path.name}.src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hostname").write_bytes(hostname)
    (src / "etc" / "passwd").write_bytes(SECRET)
    (src / "data").mkdir()
    (src / "data" / "blob.bin").write_bytes(blob)
    (src / "bin").mkdir()
    (src / "bin" / "su").write_bytes(b"#!/bin/sh\necho not really\n")
    os.chmod(src / "bin" / "su", 0o4755)
    os.symlink("/etc/passwd", src / "etc" / "escape")
    with open(path, "wb") as fh:
        fh.truncate(SIZE)
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"}
    subprocess.run([mkfs, "-q", "-F", "-b", "4096", "-d", str(src), str(path)], check=True, env=env)
    return path.read_bytes()


def apply_image(rep: Replica, epoch: int, new: bytes, old: bytes) -> None:
    """One epoch that turns the replica from `old` into `new`: every block that differs."""
    idx = [i for i in range(SIZE // BS) if new[i * BS:(i + 1) * BS] != old[i * BS:(i + 1) * BS]]
    blocks = [new[i * BS:(i + 1) * BS] for i in idx]
    w = rep.begin(epoch, T0 + epoch)  # recent: retention by age keeps it
    data = b"".join(blocks)
    w.add_data(pack_u64(idx), b"".join(block_hash(b) for b in blocks), len(data), compress(data))
    w.seal(w.blocks)
    w.apply()


def one_epoch(data_dir: Path, image: bytes) -> None:
    """A replica of vol1 whose epoch 1 is `image`."""
    rep = Replica.open(data_dir, "vol1", Geometry(SIZE, BS), create=True)
    try:
        apply_image(rep, 1, image, bytes(SIZE))
    finally:
        rep.close()


class Mount:
    """`python -m cdp mount ...` as its own process, always unmounted at the end."""

    def __init__(self, where: Path, *args: str | Path) -> None:
        self.where = where
        where.mkdir()
        self.log = where.parent / f"{where.name}.log"
        self.fh = open(self.log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "cdp", "mount", *map(str, args), str(where)],
                                     stdout=self.fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def ready(self, name: str) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"cdp mount exited {self.proc.returncode}: {self.output()}")
            return is_mounted(self.where) and (self.where / name).exists()
        wait_for(up, 60, what=lambda: f"the mount: {self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(scaled(30))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if is_mounted(self.where):
            unmount(self.where)
        self.fh.close()


@pytest.fixture
def mounts() -> Iterator[list[Mount]]:
    made: list[Mount] = []
    yield made
    for m in made:
        m.close()


def test_a_replica_point_stays_that_point_while_epochs_apply(tmp_path: Path, mounts: list[Mount]) -> None:
    rng = random.Random(7)
    blob1, blob2 = rng.randbytes(700 * 1024 + 5), rng.randbytes(700 * 1024 + 5)
    v1 = ext4_with(tmp_path / "v1.img", b"point-one\n", blob1)
    v2 = ext4_with(tmp_path / "v2.img", b"point-two\n", blob2)
    toml = receiver_with_archive(tmp_path / "rx", str(tmp_path / "repo"))
    data_dir = load_receiver(toml).data_dir
    rep = Replica.open(data_dir, "vol1", Geometry(SIZE, BS), create=True)
    try:
        apply_image(rep, 1, v1, bytes(SIZE))
        apply_image(rep, 2, v2, v1)
        # the mount of point 1 comes up while this process holds the replica's writer lock
        m = Mount(tmp_path / "mnt", "-c", toml, "vol1", "--point", "1")
        mounts.append(m)
        m.ready("vol1.img")
        mnt = m.where
        assert sorted(os.listdir(mnt)) == ["files", "vol1.img"]
        assert file_hash(mnt / "vol1.img") == bytes_hash(v1) != bytes_hash(v2)
        assert (mnt / "files" / "etc" / "hostname").read_bytes() == b"point-one\n"
        assert (mnt / "files" / "data" / "blob.bin").read_bytes() == blob1
        assert 1 in live_pins(data_dir / "vol1")
        # the guest's symlink is a symlink with its target as stored; setuid shows, has no effect
        link = mnt / "files" / "etc" / "escape"
        assert stat.S_ISLNK(os.lstat(link).st_mode) and os.readlink(link) == "/etc/passwd"
        su = os.lstat(mnt / "files" / "bin" / "su")
        assert stat.S_ISREG(su.st_mode) and stat.S_IMODE(su.st_mode) == 0o4755
        opts = next(line.split()[3] for line in Path("/proc/mounts").read_text().splitlines()
                    if line.split()[1] == str(mnt))
        assert {"ro", "nosuid", "nodev"} <= set(opts.split(","))
        with pytest.raises(OSError) as e:
            open(mnt / "files" / "etc" / "hostname", "r+b")
        assert e.value.errno == errno.EROFS
        # the receiver goes on: a new epoch, and retention that would keep only the latest point
        apply_image(rep, 3, v1, v2)
        rep.journal.retention = Retention(None, 1)
        rep.journal.prune()
        assert list_points(data_dir / "vol1")[0].epoch == 1  # pinned: kept
        assert file_hash(mnt / "vol1.img") == bytes_hash(v1)
        assert (mnt / "files" / "data" / "blob.bin").read_bytes() == blob1
        # an epoch applied without a journal record: the point cannot be read as it was any more,
        # and the mount says EIO instead of showing the newer image
        rep.close()
        rep = Replica.open(data_dir, "vol1", retention=Retention(0, 0))
        apply_image(rep, 4, v2, v1)
        with pytest.raises(OSError) as e:
            (mnt / "vol1.img").read_bytes()
        assert e.value.errno == errno.EIO
        assert m.stop() == 0, m.output()
    finally:
        rep.close()
    assert not is_mounted(mnt) and os.listdir(mnt) == []
    assert 1 not in live_pins(data_dir / "vol1")
    assert "unmounted" in m.output()


def test_an_archived_snapshot_mounts_with_its_files(tmp_path: Path, mounts: list[Mount]) -> None:
    rng = random.Random(8)
    blob = rng.randbytes(2 * MiB + 17)
    v1 = ext4_with(tmp_path / "v1.img", b"archived\n", blob)
    toml = receiver_with_archive(tmp_path / "rx", str(tmp_path / "repo"), chunk_size="1MiB")
    cfg = load_receiver(toml)
    run_sync(init_repo(cfg.archives[0]))
    one_epoch(cfg.data_dir, v1)
    snap = run_archive(cfg, "offsite").snapshot  # read from the replica, as a scheduled run does
    m = Mount(tmp_path / "mnt", "-c", toml, "vol1", "--snapshot", snap[:8])
    mounts.append(m)
    m.ready("vol1.img")
    assert file_hash(m.where / "vol1.img") == bytes_hash(v1)
    assert (m.where / "files" / "data" / "blob.bin").read_bytes() == blob
    assert sorted(os.listdir(m.where / "files" / "etc")) == ["escape", "hostname", "passwd"]
    assert os.readlink(m.where / "files" / "etc" / "escape") == "/etc/passwd"
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, says in ((["vol1", empty, "--snapshot", "ffffffff"], "no snapshot matches"),
                       (["vol9", empty, "--archive", "offsite"], "has no volume 'vol9'")):
        r = run_cdp("mount", "-c", toml, *args)
        assert r.returncode == 2 and says in r.stderr, r.stderr
    # the mount holds the repository's shared lock: prune cannot delete what it reads
    r = run_cdp("archive", "prune", "-c", toml)
    assert r.returncode != 0 and "locked" in r.stderr, r.stderr
    assert m.stop() == 0, m.output()
    assert not is_mounted(m.where)
    # DESIGN.md's form: a positional that is no point of the replica is a snapshot id
    m = Mount(tmp_path / "pos", "-c", toml, snap[:8], "vol1")
    mounts.append(m)
    m.ready("vol1.img")
    assert file_hash(m.where / "vol1.img") == bytes_hash(v1)
    assert m.stop() == 0, m.output()
    r = run_cdp("archive", "prune", "-c", toml, "--dry-run")
    assert r.returncode == 0, r.stderr


def test_an_image_without_a_file_system_mounts_without_files(tmp_path: Path, mounts: list[Mount]) -> None:
    noise = random.Random(9).randbytes(SIZE)
    toml = receiver_with_archive(tmp_path / "rx", str(tmp_path / "repo"))
    data_dir = load_receiver(toml).data_dir
    one_epoch(data_dir, noise)
    m = Mount(tmp_path / "mnt", "-c", toml, "vol1")
    mounts.append(m)
    m.ready("vol1.img")
    assert os.listdir(m.where) == ["vol1.img"]
    assert file_hash(m.where / "vol1.img") == bytes_hash(noise)
    assert m.stop(signal.SIGINT) == 0  # Ctrl-C
    assert not is_mounted(m.where)
    assert "no files/ folder" in m.output() and "no ext2/3/4, FAT or NTFS" in m.output()


def test_refusals_exit_2_and_mount_nothing(tmp_path: Path) -> None:
    toml = receiver_with_archive(tmp_path / "rx", str(tmp_path / "repo"))
    data_dir = load_receiver(toml).data_dir
    one_epoch(data_dir, bytes(SIZE - BS) + b"x" * BS)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "a").write_text("x")
    r = run_cdp("mount", "-c", toml, "vol1", busy)
    assert r.returncode == 2 and "not empty" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, says in ((["--point", "9"], "point 9 is not kept"), (["--label", "nope"], "labelled 'nope'"),
                       (["--snapshot", "latest"], "no archive repository")):
        r = run_cdp("mount", "-c", toml, "vol1", empty, *args)
        assert r.returncode == 2 and says in r.stderr, (args, r.stderr)
        assert not is_mounted(empty)
    r = run_cdp("mount", "-c", toml, "nosuch", empty)
    assert r.returncode == 2 and "no replica" in r.stderr
    assert live_pins(data_dir / "vol1") == []


def test_label_and_at_pick_the_same_point_as_point(tmp_path: Path, mounts: list[Mount]) -> None:
    rng = random.Random(10)
    one, two = rng.randbytes(SIZE), rng.randbytes(SIZE)
    toml = receiver_with_archive(tmp_path / "rx", str(tmp_path / "repo"))
    data_dir = load_receiver(toml).data_dir
    rep = Replica.open(data_dir, "vol1", Geometry(SIZE, BS), create=True)
    try:
        apply_image(rep, 1, one, bytes(SIZE))
        apply_image(rep, 2, two, one)
    finally:
        rep.close()
    set_label(data_dir / "vol1", 1, "baseline")
    for i, args in enumerate((["--label", "baseline"], ["--at", str(T0 + 1.5)], [])):
        m = Mount(tmp_path / f"mnt{i}", "-c", toml, "vol1", *args)
        mounts.append(m)
        m.ready("vol1.img")
        want = two if not args else one
        assert file_hash(m.where / "vol1.img") == bytes_hash(want), args
        assert m.stop() == 0
    # DESIGN.md's form: `cdp mount -c receiver.toml POINT|SNAPSHOT VOL DIR`
    for i, (which, want) in enumerate((("baseline", one), ("2", two), ("1", one))):
        m = Mount(tmp_path / f"pos{i}", "-c", toml, which, "vol1")
        mounts.append(m)
        m.ready("vol1.img")
        assert file_hash(m.where / "vol1.img") == bytes_hash(want), which
        assert m.stop() == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cdp("mount", "-c", toml, "1", "vol1", empty, "--point", "2")
    assert r.returncode == 2 and "names the point or snapshot already" in r.stderr, r.stderr
