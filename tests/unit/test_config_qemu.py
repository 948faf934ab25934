"""Config of qemu volumes: mode = "qemu" needs qmp and node; those keys mean nothing elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_config import SOURCE, config_error, source_with, write_token

from cdp.config import load_source
from cdp.config.model import DEFAULT_BLOCK_SIZE

QEMU = SOURCE + 'mode = "qemu"\nqmp = "run/vm1.qmp"\nnode = "drive0"\n'


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    write_token(tmp_path / "etc" / "host1.token")
    return tmp_path / "etc"


def test_a_qemu_volume(etc: Path) -> None:
    (v,) = load_source(source_with(etc, QEMU + 'nbd_socket = "/run/vm1-nbd.sock"\n')).volumes
    assert (v.mode, v.qmp, v.node, v.nbd_socket) == ("qemu", etc / "run/vm1.qmp", "drive0",
                                                     Path("/run/vm1-nbd.sock"))
    assert v.block_size == DEFAULT_BLOCK_SIZE and v.epoch_interval == 1.0  # QEMU's 64 KiB granularity


@pytest.mark.parametrize(("drop", "key", "why"), [
    ('qmp = "run/vm1.qmp"\n', "qmp", "QMP monitor socket"),
    ('node = "drive0"\n', "node", "block node name"),
])
def test_qemu_mode_needs_qmp_and_node(etc: Path, drop: str, key: str, why: str) -> None:
    msg = config_error(load_source, source_with(etc, QEMU.replace(drop, "")))
    assert f"volume[0].{key}: qemu mode needs" in msg and why in msg


@pytest.mark.parametrize(("line", "key", "why"), [
    ('node = "0drive"', "node", "not a QEMU node name"),
    ('node = "' + "d" * 32 + '"', "node", "at most 31"),
    ('epoch_interval = "0s"', "epoch_interval", "must be positive"),
    ('group = "vm1"', "group", "consistency groups need"),
])
def test_bad_qemu_values(etc: Path, line: str, key: str, why: str) -> None:
    text = QEMU.replace('node = "drive0"\n', "") + ("" if key == "node" else 'node = "drive0"\n')
    text += line + "\n"
    msg = config_error(load_source, source_with(etc, text))
    assert f"volume[0].{key}:" in msg and why in msg


@pytest.mark.parametrize("key", ["qmp", "node", "nbd_socket"])
def test_qemu_keys_outside_qemu_mode_are_refused(etc: Path, key: str) -> None:
    msg = config_error(load_source, source_with(etc, SOURCE + f'{key} = "x"\n'))
    assert f'volume[0].{key}: only applies to a qemu volume (mode = "qemu")' in msg
