"""The source daemon's rate-limit plumbing, without processes: schedule, reload, frame sizes."""

from __future__ import annotations

import asyncio
import logging
import os
import textwrap
from datetime import datetime
from pathlib import Path

import pytest

from cdp.config import load_source
from cdp.source.daemon import Source, _wire_estimate
from cdp.source.worker import MIN_PACED_BATCH, paced
from cdp.wire.frames import encode
from cdp.wire.messages import Begin, Commit, Current, Data, Error, GetHashes, Open, Ref, Zero

MiB = 1024 * 1024

CONFIG = """\
[source]
name = "host1"
receiver = "127.0.0.1:7400"
token_file = "host1.token"
rate_limit = "{rate}"
read_limit = "100MiB"

[[source.schedule]]
days = "mon-fri"
hours = "08:00-18:00"
rate_limit = "50MiB"

[[volume]]
name = "vm1"
path = "vm1.raw"
rate_limit = "{vol_rate}"
"""


def write(tmp_path: Path, rate: str = "10MiB", vol_rate: str = "unlimited") -> Path:
    tok = tmp_path / "host1.token"
    if not tok.exists():
        fd = os.open(tok, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("0123456789abcdef0123456789abcdef")
    path = tmp_path / "source.toml"
    path.write_text(textwrap.dedent(CONFIG.format(rate=rate, vol_rate=vol_rate)))
    return path


@pytest.fixture
def source(tmp_path):
    src = Source(load_source(write(tmp_path)))
    yield src
    src.pool.shutdown()


def test_schedule_sets_the_source_buckets(source, caplog):
    source._apply_schedule(datetime(2024, 1, 7, 9))  # sunday (whatever day it is now)
    caplog.set_level(logging.INFO, "cdp.source.daemon")
    source._apply_schedule(datetime(2024, 1, 3, 9))  # a wednesday morning
    assert source.net.rate == 50 * MiB
    assert source.reads.rate == 100 * MiB
    assert source.caps is not None and source.caps.window == "mon-fri 08:00-18:00"
    assert "window mon-fri 08:00-18:00" in caplog.text
    caplog.clear()
    source._apply_schedule(datetime(2024, 1, 3, 10))  # same window: nothing to say
    assert caplog.text == ""
    source._apply_schedule(datetime(2024, 1, 6, 9))  # saturday: the base caps
    assert source.net.rate == 10 * MiB
    assert source.caps.window is None
    assert "rate limits now: network 10.0 MiB/s, scan reads 100.0 MiB/s (no window active)" \
        in caplog.text


def test_reload_applies_new_caps(source, tmp_path, caplog):
    caplog.set_level(logging.INFO, "cdp.source.daemon")
    write(tmp_path, rate="unlimited", vol_rate="2MiB")
    asyncio.run(source._reload())
    assert source.cfg.rate_limit is None
    assert source.volumes["vm1"].bucket.rate == 2 * MiB
    assert source.volumes["vm1"].status().rate_limit == 2 * MiB
    assert "config reload: source.rate_limit: 10.0 MiB/s -> unlimited" in caplog.text
    assert "config reload: volume[vm1].rate_limit: unlimited -> 2.0 MiB/s" in caplog.text


def test_reload_error_keeps_the_running_config(source, tmp_path, caplog):
    before = source.cfg
    (tmp_path / "source.toml").write_text("[source\n")
    asyncio.run(source._reload())
    assert source.cfg is before
    assert "config reload failed" in caplog.text
    assert "not valid TOML" in caplog.text


def test_reload_warns_about_what_needs_a_restart(source, tmp_path, caplog):
    path = write(tmp_path)
    path.write_text(path.read_text().replace("127.0.0.1:7400", "127.0.0.1:7401"))
    asyncio.run(source._reload())
    assert source.cfg.receiver == ("127.0.0.1", 7400)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("source.receiver" in r.getMessage() and "needs a restart" in r.getMessage()
               for r in warnings)


@pytest.mark.parametrize("msg", [
    Data("vm1", 3, b"\0" * 8 * 32, b"h" * 16 * 32, 2 * MiB, os.urandom(300_000)),
    Begin("vm1", 3, 1.5), Commit("vm1", 3, 1000), Zero("vm1", 3, b"\0" * 160),
    Ref("vm1", 3, "vm2", b"\0" * 80, b"h" * 160, b"\0" * 80), Open("vm1", 1 << 40, 65536),
    Current("vm1", 3, 1.5), GetHashes("vm1", 0, 1 << 20, False), Error("tracker", "x" * 300, "vm1"),
])
def test_wire_estimate_is_close_to_the_frame_size_and_not_below(msg):
    size = len(encode(msg))
    assert size <= _wire_estimate(msg) <= size + 64


def test_frames_and_reads_shrink_under_a_cap():
    assert paced(2 * MiB, None, MIN_PACED_BATCH) == 2 * MiB  # no cap: as configured
    assert paced(2 * MiB, 100 * MiB, MIN_PACED_BATCH) == 2 * MiB  # never larger
    assert paced(2 * MiB, 4 * MiB, MIN_PACED_BATCH) == int(0.4 * MiB)  # a tenth of a second
    assert paced(2 * MiB, 256 * 1024, MIN_PACED_BATCH) == MIN_PACED_BATCH  # but not tiny
    assert paced(128 * 1024, 256 * 1024, MIN_PACED_BATCH) == 128 * 1024  # a small batch stays
    assert paced(4 * MiB, 2 * MiB, 65536) == int(0.2 * MiB)  # scan reads
