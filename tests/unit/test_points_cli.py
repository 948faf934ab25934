"""`cdp points` and the retention keys of receiver.toml."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from cdp.blocks import Geometry, pack_u64
from cdp.cli.main import main
from cdp.codec import block_hash, compress
from cdp.config import KeepConfig, load_receiver
from cdp.errors import ConfigError
from cdp.replica import Replica

BS = 65536


def receiver_toml(tmp_path: Path, extra: str = "", client_extra: str = "") -> Path:
    token = tmp_path / "t.token"
    token.write_text("x" * 32)
    os.chmod(token, 0o600)
    cfg = tmp_path / "receiver.toml"
    cfg.write_text(f'[receiver]\ndata_dir = "replicas"\n{extra}\n'
                   f'[[receiver.client]]\nname = "h"\ntoken_file = "t.token"\n'
                   f'volumes = ["a", "b"]\n{client_extra}\n')
    return cfg


def test_retention_keys_and_overrides(tmp_path: Path) -> None:
    cfg = load_receiver(receiver_toml(tmp_path))
    assert cfg.keep_for("a") == KeepConfig(24 * 3600.0, 10 * 1024**3)
    cfg = load_receiver(receiver_toml(
        tmp_path, 'keep_points = "2h"\nkeep_points_size = "1GiB"\n'
        '[[receiver.volume]]\nname = "b"\nkeep_points = "forever"\n',
        'keep_points_size = "unlimited"'))
    assert cfg.keep == KeepConfig(7200.0, 1024**3)
    assert cfg.keep_for("a") == KeepConfig(7200.0, None)  # the client's override
    assert cfg.keep_for("b") == KeepConfig(None, 1024**3)  # the volume's, over the client's
    assert cfg.keep_for("other") == cfg.keep
    with pytest.raises(ConfigError, match="keep_points"):
        load_receiver(receiver_toml(tmp_path, 'keep_points = "soon"'))
    with pytest.raises(ConfigError, match="drill_format"):
        load_receiver(receiver_toml(tmp_path, 'drill_format = "vmdk"'))


def test_points_lists_epochs_times_and_sizes(tmp_path: Path, capsys) -> None:
    cfg = receiver_toml(tmp_path)
    geo = Geometry(8 * BS, BS)
    rep = Replica.open(tmp_path / "replicas", "a", geo, create=True)
    rng = random.Random(1)
    t0 = time.time() - 60
    for e in range(1, 5):
        w = rep.begin(e, t0 + e)
        data = rng.randbytes(BS)
        w.add_data(pack_u64([e % 3]), block_hash(data), BS, compress(data))
        w.commit(1)
    rep.close()
    assert main(["points", "-c", str(cfg), "a", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["epoch"] for p in out["points"]] == [1, 2, 3, 4]
    assert out["points"][-1]["current"] and out["points"][-1]["size"] == 0
    assert out["points"][0]["time"] == t0 + 1 and 55 < out["points"][0]["age"] < 600
    assert out["points"][0]["size"] > 0 and out["journal_bytes"] == sum(
        p["size"] for p in out["points"])
    assert main(["points", "-c", str(cfg), "a"]) == 0
    text = capsys.readouterr().out
    assert "4 point(s)" in text and "current" in text
    assert main(["points", "-c", str(cfg), "nope"]) == 2
    assert "no replica of volume 'nope'" in capsys.readouterr().err
