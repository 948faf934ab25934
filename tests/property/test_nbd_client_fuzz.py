"""Untrusted server bytes into the NBD client session: only NbdBadServerError or NbdRefusedError
may come out, whatever comes out is well formed, and nothing the server says grows memory.

1. random bytes after a greeting, and mutated handshakes (bit flips, inserted and deleted bytes);
2. random bytes and mutated valid replies in transmission, with READs and BLOCK_STATUS in flight,
   split at random points: every event answers a request and fits it (exact READ length, extents
   consecutive inside the requested range), and the bytes buffered between calls never exceed
   one chunk header plus the largest payload the requests in flight allow;
3. round trip: any valid way of answering a READ (content chunks of data and holes in any order)
   or a BLOCK_STATUS (any extents, the last one past the end) decodes to the right bytes and
   extents, however the stream is split.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from nbdscript import (
    BITMAP,
    SIZE,
    data_chunk,
    error_chunk,
    greeting,
    handshake,
    hole_chunk,
    ready_client,
    simple,
    status_chunk,
)

from cdp.nbd import spec as p
from cdp.nbd.clientevents import (
    ClientEvent,
    Failed,
    NbdBadServerError,
    NbdRefusedError,
    ReadDone,
    StatusDone,
)
from cdp.nbd.clienthello import ClientPhase
from cdp.nbd.clientsession import MAX_ERROR_CHUNK, MAX_STATUS_EXTENTS, NbdClientSession

CTX = {1: "base:allocation", 9: BITMAP}
READ_AT, READ_LEN = 4096, 3000
STATUS_AT, STATUS_LEN = 8192, 65536


def _mutate(data: bytes, draw: st.DrawFn) -> bytes:
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete"]))
        i = draw(st.integers(0, max(len(b) - 1, 0)))
        if kind == "flip" and b:
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            b[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif b:
            del b[i:i + draw(st.integers(1, 8))]
    return bytes(b)


def _split(data: bytes, draw: st.DrawFn) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def _feed(client: NbdClientSession, pieces: list[bytes],
          bound: int | None = None) -> tuple[list[ClientEvent], Exception | None]:
    events: list[ClientEvent] = []
    for piece in pieces:
        try:
            events += client.receive_data(piece)
        except (NbdBadServerError, NbdRefusedError) as exc:
            assert client.phase is ClientPhase.CLOSED and client.pending == frozenset()
            return events, exc
        if bound is not None:
            assert len(client._buf) <= bound, (len(client._buf), bound)
    return events, None


# --- 1. handshake -------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_random_bytes_after_the_greeting(junk: bytes, with_contexts: bool) -> None:
    client = NbdClientSession("d", list(CTX.values()) if with_contexts else [])
    _feed(client, [greeting() + junk])
    assert client.phase in (ClientPhase.OPTIONS, ClientPhase.CLOSED, ClientPhase.TRANSMISSION)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_handshakes(data: st.DataObject) -> None:
    client = NbdClientSession("d", list(CTX.values()))
    stream = _mutate(handshake(CTX), data.draw)
    events, _ = _feed(client, _split(stream, data.draw))
    for event in events:  # only a Ready can come out of a handshake
        assert client.phase is ClientPhase.TRANSMISSION
        assert set(getattr(event, "contexts", ())) <= set(CTX.values())


# --- 2. transmission ----------------------------------------------------------------------------

def _in_flight() -> tuple[NbdClientSession, dict[int, tuple[str, int, int]], int]:
    """A client with a READ and a BLOCK_STATUS in flight; cookie -> (kind, offset, length); and the
    most the session may buffer between calls."""
    client, _ = ready_client(CTX)
    r = client.read(READ_AT, READ_LEN)
    s = client.block_status(STATUS_AT, STATUS_LEN)
    header = struct.calcsize(">IHHQI")
    bound = header + max(8 + READ_LEN, 4 + 8 * MAX_STATUS_EXTENTS, MAX_ERROR_CHUNK)
    return client, {r: ("read", READ_AT, READ_LEN), s: ("status", STATUS_AT, STATUS_LEN)}, bound


def _check(events: list[ClientEvent], requests: dict[int, tuple[str, int, int]]) -> None:
    seen = set()
    for event in events:
        assert isinstance(event, ReadDone | StatusDone | Failed)
        assert event.cookie in requests and event.cookie not in seen
        seen.add(event.cookie)
        kind, offset, length = requests[event.cookie]
        if isinstance(event, ReadDone):
            assert kind == "read" and len(event.data) == length
        elif isinstance(event, StatusDone):
            assert kind == "status" and set(event.extents) == set(CTX.values())
            for extents in event.extents.values():
                pos = offset
                assert extents
                for e in extents:
                    assert e.offset == pos and e.length > 0
                    pos += e.length
                assert pos <= offset + length
        else:
            assert event.errno != 0


def _valid_replies(r: int, s: int) -> bytes:
    return (data_chunk(r, READ_AT, b"x" * 1000, done=False) + status_chunk(s, 1, [(4096, 3), (1 << 20, 0)],
                                                                          done=False)
            + hole_chunk(r, READ_AT + 1000, 2000) + status_chunk(s, 9, [(STATUS_LEN, 1)]))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_in_transmission(junk: bytes) -> None:
    client, requests, bound = _in_flight()
    events, _ = _feed(client, [junk], bound)
    _check(events, requests)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_mutated_replies_split_anywhere(data: st.DataObject) -> None:
    client, requests, bound = _in_flight()
    r, s = sorted(requests)
    extra = data.draw(st.sampled_from([b"", error_chunk(r, 5, b"oops"), simple(s, 22),
                                       struct.pack(">IHHQI", p.STRUCTURED_REPLY_MAGIC, 1, 0x8100, r, 6)
                                       + bytes(6)]))
    stream = _mutate(extra + _valid_replies(r, s), data.draw)
    events, _ = _feed(client, _split(stream, data.draw), bound)
    _check(events, requests)


# --- 3. round trips -----------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_valid_read_reply_reassembles(data: st.DataObject) -> None:
    client, _ = ready_client()
    offset = data.draw(st.integers(0, SIZE - 1))
    length = data.draw(st.integers(1, min(SIZE - offset, 5000)))
    cookie = client.read(offset, length)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, length - 1), max_size=8)) if length > 1 else []))
    pieces = list(zip([0, *cuts], [*cuts, length], strict=True))
    order = data.draw(st.permutations(pieces))
    want = bytearray(length)
    stream = b""
    for i, (a, b) in enumerate(order):
        last = i == len(order) - 1
        if data.draw(st.booleans()):
            stream += hole_chunk(cookie, offset + a, b - a, done=last)
        else:
            payload = data.draw(st.binary(min_size=b - a, max_size=b - a))
            want[a:b] = payload
            stream += data_chunk(cookie, offset + a, payload, done=last)
    events, exc = _feed(client, _split(stream, data.draw))
    assert exc is None and events == [ReadDone(cookie, want)]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_valid_block_status_reply_decodes(data: st.DataObject) -> None:
    client, _ = ready_client(CTX)
    offset = data.draw(st.integers(0, SIZE - 1))
    length = data.draw(st.integers(1, SIZE - offset))
    cookie = client.block_status(offset, length)
    stream = b""
    want = {}
    for i, (ctx_id, name) in enumerate(data.draw(st.permutations(list(CTX.items())))):
        lengths = data.draw(st.lists(st.integers(1, length), min_size=1, max_size=6))
        flags = data.draw(st.lists(st.integers(0, 3), min_size=len(lengths), max_size=len(lengths)))
        extents, pos = [], offset
        for n, f in zip(lengths, flags, strict=True):
            extents.append((n, f))
            take = min(n, offset + length - pos)
            want.setdefault(name, []).append((pos, take, f))
            pos += take
            if pos == offset + length:
                break
        stream += status_chunk(cookie, ctx_id, extents, done=i == len(CTX) - 1)
    events, exc = _feed(client, _split(stream, data.draw))
    assert exc is None
    (event,) = events
    assert isinstance(event, StatusDone)
    assert {k: [tuple(e) for e in v] for k, v in event.extents.items()} == want
