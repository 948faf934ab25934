"""Rate-limit keys of the source config, and merging a reloaded config (cdp.config)."""

from __future__ import annotations

import os
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from cdp.config import load_source, reload_source
from cdp.errors import ConfigError
from cdp.ratelimit import ALL_DAYS, INHERIT, Caps, Schedule

MiB = 1024 * 1024

HEAD = """\
[source]
name = "host1"
receiver = "127.0.0.1:7400"
token_file = "host1.token"
"""

VOLUME = """
[[volume]]
name = "vm1"
path = "vm1.raw"
"""


@pytest.fixture
def cfg_dir(tmp_path: Path) -> Path:
    fd = os.open(tmp_path / "host1.token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("0123456789abcdef0123456789abcdef")
    return tmp_path


def write(cfg_dir: Path, source: str = "", volume: str = "", tail: str = "") -> Path:
    """A source config: `source` lines go in [source], `volume` lines in the [[volume]]."""
    path = cfg_dir / "source.toml"
    path.write_text(HEAD + textwrap.dedent(source) + VOLUME + textwrap.dedent(volume)
                    + textwrap.dedent(tail))
    return path


def error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_source(path)
    assert info.value.exit_code == 2
    msg = str(info.value)
    assert str(path.resolve()) in msg
    return msg


def test_no_limits_by_default(cfg_dir):
    cfg = load_source(write(cfg_dir))
    assert cfg.rate_limit is None
    assert cfg.read_limit is None
    assert cfg.schedule == ()
    assert cfg.volumes[0].rate_limit is None


@pytest.mark.parametrize(("value", "want"), [
    ('"50MiB"', 50 * MiB), ('"50MiB/s"', 50 * MiB), ('"100Mbit/s"', 12.5e6), ("1048576", MiB),
    ('"unlimited"', None),
])
def test_rate_values(cfg_dir, value, want):
    cfg = load_source(write(cfg_dir, f"rate_limit = {value}\nread_limit = {value}\n",
                            f"rate_limit = {value}\n"))
    assert cfg.rate_limit == want
    assert cfg.read_limit == want
    assert cfg.volumes[0].rate_limit == want


@pytest.mark.parametrize(("where", "key"), [("source", "source.rate_limit"),
                                            ("source-read", "source.read_limit"),
                                            ("volume", "volume[0].rate_limit")])
@pytest.mark.parametrize("value", ['"fast"', "0", '"50Mbps"', "true", '"-1MiB"', '"100"'])
def test_bad_rates_name_file_and_key(cfg_dir, where, key, value):
    line = f"{key.rpartition('.')[2]} = {value}\n"
    path = write(cfg_dir, line if where.startswith("source") else "",
                 line if where == "volume" else "")
    msg = error(path)
    assert key in msg
    assert "unlimited" in msg  # says what to write instead


def test_schedule_windows(cfg_dir):
    cfg = load_source(write(cfg_dir, 'rate_limit = "10MiB"\n', tail="""
        [[source.schedule]]
        days = "mon-fri"
        hours = "08:00-18:00"
        rate_limit = "50MiB/s"

        [[source.schedule]]
        hours = "22:00-06:00"
        rate_limit = "unlimited"
        read_limit = "200MiB"

        [[source.schedule]]
        days = ["sat", "sun"]
        read_limit = "1GiB"
        """))
    business, night, weekend = cfg.schedule
    assert business.days == frozenset(range(5))
    assert (business.start, business.end) == (8 * 60, 18 * 60)
    assert business.rate_limit == 50 * MiB
    assert business.read_limit is INHERIT
    assert business.label == "mon-fri 08:00-18:00"
    assert night.days == ALL_DAYS
    assert (night.start, night.end) == (22 * 60, 6 * 60)
    assert night.rate_limit is None
    assert night.read_limit == 200 * MiB
    assert night.label == "every day 22:00-06:00"
    assert weekend.days == frozenset({5, 6})
    assert (weekend.start, weekend.end) == (0, 24 * 60)
    assert weekend.label == "sat,sun 00:00-24:00"
    # what the daemon builds from it
    from datetime import datetime
    s = Schedule(cfg.rate_limit, cfg.read_limit, cfg.schedule)
    assert s.active(datetime(2024, 1, 3, 9)) == Caps(50 * MiB, None, "mon-fri 08:00-18:00")
    assert s.active(datetime(2024, 1, 3, 19)) == Caps(10 * MiB, None, None)
    assert s.active(datetime(2024, 1, 4, 3)) == Caps(None, 200 * MiB, "every day 22:00-06:00")


@pytest.mark.parametrize(("table", "key", "words"), [
    ('days = "mon-fry"\nrate_limit = "1MiB"', "source.schedule[0].days", "unknown day"),
    ('hours = "8-18"\nrate_limit = "1MiB"', "source.schedule[0].hours", "08:00-18:00"),
    ('hours = "08:00-08:00"\nrate_limit = "1MiB"', "source.schedule[0].hours", "empty"),
    ('rate_limit = "quick"', "source.schedule[0].rate_limit", "50MiB/s"),
    ('read_limit = 0', "source.schedule[0].read_limit", "unlimited"),
    ('rate = "1MiB"', "source.schedule[0].rate", "unknown key"),
    ('days = "mon"', "source.schedule[0].rate_limit", "must set rate_limit, read_limit"),
])
def test_bad_schedule_names_file_and_key(cfg_dir, table, key, words):
    msg = error(write(cfg_dir, tail="\n[[source.schedule]]\n" + table + "\n"))
    assert key in msg
    assert words in msg


def test_second_window_is_named_by_its_index(cfg_dir):
    msg = error(write(cfg_dir, tail='\n[[source.schedule]]\nrate_limit = "1MiB"\n'
                      '\n[[source.schedule]]\nhours = "25:00-01:00"\nrate_limit = "1MiB"\n'))
    assert "source.schedule[1].hours" in msg


def test_schedule_must_be_an_array_of_tables(cfg_dir):
    msg = error(write(cfg_dir, 'schedule = "nights"\n'))
    assert "source.schedule" in msg
    assert "[[source.schedule]]" in msg


def test_window_tables_point_to_schedule(cfg_dir):
    # `window` is the number of epochs in flight; time windows have their own tables
    msg = error(write(cfg_dir, tail='\n[[source.window]]\nhours = "08:00-18:00"\n'
                      'rate_limit = "1MiB"\n'))
    assert "source.window" in msg
    assert "[[source.schedule]]" in msg


def test_epoch_window_and_schedule_together(cfg_dir):
    cfg = load_source(write(cfg_dir, "window = 4\n", tail='\n[[source.schedule]]\nrate_limit = "1MiB"\n'))
    assert cfg.window == 4
    assert cfg.schedule[0].rate_limit == MiB


def test_old_configs_and_defaults_still_construct():
    # code that builds configs by hand (tests, tools) keeps working without the new fields
    from cdp.config import SourceConfig, VolumeConfig
    v = VolumeConfig("a", Path("/a"))
    c = SourceConfig(Path("/s.toml"), "h", ("127.0.0.1", 1), b"t" * 16, Path("/st"), (v,))
    assert (c.rate_limit, c.read_limit, c.schedule, v.rate_limit) == (None, None, (), None)


# -- reloading -------------------------------------------------------------------


def test_reload_applies_caps_and_live_keys(cfg_dir):
    old = load_source(write(cfg_dir, 'rate_limit = "256KiB"\n', 'scan_interval = "10s"\n'))
    new = load_source(write(cfg_dir, 'rate_limit = "unlimited"\nread_limit = "10MiB"\n'
                            "compress_level = 3\n",
                            'scan_interval = "5s"\nrate_limit = "1MiB"\n',
                            tail='\n[[source.schedule]]\nhours = "22:00-06:00"\nrate_limit = "2MiB"\n'))
    plan = reload_source(old, new)
    assert plan.restart == ()
    assert "source.rate_limit: 256.0 KiB/s -> unlimited" in plan.applied
    assert "source.read_limit: unlimited -> 10.0 MiB/s" in plan.applied
    assert "source.compress_level: 1 -> 3" in plan.applied
    assert "volume[vm1].rate_limit: unlimited -> 1.0 MiB/s" in plan.applied
    assert "volume[vm1].scan_interval: 10s -> 5s" in plan.applied
    assert any(line.startswith("source.schedule: none -> every day 22:00-06:00") for line in plan.applied)
    assert plan.cfg == new


def test_reload_keeps_what_needs_a_restart(cfg_dir):
    old = load_source(write(cfg_dir))
    text = (HEAD.replace("127.0.0.1:7400", "10.0.0.9:7400") + "workers = 8\n"
            'rate_limit = "1MiB"\n' + VOLUME.replace("vm1.raw", "other.raw")
            + 'rate_limit = "2MiB"\n' + '\n[[volume]]\nname = "vm2"\npath = "vm2.raw"\n')
    (cfg_dir / "source.toml").write_text(text)
    new = load_source(cfg_dir / "source.toml")
    plan = reload_source(old, new)
    assert "source.rate_limit: unlimited -> 1.0 MiB/s" in plan.applied
    assert "volume[vm1].rate_limit: unlimited -> 2.0 MiB/s" in plan.applied
    assert "source.receiver: 127.0.0.1:7400 -> 10.0.0.9:7400" in plan.restart  # not a repr
    assert "source.workers: 2 -> 8" in plan.restart
    assert any(line.startswith("volume[vm1].path:") for line in plan.restart)
    assert "volume 'vm2' added" in plan.restart
    cfg = plan.cfg
    assert cfg.receiver == old.receiver
    assert cfg.workers == old.workers
    assert cfg.rate_limit == MiB
    assert [v.name for v in cfg.volumes] == ["vm1"]
    assert cfg.volumes[0].path == old.volumes[0].path
    assert cfg.volumes[0].rate_limit == 2 * MiB


def test_reload_removed_volume_and_secret_token(cfg_dir):
    old = load_source(write(cfg_dir, tail='\n[[volume]]\nname = "vm2"\npath = "vm2.raw"\n'))
    new = replace(load_source(write(cfg_dir)), token=b"another-secret-token")
    plan = reload_source(old, new)
    assert "volume 'vm2' removed" in plan.restart
    # a rotated token is used from the next connection on (the receiver drops the old one)
    assert "source.token_file: the token changed" in plan.applied
    assert not any("another-secret-token" in line for line in plan.restart + plan.applied)
    assert [v.name for v in plan.cfg.volumes] == ["vm1", "vm2"]
    assert plan.cfg.token == b"another-secret-token"


def test_reload_batch_bytes_must_fit_the_running_max_frame(cfg_dir):
    old = load_source(write(cfg_dir, 'max_frame = "2MiB"\nbatch_bytes = "1MiB"\n'))
    new = load_source(write(cfg_dir, 'max_frame = "8MiB"\nbatch_bytes = "4MiB"\n'))
    plan = reload_source(old, new)
    assert plan.cfg.max_frame == 2 * MiB
    assert plan.cfg.batch_bytes == 1 * MiB
    assert any(line.startswith("source.batch_bytes") for line in plan.restart)
    assert not any(line.startswith("source.batch_bytes") for line in plan.applied)


def test_reload_nothing_changed(cfg_dir):
    cfg = load_source(write(cfg_dir, 'rate_limit = "1MiB"\n'))
    plan = reload_source(cfg, load_source(cfg.path))
    assert plan.applied == plan.restart == ()
    assert plan.cfg == cfg
