"""A label names one point: Label.move, Labelled.moved_from and LabelTaken (protocol 3) on
the wire and in both sessions, and what a protocol 2 source, which knows none of them, gets."""

from __future__ import annotations

import os

import pytest
from helpers import feed, sent

from cdp.errors import LocalProtocolError, PeerTooOldError, RemoteProtocolError
from cdp.wire.frames import encode
from cdp.wire.messages import (
    Ack,
    Auth,
    Begin,
    Commit,
    Data,
    Hello,
    Label,
    Labelled,
    LabelTaken,
    Open,
    Opened,
    from_wire,
    to_wire,
)
from cdp.wire.receiver_session import ReceiverSession
from cdp.wire.session import NONCE_LEN, State, source_mac
from cdp.wire.source_session import SourceSession

TOKEN = b"0123456789abcdef0123456789abcdef"
CLIENTS = {"host1": (TOKEN, ("vm1",))}.get


def _acked(src: SourceSession, rcv: ReceiverSession) -> None:
    """vm1 open on both, epochs 1 and 2 committed and acknowledged."""
    feed(rcv, sent(src, Open("vm1", 1 << 20, 65536)))
    feed(src, sent(rcv, Opened("vm1", "r", 0, 0.0)))
    for e in (1, 2):
        feed(rcv, sent(src, Begin("vm1", e, 0.0)))
        feed(rcv, sent(src, Data("vm1", e, bytes(8), b"h" * 16, 65536, b"z")))
        feed(rcv, sent(src, Commit("vm1", e, 1)))
        feed(src, sent(rcv, Ack("vm1", e, 0.0)))


def pair() -> tuple[SourceSession, ReceiverSession]:
    src, rcv = SourceSession("host1", TOKEN), ReceiverSession(CLIENTS)
    src.start()
    feed(rcv, sent(src))
    rcv.challenge()
    feed(src, sent(rcv))
    src.auth()
    feed(rcv, sent(src))
    rcv.welcome()
    feed(src, sent(rcv))
    _acked(src, rcv)
    return src, rcv


def old_source_receiver() -> ReceiverSession:
    """A receiver session talking to a protocol 2 source (driven by hand: ours speaks 3)."""
    rcv = ReceiverSession(CLIENTS)
    nonce = os.urandom(NONCE_LEN)
    feed(rcv, encode(Hello(2, "host1", nonce)))
    rcv.challenge()
    feed(rcv, encode(Auth(source_mac(TOKEN, "host1", nonce, rcv.nonce))))
    rcv.welcome()
    feed(rcv, encode(Open("vm1", 1 << 20, 65536)))
    sent(rcv, Opened("vm1", "r", 0, 0.0))
    for frame in (Begin("vm1", 1, 0.0), Data("vm1", 1, bytes(8), b"h" * 16, 65536, b"z"),
                  Commit("vm1", 1, 1)):
        feed(rcv, encode(frame))
    sent(rcv, Ack("vm1", 1, 0.0))
    return rcv


def test_the_new_fields_leave_the_wire_when_unused_so_older_peers_read_them():
    # an older source sends three fields: move is false, the safe way
    assert from_wire([Label.TYPE, "vm1", 1, "base"]) == Label("vm1", 1, "base", False)
    assert to_wire(Label("vm1", 1, "base")) == [Label.TYPE, "vm1", 1, "base"]
    assert to_wire(Label("vm1", 1, "base", True)) == [Label.TYPE, "vm1", 1, "base", True]
    # a Labelled that moved nothing is the three fields a protocol 2 source expects
    assert to_wire(Labelled("vm1", 1, "base")) == [Labelled.TYPE, "vm1", 1, "base"]
    moved = Labelled("vm1", 5, "base", 2, 1234.5)
    assert from_wire(to_wire(moved)) == moved
    taken = LabelTaken("vm1", 5, "base", 2, 1234.5)
    assert from_wire(to_wire(taken)) == taken
    for bad in ([Label.TYPE, "vm1", 1, "base", 1], [Labelled.TYPE, "vm1", 1, "base", 2, 1.0, 3],
                [LabelTaken.TYPE, "vm1", 5, "base", 2]):
        with pytest.raises(RemoteProtocolError):
            from_wire(bad)


def test_a_refused_label_reaches_the_source_and_a_moved_one_says_from_where():
    src, rcv = pair()
    assert feed(rcv, sent(src, Label("vm1", 2, "base"))) == [Label("vm1", 2, "base")]
    refused = LabelTaken("vm1", 2, "base", 1, 100.0)
    assert feed(src, sent(rcv, refused)) == [refused]
    assert feed(rcv, sent(src, Label("vm1", 2, "base", True))) == [
        Label("vm1", 2, "base", True)]
    moved = Labelled("vm1", 2, "base", 1, 100.0)
    assert feed(src, sent(rcv, moved)) == [moved]
    with pytest.raises(LocalProtocolError):  # answered already
        rcv.send(Labelled("vm1", 2, "base"))


def test_answers_that_do_not_fit_their_label_are_violations():
    src, rcv = pair()
    feed(rcv, sent(src, Label("vm1", 2, "base", True)))
    with pytest.raises(LocalProtocolError):  # a move is never refused
        rcv.send(LabelTaken("vm1", 2, "base", 1, 100.0))
    with pytest.raises(RemoteProtocolError):
        feed(src, encode(LabelTaken("vm1", 2, "base", 1, 100.0)))
    assert src.state is State.CLOSED

    src, rcv = pair()
    feed(rcv, sent(src, Label("vm1", 2, "base")))
    for bad in (Labelled("vm1", 2, "base", 1, 100.0),  # moved, unasked
                LabelTaken("vm1", 2, "base", 2, 100.0)):  # "taken" by its own point
        with pytest.raises(LocalProtocolError):
            rcv.send(bad)
    with pytest.raises(RemoteProtocolError):
        feed(src, encode(Labelled("vm1", 2, "base", 1, 100.0)))


def test_a_protocol_2_source_cannot_move_and_is_not_sent_what_it_cannot_read():
    rcv = old_source_receiver()
    assert rcv.version == 2
    with pytest.raises(RemoteProtocolError):
        feed(rcv, encode(Label("vm1", 1, "base", True)))

    rcv = old_source_receiver()
    assert feed(rcv, encode(Label("vm1", 1, "base"))) == [Label("vm1", 1, "base")]
    with pytest.raises(LocalProtocolError):
        rcv.send(LabelTaken("vm1", 1, "base", 2, 100.0))
    rcv.unanswered("vm1", 1, "base")  # refused without an answer
    with pytest.raises(LocalProtocolError):
        rcv.send(Labelled("vm1", 1, "base"))
    with pytest.raises(LocalProtocolError):
        rcv.unanswered("vm1", 1, "base")


def test_a_source_does_not_move_a_label_on_a_receiver_that_chose_protocol_2(monkeypatch):
    monkeypatch.setattr("cdp.wire.messages.PROTOCOL_VERSION", 2)  # the receiver speaks up to 2
    src, rcv = pair()
    assert src.version == rcv.version == 2
    with pytest.raises(PeerTooOldError, match=r"the receiver speaks protocol 2, which lacks moving a "
                       r"checkpoint label .* upgrade the receiver"):
        src.send(Label("vm1", 2, "base", True))
    assert src.state is State.READY  # refused before anything was sent: the session goes on
    feed(rcv, sent(src, Label("vm1", 2, "base")))  # a plain label is protocol 1


def test_a_checkpoint_moving_a_label_on_a_receiver_without_it_fails_at_once(monkeypatch, tmp_path):
    """The refusal reaches `cdp checkpoint --move` in words, not as a timeout: the source
    does not retry a Label the negotiated version lacks, as it retries one a reconnect lost."""
    import asyncio
    from types import SimpleNamespace

    from cdp.source.checkpoint import Checkpoints

    monkeypatch.setattr("cdp.wire.messages.PROTOCOL_VERSION", 2)
    src, _ = pair()

    class OneLink:
        session = src

        async def send(self, msg):
            src.send(msg)

    checkpoints = Checkpoints(SimpleNamespace(link=OneLink()))  # type: ignore[arg-type]

    async def label() -> None:
        async with asyncio.timeout(5):
            await checkpoints._send_label(SimpleNamespace(name="vm1"), 2, "base", True)  # type: ignore[arg-type]

    with pytest.raises(PeerTooOldError, match="upgrade the receiver"):
        asyncio.run(label())
