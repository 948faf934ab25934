"""Rescans hash every other window in a helper process (cdp/tracker/hashworker.py): the
result must be exactly that of a scan on one core, also when the file is written during
the scan, shrinks, or the helper dies; and the helper must never outlive its source."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from helpers import scaled

from cdp.blocks import Geometry
from cdp.codec import block_hash, zero_hash
from cdp.tracker.hashworker import HashHelper, HashHelpers
from cdp.tracker.scan import hash_volume, scan

BS = 4096
CHUNK = 16 * BS  # small windows: many pairs, many round trips


def _image(path: Path, blocks: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(blocks * BS))
    data[7 * BS:9 * BS] = bytes(2 * BS)
    path.write_bytes(data + b"tail")  # a last block that is not whole


@pytest.fixture
def helper():  # type: ignore[no-untyped-def]
    h = HashHelper()
    yield h
    h.close()


def _changes(fd: int, geo: Geometry, smap: bytearray, helper: HashHelper | None) -> list[tuple[int, bytes]]:
    out = []
    for i, h, content in scan(fd, geo, smap, chunk=CHUNK, helper=helper):
        assert (content is None and h in (zero_hash(BS), zero_hash(geo.length(i)))) or \
            (content is not None and block_hash(content) == h)
        out.append((i, h))
    return out


def test_same_changes_as_one_core(tmp_path: Path, helper: HashHelper) -> None:
    img = tmp_path / "v.img"
    _image(img, 1000)
    geo = Geometry(img.stat().st_size, BS)
    smap = hash_volume(img, geo)
    rng = random.Random(3)
    picked = [*sorted(rng.sample(range(geo.blocks), 60)), geo.blocks - 1]
    with open(img, "r+b") as f:
        for b in picked:
            f.seek(b * BS)
            f.write(b"\x02" * 3)
    fd = os.open(img, os.O_RDONLY)
    try:
        alone = _changes(fd, geo, smap, None)
        assert [i for i, _ in alone] == sorted(set(picked))
        for _ in range(3):  # the helper is reused across scans
            assert _changes(fd, geo, smap, helper) == alone
        assert not helper.broken
    finally:
        os.close(fd)


def test_written_during_the_scan_reports_only_consistent_pairs(tmp_path: Path, helper: HashHelper) -> None:
    img = tmp_path / "v.img"
    _image(img, 512)
    geo = Geometry(img.stat().st_size, BS)
    stop = threading.Event()

    def writer() -> None:
        rng = random.Random(2)
        wfd = os.open(img, os.O_WRONLY)
        try:
            while not stop.is_set():
                os.pwrite(wfd, rng.choice([bytes(BS), rng.randbytes(BS)]), rng.randrange(512) * BS)
        finally:
            os.close(wfd)

    t = threading.Thread(target=writer)
    t.start()
    try:
        fd = os.open(img, os.O_RDONLY)
        try:
            smap = hash_volume(img, geo)
            for _ in range(40):
                _changes(fd, geo, smap, helper)  # asserts every pair
        finally:
            os.close(fd)
    finally:
        stop.set()
        t.join()


def test_a_dead_helper_costs_nothing_but_speed(tmp_path: Path, helper: HashHelper) -> None:
    img = tmp_path / "v.img"
    _image(img, 600)
    geo = Geometry(img.stat().st_size, BS)
    smap = bytearray(hash_volume(img, geo))
    smap[5 * 16:6 * 16] = bytes(16)  # block 5 and 400 "changed"
    smap[400 * 16:401 * 16] = bytes(16)
    fd = os.open(img, os.O_RDONLY)
    try:
        want = _changes(fd, geo, smap, None)
        assert [i for i, _ in want] == [5, 400]
        it = scan(fd, geo, smap, chunk=CHUNK, helper=helper)
        got = [next(it)[:2]]
        helper.proc.kill()  # dies in the middle of the scan
        helper.proc.wait()
        got += [c[:2] for c in it]
        assert got == want
        assert helper.broken
        assert _changes(fd, geo, smap, helper) == want  # and after
    finally:
        os.close(fd)


def test_the_helper_ends_when_its_source_is_killed(tmp_path: Path) -> None:
    """A source killed with SIGKILL leaves no helper behind: it reads EOF and exits."""
    img = tmp_path / "v.img"
    _image(img, 64)
    pidfile = tmp_path / "helper.pid"
    prog = textwrap.dedent(f"""
        import os, time
        from cdp.tracker.hashworker import HashHelper
        h = HashHelper()
        fd = os.open({str(img)!r}, os.O_RDONLY)
        h.attach(fd)
        assert h.submit(0, 4096, 4096) and h.result()
        open({str(pidfile)!r}, "w").write(str(h.proc.pid))
        time.sleep(600)
    """)
    src = subprocess.Popen([sys.executable, "-c", prog])
    try:
        end = time.monotonic() + scaled(30)
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < end and src.poll() is None
            time.sleep(0.02)
        pid = int(pidfile.read_text())
        src.send_signal(signal.SIGKILL)
        src.wait()
        end = time.monotonic() + scaled(30)
        while True:  # the helper is our grandchild: once it exits, init reaps it
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError):
                break
            if state == "Z":
                break
            assert time.monotonic() < end, "the hash helper outlived its killed source"
            time.sleep(0.02)
    finally:
        if src.poll() is None:
            src.kill()
            src.wait()


def test_helpers_are_lent_one_per_scan_and_kept(tmp_path: Path) -> None:
    pool = HashHelpers(limit=1)
    try:
        with pool.lend() as a:
            assert a is not None
            with pool.lend() as b:
                assert b is None  # the only one is busy: that scan hashes on one core
        with pool.lend() as c:
            assert c is a  # kept for the next scan, not restarted
        assert HashHelpers(limit=0).limit == 0
        with HashHelpers(limit=0).lend() as d:
            assert d is None
    finally:
        pool.close()
    assert a.proc.wait(scaled(10)) == 0
