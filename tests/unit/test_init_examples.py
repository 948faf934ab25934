"""`cdp init` writes every config key, at its true default (issue 15 item 11).

The example files are written from cdp/config/keys.py, which the loader also
reads its keys and defaults from. These tests hold the three together: every
key the loader can read is declared (the loader refuses to read any other) and
is in the example for its side; the examples load; uncommenting any key at the
value shown gives the same config as leaving it out; and an unknown key's error
lists the accepted ones.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import run_main

from cdp.cli.init import RECEIVER_BLOCKS, SOURCE_BLOCKS, Block, Line, init, receiver_lines, source_lines
from cdp.config import (
    ArchiveConfig,
    ClientConfig,
    FilesetConfig,
    ReceiverConfig,
    SourceConfig,
    Table,
    VolumeConfig,
    load_receiver,
    load_source,
)
from cdp.config.keys import RECEIVER_FILE, SOURCE_FILE, TABLES
from cdp.errors import ConfigError

SIDES: dict[str, tuple[Callable[[Path], Any], Callable[[], list[Line]], tuple[Block, ...]]] = {
    "receiver.toml": (load_receiver, receiver_lines, RECEIVER_BLOCKS),
    "source.toml": (load_source, source_lines, SOURCE_BLOCKS),
}
HEADER = re.compile(r"^(?:# )?\[\[?([a-z_.]+)\]\]?(?:\s|$)")
KEY = re.compile(r"^(?:# )?([a-z_]+) = ")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    init(tmp_path / "cfg", image_size=1 << 20)
    return tmp_path / "cfg"


def keys_in(text: str) -> dict[str, set[str]]:
    """Table -> the keys written for it (set or commented out), read from the file's text alone."""
    tables: dict[str, set[str]] = {}
    current = None
    for line in text.splitlines():
        if m := HEADER.match(line):
            current = m[1]
            tables.setdefault(current, set())
        elif (m := KEY.match(line)) and current is not None:
            tables[current].add(m[1])
    return tables


def side_of(table: str) -> str:
    top = table.split(".")[0]
    assert top in RECEIVER_FILE or top in SOURCE_FILE, table
    return "receiver.toml" if top in RECEIVER_FILE else "source.toml"


def test_every_key_the_loader_accepts_is_in_the_example_for_its_side(site: Path) -> None:
    found = {name: keys_in((site / name).read_text()) for name in SIDES}
    for table, keys in TABLES.items():
        mine, other = found[side_of(table)], found["source.toml" if side_of(table) == "receiver.toml"
                                                  else "receiver.toml"]
        assert table in mine, f"[{table}] is missing from {side_of(table)}"
        assert table not in other
        for key in keys.values():
            if key.table:
                assert f"{table}.{key.name}" in mine, f"[{table}.{key.name}] is missing"
            else:
                assert key.name in mine[table], f"{table}.{key.name} is missing from {side_of(table)}"
    for name, tables in found.items():  # and nothing the loader does not know
        for table, keys in tables.items():
            assert keys <= set(TABLES[table]), (name, table, keys - set(TABLES[table]))
    assert len(found["source.toml"]["volume"]) == len([k for k in TABLES["volume"].values()
                                                       if not k.table])  # scan and nbd keys


def test_the_loader_reads_no_key_that_is_not_declared() -> None:
    t = Table(Path("/x/receiver.toml"), "receiver.client[0]", {})
    with pytest.raises(AssertionError, match=r"config/keys\.py"):
        t.get("colour", str)
    with pytest.raises(AssertionError, match=r"config/keys\.py"):  # a second default beside the declared one
        Table(Path("/x/receiver.toml"), "receiver", {}).get("idle_timeout", float, default=3.0)
    with pytest.raises(ConfigError, match="is required"):  # required comes from the declaration
        t.get("name", str)


def _variant(lines: list[Line], uncomment: set[int]) -> str:
    out = []
    for i, line in enumerate(lines):
        if i in uncomment:
            assert line.text.startswith("# "), line.text
            out.append(line.text[2:])
        else:
            out.append(line.text)
    return "\n".join(out) + "\n"


def _chain(blocks: tuple[Block, ...], i: int) -> list[int]:
    """A block and the blocks it is a sub-table of."""
    chain = [i]
    while (parent := blocks[chain[-1]].parent) is not None:
        chain.append(parent)
    return chain


def _enable(lines: list[Line], blocks: tuple[Block, ...], i: int) -> set[int]:
    """The lines to uncomment for block i (and the blocks it is part of) with what they set."""
    chain = {b for b in _chain(blocks, i) if not blocks[b].on}
    return {n for n, line in enumerate(lines) if line.block in chain and line.role in ("header", "set")}


@pytest.mark.parametrize("name", SIDES)
def test_the_examples_load_and_every_shown_default_is_the_default(site: Path, name: str) -> None:
    loader, make_lines, blocks = SIDES[name]
    lines = make_lines()
    path = site / name
    assert path.read_text() == "\n".join(line.text for line in lines) + "\n"  # the lines are the file
    plain = loader(path)

    # every key of the active tables shown at its default, uncommented: the same config
    on = {i for i, b in enumerate(blocks) if b.on}
    shown = {n for n, line in enumerate(lines) if line.role == "default" and line.block in on}
    assert len(shown) > 10
    path.write_text(_variant(lines, shown))
    assert loader(path) == plain

    # each table that is commented out: enabled with what it sets, then also with every default shown
    checked = 0
    for i, b in enumerate(blocks):
        if b.on:
            continue
        needed = _enable(lines, blocks, i)
        path.write_text(_variant(lines, needed))
        enabled = loader(path)
        assert enabled != plain, f"enabling [{b.table}] changed nothing"
        defaults = {n for n, line in enumerate(lines) if line.block == i and line.role == "default"}
        checked += len(defaults)
        path.write_text(_variant(lines, needed | defaults))
        assert loader(path) == enabled, f"[{b.table}]: a shown default is not the default"
    assert checked > 5


@pytest.mark.parametrize("name", SIDES)
def test_every_example_value_is_read_by_the_loader(site: Path, name: str) -> None:
    """Keys without a default show an example: each is accepted (no "unknown key") where it stands."""
    loader, make_lines, blocks = SIDES[name]
    lines = make_lines()
    path = site / name
    examples = [n for n, line in enumerate(lines) if line.role == "example"]
    assert examples
    for n in examples:
        needed = _enable(lines, blocks, lines[n].block) if lines[n].block is not None else set()
        path.write_text(_variant(lines, needed))
        without = loader(path)
        path.write_text(_variant(lines, needed | {n}))
        try:
            with_it = loader(path)
        except ConfigError as exc:  # e.g. a user "libvirt-qemu" this host lacks: not a layout error
            assert "unknown key" not in str(exc) and lines[n].key in str(exc), str(exc)
        else:
            assert with_it != without, f"{lines[n].text!r} changed nothing"


def test_an_unknown_key_lists_the_accepted_ones(site: Path) -> None:
    rx = site / "receiver.toml"
    rx.write_text(rx.read_text().replace("[receiver]\n", '[receiver]\nlisen = "127.0.0.1:7401"\n'))
    with pytest.raises(ConfigError) as info:
        load_receiver(rx)
    msg = str(info.value)
    assert "receiver.lisen: unknown key; did you mean 'listen'?" in msg
    assert all(key in msg for key in TABLES["receiver"]), msg

    src = site / "source.toml"
    src.write_text(src.read_text().replace('mode = "scan"', 'mode = "scan"\nnbd_sock_mode = "0660"'))
    with pytest.raises(ConfigError) as info:
        load_source(src)
    msg = str(info.value)
    assert "volume[0].nbd_sock_mode: unknown key; did you mean 'nbd_socket_mode'?" in msg
    assert "capture_disk" in msg and "scan_interval" in msg and "cdp init" in msg


def _field_defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def test_the_dataclass_defaults_agree_with_the_declared_ones(site: Path) -> None:
    """Code that builds configs without a file (tests, the bench) gets the same defaults."""
    rx, src = site / "receiver.toml", site / "source.toml"
    rx.write_text(rx.read_text() + '\n[[archive]]\nname = "a"\nrepository = "arch"\n'
                  'password_file = "pw"\n')
    cfg, scfg = load_receiver(rx), load_source(src)
    pairs = [(cfg, ReceiverConfig, "receiver"), (cfg.clients[0], ClientConfig, "receiver.client"),
             (cfg.archives[0], ArchiveConfig, "archive"), (scfg, SourceConfig, "source"),
             (scfg.volumes[0], VolumeConfig, "volume")]
    written = {"password_file", "state_dir", "mode"}  # set in these files; the rest left out
    compared = 0
    for obj, cls, table in pairs:
        for name, default in _field_defaults(cls).items():
            if name in TABLES[table] and name not in written:
                assert getattr(obj, name) == default, f"{cls.__name__}.{name}"
                compared += 1
    assert cfg.keep == ReceiverConfig.__dataclass_fields__["keep"].default  # keep_points*
    fs = _field_defaults(FilesetConfig)
    src.write_text(src.read_text() + '\n[[fileset]]\nname = "f"\npaths = ["/etc/hostname"]\n')
    loaded = load_source(src).filesets[0]
    assert (loaded.max_file_size, loaded.scan_interval) == (fs["max_file_size"], fs["scan_interval"])
    assert compared > 30


def test_cdp_init_writes_files_that_load_and_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    r = run_main(capsys, "init", tmp_path / "site")
    assert r.returncode == 0, r.stderr
    cfg = load_receiver(tmp_path / "site" / "receiver.toml")
    scfg = load_source(tmp_path / "site" / "source.toml")
    assert [c.name for c in cfg.clients] == [scfg.name] and cfg.clients[0].token == scfg.token
    assert [v.name for v in scfg.volumes] == list(cfg.clients[0].volumes)
    assert (tmp_path / "site" / "host1.token").stat().st_mode & 0o077 == 0
    again = run_main(capsys, "init", tmp_path / "site")
    assert again.returncode == 2 and "already exists" in again.stderr
