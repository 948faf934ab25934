"""Label / Labelled (types 50-51) under hypothesis: any label text and epoch fed to either
session is accepted only when valid (printable, bounded, an acknowledged epoch), else it
closes the connection with a protocol error; nothing else escapes."""

from __future__ import annotations

import msgpack
from helpers import feed, sent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.errors import LocalProtocolError, RemoteProtocolError
from cdp.wire.frames import encode
from cdp.wire.messages import Ack, Begin, Commit, Data, Label, Labelled, Open, Opened, valid_label
from cdp.wire.receiver_session import ReceiverSession
from cdp.wire.session import State
from cdp.wire.source_session import SourceSession

TOKEN = b"0123456789abcdef0123456789abcdef"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
labels = st.one_of(st.text(max_size=200), st.sampled_from(["base", " x", "x ", "12", "a\nb",
                                                            "a" * 128, "a" * 129, "", "é"]))


def acked_pair() -> tuple[SourceSession, ReceiverSession]:
    """Both sessions ready, vm1 open, epoch 1 committed and acknowledged, epoch 2 committed."""
    src, rcv = SourceSession("host1", TOKEN), ReceiverSession({"host1": (TOKEN, ("vm1",))}.get)
    src.start()
    feed(rcv, sent(src))
    rcv.challenge()
    feed(src, sent(rcv))
    src.auth()
    feed(rcv, sent(src))
    rcv.welcome()
    feed(src, sent(rcv))
    feed(rcv, sent(src, Open("vm1", 1 << 20, 65536)))
    feed(src, sent(rcv, Opened("vm1", "r", 0, 0.0)))
    for e in (1, 2):
        feed(rcv, sent(src, Begin("vm1", e, 0.0)))
        feed(rcv, sent(src, Data("vm1", e, bytes(8), b"h" * 16, 65536, b"z")))
        feed(rcv, sent(src, Commit("vm1", e, 1)))
    feed(src, sent(rcv, Ack("vm1", 1, 0.0)))
    return src, rcv


@FUZZ
@given(epoch=st.integers(0, 2**63 - 1), label=labels, volume=st.sampled_from(["vm1", "vm2"]))
def test_receiver_accepts_only_valid_labels_of_acknowledged_epochs(epoch, label, volume):
    _, rcv = acked_pair()
    frame = encode(Label(volume, epoch, label), 1 << 20)
    ok = volume == "vm1" and epoch == 1 and valid_label(label)
    try:
        events = feed(rcv, frame)
    except RemoteProtocolError:
        assert not ok and rcv.state is State.CLOSED
        return
    assert ok and events == [Label(volume, epoch, label)]
    rcv.send(Labelled(volume, epoch, label))  # answered once
    try:
        rcv.send(Labelled(volume, epoch, label))
        raise AssertionError("a second Labelled went out")
    except LocalProtocolError:
        pass


@FUZZ
@given(epoch=st.integers(0, 2**63 - 1), label=labels)
def test_source_sends_only_valid_labels_and_takes_only_answers_it_asked_for(epoch, label):
    src, rcv = acked_pair()
    try:
        frame = sent(src, Label("vm1", epoch, label))
    except LocalProtocolError:
        assert not (epoch == 1 and valid_label(label))
        answer = encode(Labelled("vm1", epoch, label), 1 << 20)
        try:
            feed(src, answer)
            raise AssertionError("an unrequested Labelled was accepted")
        except RemoteProtocolError:
            assert src.state is State.CLOSED
        return
    assert feed(rcv, frame) == [Label("vm1", epoch, label)]
    assert feed(src, sent(rcv, Labelled("vm1", epoch, label))) == [
        Labelled("vm1", epoch, label)]


@FUZZ
@given(fields=st.lists(st.one_of(st.integers(-2**63, 2**64 - 1), st.text(max_size=20), st.binary(max_size=8),
                                 st.none(), st.booleans()), max_size=5))
def test_malformed_label_frames_close_the_connection(fields):
    _, rcv = acked_pair()
    blob = msgpack.packb([50, *fields], use_bin_type=True)
    frame = len(blob).to_bytes(4, "big") + blob
    try:
        events = feed(rcv, frame)
    except RemoteProtocolError:
        assert rcv.state is State.CLOSED
        return
    assert len(events) == 1 and isinstance(events[0], Label)
    assert valid_label(events[0].label) and events[0].epoch == 1
