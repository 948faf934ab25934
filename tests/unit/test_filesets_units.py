"""File sets without processes: the sessions' rules, the source's walk, the receiver's store."""

from __future__ import annotations

import os

import pytest
import xxhash
from helpers import feed, sent

from cdp.codec import compress
from cdp.config import FilesetConfig
from cdp.errors import LocalProtocolError, RemoteProtocolError, UsageError
from cdp.replica.files import FilesetStore
from cdp.source.filesets import read_file, walk, wire_name
from cdp.wire.messages import FileAck, FileDelete, FileError, FileOpen, FileOpened, FilePut
from cdp.wire.receiver_session import ReceiverSession
from cdp.wire.session import FilesetError, valid_file_path
from cdp.wire.source_session import SourceSession

TOKEN = b"t" * 32


def _pair(sets: tuple[str, ...] = ("cfg",)) -> tuple[SourceSession, ReceiverSession]:
    src = SourceSession("host1", TOKEN)
    rcv = ReceiverSession({"host1": (TOKEN, ())}.get, filesets=lambda c: sets)
    src.start()
    feed(rcv, sent(src))
    rcv.challenge()
    feed(src, sent(rcv))
    src.auth()
    feed(rcv, sent(src))
    rcv.welcome()
    feed(src, sent(rcv))
    return src, rcv


def test_a_conversation():
    src, rcv = _pair()
    assert feed(rcv, sent(src, FileOpen("cfg"))) == [FileOpen("cfg")]
    with pytest.raises(LocalProtocolError):
        src.send(FilePut("cfg", "a", bytes(16), 0, 0.0, 0, 0.0, b""))  # before FileOpened
    feed(src, sent(rcv, FileOpened("cfg", ["a"], bytes(16), bytes(8))))
    put = FilePut("cfg", "etc/a", bytes(16), 1, 0.0, 0o644, 0.0, b"z")
    assert feed(rcv, sent(src, put)) == [put]
    with pytest.raises(LocalProtocolError):
        src.send(FileDelete("cfg", "etc/b", 0.0))  # one request at a time
    with pytest.raises(LocalProtocolError):
        rcv.send(FileAck("cfg", "etc/other", 1))
    assert feed(src, sent(rcv, FileAck("cfg", "etc/a", 1))) == [FileAck("cfg", "etc/a", 1)]
    with pytest.raises(RemoteProtocolError):  # an answer nobody asked for
        feed(src, _frame(FileAck("cfg", "etc/a", 2)))


def _frame(msg):
    from cdp.wire.frames import encode

    return encode(msg)


def test_unauthorized_set_and_bad_paths_are_refused():
    _, rcv = _pair()
    with pytest.raises(FilesetError) as ei:
        feed(rcv, _frame(FileOpen("other")))
    assert ei.value.wire_code == "unauthorized" and "may not write file set 'other'" in str(
        ei.value)
    with pytest.raises(RemoteProtocolError):  # a request for a set that is not open
        feed(rcv, _frame(FileDelete("other", "a", 0.0)))
    _, rcv = _pair()
    feed(rcv, _frame(FileOpen("cfg")))
    sent(rcv, FileOpened("cfg", [], b"", b""))
    with pytest.raises(FilesetError) as ei:
        feed(rcv, _frame(FileDelete("cfg", "../../etc/passwd", 0.0)))
    assert ei.value.wire_code == "path" and ei.value.path == "../../etc/passwd"
    sent(rcv, FileError("cfg", "../../etc/passwd", "path", "refused"))  # the set goes on
    with pytest.raises(RemoteProtocolError):
        feed(rcv, _frame(FileDelete("cfg", "", 0.0)))


@pytest.mark.parametrize("path,ok", [("etc/a.xml", True), ("a", True), ("../a", False),
                                     ("/a", False), ("a/../b", False), ("a\0", False),
                                     ("", False), ("a/", False), ("a\\b", False),
                                     ("x" * 5000, False)])
def test_valid_file_path(path, ok):
    assert valid_file_path(path) is ok


def test_walk_refuses_big_special_and_outside_links(tmp_path):
    d = tmp_path / "set"
    (d / "sub").mkdir(parents=True)
    (d / "ok").write_bytes(b"1")
    (d / "sub" / "ok2").write_bytes(b"2")
    (d / "big").write_bytes(b"x" * 2000)
    os.mkfifo(d / "fifo")
    (tmp_path / "outside").write_bytes(b"o")
    (d / "out-link").symlink_to(tmp_path / "outside")
    (d / "in-link").symlink_to(d / "ok")
    (d / "dangling").symlink_to(tmp_path / "nowhere")
    found, refused = walk(FilesetConfig("s", (d,), max_file_size=1000))
    n = wire_name
    assert set(found) == {n(str(d / "ok")), n(str(d / "sub" / "ok2")), n(str(d / "in-link"))}
    assert set(refused) == {n(str(d / "big")), n(str(d / "fifo")), n(str(d / "out-link")),
                            n(str(d / "dangling"))}
    assert "over the set's max_file_size" in refused[n(str(d / "big"))]
    assert "FIFO" in refused[n(str(d / "fifo"))]
    assert "outside the file set" in refused[n(str(d / "out-link"))]
    got = read_file(found[n(str(d / "in-link"))], 1000)
    assert not isinstance(got, str) and got[0] == b"1"
    # a listed path that is a symlink is followed
    found, refused = walk(FilesetConfig("s", (d / "out-link",)))
    assert list(found) == [n(str(d / "out-link"))] and not refused


def test_store_ignores_a_torn_line_and_checks_hashes(tmp_path):
    store = FilesetStore(tmp_path / "cfg")
    data = b"hello"
    h = xxhash.xxh3_128_digest(data)
    assert store.put("a", h, 5, 1.0, 0o600, 1.0, compress(data)) == 1
    log = next((tmp_path / "cfg" / "log").glob("*.jsonl"))
    with open(log, "ab") as fh:
        fh.write(b'{"path": "a", "vers')  # a crash mid-append: never acknowledged
    assert [v.version for v in store.versions("a")] == [1]
    assert store.put("a", xxhash.xxh3_128_digest(b"v2"), 2, 2.0, 0o600, 2.0,
                     compress(b"v2")) == 2
    assert [store.content(v) for v in store.versions("a")] == [b"hello", b"v2"]
    assert store.delete("a", 3.0) == 3
    with pytest.raises(UsageError):
        store.content(store.versions("a")[-1])
    from cdp.errors import ReplicaError

    with pytest.raises(ReplicaError):
        store.put("b", bytes(16), 5, 1.0, 0o600, 1.0, compress(data))
    assert store.versions("b") == []


def test_config_keys(tmp_path):
    from cdp.config import load_receiver, load_source
    from cdp.errors import ConfigError

    tok = tmp_path / "t.token"
    tok.write_text("x" * 64)
    os.chmod(tok, 0o600)
    rx = tmp_path / "rx.toml"
    rx.write_text('[receiver]\n[[receiver.client]]\nname = "h"\ntoken_file = "t.token"\n'
                  'volumes = []\nfilesets = ["cfg", "net"]\n')
    assert load_receiver(rx).client("h").filesets == ("cfg", "net")
    rx.write_text('[receiver]\n[[receiver.client]]\nname = "h"\ntoken_file = "t.token"\n'
                  'volumes = []\nfilesets = ["../x"]\n')
    with pytest.raises(ConfigError, match="filesets"):
        load_receiver(rx)
    src = tmp_path / "src.toml"
    base = '[source]\nname = "h"\nreceiver = "127.0.0.1:1"\ntoken_file = "t.token"\n'
    src.write_text(base + '[[fileset]]\nname = "cfg"\npaths = ["etc"]\n'
                   'max_file_size = "1MiB"\nscan_interval = "5s"\n')
    fs = load_source(src).filesets[0]
    assert (fs.paths, fs.max_file_size, fs.scan_interval) == ((tmp_path / "etc",), 1 << 20, 5.0)
    assert load_source(src).filesets[0].name == "cfg"
    src.write_text(base + '[[fileset]]\nname = "cfg"\npaths = ["etc"]\nmax_file_size = "2GiB"\n')
    with pytest.raises(ConfigError, match="max_file_size"):
        load_source(src)
