"""Apply ordering under SIGKILL: the WAL is fdatasync'd with the image (not at seal) when an
undo file comes first, and state.json's folder is fsync'd only before the WAL of its epoch is
reused. A real process is killed mid-apply (or just after it); the files are then brought to
what a power cut could have left (the unsynced WAL or the unsynced rename lost), and the
replica must reopen at a whole epoch, with a journal that agrees with it."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cdp.blocks import Geometry
from cdp.codec import block_hash
from cdp.replica import Replica

BS = 65536
BLOCKS = 32
GEO = Geometry(BLOCKS * BS, BS)

CHILD = textwrap.dedent("""
    import os, random, signal, sys, time
    from pathlib import Path
    from cdp.blocks import Geometry, pack_u64
    from cdp.codec import block_hash, compress
    from cdp.replica import Replica
    import cdp.replica.store as store

    root, when = Path(sys.argv[1]), sys.argv[2]
    BS = 65536
    geo = Geometry(32 * BS, BS)

    def content(epoch):
        rng = random.Random(epoch)
        return [rng.randbytes(BS) for _ in range(32)]

    def epoch(rep, e, idx):
        blocks = content(e)
        w = rep.begin(e, time.time())
        data = b"".join(blocks[i] for i in idx)
        w.add_data(pack_u64(idx), b"".join(block_hash(blocks[i]) for i in idx), len(data),
                   compress(data))
        w.seal(len(idx))
        return w

    rep = Replica.open(root, "v", geo, create=True)
    epoch(rep, 1, list(range(32))).apply()
    os.sync()  # epoch 1 is on disk, whatever happens next
    (root / "v" / "state.1.json").write_bytes((root / "v" / "state.json").read_bytes())
    if when == "mid-apply":
        real = store.Replica._write_blocks
        def write_then_die(self, *a):
            real(self, *a)
            os.kill(os.getpid(), signal.SIGKILL)
        store.Replica._write_blocks = write_then_die
    w = epoch(rep, 2, list(range(0, 32, 2)))
    w.apply()
    print("acked", flush=True)  # what the receiver would send the source now
    os.kill(os.getpid(), signal.SIGKILL)
""")


def content(epoch: int) -> list[bytes]:
    rng = random.Random(epoch)
    return [rng.randbytes(BS) for _ in range(BLOCKS)]


def expected(epoch: int) -> bytes:
    one = content(1)
    if epoch == 1:
        return b"".join(one)
    two = content(2)
    return b"".join(two[i] if i % 2 == 0 else one[i] for i in range(BLOCKS))


def run_child(root: Path, when: str) -> str:
    p = subprocess.run([sys.executable, "-c", CHILD, str(root), when], capture_output=True,
                       text=True, timeout=60, env=os.environ.copy())
    assert p.returncode == -signal.SIGKILL, p.stderr
    return p.stdout


def reopen_and_check(root: Path, epoch: int) -> None:
    rep = Replica.open(root, "v", GEO)
    try:
        assert rep.state.epoch == epoch
        img = (root / "v" / "image").read_bytes()
        assert img == expected(epoch)
        assert rep.stored_hashes(0, BLOCKS) == b"".join(
            block_hash(img[i * BS:(i + 1) * BS]) for i in range(BLOCKS))
        # the journal agrees: an undo file for epoch 2 exactly when the replica is at 2 (the
        # first epoch of a new replica needs none), and point 1 reads back as epoch 1
        assert rep.journal.epochs() == ([2] if epoch == 2 else [])
        if epoch == 2:
            undo = rep.journal.path(2)
            from cdp.replica.undo import UndoFile
            u = UndoFile(undo)
            try:
                one = content(1)
                for b, entry in u.entries.items():
                    assert u.read(entry, BS) == one[b]
                assert sorted(u.entries) == list(range(0, BLOCKS, 2))
            finally:
                u.close()
    finally:
        rep.close()


def test_killed_mid_apply_replays_the_sealed_epoch(tmp_path: Path) -> None:
    """kill -9 while the image is half written: the page cache kept the WAL, so the epoch
    is finished on open (the undo file made before the first write is reused)."""
    assert run_child(tmp_path, "mid-apply") == ""
    reopen_and_check(tmp_path, 2)


def test_wal_lost_before_its_sync_rolls_back_with_the_undo_file(tmp_path: Path) -> None:
    """A power cut mid-apply may lose the WAL (fdatasync'd only with the image now): the
    undo file, durable before the first image write, takes the image back to epoch 1."""
    assert run_child(tmp_path, "mid-apply") == ""
    wal_file = tmp_path / "v" / "wal.0"
    with open(wal_file, "r+b") as fh:  # its pages never reached the disk
        fh.write(bytes(os.path.getsize(wal_file)))
    reopen_and_check(tmp_path, 1)


@pytest.mark.parametrize("lose_rename", [False, True])
def test_acked_epoch_survives_a_lost_state_rename(tmp_path: Path, lose_rename: bool) -> None:
    """After the ack, state.json's folder is not fsync'd yet: a power cut may bring back the
    state of epoch 1; the WAL of epoch 2 (durable before the ack) replays it."""
    assert run_child(tmp_path, "after-ack") == "acked\n"
    if lose_rename:
        shutil.copyfile(tmp_path / "v" / "state.1.json", tmp_path / "v" / "state.json")
    reopen_and_check(tmp_path, 2)
