"""When a recovery point was captured, and what `cdp failover test --at T` may return.

Every clone is compared byte for byte with a copy of the source image kept at
the moment it stands for. `--at T` must return a point holding no write that
finished after T, and never the empty replica from before the first epoch.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

from conftest import CdpEnv, bytes_hash, file_hash, make_image, run_cdp, wait_converged

VOL = "vol1"


def drill_at(env: CdpEnv, at: float, tmp: Path) -> tuple[int, dict, str]:
    """`cdp failover test --at AT --format raw --keep --json`: exit status, report, and the
    hash of the clone (removed afterwards)."""
    r = run_cdp("failover", "test", "-c", env.receiver_toml, VOL, "--at", repr(at),
                "--format", "raw", "--keep", "--dir", tmp, "--json")
    if r.returncode not in (0, 1):
        return r.returncode, {"stderr": r.stderr}, ""
    rep = json.loads(r.stdout)
    h = file_hash(rep["clone"])
    shutil.rmtree(Path(rep["clone"]).parent)
    return r.returncode, rep, h


def test_at_before_the_first_point_is_refused(cdp_env, daemons, tmp_path: Path) -> None:
    # kept forever: by age, point 0 (time 0) would be dropped at once, hiding the mistake
    env = cdp_env(receiver_extra='keep_points = "forever"')
    image = env.source.images[VOL]
    make_image(image, 2 << 20, random.Random(51))
    seeded = image.read_bytes()  # the image the first epoch captures
    rx = daemons.receiver(env)
    before = time.time()
    src = daemons.source(env)
    wait_converged(env, VOL, before, src, rx)
    # before the first epoch the replica held nothing: no point was captured then
    rc, rep, _ = drill_at(env, before - 60, tmp_path / "drills")
    assert rc == 2, rep
    assert "no point captured at or before" in rep["stderr"], rep
    assert "the oldest is epoch 1" in rep["stderr"], rep
    # the first point itself is found, and is the image as seeded
    rc, rep, h = drill_at(env, time.time(), tmp_path / "drills")
    assert rc == 0 and rep["point"]["epoch"] == 1, rep
    assert h == bytes_hash(seeded)
    src.stop()
    rx.stop()
