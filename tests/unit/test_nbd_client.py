"""The sans-I/O NBD client session: against cdp's own server session, and against scripted bytes.

1. a client and cdp's NbdServerSession talk each other through the handshake, READ (data and
   holes) and BLOCK_STATUS, with no sockets;
2. refusals the server states in-band (no export, a context it does not offer, TLS) are
   NbdRefusedError with a message that says what to do; an old server without structured
   replies still serves plain READs;
3. every malformed or out-of-range reply is NbdBadServerError, raised from the chunk header
   before its payload is buffered when the length alone is wrong;
4. the reassembly rules: chunks in any order, holes as zeros, no overlap, full coverage,
   error chunks become Failed and the connection goes on, block status extents clipped.
"""

from __future__ import annotations

import errno
import struct

import pytest
from nbdscript import (
    BITMAP,
    EXPORT,
    SIZE,
    chunk,
    data_chunk,
    error_chunk,
    greeting,
    handshake,
    hole_chunk,
    info_export,
    ready_client,
    rep,
    simple,
    status_chunk,
)

from cdp.errors import LocalProtocolError
from cdp.nbd import spec as p
from cdp.nbd.clientevents import (
    ClientEvent,
    Extent,
    Failed,
    NbdBadServerError,
    NbdRefusedError,
    ReadDone,
    Ready,
    StatusDone,
)
from cdp.nbd.clienthello import ClientPhase
from cdp.nbd.clientsession import NbdClientSession
from cdp.nbd.events import BlockStatus, Event, Read
from cdp.nbd.protocol import NbdServerSession

CTX = {1: "base:allocation", 7: BITMAP}


def _pump(client: NbdClientSession, server: NbdServerSession) -> tuple[list[ClientEvent], list[Event]]:
    """Move bytes both ways until neither side has anything to say."""
    cev: list[ClientEvent] = []
    sev: list[Event] = []
    while True:
        to_client, to_server = server.data_to_send(), client.data_to_send()
        if not to_client and not to_server:
            return cev, sev
        cev += client.receive_data(to_client)
        sev += server.receive_data(to_server)


# --- 1. against cdp's own server session ----------------------------------------------------

def test_handshake_read_and_block_status_against_cdps_server_session() -> None:
    server = NbdServerSession({"disk": SIZE})
    client = NbdClientSession("disk", ["base:allocation"])
    cev, _ = _pump(client, server)
    (ready,) = cev
    assert isinstance(ready, Ready)
    assert (ready.size, ready.structured, ready.contexts) == (SIZE, True, ("base:allocation",))
    assert ready.max_block == p.MAX_REQUEST and client.phase is ClientPhase.TRANSMISSION

    c_read = client.read(4096, 8192)
    c_hole = client.read(65536, 4096)
    c_status = client.block_status(0, SIZE)
    _, sev = _pump(client, server)
    reads = {e.offset: e for e in sev if isinstance(e, Read)}
    (status,) = [e for e in sev if isinstance(e, BlockStatus)]
    server.reply(reads[4096].cookie, data=b"x" * 8192)
    server.reply_hole(reads[65536].cookie)
    server.reply_block_status(status.cookie, [(8192, 0), (SIZE, p.STATE_HOLE | p.STATE_ZERO)])
    cev, _ = _pump(client, server)
    by_cookie = {e.cookie: e for e in cev if not isinstance(e, Ready)}
    assert by_cookie[c_read] == ReadDone(c_read, bytearray(b"x" * 8192))
    assert by_cookie[c_hole] == ReadDone(c_hole, bytearray(4096))
    assert by_cookie[c_status] == StatusDone(c_status, {"base:allocation": (
        Extent(0, 8192, 0), Extent(8192, SIZE - 8192, 3))})

    client.disconnect()
    assert client.phase is ClientPhase.CLOSED
    _pump(client, server)
    assert server.phase is p.Phase.CLOSED


def test_a_server_error_is_a_failed_event_and_the_connection_goes_on() -> None:
    server = NbdServerSession({"disk": SIZE})
    client = NbdClientSession("disk")
    _pump(client, server)
    cookie = client.read(0, 512)
    _, sev = _pump(client, server)
    server.reply(sev[0].cookie, errno.EIO, message="disk on fire")  # type: ignore[union-attr]
    cev, _ = _pump(client, server)
    assert cev == [Failed(cookie, errno.EIO, "disk on fire")]
    again = client.read(0, 512)
    _, sev = _pump(client, server)
    server.reply(sev[0].cookie, data=bytes(512))  # type: ignore[union-attr]
    assert _pump(client, server)[0] == [ReadDone(again, bytearray(512))]


# --- 2. refusals ------------------------------------------------------------------------------

def test_unknown_export_is_refused_with_the_servers_reason() -> None:
    client = NbdClientSession("nope")
    with pytest.raises(NbdRefusedError, match=r"no export 'nope'.*not here"):
        client.receive_data(greeting() + rep(p.OPT_STRUCTURED_REPLY, p.REP_ACK)
                            + rep(p.OPT_GO, p.REP_ERR_UNKNOWN, b"not here"))
    assert client.phase is ClientPhase.CLOSED


def test_a_context_the_export_does_not_offer_is_refused_and_says_how_to_export_it() -> None:
    client = NbdClientSession(EXPORT, ["base:allocation", BITMAP])
    data = (greeting() + rep(p.OPT_STRUCTURED_REPLY, p.REP_ACK)
            + rep(p.OPT_SET_META_CONTEXT, p.REP_META_CONTEXT, struct.pack(">I", 1) + b"base:allocation")
            + rep(p.OPT_SET_META_CONTEXT, p.REP_ACK))
    with pytest.raises(NbdRefusedError, match=r"qemu:dirty-bitmap:b0.*bitmaps"):
        client.receive_data(data)


def test_tls_required_is_refused_with_a_hint() -> None:
    client = NbdClientSession(EXPORT)
    with pytest.raises(NbdRefusedError, match="requires TLS"):
        client.receive_data(greeting() + rep(p.OPT_STRUCTURED_REPLY, p.REP_ERR_TLS_REQD))


def test_an_old_server_without_structured_replies_serves_plain_reads() -> None:
    client, ready = ready_client(structured=False)
    assert not ready.structured
    cookie = client.read(10, 5)
    assert client.receive_data(simple(cookie, 0, b"he")) == []  # waits for the rest of the data
    assert client.receive_data(b"llo") == [ReadDone(cookie, bytearray(b"hello"))]
    with pytest.raises(LocalProtocolError):
        client.block_status(0, 10)  # no contexts were negotiated


def test_block_status_needs_structured_replies() -> None:
    client = NbdClientSession(EXPORT, [BITMAP])
    with pytest.raises(NbdRefusedError, match="structured replies"):
        client.receive_data(greeting() + rep(p.OPT_STRUCTURED_REPLY, p.REP_ERR_UNSUP))


# --- 3. malformed handshakes ----------------------------------------------------------------

@pytest.mark.parametrize("data, match", [
    (struct.pack(">QQH", 0x1234, p.IHAVEOPT, 3), "not an NBD server"),
    (struct.pack(">QQH", p.NBDMAGIC, 0x00420281861253, 3), "oldstyle"),
    (struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, 0), "fixed newstyle"),
    (greeting() + rep(p.OPT_GO, p.REP_ACK), "answered option 7"),
    (greeting() + struct.pack(">QIII", p.OPT_REPLY_MAGIC, p.OPT_STRUCTURED_REPLY, p.REP_ACK, 1 << 20),
     "over 65536"),
    (greeting() + rep(p.OPT_STRUCTURED_REPLY, p.REP_ACK) + rep(p.OPT_GO, p.REP_ACK), "without the export"),
    (greeting() + rep(p.OPT_STRUCTURED_REPLY, p.REP_ACK) + info_export(size=1 << 63), "not valid"),
    (greeting() + rep(p.OPT_STRUCTURED_REPLY, p.REP_ACK)
     + rep(p.OPT_GO, p.REP_INFO, struct.pack(">HIII", p.INFO_BLOCK_SIZE, 3, 4096, 1 << 20)), "block sizes"),
    (greeting() + rep(p.OPT_STRUCTURED_REPLY, p.REP_ACK) + rep(p.OPT_GO, p.REP_INFO, b"\x00"),
     "information"),
    (greeting() + rep(p.OPT_STRUCTURED_REPLY, p.REP_ACK) + rep(p.OPT_GO, p.REP_INFO, b"\x00\x09") * 70,
     "over 64 replies"),
])
def test_malformed_handshakes_are_protocol_errors(data: bytes, match: str) -> None:
    client = NbdClientSession(EXPORT)
    with pytest.raises(NbdBadServerError, match=match):
        client.receive_data(data)
    assert client.phase is ClientPhase.CLOSED
    assert client.receive_data(b"more") == []


def test_a_context_not_asked_for_or_granted_twice_is_a_protocol_error() -> None:
    head = greeting() + rep(p.OPT_STRUCTURED_REPLY, p.REP_ACK)
    ctx = struct.pack(">I", 1) + BITMAP.encode()
    for extra in (rep(p.OPT_SET_META_CONTEXT, p.REP_META_CONTEXT, struct.pack(">I", 2) + b"qemu:other"),
                  rep(p.OPT_SET_META_CONTEXT, p.REP_META_CONTEXT, ctx) * 2):
        client = NbdClientSession(EXPORT, [BITMAP])
        with pytest.raises(NbdBadServerError, match="granted"):
            client.receive_data(head + extra)


def test_the_handshake_may_arrive_one_byte_at_a_time() -> None:
    client = NbdClientSession(EXPORT, list(CTX.values()))
    events: list[ClientEvent] = []
    for b in handshake(CTX):
        events += client.receive_data(bytes([b]))
    assert [type(e) for e in events] == [Ready]
    assert client.contexts == ("base:allocation", BITMAP)


def test_what_the_client_sends_is_what_the_spec_says() -> None:
    client = NbdClientSession(EXPORT, [BITMAP])
    client.receive_data(greeting())
    sent = client.data_to_send()
    assert sent[:4] == struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES)
    assert sent[4:] == struct.pack(">QII", p.IHAVEOPT, p.OPT_STRUCTURED_REPLY, 0)
    client.receive_data(rep(p.OPT_STRUCTURED_REPLY, p.REP_ACK))
    query = BITMAP.encode()
    meta = struct.pack(">I", 1) + EXPORT.encode() + struct.pack(">II", 1, len(query)) + query
    assert client.data_to_send() == struct.pack(">QII", p.IHAVEOPT, p.OPT_SET_META_CONTEXT, len(meta)) + meta


# --- 4. replies -------------------------------------------------------------------------------

def test_read_chunks_in_any_order_with_holes_reassemble() -> None:
    client, _ = ready_client()
    cookie = client.read(1000, 300)
    events = client.receive_data(data_chunk(cookie, 1200, b"c" * 100, done=False)
                                 + hole_chunk(cookie, 1100, 100, done=False)
                                 + data_chunk(cookie, 1000, b"a" * 100, done=False)
                                 + chunk(cookie, p.REPLY_TYPE_NONE))
    assert events == [ReadDone(cookie, bytearray(b"a" * 100 + bytes(100) + b"c" * 100))]
    assert client.pending == frozenset()


@pytest.mark.parametrize("reply, match", [
    (lambda c: data_chunk(c, 900, b"x" * 200), "outside the request"),
    (lambda c: data_chunk(c, 1250, b"x" * 100), "outside the request"),
    (lambda c: data_chunk(c, 1000, b"x" * 100, done=False) + data_chunk(c, 1050, b"y" * 10), "overlaps"),
    (lambda c: hole_chunk(c, 1100, 100, done=False) + data_chunk(c, 1000, b"y" * 101), "overlaps"),
    (lambda c: data_chunk(c, 1000, b"x" * 100), "covers 100 of 300"),
    (lambda c: hole_chunk(c, 1000, 0), "size 0"),
    (lambda c: data_chunk(c + 1, 1000, b"x"), "not in flight"),
    (lambda c: simple(c, 0), "simple success"),
    (lambda c: simple(c, errno.EIO), "simple reply to a READ"),
    (lambda c: chunk(c, p.REPLY_TYPE_NONE, done=False), "without the DONE"),
    (lambda c: chunk(c, 77, b"?"), "unknown type 77"),
    (lambda c: chunk(c, p.REPLY_TYPE_BLOCK_STATUS, bytes(12)), "cannot answer"),
    (lambda c: struct.pack(">IHHQI", p.STRUCTURED_REPLY_MAGIC, 1, p.REPLY_TYPE_OFFSET_DATA, c, 8 + 301),
     "cannot answer"),
    (lambda c: error_chunk(c, 0, b"no errno"), "errno 0"),
    (lambda c: chunk(c, p.REPLY_TYPE_ERROR, struct.pack(">IH", 5, 50) + b"short"), "message of 50"),
    (lambda c: struct.pack(">IIQ", 0xDEADBEEF, 0, c), "magic"),
])
def test_bad_read_replies_are_protocol_errors(reply: object, match: str) -> None:
    client, _ = ready_client()
    cookie = client.read(1000, 300)
    with pytest.raises(NbdBadServerError, match=match):
        client.receive_data(reply(cookie))  # type: ignore[operator]
    assert client.phase is ClientPhase.CLOSED and client.pending == frozenset()


def test_an_oversized_chunk_is_refused_from_its_header_alone() -> None:
    client, _ = ready_client()
    cookie = client.read(0, 4096)
    header = struct.pack(">IHHQI", p.STRUCTURED_REPLY_MAGIC, 1, p.REPLY_TYPE_OFFSET_DATA, cookie, 0xFFFFFFFF)
    with pytest.raises(NbdBadServerError):
        client.receive_data(header)


def test_dont_fragment_allows_one_content_chunk() -> None:
    client, _ = ready_client()
    cookie = client.read(0, 200, df=True)
    with pytest.raises(NbdBadServerError, match="fragment"):
        client.receive_data(data_chunk(cookie, 0, b"a" * 100, done=False)
                            + data_chunk(cookie, 100, b"b" * 100))


def test_error_chunks_fail_the_request_and_keep_the_connection() -> None:
    client, _ = ready_client()
    cookie = client.read(0, 100)
    offset_err = chunk(cookie, p.REPLY_TYPE_ERROR_OFFSET, struct.pack(">IH", errno.EIO, 3) + b"bad"
                       + struct.pack(">Q", 50), done=False)
    unknown_err = chunk(cookie, 0x8123, struct.pack(">IH", errno.EPERM, 0) + b"extra")
    assert client.receive_data(data_chunk(cookie, 0, b"x" * 50, done=False) + offset_err + unknown_err) == [
        Failed(cookie, errno.EIO, "bad")]
    again = client.read(0, 10)
    assert client.receive_data(error_chunk(again, errno.ENOSPC, b"\x1b[2Jfull")) == [
        Failed(again, errno.ENOSPC, "\\x1b[2Jfull")]  # control characters never reach a terminal


def test_block_status_extents_are_clipped_and_checked() -> None:
    client, _ = ready_client(CTX)
    cookie = client.block_status(4096, 65536)
    events = client.receive_data(status_chunk(cookie, 7, [(4096, 1), (1 << 20, 0)], done=False)
                                 + status_chunk(cookie, 1, [(65536, 0)]))
    assert events == [StatusDone(cookie, {BITMAP: (Extent(4096, 4096, 1), Extent(8192, 61440, 0)),
                                          "base:allocation": (Extent(4096, 65536, 0),)})]
    short = client.block_status(0, SIZE)
    (done,) = client.receive_data(status_chunk(short, 1, [(512, 0)], done=False)
                                  + status_chunk(short, 7, [(1024, 1)]))
    assert done == StatusDone(short, {"base:allocation": (Extent(0, 512, 0),), BITMAP: (Extent(0, 1024, 1),)})


@pytest.mark.parametrize("reply, match", [
    (lambda c: status_chunk(c, 1, [(65536, 0), (1, 0)], done=False), "past the requested end"),
    (lambda c: status_chunk(c, 1, [(0, 0)]), "empty"),
    (lambda c: status_chunk(c, 3, [(10, 0)]), "not granted"),
    (lambda c: status_chunk(c, 1, [(10, 0)], done=False) + status_chunk(c, 1, [(10, 0)]), "repeated"),
    (lambda c: status_chunk(c, 1, [(10, 0)]), "lacks a negotiated context"),
    (lambda c: simple(c, 0), "simple success"),
    (lambda c: data_chunk(c, 0, b"x"), "cannot answer"),
    (lambda c: chunk(c, p.REPLY_TYPE_BLOCK_STATUS, struct.pack(">I", 1) + bytes(9)), "cannot answer"),
])
def test_bad_block_status_replies_are_protocol_errors(reply: object, match: str) -> None:
    client, _ = ready_client(CTX)
    cookie = client.block_status(0, 65536)
    with pytest.raises(NbdBadServerError, match=match):
        client.receive_data(reply(cookie))  # type: ignore[operator]


def test_req_one_allows_one_extent_and_a_simple_error_fails_the_request() -> None:
    client, _ = ready_client({1: "base:allocation"})
    cookie = client.block_status(0, 4096, req_one=True)
    with pytest.raises(NbdBadServerError, match="one-extent"):
        client.receive_data(status_chunk(cookie, 1, [(1024, 0), (1024, 1)]))
    client, _ = ready_client({1: "base:allocation"})
    cookie = client.block_status(0, 4096)
    assert client.receive_data(simple(cookie, errno.EINVAL)) == [Failed(cookie, errno.EINVAL, "")]


def test_requests_the_client_must_not_send() -> None:
    client, ready = ready_client()
    with pytest.raises(LocalProtocolError):
        client.read(SIZE - 10, 11)
    with pytest.raises(LocalProtocolError):
        client.read(0, ready.max_block + 1)
    with pytest.raises(LocalProtocolError):
        client.read(0, 0)
    with pytest.raises(LocalProtocolError):
        client.block_status(0, 10)  # no context
    client.disconnect()
    with pytest.raises(LocalProtocolError):
        client.read(0, 10)
    assert client.data_to_send() == struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_DISC, 0, 0, 0)


def test_disconnect_waits_for_replies_in_flight() -> None:
    client, _ = ready_client()
    cookie = client.read(0, 4)
    client.disconnect()
    assert client.phase is ClientPhase.TRANSMISSION
    assert client.receive_data(data_chunk(cookie, 0, b"abcd")) == [ReadDone(cookie, bytearray(b"abcd"))]
    assert client.phase is ClientPhase.CLOSED
