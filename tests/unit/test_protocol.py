"""The sans-I/O sessions driven against each other, no sockets (cdp.wire.session).

`Pair` plays h11's ConnectionPair: it moves the bytes one session's send() buffers
(data_to_send()) into the other's receive_data(), takes the events_received(), and
keeps every byte for inspection.
"""

from __future__ import annotations

import os

import pytest
from helpers import feed, sent

from cdp.config import load_source
from cdp.errors import AuthError, ConfigError, LocalProtocolError, RemoteProtocolError, VolumeError
from cdp.wire.frames import HEADER, encode
from cdp.wire.messages import (
    ALL,
    PROTOCOL_VERSION,
    Ack,
    Auth,
    Begin,
    Bye,
    Challenge,
    Commit,
    Current,
    Data,
    Error,
    FileOpen,
    FileOpened,
    FilePut,
    GetHashes,
    Hashes,
    Hello,
    Message,
    Need,
    Open,
    Opened,
    Ref,
    Welcome,
    Zero,
)
from cdp.wire.receiver_session import ReceiverSession
from cdp.wire.session import NONCE_LEN, State, receiver_proof, source_mac
from cdp.wire.source_session import SourceSession

TOKEN = b"3f1c0a9e5b7d2468ace13579bdf02468"
OTHER_TOKEN = b"ffffffffffffffffffffffffffffffff"
CLIENTS = {"host1": (TOKEN, ("vm1", "vm2")), "host2": (OTHER_TOKEN, ("vm3",))}
BS = 65536


class Pair:
    def __init__(self, name: str = "host1", token: bytes = TOKEN, clients=None,
                 source_nonce: bytes | None = None, receiver_nonce: bytes | None = None) -> None:
        clients = CLIENTS if clients is None else clients
        self.src = SourceSession(name, token, nonce=source_nonce)
        self.rcv = ReceiverSession(clients.get, nonce=receiver_nonce)
        self.wire: list[bytes] = []

    def s2r(self, data: bytes) -> list[Message]:
        self.wire.append(data)
        return feed(self.rcv, data)

    def r2s(self, data: bytes) -> list[Message]:
        self.wire.append(data)
        return feed(self.src, data)

    def src_send(self, msg: Message) -> list[Message]:
        return self.s2r(sent(self.src, msg))

    def rcv_send(self, msg: Message) -> list[Message]:
        return self.r2s(sent(self.rcv, msg))

    def handshake(self) -> None:
        self.src.start()
        (hello,) = self.s2r(sent(self.src))
        assert isinstance(hello, Hello)
        self.rcv.challenge()
        (challenge,) = self.r2s(sent(self.rcv))
        assert isinstance(challenge, Challenge)
        self.src.auth()
        (auth,) = self.s2r(sent(self.src))
        assert isinstance(auth, Auth)
        self.rcv.welcome()
        (welcome,) = self.r2s(sent(self.rcv))
        assert isinstance(welcome, Welcome)

    def open(self, volume: str = "vm1", last_epoch: int = 0) -> None:
        assert self.src_send(Open(volume, 10 * BS, BS)) == [Open(volume, 10 * BS, BS)]
        opened = Opened(volume, "replica-1", last_epoch, 1000.0)
        assert self.rcv_send(opened) == [opened]

    def epoch_frames(self, volume: str, e: int) -> list[Message]:
        return [Begin(volume, e, 1.0), data(volume, e), Commit(volume, e, 1)]


def data(volume: str, e: int) -> Data:
    return Data(volume, e, b"\x00" * 8, b"h" * 16, BS, b"zdata")


def ready(volume: str | None = "vm1", last_epoch: int = 0) -> Pair:
    p = Pair()
    p.handshake()
    if volume:
        p.open(volume, last_epoch)
    return p


# ---------------------------------------------------------------- handshake


def test_handshake():
    p = Pair()
    p.handshake()
    assert p.src.state is State.READY
    assert p.rcv.state is State.READY
    assert p.src.allowed == ["vm1", "vm2"]
    assert p.rcv.client == "host1"
    assert p.rcv.allowed == ("vm1", "vm2")


def test_token_never_on_the_wire():
    p = ready()
    for e in (1, 2):
        for m in p.epoch_frames("vm1", e):
            p.src_send(m)
        p.rcv_send(Ack("vm1", e, 2.0))
    p.src_send(Bye("done"))
    traffic = b"".join(p.wire)
    assert len(traffic) > 200
    assert TOKEN not in traffic
    assert TOKEN.hex().encode() not in traffic
    # nor a long piece of it
    assert not any(TOKEN[i:i + 8] in traffic for i in range(len(TOKEN) - 7))


def test_handshake_byte_by_byte():
    p = Pair()

    def trickle(data: bytes, sink) -> list[Message]:
        out: list[Message] = []
        for i in range(len(data)):
            out += feed(sink, data[i:i + 1])
        return out

    p.src.start()
    assert [type(m) for m in trickle(sent(p.src), p.rcv)] == [Hello]
    p.rcv.challenge()
    assert [type(m) for m in trickle(sent(p.rcv), p.src)] == [Challenge]
    p.src.auth()
    assert [type(m) for m in trickle(sent(p.src), p.rcv)] == [Auth]
    p.rcv.welcome()
    assert [type(m) for m in trickle(sent(p.rcv), p.src)] == [Welcome]
    assert p.src.state is p.rcv.state is State.READY


def test_wrong_token_refused_by_receiver():
    p = Pair(token=OTHER_TOKEN)
    p.src.start()
    p.s2r(sent(p.src))
    p.rcv.challenge()
    p.r2s(sent(p.rcv))
    p.src.auth()
    with pytest.raises(AuthError, match="host1"):
        p.s2r(sent(p.src))
    assert p.rcv.state is State.CLOSED
    # no Welcome after a failed Auth; the receiver may still say why
    with pytest.raises(LocalProtocolError):
        p.rcv.welcome()
    events = p.rcv_send(Error("auth", "authentication failed", ""))
    assert events == [Error("auth", "authentication failed", "")]
    assert p.src.state is State.CLOSED


def test_unknown_client_refused():
    p = Pair(name="stranger")
    p.src.start()
    p.s2r(sent(p.src))
    p.rcv.challenge()
    p.r2s(sent(p.rcv))
    p.src.auth()
    with pytest.raises(AuthError, match="stranger"):
        p.s2r(sent(p.src))
    assert p.rcv.state is State.CLOSED
    assert feed(p.rcv, encode(Open("vm1", BS, BS))) == []


def test_other_clients_token_refused():
    # host2's token is valid, but not for host1
    p = Pair(name="host1", token=CLIENTS["host2"][0])
    p.src.start()
    p.s2r(sent(p.src))
    p.rcv.challenge()
    p.r2s(sent(p.rcv))
    p.src.auth()
    with pytest.raises(AuthError):
        p.s2r(sent(p.src))


def _source_awaiting_welcome(token: bytes = TOKEN) -> tuple[SourceSession, bytes]:
    src = SourceSession("host1", token)
    src.start()
    server_nonce = b"S" * NONCE_LEN
    feed(src, encode(Challenge(PROTOCOL_VERSION, server_nonce)))
    src.auth()
    return src, server_nonce


def test_receiver_with_different_token_fails_source_check():
    src, server_nonce = _source_awaiting_welcome()
    proof = receiver_proof(OTHER_TOKEN, "host1", src.nonce, server_nonce)
    with pytest.raises(AuthError, match="receiver"):
        feed(src, encode(Welcome(proof, ["vm1"], 1 << 20)))
    assert src.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        src.send(Open("vm1", BS, BS))


def test_receiver_with_right_token_passes_source_check():
    # the control for the test above: the same Welcome with the right proof is accepted
    src, server_nonce = _source_awaiting_welcome()
    proof = receiver_proof(TOKEN, "host1", src.nonce, server_nonce)
    assert feed(src, encode(Welcome(proof, ["vm1"], 1 << 20))) != []
    assert src.state is State.READY


def test_receiver_cannot_reflect_source_mac():
    src, server_nonce = _source_awaiting_welcome()
    reflected = source_mac(TOKEN, "host1", src.nonce, server_nonce)
    with pytest.raises(AuthError):
        feed(src, encode(Welcome(reflected, ["vm1"], 1 << 20)))


def test_welcome_from_earlier_handshake_refused():
    old = Pair(receiver_nonce=b"R" * NONCE_LEN)
    old.handshake()
    old_welcome = old.wire[3]
    new = Pair(receiver_nonce=b"R" * NONCE_LEN)
    new.src.start()
    new.s2r(sent(new.src))
    new.rcv.challenge()
    new.r2s(sent(new.rcv))
    new.src.auth()
    with pytest.raises(AuthError):
        feed(new.src, old_welcome)


def test_replayed_auth_refused():
    old = Pair(source_nonce=b"C" * NONCE_LEN)
    old.handshake()
    hello_bytes, auth_bytes = old.wire[0], old.wire[2]

    fresh = ReceiverSession(CLIENTS.get)
    assert fresh.nonce != old.rcv.nonce
    feed(fresh, hello_bytes)
    fresh.challenge()
    with pytest.raises(AuthError):
        feed(fresh, auth_bytes)
    assert fresh.state is State.CLOSED

    # control: had the receiver reused its nonce, the replay would have worked
    same = ReceiverSession(CLIENTS.get, nonce=old.rcv.nonce)
    feed(same, hello_bytes)
    same.challenge()
    assert [type(m) for m in feed(same, auth_bytes)] == [Auth]


def test_nonces_are_fresh():
    a, b = Pair(), Pair()
    assert len(a.src.nonce) == len(a.rcv.nonce) == NONCE_LEN
    assert len({a.src.nonce, b.src.nonce, a.rcv.nonce, b.rcv.nonce}) == 4


@pytest.mark.parametrize("nonce", [b"", b"x" * (NONCE_LEN - 1), b"x" * (NONCE_LEN + 1)])
def test_receiver_refuses_bad_hello_nonce(nonce):
    rcv = ReceiverSession(CLIENTS.get)
    with pytest.raises(RemoteProtocolError, match="nonce"):
        feed(rcv, encode(Hello(PROTOCOL_VERSION, "host1", nonce)))
    assert rcv.state is State.CLOSED


def test_source_refuses_bad_challenge_nonce():
    src = SourceSession("host1", TOKEN)
    src.start()
    with pytest.raises(RemoteProtocolError, match="nonce"):
        feed(src, encode(Challenge(PROTOCOL_VERSION, b"short")))


def test_version_mismatch():
    rcv = ReceiverSession(CLIENTS.get)
    with pytest.raises(RemoteProtocolError, match="protocol"):
        feed(rcv, encode(Hello(PROTOCOL_VERSION + 1, "host1", b"n" * NONCE_LEN)))
    src = SourceSession("host1", TOKEN)
    src.start()
    with pytest.raises(RemoteProtocolError, match="protocol"):
        feed(src, encode(Challenge(PROTOCOL_VERSION + 1, b"n" * NONCE_LEN)))


def test_receiver_refuses_second_hello():
    rcv = ReceiverSession(CLIENTS.get)
    two = (encode(Hello(PROTOCOL_VERSION, "host1", b"a" * NONCE_LEN))
           + encode(Hello(PROTOCOL_VERSION, "host2", b"b" * NONCE_LEN)))
    with pytest.raises(RemoteProtocolError):
        feed(rcv, two)


def test_source_refuses_second_challenge():
    src = SourceSession("host1", TOKEN)
    src.start()
    feed(src, encode(Challenge(PROTOCOL_VERSION, b"a" * NONCE_LEN)))
    with pytest.raises(RemoteProtocolError):
        feed(src, encode(Challenge(PROTOCOL_VERSION, b"b" * NONCE_LEN)))


# ---------------------------------------------------------------- volumes


def test_open_authorized_volume():
    p = ready(None)
    p.open("vm1", last_epoch=41)
    p.open("vm2")
    assert set(p.rcv.volumes) == set(p.src.volumes) == {"vm1", "vm2"}
    assert p.rcv.volumes["vm1"].expected == p.src.volumes["vm1"].expected == 42


def test_open_unauthorized_volume():
    p = ready(None)
    with pytest.raises(VolumeError) as info:
        p.src_send(Open("vm3", BS, BS))  # host2's volume
    assert info.value.wire_code == "unauthorized"
    assert info.value.volume == "vm3"
    assert "vm3" in str(info.value)
    # a volume-level refusal: the connection goes on
    assert p.rcv.state is State.READY
    assert p.rcv_send(Error("unauthorized", str(info.value), "vm3")) == [
        Error("unauthorized", str(info.value), "vm3")]
    assert p.src.state is State.READY
    p.open("vm1")
    # and the refused volume can be asked for again (and is refused again)
    with pytest.raises(VolumeError):
        p.src_send(Open("vm3", BS, BS))


@pytest.mark.parametrize("name", ["../etc", "..", "a/b", ".hidden", "", "/etc", "x" * 200])
def test_open_bad_name(name):
    clients = {"host1": (TOKEN, (name, "vm1"))}  # even if the config listed it
    p = Pair(clients=clients)
    p.handshake()
    with pytest.raises(VolumeError) as info:
        p.src_send(Open(name, BS, BS))
    assert info.value.wire_code == "name"
    assert info.value.volume == name
    assert p.rcv.state is State.READY
    assert name not in p.rcv.volumes


def test_open_twice_refused():
    p = ready("vm1")
    with pytest.raises(LocalProtocolError):
        p.src.send(Open("vm1", BS, BS))
    with pytest.raises(RemoteProtocolError, match="twice"):
        feed(p.rcv, encode(Open("vm1", BS, BS)))


def test_opened_for_volume_not_asked_for():
    p = ready(None)
    with pytest.raises(RemoteProtocolError):
        feed(p.src, encode(Opened("vm1", "r", 0, 0.0)))


def test_volume_error_does_not_lose_neighbouring_frames():
    # the same bytes, one call vs one byte at a time, must give the same messages
    chunk = (encode(Open("vm1", BS, BS)) + encode(Open("vm3", BS, BS))
             + encode(Open("vm2", BS, BS)))

    def collect(pieces: list[bytes]) -> tuple[list[Message], list[str]]:
        p = ready(None)
        feed(p.rcv, b"")
        events: list[Message] = []
        refused: list[str] = []
        for piece in [*pieces, b""]:
            try:
                events += feed(p.rcv, piece)
            except VolumeError as exc:
                refused.append(exc.volume)
        return events, refused

    trickled = collect([chunk[i:i + 1] for i in range(len(chunk))])
    assert trickled == ([Open("vm1", BS, BS), Open("vm2", BS, BS)], ["vm3"])
    assert collect([chunk]) == trickled


# ---------------------------------------------------------------- before auth


def test_receiver_messages_before_auth():
    for setup in ("start", "hello", "challenged"):
        p = Pair()
        if setup != "start":
            p.src.start()
            p.s2r(sent(p.src))
        if setup == "challenged":
            p.rcv.challenge()
            p.r2s(sent(p.rcv))
        with pytest.raises(RemoteProtocolError, match="before authentication"):
            feed(p.rcv, encode(Open("vm1", BS, BS)))
        assert p.rcv.state is State.CLOSED


@pytest.mark.parametrize("msg", [Auth(b"m" * 32), Begin("vm1", 1, 0.0),
                                 Current("vm1", 0, 0.0), GetHashes("vm1", 0, 1, False)])
def test_receiver_refuses_before_hello(msg):
    rcv = ReceiverSession(CLIENTS.get)
    with pytest.raises(RemoteProtocolError):
        feed(rcv, encode(msg))
    assert rcv.state is State.CLOSED


def test_receiver_refuses_auth_before_challenge_sent():
    p = Pair()
    p.src.start()
    p.s2r(sent(p.src))
    mac = source_mac(TOKEN, "host1", p.src.nonce, p.rcv.nonce)
    with pytest.raises(RemoteProtocolError, match="Auth"):
        feed(p.rcv, encode(Auth(mac)))


@pytest.mark.parametrize("msg", [Opened("vm1", "r", 0, 0.0), Ack("vm1", 1, 0.0),
                                 Welcome(b"p" * 32, [], 1 << 20)])
def test_source_refuses_before_auth(msg):
    src = SourceSession("host1", TOKEN)
    src.start()
    with pytest.raises(RemoteProtocolError):
        feed(src, encode(msg))
    assert src.state is State.CLOSED


# ---------------------------------------------------------------- epochs


def test_epoch_sequence():
    p = ready("vm1", last_epoch=6)
    begin, data7, commit = p.epoch_frames("vm1", 7)
    zero = Zero("vm1", 7, b"\x00" * 16)
    ref = Ref("vm1", 7, "vm1", b"\x01" + bytes(7), b"h" * 16, bytes(8))
    for m in (begin, data7, zero, ref, commit):
        assert p.src_send(m) == [m]
    assert p.rcv.volumes["vm1"].committed == [7]
    ack = Ack("vm1", 7, 5.0)
    assert p.rcv_send(ack) == [ack]
    assert p.src.volumes["vm1"].committed == []
    # the next epoch follows
    for m in p.epoch_frames("vm1", 8):
        assert p.src_send(m) == [m]
    assert p.rcv_send(Ack("vm1", 8, 6.0)) == [Ack("vm1", 8, 6.0)]


def test_epochs_in_one_chunk_with_acks_between():
    p = ready("vm1")
    for e in (1, 2, 3):
        chunk = b"".join(sent(p.src, m) for m in p.epoch_frames("vm1", e))
        assert len(p.s2r(chunk)) == 3
        p.rcv_send(Ack("vm1", e, 0.0))


def test_two_volumes_interleaved():
    p = ready("vm1")
    p.open("vm2", last_epoch=10)
    msgs = [Begin("vm1", 1, 0.0), Begin("vm2", 11, 0.0), data("vm2", 11), data("vm1", 1),
            Commit("vm2", 11, 1), Commit("vm1", 1, 1)]
    chunk = b"".join(sent(p.src, m) for m in msgs)
    assert p.s2r(chunk) == msgs
    p.rcv_send(Ack("vm2", 11, 0.0))
    p.rcv_send(Ack("vm1", 1, 0.0))


def test_current_and_hashes():
    p = ready("vm1")
    assert p.src_send(Current("vm1", 0, 3.0)) == [Current("vm1", 0, 3.0)]
    assert p.src_send(GetHashes("vm1", 0, 2, False)) == [GetHashes("vm1", 0, 2, False)]
    h = Hashes("vm1", 0, b"h" * 32)
    assert p.rcv_send(h) == [h]
    p.src.hashes_done("vm1")
    with pytest.raises(RemoteProtocolError, match="did not ask"):
        p.r2s(sent(p.rcv, h))


def test_hashes_bad_length():
    p = ready("vm1")
    p.src_send(GetHashes("vm1", 0, 2, False))
    with pytest.raises(RemoteProtocolError, match="16"):
        p.r2s(sent(p.rcv, Hashes("vm1", 0, b"h" * 17)))


@pytest.mark.parametrize(
    "msgs",
    [[data("vm1", 1)],
     [Zero("vm1", 1, b"")],
     [Ref("vm1", 1, "vm1", b"", b"", b"")],
     [Commit("vm1", 1, 0)],
     [Begin("vm1", 1, 0.0), Commit("vm1", 1, 0), data("vm1", 1)]],
    ids=["data", "zero", "ref", "commit", "data-after-commit"],
)
def test_epoch_message_outside_epoch(msgs):
    p = ready("vm1")
    with pytest.raises(RemoteProtocolError, match="outside its epoch"):
        p.s2r(b"".join(encode(m) for m in msgs))
    assert p.rcv.state is State.CLOSED


@pytest.mark.parametrize(
    "msgs",
    [[Begin("vm1", 5, 0.0)],
     [Begin("vm1", 0, 0.0)],
     [Begin("vm1", 1, 0.0), data("vm1", 2)],
     [Begin("vm1", 1, 0.0), Commit("vm1", 0, 0)],
     [Begin("vm1", 1, 0.0), Begin("vm1", 1, 0.0)]],
    ids=["begin-ahead", "begin-behind", "data-wrong", "commit-wrong", "begin-twice"],
)
def test_wrong_epoch_number(msgs):
    p = ready("vm1")
    with pytest.raises(RemoteProtocolError, match="vm1"):
        p.s2r(b"".join(encode(m) for m in msgs))
    assert p.rcv.state is State.CLOSED


def test_source_refuses_wrong_epoch_locally():
    p = ready("vm1")
    with pytest.raises(LocalProtocolError):
        p.src.send(Begin("vm1", 2, 0.0))
    with pytest.raises(LocalProtocolError):
        p.src.send(data("vm1", 1))
    p.src_send(Begin("vm1", 1, 0.0))
    with pytest.raises(LocalProtocolError):
        p.src.send(Begin("vm1", 2, 0.0))
    with pytest.raises(LocalProtocolError):
        p.src.send(Commit("vm1", 2, 0))


def test_frames_for_unopened_volume():
    p = ready("vm1")
    with pytest.raises(RemoteProtocolError, match="not open"):
        feed(p.rcv, encode(Begin("vm2", 1, 0.0)))
    p = ready("vm1")
    with pytest.raises(RemoteProtocolError, match="not open"):
        feed(p.src, encode(Ack("vm2", 1, 0.0)))


def test_ack_for_epoch_not_committed():
    p = ready("vm1")
    p.src_send(Begin("vm1", 1, 0.0))
    with pytest.raises(RemoteProtocolError):
        feed(p.src, encode(Ack("vm1", 1, 0.0)))


def test_need_discards_until_begin():
    p = ready("vm1")
    for m in p.epoch_frames("vm1", 1):
        p.src_send(m)
    # the receiver asks again for epoch 1 while the source already streams epoch 2
    need = sent(p.rcv, Need("vm1", 1, pack_indices := b"\x03" + bytes(7)))
    for m in p.epoch_frames("vm1", 2):
        assert p.src_send(m) == []  # dropped: epoch 2 is later than the epoch asked for
    assert p.src_send(Current("vm1", 2, 0.0)) == []
    assert p.r2s(need) == [Need("vm1", 1, pack_indices)]
    # the source must start epoch 1 again
    with pytest.raises(LocalProtocolError):
        p.src.send(Begin("vm1", 2, 0.0))
    with pytest.raises(LocalProtocolError):
        p.src.send(data("vm1", 1))
    with pytest.raises(LocalProtocolError):
        p.src.send(Commit("vm1", 1, 0))
    resend = p.epoch_frames("vm1", 1)
    assert p.src_send(resend[0]) == [resend[0]]
    assert p.src_send(resend[1]) == [resend[1]]
    assert p.src_send(resend[2]) == [resend[2]]
    assert p.rcv_send(Ack("vm1", 1, 0.0)) == [Ack("vm1", 1, 0.0)]
    # and normal service resumes
    for m in p.epoch_frames("vm1", 2):
        assert p.src_send(m) == [m]


def test_need_discard_still_refuses_older_epochs():
    p = ready("vm1", last_epoch=4)
    for m in p.epoch_frames("vm1", 5):
        p.src_send(m)
    p.r2s(sent(p.rcv, Need("vm1", 5, b"")))
    with pytest.raises(RemoteProtocolError):
        feed(p.rcv, encode(Begin("vm1", 4, 0.0)))


def test_receiver_accepts_pipelined_epochs():
    p = ready("vm1")
    msgs = [*p.epoch_frames("vm1", 1), *p.epoch_frames("vm1", 2)]
    chunk = b"".join(sent(p.src, m) for m in msgs)  # the source allows this
    assert p.s2r(chunk) == msgs
    assert p.rcv_send(Ack("vm1", 1, 0.0)) == [Ack("vm1", 1, 0.0)]
    assert p.rcv_send(Ack("vm1", 2, 0.0)) == [Ack("vm1", 2, 0.0)]


def test_pipelined_epochs_one_frame_at_a_time():
    p = ready("vm1")
    for m in [*p.epoch_frames("vm1", 1), *p.epoch_frames("vm1", 2)]:
        assert p.src_send(m) == [m]
    p.rcv_send(Ack("vm1", 1, 0.0))
    for m in p.epoch_frames("vm1", 3):
        assert p.src_send(m) == [m]
    p.rcv_send(Ack("vm1", 2, 0.0))
    p.rcv_send(Ack("vm1", 3, 0.0))
    with pytest.raises(LocalProtocolError):
        p.rcv.send(Ack("vm1", 3, 0.0))  # answered already


def test_answers_in_commit_order():
    p = ready("vm1")
    for m in [*p.epoch_frames("vm1", 1), *p.epoch_frames("vm1", 2)]:
        p.src_send(m)
    with pytest.raises(LocalProtocolError):
        p.rcv.send(Ack("vm1", 2, 0.0))
    with pytest.raises(RemoteProtocolError):
        feed(p.src, encode(Ack("vm1", 2, 0.0)))


def test_need_after_reject_with_pipelined_epoch():
    p = ready("vm1")
    msgs = [*p.epoch_frames("vm1", 1), *p.epoch_frames("vm1", 2)]
    assert p.s2r(b"".join(sent(p.src, m) for m in msgs)) == msgs  # one read
    p.rcv.reject("vm1", 1)  # epoch 1 has unresolvable references
    assert p.rcv_send(Need("vm1", 1, b"")) == [Need("vm1", 1, b"")]
    with pytest.raises(LocalProtocolError):
        p.rcv.send(Ack("vm1", 2, 0.0))  # epoch 2 was dropped with epoch 1
    for m in p.epoch_frames("vm1", 1):
        assert p.src_send(m) == [m]
    assert p.rcv_send(Ack("vm1", 1, 0.0)) == [Ack("vm1", 1, 0.0)]


def _largest_window_accepted(tmp_path) -> int:
    tok = tmp_path / "t.token"
    fd = os.open(tok, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, TOKEN)
    os.close(fd)
    largest = 0
    for window in (1, 2, 8, 16, 17, 32, 64, 65, 128, 1024):
        cfg = tmp_path / f"source-{window}.toml"
        cfg.write_text(f'[source]\nname = "host1"\nreceiver = "127.0.0.1:7400"\n'
                       f'token_file = "t.token"\nwindow = {window}\n'
                       f'[[volume]]\nname = "vm1"\npath = "vm1.img"\n')
        try:
            largest = load_source(cfg).window
        except ConfigError:
            pass
    return largest


def test_largest_configurable_window_fits_the_receiver(tmp_path):
    window = _largest_window_accepted(tmp_path)
    assert window >= 2
    p = ready("vm1")
    # the source daemon sends Begin while fewer than `window` epochs are unacked
    for e in range(1, window + 1):
        for m in p.epoch_frames("vm1", e):
            assert p.src_send(m) == [m]
    for e in range(1, window + 1):
        p.rcv_send(Ack("vm1", e, 0.0))


def test_reject_drops_frames_until_begin():
    p = ready("vm1")
    for m in p.epoch_frames("vm1", 1):
        p.src_send(m)
    p.rcv.reject("vm1", 1)
    for m in p.epoch_frames("vm1", 2):
        assert p.src_send(m) == []
    p.rcv_send(Need("vm1", 1, b""))
    for m in p.epoch_frames("vm1", 1):
        assert p.src_send(m) == [m]
    p.rcv_send(Ack("vm1", 1, 0.0))


def test_next_event_judges_each_frame_after_the_last_decision():
    """Why the receiver takes one message at a time: a reject at Commit(1) drops the epoch 2
    frames that arrived in the same read; taken all at once, they would have passed."""
    p = ready("vm1")
    msgs = [*p.epoch_frames("vm1", 1), *p.epoch_frames("vm1", 2)]
    p.rcv.receive_data(b"".join(sent(p.src, m) for m in msgs))  # one read
    taken = []
    while (item := p.rcv.next_event()) is not None:
        msg, size = item
        assert size == len(encode(msg))
        taken.append(msg)
        if isinstance(msg, Commit):
            p.rcv.reject("vm1", msg.epoch)
    assert taken == msgs[:3]
    q = ready("vm1")
    q.rcv.receive_data(b"".join(sent(q.src, m) for m in msgs))
    assert q.rcv.events_received() == msgs  # no decision in between: all of them


# ---------------------------------------------------------------- the sans-I/O API


def test_bytes_in_are_buffered_until_taken_and_bytes_out_until_drained():
    p = ready("vm1")
    begin, commit = Begin("vm1", 1, 0.0), Commit("vm1", 1, 0)
    assert p.src.send(begin) is None
    assert p.src.send(commit) is None
    out = p.src.data_to_send()
    assert out == encode(begin) + encode(commit)  # in order, as accepted
    assert p.src.data_to_send() == b""  # drained
    assert p.rcv.receive_data(out[:5]) is None
    assert p.rcv.events_received() == []  # nothing whole yet
    p.rcv.receive_data(out[5:])
    assert p.rcv.events_received() == [begin, commit]
    assert p.rcv.events_received() == []  # taken
    assert p.rcv.next_event() is None


def test_a_refused_send_buffers_nothing_and_changes_nothing():
    p = ready("vm1")
    with pytest.raises(LocalProtocolError):
        p.src.send(Commit("vm1", 1, 0))  # no Begin
    assert p.src.data_to_send() == b""
    # a frame too large to encode is refused before the session moves on: the file set is
    # not left awaiting an answer to a FilePut that never left
    small = SourceSession("host1", TOKEN, max_frame=1024)
    rcv = ReceiverSession(CLIENTS.get, filesets=lambda client: ("cfg",))
    small.start()
    feed(rcv, sent(small))
    rcv.challenge()
    feed(small, sent(rcv))
    small.auth()
    feed(rcv, sent(small))
    rcv.welcome()
    feed(small, sent(rcv))
    feed(rcv, sent(small, FileOpen("cfg")))
    feed(small, sent(rcv, FileOpened("cfg", [], b"", b"")))
    with pytest.raises(LocalProtocolError, match="exceeds"):
        small.send(FilePut("cfg", "a", bytes(16), 2048, 0.0, 0o644, 0.0, os.urandom(2048)))
    assert small.filesets == {"cfg": None}
    assert small.data_to_send() == b""
    put = FilePut("cfg", "a", bytes(16), 1, 0.0, 0o644, 0.0, b"z")
    assert feed(rcv, sent(small, put)) == [put]


def test_a_frame_too_large_is_refused_on_arrival_a_malformed_one_when_taken():
    p = ready("vm1")
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        p.rcv.receive_data(HEADER.pack(p.rcv.max_frame + 1))  # its length alone
    assert p.rcv.state is State.CLOSED
    q = ready("vm1")
    q.rcv.receive_data(b"\x00\x00\x00\x01\xc1")  # buffered: judged when taken
    assert q.rcv.state is State.READY
    with pytest.raises(RemoteProtocolError, match="malformed"):
        q.rcv.events_received()
    assert q.rcv.state is State.CLOSED


# ---------------------------------------------------------------- local errors


@pytest.mark.parametrize(
    "action",
    [lambda p: p.src.send(Open("vm1", BS, BS)),
     lambda p: p.src.auth(),
     lambda p: p.src.send(Begin("vm1", 1, 0.0))],
    ids=["open-before-hello", "auth-before-hello", "begin-before-hello"],
)
def test_source_local_errors_at_start(action):
    with pytest.raises(LocalProtocolError):
        action(Pair())


def test_source_local_errors():
    p = Pair()
    p.src.start()
    p.s2r(sent(p.src))
    with pytest.raises(LocalProtocolError):
        p.src.start()  # Hello twice
    with pytest.raises(LocalProtocolError):
        p.src.auth()  # no Challenge yet
    p.rcv.challenge()
    p.r2s(sent(p.rcv))
    with pytest.raises(LocalProtocolError):
        p.src.send(Open("vm1", BS, BS))  # not authenticated yet
    p.src.auth()
    p.s2r(sent(p.src))
    with pytest.raises(LocalProtocolError):
        p.src.auth()  # Auth twice
    p.rcv.welcome()
    p.r2s(sent(p.rcv))
    with pytest.raises(LocalProtocolError):
        p.src.send(Begin("vm1", 1, 0.0))  # no Open yet
    p.src_send(Open("vm1", BS, BS))
    with pytest.raises(LocalProtocolError):
        p.src.send(Begin("vm1", 1, 0.0))  # no Opened yet
    for msg in (Ack("vm1", 1, 0.0), Opened("vm1", "r", 0, 0.0), Welcome(b"", [], 1),
                Challenge(1, b"x" * 32), Hashes("vm1", 0, b""), Need("vm1", 1, b"")):
        with pytest.raises(LocalProtocolError):
            p.src.send(msg)


def test_receiver_local_errors():
    p = Pair()
    with pytest.raises(LocalProtocolError):
        p.rcv.challenge()  # no Hello yet
    with pytest.raises(LocalProtocolError):
        p.rcv.welcome()
    p.src.start()
    p.s2r(sent(p.src))
    with pytest.raises(LocalProtocolError):
        p.rcv.welcome()  # Welcome before Auth
    p.rcv.challenge()
    p.r2s(sent(p.rcv))
    with pytest.raises(LocalProtocolError):
        p.rcv.challenge()  # Challenge twice
    with pytest.raises(LocalProtocolError):
        p.rcv.welcome()  # still no Auth
    with pytest.raises(LocalProtocolError):
        p.rcv.send(Opened("vm1", "r", 0, 0.0))
    p.src.auth()
    p.s2r(sent(p.src))
    p.rcv.welcome()
    p.r2s(sent(p.rcv))
    with pytest.raises(LocalProtocolError):
        p.rcv.welcome()  # Welcome twice
    with pytest.raises(LocalProtocolError):
        p.rcv.send(Opened("vm1", "r", 0, 0.0))  # no Open
    p.open("vm1")
    with pytest.raises(LocalProtocolError):
        p.rcv.send(Ack("vm1", 1, 0.0))  # no Commit
    with pytest.raises(LocalProtocolError):
        p.rcv.send(Need("vm1", 1, b""))
    for msg in (Begin("vm1", 1, 0.0), Open("vm2", BS, BS), Hello(1, "x", b"n" * 32),
                Auth(b"m"), data("vm1", 1), Commit("vm1", 1, 0), Current("vm1", 0, 0.0)):
        with pytest.raises(LocalProtocolError):
            p.rcv.send(msg)


def test_source_refuses_begin_on_readonly_volume():
    p = ready(None)
    p.src_send(Open("vm1", BS, BS, readonly=True))
    p.rcv_send(Opened("vm1", "r", 0, 0.0))
    with pytest.raises(LocalProtocolError):
        p.src.send(Begin("vm1", 1, 0.0))


def test_source_refuses_current_on_readonly_volume():
    """The receiver refuses Current there, so the source session must not send it."""
    p = ready(None)
    p.src_send(Open("vm1", BS, BS, readonly=True))
    p.rcv_send(Opened("vm1", "r", 0, 0.0))
    with pytest.raises(LocalProtocolError, match="read-only"):
        p.src.send(Current("vm1", 0, 0.0))
    with pytest.raises(RemoteProtocolError, match="read-only"):
        p.s2r(encode(Current("vm1", 0, 0.0)))


def test_receiver_refuses_volume_error_before_welcome():
    p = Pair()
    p.src.start()
    p.s2r(sent(p.src))
    with pytest.raises(LocalProtocolError):
        p.rcv.send(Error("replica", "broken", "vm1"))


# ---------------------------------------------------------------- closing


def test_connection_error_from_source_closes_both():
    p = ready("vm1")
    err = Error("tracker", "disk gone", "")
    assert p.src_send(err) == [err]
    assert p.src.state is State.CLOSED
    assert p.rcv.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        p.src.send(Begin("vm1", 1, 0.0))
    with pytest.raises(LocalProtocolError):
        p.rcv.send(Ack("vm1", 1, 0.0))
    assert feed(p.rcv, encode(Begin("vm1", 1, 0.0))) == []
    # saying goodbye is still allowed
    sent(p.src, Bye("bye"))


def test_connection_error_from_receiver_closes_both():
    p = ready("vm1")
    err = Error("disk_full", "no space", "")
    assert p.rcv_send(err) == [err]
    assert p.rcv.state is State.CLOSED
    assert p.src.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        p.src.send(Begin("vm1", 1, 0.0))
    assert feed(p.src, encode(Ack("vm1", 1, 0.0))) == []


def test_connection_error_stops_processing_the_chunk():
    p = ready("vm1")
    chunk = encode(Error("x", "y", "")) + encode(Begin("vm1", 99, 0.0))
    assert feed(p.rcv, chunk) == [Error("x", "y", "")]


def test_connection_error_before_auth():
    rcv = ReceiverSession(CLIENTS.get)
    assert feed(rcv, encode(Error("auth", "bad", ""))) == [Error("auth", "bad", "")]
    assert rcv.state is State.CLOSED


def test_bye_closes():
    p = ready("vm1")
    assert p.src_send(Bye("shutdown")) == [Bye("shutdown")]
    assert p.src.state is State.CLOSED and p.rcv.state is State.CLOSED


def test_volume_error_only_drops_that_volume():
    p = ready("vm1")
    p.open("vm2")
    p.src_send(Begin("vm1", 1, 0.0))
    late = encode(data("vm1", 1))  # already in flight when the receiver gives up on vm1
    err = Error("replica", "bad image", "vm1")
    assert p.rcv_send(err) == [err]
    assert p.src.state is State.READY and p.rcv.state is State.READY
    assert "vm1" not in p.src.volumes and "vm1" not in p.rcv.volumes
    with pytest.raises(LocalProtocolError):
        p.src.send(data("vm1", 1))
    assert p.s2r(late) == []  # dropped, not a protocol violation
    assert p.rcv.state is State.READY
    # the other volume goes on
    for m in p.epoch_frames("vm2", 1):
        assert p.src_send(m) == [m]
    p.rcv_send(Ack("vm2", 1, 0.0))
    # and the stopped one can be opened again, starting from its last epoch
    p.open("vm1")
    for m in p.epoch_frames("vm1", 1):
        assert p.src_send(m) == [m]


def test_source_error_for_volume_keeps_connection():
    p = ready("vm1")
    err = Error("tracker", "image vanished", "vm1")
    assert p.src_send(err) == [err]
    assert p.src.state is State.READY and p.rcv.state is State.READY


def test_readonly_open_refuses_writes():
    p = ready(None)
    assert p.src_send(Open("vm1", BS, BS, readonly=True)) == [Open("vm1", BS, BS, readonly=True)]
    p.rcv_send(Opened("vm1", "r", 3, 0.0))
    assert p.src_send(GetHashes("vm1", 0, 1, False)) == [GetHashes("vm1", 0, 1, False)]
    assert p.rcv_send(Hashes("vm1", 0, b"h" * 16)) == [Hashes("vm1", 0, b"h" * 16)]
    with pytest.raises(RemoteProtocolError, match="read-only"):
        p.s2r(encode(Begin("vm1", 4, 0.0)))


def test_remote_error_closes_session():
    p = ready("vm1")
    with pytest.raises(RemoteProtocolError):
        feed(p.rcv, b"\x00\x00\x00\x01\xc1")
    assert p.rcv.state is State.CLOSED
    assert feed(p.rcv, encode(Current("vm1", 0, 0.0))) == []
    # the receiver may still explain itself
    sent(p.rcv, Error("protocol", "malformed", ""))


# ---------------------------------------------------------------- cuts (protocol 2)


def test_a_cut_goes_inside_its_epoch_and_names_only_the_clients_volumes():
    from cdp.wire.messages import Cut

    p = ready()
    cut = Cut("vm1", 1, 5.0, 4.0, "db", ["vm1", "vm2"])
    assert p.src_send(Begin("vm1", 1, 1.0)) == [Begin("vm1", 1, 1.0)]
    assert p.src_send(cut) == [cut]
    assert p.src_send(Commit("vm1", 1, 0)) == [Commit("vm1", 1, 0)]
    with pytest.raises(LocalProtocolError):
        p.src.send(Cut("vm1", 2, 5.0, 0.0, "", []))  # outside its epoch
    p = ready()
    p.src_send(Begin("vm1", 1, 1.0))
    with pytest.raises(VolumeError, match="may not write it"):  # vm3 is host2's
        p.s2r(sent(p.src, Cut("vm1", 1, 5.0, 0.0, "db", ["vm1", "vm3"])))
    for bad in (Cut("vm1", 1, 5.0, 6.0, "", []), Cut("vm1", 1, 5.0, 0.0, "db", ["vm2"]),
                Cut("vm1", 1, 5.0, 0.0, "", ["vm1"]), Cut("vm1", 1, 5.0, 0.0, "../x", ["vm1"])):
        p = ready()
        p.src_send(Begin("vm1", 1, 1.0))
        with pytest.raises(RemoteProtocolError):
            p.s2r(sent(p.src, bad))


def test_a_protocol_1_source_is_answered_in_protocol_1():
    from cdp.wire.frames import FrameDecoder

    rcv = ReceiverSession(CLIENTS.get)
    feed(rcv, encode(Hello(1, "host1", b"n" * NONCE_LEN)))
    dec = FrameDecoder(4096)
    rcv.challenge()
    dec.push(sent(rcv))
    item = dec.pop()
    assert item is not None and isinstance(item[0], Challenge) and item[0].version == 1


def _chosen(hello: Hello) -> int:
    from cdp.wire.frames import FrameDecoder

    rcv = ReceiverSession(CLIENTS.get)
    feed(rcv, encode(hello))
    dec = FrameDecoder(4096)
    rcv.challenge()
    dec.push(sent(rcv))
    item = dec.pop()
    assert item is not None and isinstance(item[0], Challenge)
    assert item[0].version == rcv.version
    return rcv.version


def test_the_receiver_answers_in_the_highest_version_both_speak():
    n = b"n" * NONCE_LEN
    assert _chosen(Hello(3, "host1", n)) == 3  # a source before negotiation: its own version
    assert _chosen(Hello(PROTOCOL_VERSION, "host1", n, 1)) == PROTOCOL_VERSION
    # a newer source that still speaks ours: ours, not a refusal (sources need not wait for us)
    assert _chosen(Hello(PROTOCOL_VERSION + 3, "host1", n, PROTOCOL_VERSION)) == PROTOCOL_VERSION
    with pytest.raises(RemoteProtocolError, match=rf"needs protocol {PROTOCOL_VERSION + 1} or "
                       r"later.*upgrade the receiver"):
        _chosen(Hello(PROTOCOL_VERSION + 3, "host1", n, PROTOCOL_VERSION + 1))
    with pytest.raises(RemoteProtocolError, match="upgrade the source"):
        _chosen(Hello(0, "host1", n))


def test_our_hello_offers_every_version_we_speak_and_an_old_receiver_reads_what_it_knows():
    from cdp.wire.frames import FrameDecoder
    from cdp.wire.messages import MIN_PROTOCOL_VERSION

    src = SourceSession("host1", TOKEN)
    dec = FrameDecoder(4096)
    src.start()
    dec.push(sent(src))
    item = dec.pop()
    assert item is not None and item[0] == Hello(PROTOCOL_VERSION, "host1", src.nonce, MIN_PROTOCOL_VERSION)
    # the source adopts the receiver's choice and gates what that version lacks
    feed(src, encode(Challenge(1, b"c" * NONCE_LEN)))
    assert src.version == 1


def test_a_receiver_too_old_to_negotiate_is_named_for_upgrade():
    """Every receiver before protocol 4 refuses our four-field Hello with these words, and
    closes: the source says whom to upgrade instead of passing on a field count."""
    from cdp.errors import PeerTooOldError
    from cdp.wire.messages import MIN_PROTOCOL_VERSION, from_wire, to_wire
    from cdp.wire.source_session import OLD_RECEIVER_REFUSAL

    src = SourceSession("host1", TOKEN)
    src.start()
    with pytest.raises(PeerTooOldError, match=r"the receiver speaks a protocol before 4, which "
                       r"lacks version negotiation .*upgrade the receiver to a cdp of protocol 4"):
        feed(src, encode(Error("protocol", OLD_RECEIVER_REFUSAL, "")))
    assert src.state is State.CLOSED
    # those words are the field count check's (unchanged since protocol 1), for three fields
    with pytest.raises(RemoteProtocolError, match=r"^Hello: expected 4 fields, got 5$"):
        from_wire([Hello.TYPE, PROTOCOL_VERSION, "host1", b"n" * NONCE_LEN, 1, 0])
    assert OLD_RECEIVER_REFUSAL == "Hello: expected 3 fields, got 4"
    assert len(to_wire(Hello(PROTOCOL_VERSION, "host1", src.nonce, MIN_PROTOCOL_VERSION))) == 5
    # any other refusal of the Hello is handed out as it came (the caller reports it)
    src = SourceSession("host1", TOKEN)
    src.start()
    other = Error("protocol", "invalid client name 'x y'", "")
    assert feed(src, encode(other)) == [other]
    assert src.state is State.CLOSED


# ---------------------------------------------------------------- dispatch tables
# Each session maps type(msg) to a handler: that equals the isinstance chain it replaced only
# while no message class subclasses another, and both ends agree on who sends what.


def test_no_message_class_subclasses_another():
    assert len(ALL) > 20
    for cls in ALL:
        assert cls.__bases__ == (Message,), cls


def test_what_one_end_sends_the_other_receives():
    # Bye (and a connection-level Error) are taken by _closing before any table
    assert set(ReceiverSession._ON_RECEIVE) | {Bye} == set(SourceSession._ON_SEND)
    assert set(SourceSession._ON_RECEIVE) | {Bye} == set(ReceiverSession._ON_SEND)
    assert set(ReceiverSession._ON_SEND) | set(SourceSession._ON_SEND) == set(ALL)
    for cls in (ReceiverSession, SourceSession):
        assert set(cls._RECEIVE_STATES) <= set(cls._ON_RECEIVE)
        assert set(cls._SEND_ANY_STATE) <= set(cls._ON_SEND)


def test_unknown_type_before_auth_is_unexpected_not_unknown():
    rcv = ReceiverSession(CLIENTS.get)
    with pytest.raises(RemoteProtocolError, match=r"^unexpected Ack before authentication$"):
        feed(rcv, encode(Ack("vm1", 1, 0.0)))
    assert rcv.state is State.CLOSED


def test_unknown_type_for_a_failed_volume_is_dropped_else_refused():
    p = ready("vm1")
    stop = Error("io", "cannot read", "vm1")
    assert p.src_send(stop) == [stop]
    assert feed(p.rcv, encode(Ack("vm1", 1, 0.0))) == []  # dropped, as before
    with pytest.raises(RemoteProtocolError, match=r"^a source does not send Ack$"):
        feed(p.rcv, encode(Ack("vm2", 1, 0.0)))


def test_handshake_message_out_of_state_names_no_authentication():
    p = ready(None)
    with pytest.raises(RemoteProtocolError, match=r"^unexpected Hello$"):
        feed(p.rcv, encode(Hello(4, "host1", b"n" * 32, 1)))
    q = ready(None)
    with pytest.raises(RemoteProtocolError, match=r"^unexpected Welcome$"):
        feed(q.src, encode(Welcome(b"p" * 32, ["vm1"], 1 << 20)))
    with pytest.raises(RemoteProtocolError, match=r"^a receiver does not send Hello$"):
        feed(ready(None).src, encode(Hello(4, "host1", b"n" * 32, 1)))


def test_unknown_type_to_send():
    with pytest.raises(LocalProtocolError, match=r"^cannot send Data before authentication$"):
        Pair().src.send(Data("vm1", 1, b"", b"", 0, b""))
    with pytest.raises(LocalProtocolError, match=r"^a receiver does not send Data$"):
        ready("vm1").rcv.send(Data("vm1", 1, b"", b"", 0, b""))
    with pytest.raises(LocalProtocolError, match=r"^a source does not send Ack$"):
        ready("vm1").src.send(Ack("vm1", 1, 0.0))
