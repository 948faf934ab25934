"""File sets end to end: real receiver and source processes, real files, the `cdp files` verbs.

Every version of a changed file reaches the receiver (edits, deletes,
re-creates) and comes back byte for byte; too-large and special files are
refused by name while the rest of the set replicates; a client cannot write
another client's set (guarantee 4); path tricks from the wire are refused and
change nothing (guarantee 3).
"""

from __future__ import annotations

import os
import random
import socket
import time
from pathlib import Path

from helpers import (
    MiB,
    add_fileset,
    feed,
    files_list,
    make_image,
    run_cdp,
    scaled,
    sent,
    wait_converged,
    wait_for,
)

from cdp.codec import compress
from cdp.wire.frames import FrameDecoder
from cdp.wire.messages import (
    Challenge,
    FileAck,
    FileDelete,
    FileError,
    FileOpen,
    FileOpened,
    FilePut,
    Message,
    Welcome,
)
from cdp.wire.source_session import SourceSession

VOL = "vol1"
SET = "vm1-config"


def _name(p: Path) -> str:
    return str(p).lstrip("/")


def _versions(env, path: Path) -> list[dict]:
    r = run_cdp("files", "list", "-c", env.receiver_toml, SET, str(path), "--json")
    return __import__("json").loads(r.stdout) if r.returncode == 0 else []


def _wait_versions(env, path: Path, n: int, what: str) -> list[dict]:
    return wait_for(lambda: (v := _versions(env, path)) and len(v) >= n and v, 30,
                    what=lambda: f"{what}: versions of {path} are {_versions(env, path)}")


def _site(cdp_env, daemons, files: Path, extra: str = ""):
    env = cdp_env()
    make_image(env.source.images[VOL], 2 * MiB, random.Random(3))
    add_fileset(env, SET, [files / "etc", files / "vm1.xml"], extra=extra)
    rx = daemons.receiver(env, inprocess=True)
    src = daemons.source(env, inprocess=True)
    return env, rx, src


def test_versions_edits_deletes_recreates_and_restore(cdp_env, daemons, tmp_path):
    files = tmp_path / "host"
    (files / "etc" / "net").mkdir(parents=True)
    xml, conf = files / "vm1.xml", files / "etc" / "net" / "br0.conf"
    v1 = b"<domain><name>vm1</name></domain>\n"
    xml.write_bytes(v1)
    os.chmod(xml, 0o640)
    conf.write_bytes(b"bridge=br0\n" * 100)
    (files / "etc" / "huge.img").write_bytes(os.urandom(100 * 1024))  # over max_file_size
    os.mkfifo(files / "etc" / "ctl.fifo")
    (files / "etc" / "outside").symlink_to("/etc/hostname")
    env, rx, src = _site(cdp_env, daemons, files, 'max_file_size = "64KiB"\nscan_interval = "60s"')
    t0 = time.time()
    wait_converged(env, VOL, t0, src, rx)

    _wait_versions(env, xml, 1, "first copy")
    _wait_versions(env, conf, 1, "first copy")
    log = wait_for(lambda: (t := src.log_text()) and "ctl.fifo" in t and "huge.img" in t and t,
                   20, what="the refusals in the source log")
    assert f"refusing /{_name(files / 'etc' / 'huge.img')}: it is 100.0 KiB, over the set's " \
        "max_file_size" in log
    assert f"refusing /{_name(files / 'etc' / 'ctl.fifo')}: it is a FIFO" in log
    assert "symlink pointing outside the file set" in log
    # the source's status file names the set, what the receiver holds and the refusals
    fs = wait_for(lambda: (st := env.source.status()) and st.get("filesets")
                  and st["filesets"][0]["files"] == 2 and st["filesets"][0], 10,
                  what="the set in the source's status.json")
    assert fs["fileset"] == SET
    assert sorted(p.rsplit("/", 1)[1] for p in fs["refused"]) == ["ctl.fifo", "huge.img",
                                                                  "outside"]
    # edits below are noticed by file watching: the periodic re-check is a minute away
    listed = {r["path"] for r in files_list(env, SET)}
    assert listed == {_name(xml), _name(conf)}, listed
    assert files_list(env) == [{"fileset": SET, "files": 2, "deleted": 0, "versions": 2}]

    # an edit, a delete and a re-create, each a new version
    v2 = v1.replace(b"vm1", b"vm1-renamed") + os.urandom(1000)
    xml.write_bytes(v2)
    _wait_versions(env, xml, 2, "the edit")
    conf.unlink()
    vs = _wait_versions(env, conf, 2, "the delete")
    assert vs[1]["deleted"]
    conf.write_bytes(b"bridge=br1\n")
    vs = _wait_versions(env, conf, 3, "the re-create")
    assert [v["deleted"] for v in vs] == [False, True, False]

    # restore the chosen versions byte for byte, with mode
    out = tmp_path / "out"
    out.mkdir()
    for n, want in ((1, v1), (2, v2)):
        dest = out / f"xml.v{n}"
        r = run_cdp("files", "restore", "-c", env.receiver_toml, SET, "/" + _name(xml),
                    "--version", str(n), "--to", dest)
        assert r.returncode == 0, r.stderr
        assert dest.read_bytes() == want
        assert dest.stat().st_mode & 0o777 == 0o640
    at = _versions(env, xml)[0]["time"]
    r = run_cdp("files", "restore", "-c", env.receiver_toml, SET, _name(xml), "--at", str(at),
                "--to", out / "xml.at", "--json")
    assert r.returncode == 0 and (out / "xml.at").read_bytes() == v1, r.stderr
    r = run_cdp("files", "restore", "-c", env.receiver_toml, SET, _name(conf), "--to", out)
    assert r.returncode == 0 and (out / "br0.conf").read_bytes() == b"bridge=br1\n", r.stderr

    # unknown set, path, version; a deletion: exit 2 with a message
    for args, text in (((("nope", _name(xml))), "no file set"),
                       ((SET, "etc/none"), "holds no file"),
                       ((SET, _name(xml), "--version", "9"), "has no version 9"),
                       ((SET, _name(conf), "--version", "2"), "records its deletion")):
        r = run_cdp("files", "restore", "-c", env.receiver_toml, *args, "--to", out / "x")
        assert r.returncode == 2 and text in r.stderr, (args, r.returncode, r.stderr)
        assert not (out / "x").exists()
    r = run_cdp("files", "list", "-c", env.receiver_toml, "nope")
    assert r.returncode == 2

    # a restart of the source resends nothing that the receiver holds
    src.stop()
    before = (len(_versions(env, xml)), len(_versions(env, conf)))
    src.start()
    wait_for(lambda: src.log_text().count("the receiver holds 2 file(s)") >= 1, 20,
             what="the set to reopen")
    time.sleep(scaled(2))
    assert (len(_versions(env, xml)), len(_versions(env, conf))) == before
    src.stop()
    rx.stop()


def test_client_cannot_write_another_clients_fileset(cdp_env, daemons, tmp_path):
    env = cdp_env({"host1": ["vol1"], "host2": ["vol2"]})
    for v in ("vol1", "vol2"):
        make_image(env.sources["host1" if v == "vol1" else "host2"].images[v], 1 * MiB,
                   random.Random(5))
    mine = tmp_path / "h1.xml"
    mine.write_bytes(b"host1 config\n")
    theirs = tmp_path / "h2.xml"
    theirs.write_bytes(b"host2 pretending\n")
    add_fileset(env, "h1-config", [mine], client="host1")
    add_fileset(env, "h1-config", [theirs], client="host2", allow=[])  # not allowed for host2
    rx = daemons.receiver(env, inprocess=True)
    s1 = daemons.source(env, "host1", inprocess=True)
    s2 = daemons.source(env, "host2", inprocess=True)
    t0 = time.time()
    wait_for(lambda: "may not write file set 'h1-config'" in s2.log_text(), 30,
             what="host2 to be refused")
    assert "refused by the receiver (unauthorized)" in s2.log_text()
    wait_converged(env, "vol2", t0, s2, rx, client="host2")  # the rest goes on
    wait_for(lambda: _versions_any(env, "h1-config", mine), 30, what="host1's file")
    names = {r["path"] for r in files_list(env, "h1-config")}
    assert names == {_name(mine)}, names
    s1.stop()
    s2.stop()
    rx.stop()


def _versions_any(env, fileset: str, path: Path) -> list[dict]:
    r = run_cdp("files", "list", "-c", env.receiver_toml, fileset, str(path), "--json")
    return __import__("json").loads(r.stdout) if r.returncode == 0 else []


class _Raw:
    def __init__(self, port: int, name: str, token: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), scaled(5))
        self.session = SourceSession(name, token)
        self.pending: list[Message] = []
        self.decoder = FrameDecoder()

    def send(self, msg: Message) -> None:
        self.sock.sendall(sent(self.session, msg))

    def recv(self) -> Message:
        self.sock.settimeout(scaled(10))
        while not self.pending:
            data = self.sock.recv(1 << 20)
            assert data, "the receiver closed the connection"
            self.pending += feed(self.session, data)
        return self.pending.pop(0)


def test_path_tricks_are_refused(cdp_env, daemons, tmp_path):
    env = cdp_env()
    make_image(env.source.images[VOL], 1 * MiB, random.Random(7))
    add_fileset(env, SET, [tmp_path / "nothing"])
    rx = daemons.receiver(env, inprocess=True)
    c = _Raw(env.port, "host1", env.token("host1"))
    c.session.start()
    c.sock.sendall(sent(c.session))
    assert isinstance(c.recv(), Challenge)
    c.session.auth()
    c.sock.sendall(sent(c.session))
    assert isinstance(c.recv(), Welcome)
    c.send(FileOpen(SET))
    assert isinstance(c.recv(), FileOpened)
    data = b"evil\n"
    import xxhash

    h = xxhash.xxh3_128_digest(data)
    for bad in ("../../../tmp/evil", "/etc/passwd", "a/../../b", "a\0b", "a//b", "./a", "a/..",
                "a\\..\\b"):
        c.send(FilePut(SET, bad, h, len(data), 0.0, 0o644, time.time(), compress(data)))
        ans = c.recv()
        assert isinstance(ans, FileError) and ans.code == "path", (bad, ans)
    c.send(FileDelete(SET, "../x", time.time()))
    assert isinstance(c.recv(), FileError)
    # a good one still works on the same connection
    c.send(FilePut(SET, "etc/ok.conf", h, len(data), 0.0, 0o644, time.time(), compress(data)))
    ans = c.recv()
    assert isinstance(ans, FileAck) and ans.version == 1, ans
    # a put whose content does not match its hash is refused, nothing stored
    c.send(FilePut(SET, "etc/bad.conf", bytes(16), len(data), 0.0, 0o644, time.time(),
                   compress(data)))
    ans = c.recv()
    assert isinstance(ans, FileError), ans
    c.sock.close()
    assert [r["path"] for r in files_list(env, SET)] == ["etc/ok.conf"]
    assert not list(env.root.rglob("evil")) and not (tmp_path / "evil").exists()
    assert rx.running
    rx.stop()
