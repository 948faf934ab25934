"""Bad input against a running receiver: raw TCP from this process, real daemons beside it.

Guarantees 3 and 4: malformed, oversized or out-of-place input, a wrong token,
unauthorized or mismatched volumes, writes outside a volume and path tricks
get a clear error and change nothing; the receiver keeps serving a
legitimate source meanwhile. And a full disk on the receiver keeps the
replica at its last good epoch, then replication resumes once there is room.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import (
    BS,
    CdpEnv,
    Daemon,
    Daemons,
    MiB,
    assert_replica_equal,
    feed,
    file_hash,
    make_image,
    scaled,
    sent,
    wait_converged,
    wait_for,
    write_blocks,
    write_env,
    write_random_blocks,
)

from cdp.blocks import pack_u64, unpack_u64
from cdp.codec import block_hash, compress
from cdp.errors import PeerTooOldError
from cdp.wire.frames import FrameDecoder, encode
from cdp.wire.messages import (
    Begin,
    Bye,
    Challenge,
    Commit,
    Data,
    Error,
    Hello,
    Label,
    Message,
    Need,
    Open,
    Opened,
    Ping,
    Pong,
    Ref,
    Welcome,
    Zero,
)
from cdp.wire.source_session import SourceSession

SIZE = 8 * MiB
BLOCKS = SIZE // BS


class RawClient:
    """A TCP connection driven by hand. Replies are decoded with a FrameDecoder, or by
    a SourceSession when one is given (so that well-formed follow-ups can be sent)."""

    def __init__(self, port: int, session: SourceSession | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), scaled(5))
        self.session = session
        self.decoder = FrameDecoder(64 * MiB)
        self.closed = False
        self.pending: list[Message] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_msg(self, msg: Message) -> None:
        self.send(sent(self.session, msg) if self.session else encode(msg))

    def recv(self, timeout: float = 10) -> Message | None:
        """The next message, or None once the receiver closed the connection."""
        deadline = time.monotonic() + scaled(timeout)
        while not self.pending:
            if self.closed:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no answer from the receiver")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
                continue
            if self.session:
                self.pending += feed(self.session, data)
            else:
                self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    def expect_error(self, timeout: float = 10) -> Error:
        while True:
            msg = self.recv(timeout)
            assert msg is not None, "the receiver closed the connection without an Error"
            if isinstance(msg, Error):
                return msg

    def expect_closed(self, timeout: float = 10) -> list[Message]:
        """Read until the receiver closes; returns whatever came before."""
        got = []
        while (msg := self.recv(timeout)) is not None:
            got.append(msg)
        return got

    def handshake(self) -> None:
        assert self.session is not None
        self.session.start()
        self.send(sent(self.session))
        assert isinstance(self.recv(), Challenge)
        self.session.auth()
        self.send(sent(self.session))
        msg = self.recv()
        assert isinstance(msg, Welcome), msg

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@dataclass
class Site:
    env: CdpEnv
    rx: Daemon
    good_src: Daemon
    static_hash: str
    static_state: dict
    rng: random.Random

    @property
    def port(self) -> int:
        return self.env.port

    def client(self, name: str = "host2", token: bytes | None = None) -> RawClient:
        token = token if token is not None else self.env.token(name)
        c = RawClient(self.port, SourceSession(name, token))
        c.handshake()
        return c

    def rx_log(self) -> str:
        return self.rx.log_text()

    def wait_log(self, text: str) -> None:
        wait_for(lambda: text in self.rx_log(), 10, what=f"receiver log to say {text!r}")

    def check_unharmed(self) -> None:
        """The receiver runs, the attacked replica is as it was, the good source replicates."""
        assert self.rx.running, f"receiver died:\n{self.rx.tail()}"
        assert self.good_src.running, f"good source died:\n{self.good_src.tail()}"
        st = self.env.replica_state("static")
        assert st["epoch"] == self.static_state["epoch"]
        assert st["counters"] == self.static_state["counters"]
        assert file_hash(self.env.replica_image("static")) == self.static_hash
        image = self.env.sources["host1"].images["good"]
        write_random_blocks(image, self.rng.sample(range(BLOCKS), 3), self.rng)
        t = time.time()
        wait_converged(self.env, "good", t, self.good_src, self.rx, client="host1")
        assert_replica_equal(self.env, "good", image)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    """A receiver serving host1 (volume good, replicating) and host2 (volume static,
    seeded, its source stopped): host2's replica is the one attacked."""
    root = tmp_path_factory.mktemp("badinput")
    # host3 may write "good" too but runs no source: a second client of a busy volume
    env = write_env(root, {"host1": ["good"], "host2": ["static"], "host3": ["good"]})
    rng = random.Random(21)
    make_image(env.sources["host1"].images["good"], SIZE, rng)
    make_image(env.sources["host2"].images["static"], SIZE, rng)
    ds = Daemons()
    try:
        rx = ds.receiver(env)
        t0 = time.time()
        seeder = ds.source(env, "host2")
        wait_converged(env, "static", t0, seeder, rx, client="host2")
        seeder.stop()
        static_hash = assert_replica_equal(env, "static", env.sources["host2"].images["static"])
        good = ds.source(env, "host1")
        wait_converged(env, "good", t0, good, rx, client="host1")
        yield Site(env, rx, good, static_hash, env.replica_state("static"), rng)
        good.stop()
        rx.stop()
    finally:
        leftovers = ds.cleanup()
        if leftovers:
            print(ds.tails())


# -- framing -------------------------------------------------------------------


def test_garbage_bytes_get_a_protocol_error(site):
    c = RawClient(site.port)
    c.send(b"\x00\x00\x00\x08" + b"\xc1" * 8)  # 0xc1: never valid in msgpack
    err = c.expect_error()
    assert err.code == "protocol" and "malformed" in err.message
    assert c.expect_closed() == []
    c.close()
    site.check_unharmed()


def test_http_request_is_refused_as_oversized_frame(site):
    c = RawClient(site.port)
    c.send(b"GET / HTTP/1.1\r\nHost: receiver\r\n\r\n")
    err = c.expect_error()
    assert err.code == "protocol" and "exceeds" in err.message
    c.expect_closed()
    c.close()
    site.check_unharmed()


def test_well_formed_msgpack_that_is_no_message(site):
    for payload in (b"\x81\xa1a\x01", b"\x93\x63\x01\x02", b"\x92\x01\xc0"):  # map, type 99, Hello
        c = RawClient(site.port)
        c.send(len(payload).to_bytes(4, "big") + payload)
        err = c.expect_error()
        assert err.code == "protocol", err
        c.expect_closed()
        c.close()
    site.check_unharmed()


def test_truncated_frame_then_close(site):
    c = RawClient(site.port)
    c.send((1000).to_bytes(4, "big") + b"\x94" + b"x" * 9)
    c.sock.shutdown(socket.SHUT_WR)
    c.expect_closed()
    c.close()
    site.wait_log("closed the connection")
    site.check_unharmed()


def test_oversized_frame_header_is_refused_before_the_body(site):
    c = RawClient(site.port)
    c.send((0x7FFFFFFF).to_bytes(4, "big"))  # and no body: the answer must not wait for one
    err = c.expect_error()
    assert err.code == "protocol" and "exceeds" in err.message
    c.expect_closed()
    c.close()
    site.check_unharmed()


# -- authentication ------------------------------------------------------------


def test_wrong_token_is_refused(site):
    c = RawClient(site.port, SourceSession("host2", b"not-the-token-0123456789abcdef"))
    c.session.start()
    c.send(sent(c.session))
    assert isinstance(c.recv(), Challenge)
    c.session.auth()
    c.send(sent(c.session))
    err = c.expect_error()
    assert err.code == "auth" and "host2" in err.message
    c.expect_closed()
    c.close()
    site.wait_log("authentication failed for client 'host2'")
    site.check_unharmed()


def test_unknown_client_is_refused(site):
    c = RawClient(site.port, SourceSession("mallory", b"whatever-token-0123456789"))
    c.session.start()
    c.send(sent(c.session))
    assert isinstance(c.recv(), Challenge)
    c.session.auth()
    c.send(sent(c.session))
    err = c.expect_error()
    assert err.code == "auth"
    c.expect_closed()
    c.close()
    site.check_unharmed()


def test_messages_before_authentication_are_refused(site):
    c = RawClient(site.port)
    c.send(encode(Open("static", SIZE, BS)))
    err = c.expect_error()
    assert err.code == "protocol" and "before authentication" in err.message
    c.expect_closed()
    c.close()
    c = RawClient(site.port)
    c.send(encode(Hello(99, "host2", os.urandom(32))))
    err = c.expect_error()
    assert err.code == "protocol" and "protocol 99" in err.message
    c.close()
    site.check_unharmed()


# -- volumes ---------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_a_source_before_negotiation_is_answered_in_its_version(site, version):
    """A source of protocol 1-3 sends a three-field Hello naming only its own version; the
    receiver answers in it and serves it. What that version lacks, the session will not send."""
    c = RawClient(site.port, SourceSession("host2", site.env.token("host2")))
    c.session.start()
    c.session.data_to_send()  # ours offers a range: an old source's Hello goes instead
    c.send(encode(Hello(version, "host2", c.session.nonce)))
    challenge = c.recv()
    assert isinstance(challenge, Challenge) and challenge.version == version
    assert c.session.version == version
    c.session.auth()
    c.send(sent(c.session))
    assert isinstance(c.recv(), Welcome)
    c.send_msg(Open("static", SIZE, BS, readonly=True))
    opened = c.recv()
    assert isinstance(opened, Opened) and opened.epoch == site.static_state["epoch"]
    with pytest.raises(PeerTooOldError, match=rf"speaks protocol {version}, which lacks moving"):
        c.session.send(Label("static", opened.epoch, "x", True))
    if version == 1:
        with pytest.raises(PeerTooOldError, match="lacks Ping/Pong"):
            c.session.send(Ping(1))
    else:
        c.send_msg(Ping(1))
        assert c.recv() == Pong(1)
    c.send_msg(Bye("done"))
    c.close()
    site.check_unharmed()


def test_open_of_a_volume_not_in_the_clients_list_changes_nothing(site):
    c = site.client("host2")
    c.send_msg(Open("good", SIZE, BS))
    err = c.expect_error()
    assert err.code != "ok"
    c.close()
    site.wait_log("may not write volume 'good'")
    site.check_unharmed()


def test_open_of_a_volume_not_in_the_clients_list_is_a_clear_volume_error(site):
    c = site.client("host2")
    c.send_msg(Open("good", SIZE, BS))
    err = c.expect_error()
    c.close()
    assert err.code == "unauthorized" and err.volume == "good", err
    assert "may not write volume 'good'" in err.message


def test_refused_volume_leaves_the_connection_usable(site):
    c = site.client("host2")
    c.send_msg(Open("good", SIZE, BS))
    c.expect_error()
    # a volume-level refusal: the connection itself goes on
    c.send_msg(Open("static", SIZE, BS))
    msg = c.recv()
    c.close()
    assert isinstance(msg, Opened) and msg.epoch == site.static_state["epoch"], msg


PATH_TRICKS = ("../x", "..", "a/b", ".hidden", "/etc", "x" * 200)


def test_open_with_path_tricks_in_the_name_creates_nothing(site):
    outside = sorted(p.name for p in site.env.data_dir.parent.iterdir())
    for name in PATH_TRICKS:
        c = site.client("host2")
        c.send_msg(Open(name, SIZE, BS))
        c.expect_error()
        c.close()
    assert sorted(p.name for p in site.env.data_dir.parent.iterdir()) == outside
    made = sorted(p.name for p in site.env.data_dir.iterdir() if p.name != ".receiver.lock")
    assert made == ["good", "static"]  # (the lock file is the running receiver's own)
    site.check_unharmed()


def test_open_with_path_tricks_in_the_name_is_a_clear_name_error(site):
    for name in PATH_TRICKS:
        c = site.client("host2")
        c.send_msg(Open(name, SIZE, BS))
        err = c.expect_error()
        c.close()
        assert err.code == "name" and err.volume == name, err
        assert "invalid volume name" in err.message


def test_open_with_another_geometry_than_the_replica(site):
    for size, bs in ((2 * SIZE, BS), (SIZE, 4096), (SIZE - BS, BS)):
        c = site.client("host2")
        c.send_msg(Open("static", size, bs))
        err = c.expect_error()
        assert err.code == "geometry" and err.volume == "static", err
        assert "move the old replica away" in err.message
        c.close()
    site.check_unharmed()


def test_second_writer_of_a_volume_is_refused(site):
    """Another client allowed to write the volume gets `busy` while host1's source holds it."""
    c = site.client("host3")
    c.send_msg(Open("good", SIZE, BS))  # the running source holds it
    err = c.expect_error()
    assert err.code == "busy" and err.volume == "good", err
    assert "another client (host1)" in err.message
    c.close()
    site.check_unharmed()


def test_same_client_reconnecting_takes_the_volume_over(site):
    """A second connection of host1 itself is a reconnect (session takeover): it gets the
    volume at once; the real source then reconnects and takes it back, and goes on."""
    c = site.client("host1")
    c.send_msg(Open("good", SIZE, BS))
    msg = c.recv()
    assert isinstance(msg, Opened) and msg.volume == "good", msg
    assert msg.epoch == site.env.replica_state("good")["epoch"]
    err = c.expect_error(30)  # the source's reconnect supersedes this connection in turn
    assert err.code == "superseded" and err.volume == "", err
    c.close()
    assert "session takeover client=host1 volume=good" in site.rx.log_text()
    site.check_unharmed()


def _open_static(site: Site) -> tuple[RawClient, int]:
    c = site.client("host2")
    c.send_msg(Open("static", SIZE, BS))
    msg = c.recv()
    assert isinstance(msg, Opened), msg
    return c, msg.epoch + 1


def _data(volume: str, epoch: int, indices: list[int], blocks: list[bytes]) -> Data:
    raw = b"".join(blocks)
    return Data(volume, epoch, pack_u64(indices), b"".join(block_hash(b) for b in blocks),
                len(raw), compress(raw))


def test_data_past_the_end_of_the_volume(site):
    for bad in (BLOCKS, BLOCKS + 5, 1 << 40):
        c, epoch = _open_static(site)
        c.send_msg(Begin("static", epoch, time.time()))
        block = site.rng.randbytes(BS)
        c.send_msg(_data("static", epoch, [0, bad], [block, block]))
        err = c.expect_error()
        assert err.code == "bounds" and err.volume == "static", err
        assert f"block {bad} is past the end" in err.message
        c.close()
    site.check_unharmed()


def test_zero_run_outside_the_volume(site):
    c, epoch = _open_static(site)
    c.send_msg(Begin("static", epoch, time.time()))
    c.send_msg(Zero("static", epoch, pack_u64([BLOCKS - 2, 5])))
    err = c.expect_error()
    assert err.code == "bounds" and err.volume == "static", err
    c.close()
    site.check_unharmed()


def test_data_not_matching_its_hash(site):
    c, epoch = _open_static(site)
    c.send_msg(Begin("static", epoch, time.time()))
    good, evil = site.rng.randbytes(BS), site.rng.randbytes(BS)
    raw = good + evil
    c.send_msg(Data("static", epoch, pack_u64([1, 2]), block_hash(good) * 2, len(raw),
                    compress(raw)))
    err = c.expect_error()
    assert err.code == "integrity" and err.volume == "static", err
    c.close()
    site.check_unharmed()


def test_commit_with_the_wrong_block_count_applies_nothing(site):
    c, epoch = _open_static(site)
    c.send_msg(Begin("static", epoch, time.time()))
    block = site.rng.randbytes(BS)
    c.send_msg(_data("static", epoch, [3], [block]))
    c.send_msg(Commit("static", epoch, 7))
    err = c.expect_error()
    assert err.code == "protocol" and "7 blocks" in err.message, err
    c.close()
    site.check_unharmed()


def test_unfinished_epoch_from_a_vanished_client_applies_nothing(site):
    c, epoch = _open_static(site)
    c.send_msg(Begin("static", epoch, time.time()))
    block = site.rng.randbytes(BS)
    c.send_msg(_data("static", epoch, list(range(10)), [block] * 10))
    time.sleep(0.3)
    c.close()  # no Commit
    site.wait_log("peer=127.0.0.1")
    site.check_unharmed()


def test_reference_into_another_clients_volume_is_not_resolved(site):
    """Guarantee 4: host2 cannot copy host1's blocks into its own replica by reference,
    even knowing their hashes; nor reference blocks past the end of its own volume."""
    good = site.env.replica_image("good")
    with open(good, "rb") as fh:
        content = [fh.read(BS) for _ in range(BLOCKS)]
    target = next(i for i, b in enumerate(content) if any(b))
    h = block_hash(content[target])
    for from_volume, from_index in (("good", target), ("static", 1 << 40)):
        c, epoch = _open_static(site)
        c.send_msg(Begin("static", epoch, time.time()))
        c.send_msg(Ref("static", epoch, from_volume, pack_u64([5]), h, pack_u64([from_index])))
        c.send_msg(Commit("static", epoch, 1))
        msg = c.recv()
        assert isinstance(msg, Need) and msg.epoch == epoch, msg
        assert list(unpack_u64(msg.indices)) == [5]
        c.send_msg(Bye("done"))
        c.close()
    site.check_unharmed()


def test_frames_for_a_volume_not_opened(site):
    c = site.client("host2")
    c.send(encode(Begin("static", 1, time.time())))  # bypass the session: never opened
    err = c.expect_error()
    assert err.code == "protocol" and "not open" in err.message, err
    c.close()
    site.check_unharmed()


# -- a full disk ---------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 40 MiB tmpfs; request it before `daemons` so that they stop before the umount."""
    mnt = tmp_path / "rx"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.25)
        else:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _full_disk(cdp_env, daemons, mnt: Path):
    """Seed a small image onto a 40 MiB tmpfs holding a 20 MiB filler, then change the
    whole volume: the epoch needs ~16 MiB of WAL plus ~14 MiB more image, which do not fit."""
    env = cdp_env(data_dir=mnt / "replicas")
    image = env.source.images["vol1"]
    rng = random.Random(31)
    size = 16 * MiB
    with open(image, "wb") as fh:
        fh.truncate(size)
    write_random_blocks(image, range(32), rng)  # a small seed: 2 MiB of data
    filler = mnt / "filler"
    with open(filler, "wb") as fh:
        for _ in range(20):
            fh.write(os.urandom(MiB))
    free = shutil.disk_usage(mnt).free
    assert free < 24 * MiB, free

    rx = daemons.receiver(env)
    t0 = time.time()
    src = daemons.source(env)
    wait_converged(env, "vol1", t0, src, rx)
    good_hash = assert_replica_equal(env, "vol1")
    good_epoch = env.replica_state("vol1")["epoch"]

    write_blocks(image, {i: rng.randbytes(BS) for i in range(size // BS)})
    wait_for(lambda: "disk_full" in rx.log_text(), 30,
             what=lambda: f"the receiver to report a full disk:\n{rx.tail()}")
    assert "receiver disk is full" in rx.log_text() or "disk full" in rx.log_text()
    assert rx.running, rx.tail()
    assert env.replica_state("vol1")["epoch"] == good_epoch
    assert file_hash(env.replica_image("vol1")) == good_hash
    v = env.source.volume_status("vol1")
    assert v is not None and v["acked_epoch"] == good_epoch
    return env, rx, src, filler, good_epoch


def test_full_disk_keeps_the_last_good_epoch(small_tmpfs, cdp_env, daemons):
    env, rx, src, _filler, good_epoch = _full_disk(cdp_env, daemons, small_tmpfs)
    time.sleep(2)  # whatever the source retries meanwhile cannot fit either
    assert env.replica_state("vol1")["epoch"] == good_epoch
    src.stop()
    rx.stop()
    assert env.replica_state("vol1")["epoch"] == good_epoch


def test_full_disk_then_room_replication_resumes(small_tmpfs, cdp_env, daemons):
    env, rx, src, filler, good_epoch = _full_disk(cdp_env, daemons, small_tmpfs)
    filler.unlink()
    t1 = time.time()
    wait_converged(env, "vol1", t1, src, rx, timeout=30)
    assert_replica_equal(env, "vol1")
    assert env.replica_state("vol1")["epoch"] > good_epoch
    src.stop()
    rx.stop()
