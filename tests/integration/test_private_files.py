"""What cdp creates is its own user's only, whatever the umask: folders 0700, files 0600.

Issue 15, item 10: outside the systemd unit (UMask=0027), replica images came out 0644 in
0755 folders: any local user could read a copy of every protected disk. Here the daemons,
a checkpoint, a file set, a failover drill (clone kept) and a directory archive all run
under umask 000, and every folder and file they made in data_dir, state_dir, the drill
folder and the archive repository is checked. The image handed over by `cdp failover
promote` is not covered here (it is made for a DR VM to boot).
"""

from __future__ import annotations

import os
import random
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    CdpEnv,
    MiB,
    add_fileset,
    make_image,
    run_cdp,
    wait_converged,
    wait_for,
    write_random_blocks,
)

from cdp.durable import atomic_write, create_private, make_private_dir, open_private


@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _open_to_others(*roots: Path) -> list[str]:
    """Every folder, file or socket under the roots (and the roots) with group or other bits."""
    bad = []
    for root in roots:
        for path in [root, *root.rglob("*")]:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                continue
            if stat.S_IMODE(st.st_mode) & 0o077:
                bad.append(f"{oct(stat.S_IMODE(st.st_mode))} {path.relative_to(root.parent)}")
    return bad


def test_helpers_ignore_the_umask(tmp_path: Path, umask0: None) -> None:
    deep = make_private_dir(tmp_path / "a" / "b" / "c")
    atomic_write(deep / "state.json", b"{}")
    with create_private(deep / "image") as fh:
        fh.write(b"x")
    os.close(open_private(deep / "lock", os.O_RDWR | os.O_CREAT))
    assert _open_to_others(tmp_path / "a") == []
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    make_private_dir(shared)  # a folder that exists keeps its mode: it was chosen by someone
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755


def test_everything_made_under_umask_000_is_private(cdp_env, daemons, tmp_path: Path,
                                                   umask0: None) -> None:
    repo = tmp_path / "archive-repo"
    drills = tmp_path / "drills"
    env: CdpEnv = cdp_env(receiver_extra=f'drill_dir = "{drills}"\n\n[[archive]]\nname = "local"\n'
                                         f'repository = "{repo}"\nencrypt = false\n')
    rng = random.Random(10)
    img = env.source.images["vol1"]
    make_image(img, 2 * MiB, rng)
    conf = tmp_path / "etc-vm1.xml"
    conf.write_text("<domain/>")
    add_fileset(env, "vm1-config", [conf])
    rx = daemons.receiver(env)
    src = daemons.source(env)
    since = time.time()
    wait_converged(env, "vol1", since, src, rx)
    write_random_blocks(img, [1, 5, 9], rng)  # a second epoch: an undo file in the journal
    since = time.time()
    wait_converged(env, "vol1", since, src, rx)
    r = run_cdp("checkpoint", "-c", env.source.toml, "vol1", "--label", "base", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: (env.data_dir / "_files").exists(), 20, what="the file set on the receiver")
    r = run_cdp("failover", "test", "-c", env.receiver_toml, "vol1", "--format", "raw", "--keep",
                timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for verb in ("init", "run"):
        r = run_cdp("archive", verb, "-c", env.receiver_toml, timeout=120)
        assert r.returncode == 0, f"archive {verb}: {r.stdout}{r.stderr}"
    assert (env.replica_dir("vol1") / "journal").is_dir() and any(drills.rglob("*.raw"))
    assert (env.source.state_dir / "vol1").is_dir() and any(repo.rglob("*"))
    bad = _open_to_others(env.data_dir, env.source.state_dir, drills, repo)
    assert not bad, "open to group or others under umask 000:\n" + "\n".join(bad)
    src.stop()
    rx.stop()
    bad = _open_to_others(env.data_dir, env.source.state_dir)  # what a clean stop writes, too
    assert not bad, "\n".join(bad)
