"""`cdp verify --replica`: rehash a replica image against its hash map, read-only and lock-free."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from helpers import run_main

import cdp.replica.check as check
from cdp.blocks import Geometry, pack_u64
from cdp.codec import HASH_LEN, block_hash, compress
from cdp.errors import ReplicaError
from cdp.replica import Replica
from cdp.replica.check import check_replica, replica_dirs

BS = 4096
GEO = Geometry(40 * BS + 1000, BS)  # a short last block (index 40)


def no_sleep(_: float) -> None:
    pass


def write_epochs(root: Path, volume: str = "v", geo: Geometry = GEO, seed: int = 1,
                 written: tuple[int, ...] = (0, 1, 2, 3, 10)) -> Path:
    """Two epochs: `written` and the short last block get data; the rest is never written."""
    rng = random.Random(seed)
    rep = Replica.open(root, volume, geo, create=True)
    rep.seeded(0)  # a whole replica: nothing is placed, open repairs nothing
    try:
        for e, idx in enumerate((list(written[:-1]), [written[-1], geo.blocks - 1]), start=1):
            blocks = [rng.randbytes(geo.length(i)) for i in idx]
            data = b"".join(blocks)
            w = rep.begin(e, 1000.0 + e)
            w.add_data(pack_u64(idx), b"".join(block_hash(b) for b in blocks), len(data),
                       compress(data))
            w.commit(len(idx))
    finally:
        rep.close()
    return root / volume


def snapshot(path: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under path: size, mtime and content (the lock file included)."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(path.rglob("*")) if p.is_file()}


def poke(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def flip(path: Path, offset: int) -> None:
    """Change one byte of a file in place (never its size)."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x5A]))


def test_clean_replica_is_equal(tmp_path: Path) -> None:
    path = write_epochs(tmp_path)
    seen: list[tuple[int, int]] = []
    r = check_replica(path, lambda done, total: seen.append((done, total)), sleep=no_sleep)
    assert r.equal and not r.failed and not r.error
    assert (r.volume, r.epoch, r.epoch_end, r.blocks) == ("v", 2, 2, GEO.blocks)
    assert r.differing == () and r.changing == ()
    assert seen[-1] == (GEO.size, GEO.size)
    assert r.to_json()["differing"] == [] and r.to_json()["equal"] is True


def test_corrupt_image_byte_and_hash_entry_are_named(tmp_path: Path) -> None:
    path = write_epochs(tmp_path)
    before = snapshot(path)
    flip(path / "image", GEO.offset(2) + 7)  # a written block's data
    poke(path / "hashes", 5 * HASH_LEN, b"\x01")  # a never-written (hole) block's entry
    flip(path / "image", GEO.size - 1)  # the short last block's last byte
    flip(path / "image", GEO.offset(20) + 1)  # data in a never-written block
    assert snapshot(path).keys() == before.keys()
    # the live receiver holds the lock meanwhile: the check must not need it
    rep = Replica.open(tmp_path, "v")
    try:
        changed = snapshot(path)
        r = check_replica(path, sleep=no_sleep)
        assert snapshot(path) == changed  # nothing written, no new files
    finally:
        rep.close()
    assert r.differing == (2, 5, 20, GEO.blocks - 1)
    assert r.failed and r.equal is False and r.changing == ()
    assert r.note == ""  # no committed epoch waiting in a WAL


def test_check_leaves_the_folder_untouched_and_needs_no_lock(tmp_path: Path) -> None:
    path = write_epochs(tmp_path)
    lock = path / "lock"
    assert lock.exists()
    rep = Replica.open(tmp_path, "v")  # holds the flock exclusively, as the receiver does
    try:
        before = snapshot(path)  # after the open, which may tidy its WALs
        assert check_replica(path, sleep=no_sleep).equal
        assert snapshot(path) == before
    finally:
        rep.close()
    lock.unlink()  # offline, never opened by a receiver: no lock file appears
    before = snapshot(path)
    assert check_replica(path, sleep=no_sleep).equal
    assert snapshot(path) == before and not lock.exists()


def test_untouched_zero_volume_and_big_blocks(tmp_path: Path) -> None:
    geo = Geometry(3 * 4 * 1024 * 1024 + 12345, 4 * 1024 * 1024)  # 4 MiB blocks, short last one
    Replica.open(tmp_path, "z", geo, create=True).close()
    r = check_replica(tmp_path / "z", sleep=no_sleep)
    assert r.equal and r.blocks == 4 and r.epoch == 0
    path = write_epochs(tmp_path, "w", geo, written=(0, 1))
    flip(path / "image", geo.size - 1)
    assert check_replica(path, sleep=no_sleep).differing == (3,)


def test_mismatch_that_heals_is_not_a_difference(tmp_path: Path) -> None:
    """Caught between the image write and the hash-map write: the next read agrees."""
    path = write_epochs(tmp_path)
    good = (path / "image").read_bytes()[GEO.offset(1):GEO.offset(2)]
    poke(path / "image", GEO.offset(1), b"torn")
    sleeps: list[float] = []

    def writer_finishes(seconds: float) -> None:
        sleeps.append(seconds)
        poke(path / "image", GEO.offset(1), good)

    r = check_replica(path, sleep=writer_finishes)
    assert r.equal and r.differing == () and r.changing == ()
    assert len(sleeps) == 1


def test_block_that_keeps_changing_is_being_written(tmp_path: Path) -> None:
    path = write_epochs(tmp_path)
    flip(path / "image", GEO.offset(3) + 100)
    poke(path / "image", GEO.offset(4), b"x")  # stable: a real difference
    rng = random.Random(7)
    rounds: list[float] = []

    def writer_busy(seconds: float) -> None:  # block 3 changes between every two reads
        rounds.append(seconds)
        poke(path / "image", GEO.offset(3) + 100, rng.randbytes(8))

    r = check_replica(path, sleep=writer_busy)
    assert r.differing == (4,) and r.changing == (3,)
    assert len(rounds) == check.MAX_ROUNDS
    assert sum(rounds[:check.CONFIRM]) == pytest.approx(check.SETTLE)


def test_pending_committed_epoch_is_noted(tmp_path: Path) -> None:
    """Offline after a crash mid-apply: the WAL replays on open; the note says so."""
    path = write_epochs(tmp_path)
    rep = Replica.open(tmp_path, "v")
    w = rep.begin(3, 2000.0)
    data = b"n" * BS
    w.add_data(pack_u64([7]), block_hash(data), BS, compress(data))
    w.seal(1)  # durable in wal.1, not applied: as if the receiver died here
    rep.close()
    poke(path / "image", GEO.offset(7), data)  # half-applied: image written, hash map not yet
    r = check_replica(path, sleep=no_sleep)
    assert r.differing == (7,) and "epoch 3 is committed in wal.1" in r.note
    Replica.open(tmp_path, "v").close()  # the replay finishes it
    r = check_replica(path, sleep=no_sleep)
    assert r.equal and r.epoch == 3


def test_broken_replicas_are_errors_not_crashes(tmp_path: Path) -> None:
    path = write_epochs(tmp_path)
    os.truncate(path / "image", GEO.size - 1)
    r = check_replica(path, sleep=no_sleep)
    assert r.failed and "truncated" in r.error
    (path / "state.json").write_text("{")
    assert "unreadable" in check_replica(path).error
    with pytest.raises(ReplicaError, match="no replica"):
        check_replica(tmp_path / "nothing")
    path = write_epochs(tmp_path, "p")
    (path / "promoted.json").write_text("{}")
    r = check_replica(path)
    assert r.skipped and r.equal is None and not r.failed


def test_replica_dirs_skips_drills_files_and_half_created(tmp_path: Path) -> None:
    for name in ("b", "a", ".drills", "_files", ".c.new", "empty"):
        (tmp_path / name).mkdir()
        if name != "empty":
            (tmp_path / name / "state.json").write_text("{}")
    assert [p.name for p in replica_dirs(tmp_path)] == ["a", "b"]
    assert replica_dirs(tmp_path / "missing") == []


def test_cli_exit_codes_and_json(tmp_path: Path, capsys) -> None:
    data = tmp_path / "replicas"
    write_epochs(data, "a")
    write_epochs(data, "b", seed=2)
    token = tmp_path / "t.token"
    token.write_text("x" * 32)
    os.chmod(token, 0o600)
    cfg = tmp_path / "receiver.toml"
    cfg.write_text('[receiver]\ndata_dir = "replicas"\n[[receiver.client]]\nname = "h"\n'
                   'token_file = "t.token"\nvolumes = ["a", "b"]\n')
    ok = run_main(capsys, "verify", "--replica", "-c", cfg, "--json")
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert [(r["volume"], r["epoch"], r["blocks"], r["equal"], r["differing"], r["error"])
            for r in out] == [("a", 2, GEO.blocks, True, [], ""), ("b", 2, GEO.blocks, True, [], "")]
    assert ok.stderr == ""  # no progress bar when stderr is not a terminal
    poke(data / "b" / "image", GEO.offset(10), b"!")
    bad = run_main(capsys, "verify", "--replica", "-c", cfg, "b", "--json")
    assert bad.returncode == 1, bad.stderr
    assert [(r["volume"], r["equal"], r["differing"]) for r in json.loads(bad.stdout)] == [
        ("b", False, [10])]
    text = run_main(capsys, "verify", "--replica", "-c", cfg)
    assert text.returncode == 1
    assert text.stdout.splitlines() == [
        f"a: epoch 2, {GEO.blocks} blocks checked, equal",
        f"b: epoch 2, {GEO.blocks} blocks checked, 1 differing block: 10"]
    unknown = run_main(capsys, "verify", "--replica", "-c", cfg, "nope", "--json")
    assert unknown.returncode == 2 and "no replica of volume 'nope'" in unknown.stderr
    assert unknown.stdout == ""
