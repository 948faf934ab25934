"""Untrusted bytes into the NBD server session: only NbdProtocolError may come out.

1. random bytes at any phase (before the client flags, while haggling, in transmission);
2. mutated valid conversations (bit flips, inserted and deleted bytes), split at random points;
3. whatever is accepted yields events the caller can reply to, and every reply is well formed;
4. the same for a conversation with STARTTLS, structured replies, metadata contexts and BLOCK_STATUS;
5. zero-copy reception (get_buffer/buffer_updated) decodes exactly what receive_data() does.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from cdp.nbd import spec as p
from cdp.nbd.events import BlockStatus, Event, Negotiated, Read, StartTls
from cdp.nbd.protocol import NbdServerSession
from cdp.nbd.spec import NbdProtocolError

SIZE = 1 << 16


def _option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", p.IHAVEOPT, opt, len(data)) + data


def _go(name: bytes, *infos: int) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def _meta(name: bytes, *queries: bytes) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(q)) + q for q in queries))


def _request(cmd: int, cookie: int, offset: int, length: int, flags: int = 0, payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


VALID = (
    struct.pack(">I", 3)
    + _option(p.OPT_STRUCTURED_REPLY) + _option(p.OPT_LIST) + _option(p.OPT_INFO, _go(b"d", 3))
    + _option(p.OPT_GO, _go(b"d", 3))
    + _request(p.CMD_WRITE, 1, 0, 16, p.CMD_FLAG_FUA, b"x" * 16)
    + _request(p.CMD_READ, 2, 8, 16)
    + _request(p.CMD_WRITE_ZEROES, 3, 0, 4096, p.CMD_FLAG_NO_HOLE)
    + _request(p.CMD_TRIM, 4, 4096, 4096)
    + _request(p.CMD_FLUSH, 5, 0, 0)
    + _request(p.CMD_DISC, 6, 0, 0)
)

# STARTTLS, then (as if the TLS handshake ran) structured replies, metadata contexts and
# block status. The client waits for the STARTTLS reply, so TLS_HEAD always arrives alone.
TLS_HEAD = struct.pack(">I", 3) + _option(p.OPT_LIST_META_CONTEXT, _meta(b"d")) + _option(p.OPT_STARTTLS)
STRUCTURED = (
    _option(p.OPT_STRUCTURED_REPLY) + _option(p.OPT_LIST_META_CONTEXT, _meta(b"d", b"base:"))
    + _option(p.OPT_SET_META_CONTEXT, _meta(b"d", b"base:allocation", b"x-y:z"))
    + _option(p.OPT_GO, _go(b"d"))
    + _request(p.CMD_BLOCK_STATUS, 1, 0, 8192, p.CMD_FLAG_REQ_ONE)
    + _request(p.CMD_READ, 2, 8, 16, p.CMD_FLAG_DF)
    + _request(p.CMD_BLOCK_STATUS, 3, 4096, 4096)
    + _request(p.CMD_READ, 4, SIZE, 1)
    + _request(p.CMD_WRITE, 5, 0, 16, p.CMD_FLAG_FUA, b"y" * 16)
    + _request(p.CMD_DISC, 6, 0, 0)
)


def drive(chunks: list[bytes]) -> bool:
    """Feed chunks; answer every event like a server would; only NbdProtocolError may escape.

    True if the session ended without a protocol error.
    """
    s = NbdServerSession({"d": SIZE, "": 512}, max_request=1 << 16, tls=True)
    s.data_to_send()
    try:
        for chunk in chunks:
            for ev in s.receive_data(chunk):
                if isinstance(ev, Read):
                    assert ev.length > 0 and ev.offset + ev.length <= s.size
                    if ev.offset % 2:
                        s.reply_hole(ev.cookie)
                    else:
                        s.reply(ev.cookie, data=bytes(ev.length))
                elif isinstance(ev, BlockStatus):
                    assert s.meta_contexts and ev.length > 0 and ev.offset + ev.length <= s.size
                    s.reply_block_status(ev.cookie, [(4096, 0), (1 << 20, 3)])
                elif isinstance(ev, StartTls):
                    assert s.tls_active and not s.structured
                elif isinstance(ev, Negotiated):
                    assert ev.export in ("d", "")
                elif hasattr(ev, "cookie"):
                    s.reply(ev.cookie)
            s.data_to_send()
    except NbdProtocolError:
        assert s.phase is p.Phase.CLOSED
        clean = False
    else:
        clean = True
    assert s.pending == frozenset()
    return clean


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([0, 4, 4 + 61 + 20]))
def test_random_bytes_at_any_phase(junk: bytes, prefix_len: int) -> None:
    prefix = VALID[:prefix_len]
    drive([prefix, junk])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_conversations(data: st.DataObject) -> None:
    stream = bytearray(data.draw(st.sampled_from([VALID, TLS_HEAD + STRUCTURED])))
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["flip", "insert", "delete", "word"]))
        pos = data.draw(st.integers(0, len(stream) - 1))
        if kind == "flip":
            stream[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "insert":
            stream[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del stream[pos:pos + data.draw(st.integers(1, 8))]
        else:
            stream[pos:pos + 4] = data.draw(st.sampled_from(
                [b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"\x00\x01\x00\x00"]))
        if not stream:
            stream = bytearray(b"\x00")
    cuts = data.draw(st.lists(st.integers(0, 1 << 16), max_size=6))
    drive(_split(bytes(stream), cuts))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 1 << 16), max_size=8))
def test_valid_conversation_any_split(cuts: list[int]) -> None:
    assert drive(_split(VALID, cuts))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 1 << 16), max_size=8))
def test_valid_structured_conversation_any_split(cuts: list[int]) -> None:
    assert drive([TLS_HEAD, *_split(STRUCTURED, cuts)])


def _outcome(feed: Callable[[NbdServerSession, bytes], list[Event]], chunks: list[bytes]) -> tuple[
        list[Event], bytes, bool]:
    """Events, output and whether it closed on a violation, for chunks fed one way."""
    s = NbdServerSession({"d": SIZE, "": 512}, max_request=1 << 16, tls=True)
    events: list[Event] = []
    try:
        for chunk in chunks:
            events += feed(s, chunk)
    except NbdProtocolError:
        return events, s.data_to_send(), True
    return events, s.data_to_send(), False


def _via_buffer(s: NbdServerSession, chunk: bytes) -> list[Event]:
    events: list[Event] = []
    while chunk:
        view = s.get_buffer(-1)
        n = min(len(view), len(chunk))
        view[:n] = chunk[:n]
        events += s.buffer_updated(n)
        chunk = chunk[n:]
    return events


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_zero_copy_reception_equals_receive_data(data: st.DataObject) -> None:
    stream = bytearray(data.draw(st.sampled_from([VALID, TLS_HEAD + STRUCTURED])))
    for _ in range(data.draw(st.integers(0, 3))):
        pos = data.draw(st.integers(0, len(stream) - 1))
        stream[pos] ^= 1 << data.draw(st.integers(0, 7))
    chunks = _split(bytes(stream), data.draw(st.lists(st.integers(0, 1 << 16), max_size=10)))
    assert _outcome(_via_buffer, chunks) == _outcome(lambda s, c: s.receive_data(c), chunks)
