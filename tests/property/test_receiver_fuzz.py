"""Hostile input against a running receiver process, over real loopback sockets.

Hypothesis drives the receiver's whole connection handling: random bytes,
mutated frames before authentication, and, after a real HMAC handshake with a
fuzz client's token, scripted-but-mangled conversations (Open with odd names
and geometries, epochs with wrong hashes, out-of-range indices, bad zstd,
lying Commit counts, path tricks in file sets), each optionally cut short or
bit-flipped on the wire. Afterwards:

- the receiver process is still running and a legitimate source replicates a
  volume through it byte for byte;
- nothing was created outside its data_dir;
- its resident memory stayed bounded.

A bounded number of examples (FUZZ_EXAMPLES, default 150) keeps it fast.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import (
    CdpEnv,
    Daemon,
    Daemons,
    MiB,
    assert_replica_equal,
    feed,
    free_port,
    make_image,
    sent,
    wait_converged,
    wait_for,
    write_env,
    write_random_blocks,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.blocks import pack_u64
from cdp.codec import block_hash, compress
from cdp.wire.frames import FrameDecoder, encode
from cdp.wire.messages import (
    Begin,
    Bye,
    Commit,
    Current,
    Data,
    Error,
    FileDelete,
    FileOpen,
    FilePut,
    GetHashes,
    Hello,
    Label,
    Message,
    Open,
    Opened,
    Ref,
    Zero,
)
from cdp.wire.source_session import SourceSession

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ_VOLUMES = ["fz1", "fz2"]
NAMES = st.sampled_from(["fz1", "fz1", "fz1", "fz2", "fz2", "vol1", "../fz1", "..", "/etc/passwd", "a/b",
                         "fz1\x00", "x" * 300, "", ".hidden"])
FILE_PATHS = st.sampled_from(["etc/vm1.xml", "../../escape", "/abs/path", "a/../../b", "ok.txt",
                              "x" * 5000, "", "dir/", "a\x00b"])
BLOCK_SIZES = st.sampled_from([4096, 65536, 65536, 65536, 3, 1 << 30, 0])
SIZES = st.sampled_from([1 * MiB, 1 * MiB, 1 * MiB, 256 * 1024 + 4096, 0, 1 << 62, 7])
GEOMETRY = {"fz1": (1 * MiB, 65536), "fz2": (1 * MiB, 4096)}
RSS_LIMIT = 400 * MiB  # the receiver idles near 60 MiB; a leak or a huge allocation shows


@pytest.fixture(scope="module")
def stand(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("rxfuzz")
    env = write_env(root / "env", {"host1": ["vol1"], "fuzz": FUZZ_VOLUMES})
    text = env.receiver_toml.read_text()
    text = text.replace(f'volumes = {FUZZ_VOLUMES!r}'.replace("'", '"'),
                        f'volumes = {FUZZ_VOLUMES!r}\nfilesets = ["fs1"]'.replace("'", '"'))
    assert 'filesets = ["fs1"]' in text
    env.receiver_toml.write_text(text)
    ds = Daemons()
    rx = ds.receiver(env)
    try:
        yield env, rx, ds
    finally:
        ds.cleanup()


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# -- talking to the receiver ------------------------------------------------------------


def recv_messages(sock: socket.socket, sess: SourceSession, timeout: float) -> list[Message]:
    sock.settimeout(timeout)
    try:
        data = sock.recv(1 << 16)
    except (TimeoutError, OSError):
        return []
    if not data:
        return []
    try:
        return feed(sess, data)
    except Exception:  # the receiver may say things our session finds out of place
        return []


def handshake(sock: socket.socket, token: bytes) -> SourceSession | None:
    sess = SourceSession("fuzz", token)
    sess.start()
    sock.sendall(sent(sess))
    msgs = recv_messages(sock, sess, 5)
    if not msgs:
        return None
    sess.auth()
    sock.sendall(sent(sess))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and sess.allowed == []:
        if not recv_messages(sock, sess, 5):
            break
    return sess


def read_opened(sock: socket.socket) -> Opened | None:
    """The answer to an Open: Opened, or None (an Error, or nothing)."""
    dec = FrameDecoder(64 << 20)
    sock.settimeout(5)
    while True:
        try:
            data = sock.recv(1 << 16)
        except OSError:
            return None
        if not data:
            return None
        dec.push(data)
        while (got := dec.pop()) is not None:
            return got[0] if isinstance(got[0], Opened) else None


def drain(sock: socket.socket, timeout: float = 5.0) -> None:
    """Read until the receiver closes or goes quiet."""
    sock.settimeout(timeout)
    with contextlib.suppress(OSError):
        while sock.recv(1 << 16):
            pass


# -- what to send -------------------------------------------------------------------------


def batch(rng: random.Random, bs: int, n: int, corrupt: str) -> tuple[bytes, bytes, int, bytes]:
    blocks = [rng.randbytes(bs) for _ in range(n)]
    idx = [rng.randrange(16) for _ in range(n)]
    if corrupt == "index":
        idx[0] = rng.choice([1 << 40, 2**64 - 1, 16, 1 << 20])
    hashes = b"".join(block_hash(b) for b in blocks)
    if corrupt == "hash":
        hashes = hashes[:-1] + bytes([hashes[-1] ^ 1])
    raw = b"".join(blocks)
    raw_len = len(raw) if corrupt != "raw_len" else rng.choice([0, len(raw) * 64, 1 << 40])
    z = compress(raw) if corrupt != "zstd" else rng.randbytes(64)
    return pack_u64(idx), hashes, raw_len, z


@st.composite
def conversation(draw: st.DrawFn) -> dict:
    kind = draw(st.sampled_from(["raw", "preauth", "session", "session", "session"]))
    seed = draw(st.integers(0, 2**32))
    mutate = draw(st.sampled_from(["none", "none", "flip", "truncate", "insert", "length"]))
    ops = draw(st.lists(st.sampled_from([
        "data", "data", "zero", "ref", "commit", "commit_lie", "hashes", "current", "label",
        "fileput", "filedelete", "bye", "begin_again", "reopen"]), min_size=1, max_size=8))
    return {"kind": kind, "seed": seed, "mutate": mutate, "ops": ops,
            "volume": draw(NAMES), "size": draw(SIZES), "bs": draw(BLOCK_SIZES),
            "path": draw(FILE_PATHS),
            "geometry": draw(st.sampled_from(["usual"] * 4 + ["odd"])),
            "corrupt": draw(st.sampled_from(["none", "none", "index", "hash", "raw_len", "zstd"])),
            "raw": draw(st.binary(max_size=2048))}


def mangle(blob: bytes, how: str, rng: random.Random) -> bytes:
    if not blob or how == "none":
        return blob
    b = bytearray(blob)
    if how == "flip":
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif how == "truncate":
        del b[rng.randrange(len(b)):]
    elif how == "insert":
        pos = rng.randrange(len(b) + 1)
        b[pos:pos] = rng.randbytes(rng.randint(1, 64))
    elif how == "length":  # rewrite the first frame's length header
        b[0:4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff"])
    return bytes(b)


def frames_for(ex: dict, epoch: int, rng: random.Random) -> bytes:
    vol, bs = ex["volume"], ex["bs"] if ex["bs"] in (4096, 65536) else 4096
    out: list[Message] = [Begin(vol, epoch, time.time())]
    blocks = 0
    for op in ex["ops"]:
        if op == "data":
            n = rng.randint(1, 3)
            out.append(Data(vol, epoch, *batch(rng, bs, n, ex["corrupt"])))
            blocks += n
        elif op == "zero":
            out.append(Zero(vol, epoch, pack_u64(rng.choice([[0, 1], [3, 2], [1 << 50, 1],
                                                             [5], [0, 0]]))))
            blocks += 1
        elif op == "ref":
            out.append(Ref(vol, epoch, rng.choice(["fz1", "fz2", "vol1", "../x"]), pack_u64([1]),
                           rng.randbytes(16), pack_u64([rng.choice([0, 1 << 40])])))
            blocks += 1
        elif op == "commit":
            out.append(Commit(vol, epoch, blocks))
            epoch += 1
            blocks = 0
            out.append(Begin(vol, epoch, time.time()))
        elif op == "commit_lie":
            out.append(Commit(vol, epoch, blocks + rng.randint(1, 5)))
        elif op == "hashes":
            out.append(GetHashes(vol, rng.choice([0, 1 << 40]), rng.choice([1, 1 << 30]),
                                 rng.random() < 0.5))
        elif op == "current":
            out.append(Current(vol, epoch, time.time()))
        elif op == "label":
            out.append(Label(vol, rng.choice([0, epoch, 1 << 40]), ex["path"]))
        elif op == "fileput":
            data = rng.randbytes(rng.randint(0, 300))
            out.append(FileOpen("fs1"))
            out.append(FilePut(rng.choice(["fs1", "fs2", "../fs1"]), ex["path"], block_hash(data),
                               len(data), time.time(), 0o644, time.time(), compress(data)))
        elif op == "filedelete":
            out.append(FileDelete("fs1", ex["path"], time.time()))
        elif op == "bye":
            out.append(Bye("fuzz"))
        elif op == "begin_again":
            out.append(Begin(vol, epoch, time.time()))
        elif op == "reopen":
            out.append(Open(vol, ex["size"], ex["bs"]))
    out.append(Commit(vol, epoch, blocks))
    return b"".join(encode(m, 64 << 20) for m in out)


def run_example(port: int, token: bytes, ex: dict) -> None:
    rng = random.Random(ex["seed"])
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        if ex["kind"] == "raw":
            payload = ex["raw"]
        elif ex["kind"] == "preauth":
            hello = encode(Hello(rng.choice([1, 2, 99]), rng.choice(["fuzz", "host1", "nobody",
                                                                    "../x"]), rng.randbytes(32)))
            payload = mangle(hello + ex["raw"][:64], ex["mutate"], rng)
        else:
            sess = handshake(sock, token)
            if sess is None or not sess.allowed:
                return
            if ex["geometry"] == "usual":  # mostly the geometry the replica has: get in deep
                ex = {**ex, "volume": ex["volume"] if ex["volume"] in GEOMETRY else "fz1"}
                ex["size"], ex["bs"] = GEOMETRY[ex["volume"]]
            sock.sendall(encode(Open(ex["volume"], ex["size"], ex["bs"])))
            opened = read_opened(sock)
            epoch = opened.epoch + 1 if opened is not None else 1
            payload = mangle(frames_for(ex, epoch, rng), ex["mutate"], rng)
        with contextlib.suppress(OSError):
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        drain(sock)


# -- the tests ----------------------------------------------------------------------------


def test_receiver_survives_hostile_connections(stand) -> None:
    env: CdpEnv
    rx: Daemon
    env, rx, ds = stand
    token = env.token("fuzz")
    outside_before = tree(env.root)
    elsewhere = {d: set(os.listdir(d)) for d in (Path.cwd(), env.root.parent, Path("/tmp"))}
    rss0 = rss(rx.pid)
    peak = [rss0]

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(conversation())
    def one(ex: dict) -> None:
        assert rx.running, f"receiver died:\n{rx.tail()}"
        run_example(env.port, token, ex)
        assert rx.running, f"receiver died on {ex!r}:\n{rx.tail()}"
        peak[0] = max(peak[0], rss(rx.pid))
        assert peak[0] < RSS_LIMIT, f"receiver RSS {peak[0] / MiB:.0f} MiB after {ex!r}"

    one()
    # nothing outside data_dir (the log and the configs were there before)
    created = {p for p in tree(env.root) - outside_before
               if not p.startswith(env.data_dir.name + "/") and p != env.data_dir.name}
    assert not created, f"files created outside data_dir: {sorted(created)[:10]}"
    for p in env.data_dir.rglob("*"):  # no symlink or '..' leads out of it either
        assert env.data_dir.resolve() in p.resolve().parents, p
    assert not (env.data_dir.parent / "escape").exists()
    for d, names in elsewhere.items():  # the receiver's working folder, /tmp: nothing new from it
        new = {n for n in set(os.listdir(d)) - names
               if any(k in n for k in ("fz", "fs1", "escape", "passwd", "vol1", "hidden"))}
        assert not new, f"created in {d}: {sorted(new)}"
    assert not Path("/abs/path").exists()

    # still serving a legitimate source, byte for byte
    image = env.source.images["vol1"]
    make_image(image, 8 * MiB, random.Random(1))
    since = time.time()
    src = ds.source(env)
    wait_converged(env, "vol1", since, src, rx)
    assert_replica_equal(env, "vol1")
    assert rss(rx.pid) < RSS_LIMIT
    src.stop()


def _idle_from(ip: str, port: int) -> socket.socket:
    """A connection from another loopback address that never says anything."""
    s = socket.socket()
    s.bind((ip, 0))
    s.connect(("127.0.0.1", port))
    return s


def _answer(s: socket.socket, timeout: float = 5.0) -> bytes:
    s.settimeout(timeout)
    data = b""
    with contextlib.suppress(OSError):
        while chunk := s.recv(4096):
            data += chunk
    return data


def test_strangers_cannot_take_the_room_of_configured_clients(tmp_path: Path) -> None:
    """Unauthenticated connections are capped per address and in all; at the total cap the
    busiest address loses its oldest one, so a real source still gets in. max_connections
    counts authenticated connections: one more is refused with `busy`."""
    mport = free_port()
    env = write_env(tmp_path / "env", {"host1": ["vol1"], "host2": ["vol2"]},
                    receiver_extra=f"max_connections = 2\nmax_unauthenticated = 4\n"
                                   f"max_unauthenticated_per_ip = 3\n"
                                   f'metrics_listen = "127.0.0.1:{mport}"')
    ds = Daemons()
    held: list[socket.socket] = []
    try:
        rx = ds.receiver(env)
        time.sleep(0.5)  # the start-up probe's connection is gone
        held = [_idle_from("127.0.0.2", env.port) for _ in range(3)]
        time.sleep(0.3)
        with _idle_from("127.0.0.2", env.port) as s:  # a fourth from the same address
            answer = _answer(s)
        assert b"max_unauthenticated_per_ip" in answer and b"busy" in answer, answer
        held.append(_idle_from("127.0.0.3", env.port))  # 4 of 4 in all now
        time.sleep(0.3)
        # a real source (127.0.0.1) is admitted: the oldest from 127.0.0.2 makes room
        make_image(env.sources["host1"].images["vol1"], 4 * MiB, random.Random(2))
        since = time.time()
        src = ds.source(env, "host1")
        wait_converged(env, "vol1", since, src, rx, client="host1")
        assert _answer(held[0], 2) == b""  # dropped without a word
        wait_for(lambda: "dropping an unauthenticated connection from 127.0.0.2" in rx.log_text(),
                 10, what="the eviction logged")
        # authenticated connections: host1's source and one raw host2 fill max_connections
        one = socket.create_connection(("127.0.0.1", env.port), 5)
        held.append(one)
        assert handshake_as(one, "host2", env.token("host2")).allowed == ["vol2"]
        two = socket.create_connection(("127.0.0.1", env.port), 5)
        held.append(two)
        sess = handshake_as(two, "host2", env.token("host2"))
        assert sess.allowed == []
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert 'cdp_receiver_errors_total{kind="evicted"} 1.0' in metrics
        assert 'cdp_receiver_errors_total{kind="refused"} 2.0' in metrics  # per address, max_connections
        wait_for(lambda: "authenticated connections are open (max_connections)" in rx.log_text(),
                 10, what="the max_connections refusal logged")
        write_random_blocks(env.sources["host1"].images["vol1"], range(3), random.Random(3))
        since = time.time()
        wait_converged(env, "vol1", since, src, rx, client="host1")  # the source went on
        assert_replica_equal(env, "vol1", env.sources["host1"].images["vol1"])
        src.stop()
        rx.stop()
    finally:
        for s in held:
            s.close()
        ds.cleanup()


def handshake_as(sock: socket.socket, name: str, token: bytes) -> SourceSession:
    """Hello/Auth as `name`; the session (allowed == [] unless Welcome came)."""
    sess = SourceSession(name, token)
    sess.start()
    sock.sendall(sent(sess))
    got = recv_messages(sock, sess, 5)
    assert got, "no Challenge"
    sess.auth()
    sock.sendall(sent(sess))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and sess.allowed == []:
        got = recv_messages(sock, sess, 5)
        if not got:
            break
        if any(isinstance(m, Error) for m in got):
            assert any(isinstance(m, Error) and m.code == "busy" and "max_connections" in m.message
                       for m in got), got
            break
    return sess
