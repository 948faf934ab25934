"""Archive pieces without I/O: [[archive]] config, schedules, pack format, keys and sealing."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import msgpack
import pytest

from cdp.archive import crypto, pack
from cdp.archive.job import chunk_size_for, due
from cdp.config import ArchiveConfig, KeepPolicy, load_receiver
from cdp.errors import ArchiveAccessError, ArchiveCorruptError, ConfigError
from cdp.schedule import is_due, parse_schedule


def _receiver(tmp_path: Path, archive: str) -> Path:
    pw = tmp_path / "a.pass"
    pw.write_text("a long enough password\n")
    pw.chmod(0o600)
    p = tmp_path / "receiver.toml"
    p.write_text('[receiver]\nlisten = "127.0.0.1:7400"\n\n[[archive]]\n' + archive + "\n")
    return p


def test_archive_config_parses_design_example(tmp_path: Path) -> None:
    cfg = load_receiver(_receiver(tmp_path, """
name = "offsite"
repository = "s3://cdp-archive/site1"
endpoint = "http://127.0.0.1:8333"
password_file = "a.pass"
schedule = "daily 02:00"
keep = { last = 7, daily = 7, weekly = 4, monthly = 12 }"""))
    a = cfg.archive("offsite")
    assert a == ArchiveConfig("offsite", "s3://cdp-archive/site1", "http://127.0.0.1:8333",
                              tmp_path / "a.pass", "daily 02:00", KeepPolicy(7, 0, 7, 4, 12))
    assert a.encrypt and a.chunk_size == 4 << 20 and a.pack_size == 32 << 20


def test_archive_config_directory_forms(tmp_path: Path) -> None:
    cfg = load_receiver(_receiver(tmp_path, 'name = "local"\nrepository = "arch"\nencrypt = false\n'
                                  'password_file = "none"\nchunk_size = "1MiB"\npack_size = "8MiB"'))
    a = cfg.archives[0]
    assert a.repository == str(tmp_path / "arch") and a.password_file is None and not a.encrypt
    assert (a.chunk_size, a.pack_size) == (1 << 20, 8 << 20)
    cfg = load_receiver(_receiver(tmp_path, 'name = "x"\nrepository = "file:///srv/arch"\n'
                                  'password_file = "a.pass"'))
    assert cfg.archives[0].repository == "/srv/arch"


@pytest.mark.parametrize("body, key", [
    ('name = "a"\nrepository = "r"\npassword_file = "a.pass"\nkeepp = 1', "archive[0].keepp"),
    ('name = "a"\nrepository = "r"\npassword_file = "a.pass"\nkeep = { yearly = 1 }',
     "archive[0].keep.yearly"),
    ('name = "a"\nrepository = "r"', "archive[0].password_file"),
    ('name = "a"\nrepository = "s3://b/p"\nencrypt = false', "archive[0].encrypt"),
    ('name = "a"\nrepository = "r"\npassword_file = "a.pass"\nschedule = "sometimes"', "archive[0].schedule"),
    ('name = "a"\nrepository = "r"\npassword_file = "a.pass"\nchunk_size = "3MiB"', "archive[0].chunk_size"),
    ('name = "a"\nrepository = "ftp://x"\npassword_file = "a.pass"', "archive[0].repository"),
    ('name = "a"\nrepository = "r"\npassword_file = "a.pass"\nendpoint = "http://x"', "archive[0].endpoint"),
    ('name = "a"\nrepository = "r"\npassword_file = "a.pass"\nkeep = { last = -1 }', "archive[0].keep.last"),
])
def test_archive_config_errors_name_file_and_key(tmp_path: Path, body: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_receiver(_receiver(tmp_path, body))
    assert str(tmp_path / "receiver.toml") in str(exc.value) and key in str(exc.value)


def test_schedules() -> None:
    def at(s: str) -> float:
        return dt.datetime.fromisoformat(s).timestamp()

    daily = parse_schedule("daily 02:00")
    assert is_due(daily, None, at("2026-01-10 01:00"))
    assert not is_due(daily, at("2026-01-10 02:05"), at("2026-01-11 01:59"))
    assert is_due(daily, at("2026-01-10 02:05"), at("2026-01-11 02:00"))
    assert is_due(daily, at("2026-01-08 02:05"), at("2026-01-11 01:00"))  # missed slots: run once
    hourly = parse_schedule("hourly")
    assert not is_due(hourly, at("2026-01-10 05:00:01"), at("2026-01-10 05:59"))
    assert is_due(hourly, at("2026-01-10 05:00:01"), at("2026-01-10 06:00"))
    every = parse_schedule("every 6h")
    assert not is_due(every, at("2026-01-10 00:00"), at("2026-01-10 05:59"))
    assert is_due(every, at("2026-01-10 00:00"), at("2026-01-10 06:00"))
    weekly = parse_schedule("weekly sun 03:30")  # 2026-01-11 is a Sunday
    assert not is_due(weekly, at("2026-01-04 04:00"), at("2026-01-11 03:29"))
    assert is_due(weekly, at("2026-01-04 04:00"), at("2026-01-11 03:30"))
    assert not is_due(parse_schedule("manual"), None, at("2026-01-10 00:00"))
    for bad in ("daily 25:00", "every 10s", "monthly", "hourly 15"):
        with pytest.raises(ValueError):
            parse_schedule(bad)
    a = ArchiveConfig("a", "/x", schedule="every 1h")
    assert due(a, None, 0.0) and not due(a, 1000.0, 2000.0) and due(a, 1000.0, 4600.0)


def test_chunks_are_whole_blocks() -> None:
    assert chunk_size_for(4 << 20, 64 << 10) == 4 << 20
    assert chunk_size_for(64 << 10, 1 << 20) == 1 << 20
    assert chunk_size_for(3 << 20, 2 << 20) == 2 << 20


def test_key_file_wrong_password_and_keyed_ids() -> None:
    blob, keys = crypto.new_key_file(b"secret password", "repo1", n=1 << 10)
    again = crypto.unlock(blob, b"secret password", "repo1", "here")
    assert again == keys
    with pytest.raises(ArchiveAccessError, match="wrong password"):
        crypto.unlock(blob, b"other password", "repo1", "here")
    with pytest.raises(crypto.TamperedError, match="belongs to repository 'repo1'"):
        crypto.unlock(blob, b"secret password", "repo2", "here")  # bound to the repository id
    old = msgpack.unpackb(blob)
    del old["id"]  # key files written before the id was recorded: the key wrap still binds it
    with pytest.raises(ArchiveAccessError):
        crypto.unlock(msgpack.packb(old), b"secret password", "repo2", "here")
    _, other = crypto.new_key_file(b"secret password", "repo1", n=1 << 10)
    data = os.urandom(1000)
    assert keys.chunk_id(data) != other.chunk_id(data)  # ids reveal nothing without the key
    assert crypto.PLAIN.chunk_id(data) != keys.chunk_id(data)
    assert b"hello" not in keys.seal(b"hello" * 10, b"x")


def test_pack_round_trip_and_damage() -> None:
    _, keys = crypto.new_key_file(b"secret password", "r", n=1 << 10)
    chunks = [os.urandom(5000), b"text " * 2000, bytes(100) + b"x"]
    w = pack.PackWriter(keys)
    for c in chunks:
        cid = keys.chunk_id(c)
        w.add(cid, pack.encode_blob(keys, cid, c, 3), len(c))
    name, data, _entries = w.seal()
    parsed = pack.parse_pack(keys, name, data)
    assert [pack.decode_blob(keys, cid, data[e.offset:e.offset + e.length], e.raw_length)
            for cid, e in parsed] == chunks
    assert parsed[1][1].length < len(chunks[1]) // 10  # compressed
    cid, e = parsed[0]
    bad = bytearray(data)
    bad[e.offset + 100] ^= 1
    with pytest.raises(ArchiveCorruptError, match=cid.hex()):
        pack.decode_blob(keys, cid, bytes(bad[e.offset:e.offset + e.length]), e.raw_length)
    with pytest.raises(ArchiveCorruptError):  # a blob moved to another id does not authenticate
        pack.decode_blob(keys, parsed[1][0], data[e.offset:e.offset + e.length], e.raw_length)
    trailer = msgpack.packb([[cid, 8, 1 << 40, 10]])
    w2 = pack.PackWriter(crypto.PLAIN)
    w2.entries = []
    n2, d2, _ = w2.seal()
    forged = d2[:8] + trailer + len(trailer).to_bytes(4, "little") + pack.END
    with pytest.raises(ArchiveCorruptError):
        pack.parse_pack(crypto.PLAIN, n2, forged)
