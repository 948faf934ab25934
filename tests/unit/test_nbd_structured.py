"""The NBD session's newer protocol: structured replies, metadata contexts, BLOCK_STATUS, STARTTLS.

Exact bytes are checked against the layouts in the NBD spec (doc/proto.md).
"""

from __future__ import annotations

import errno
import struct

import pytest

from cdp.errors import LocalProtocolError
from cdp.nbd import spec as p
from cdp.nbd.events import BlockStatus, Disconnect, Flush, Negotiated, Read, StartTls
from cdp.nbd.protocol import NbdServerSession
from cdp.nbd.spec import NbdProtocolError, Phase

SIZE = 1 << 20
FLAGS = (p.TFLAG_HAS_FLAGS | p.TFLAG_SEND_FLUSH | p.TFLAG_SEND_FUA | p.TFLAG_SEND_TRIM
         | p.TFLAG_SEND_WRITE_ZEROES)


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", p.IHAVEOPT, opt, len(data)) + data


def go_data(name: bytes, *infos: int) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def meta_data(name: bytes, *queries: bytes) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(q)) + q for q in queries))


def request(cmd: int, cookie: int = 1, offset: int = 0, length: int = 0, flags: int = 0,
            payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


def opt_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while data:
        magic, opt, rtype, length = struct.unpack_from(">QIII", data)
        assert magic == p.OPT_REPLY_MAGIC
        out.append((opt, rtype, data[20:20 + length]))
        data = data[20 + length:]
    return out


def chunks(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(flags, type, cookie, payload) of each structured chunk; the stream must hold only chunks."""
    out = []
    while data:
        magic, flags, rtype, cookie, length = struct.unpack_from(">IHHQI", data)
        assert magic == p.STRUCTURED_REPLY_MAGIC
        out.append((flags, rtype, cookie, data[20:20 + length]))
        assert len(data) >= 20 + length
        data = data[20 + length:]
    return out


def error_chunk(payload: bytes) -> tuple[int, str]:
    err, mlen = struct.unpack_from(">IH", payload)
    assert len(payload) == 6 + mlen
    return err, payload[6:].decode()


def session(*, tls: bool = False, tls_required: bool = False) -> NbdServerSession:
    s = NbdServerSession({"disk": SIZE, "other": 4096}, tls=tls, tls_required=tls_required)
    s.data_to_send()
    assert s.receive_data(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES)) == []
    return s


def structured(meta: bool = True) -> NbdServerSession:
    s = session()
    stream = option(p.OPT_STRUCTURED_REPLY)
    if meta:
        stream += option(p.OPT_SET_META_CONTEXT, meta_data(b"disk", p.BASE_ALLOCATION.encode()))
    assert s.receive_data(stream + option(p.OPT_GO, go_data(b"disk"))) == [Negotiated("disk", SIZE)]
    s.data_to_send()
    return s


# --- structured replies -------------------------------------------------------------------------


def test_structured_reply_is_acked_and_adds_send_df() -> None:
    s = session()
    s.receive_data(option(p.OPT_STRUCTURED_REPLY, b"x"))
    assert opt_replies(s.data_to_send())[0][:2] == (p.OPT_STRUCTURED_REPLY, p.REP_ERR_INVALID)
    assert not s.structured
    s.receive_data(option(p.OPT_STRUCTURED_REPLY) + option(p.OPT_GO, go_data(b"disk")))
    assert opt_replies(s.data_to_send()) == [
        (p.OPT_STRUCTURED_REPLY, p.REP_ACK, b""),
        (p.OPT_GO, p.REP_INFO, struct.pack(">HQH", p.INFO_EXPORT, SIZE, FLAGS | p.TFLAG_SEND_DF)),
        (p.OPT_GO, p.REP_ACK, b""),
    ]


def test_export_name_after_structured_advertises_df() -> None:
    s = session()
    s.receive_data(option(p.OPT_STRUCTURED_REPLY))
    s.data_to_send()
    assert s.receive_data(option(p.OPT_EXPORT_NAME, b"disk")) == [Negotiated("disk", SIZE)]
    assert s.data_to_send() == struct.pack(">QH", SIZE, FLAGS | p.TFLAG_SEND_DF)


def test_read_is_one_offset_data_chunk() -> None:
    s = structured()
    assert s.receive_data(request(p.CMD_READ, 7, 4096, 5, p.CMD_FLAG_DF)) == [Read(7, 4096, 5)]
    s.reply(7, data=b"hello")
    [(flags, rtype, cookie, payload)] = chunks(s.data_to_send())
    assert (flags, rtype, cookie) == (p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_DATA, 7)
    assert payload == struct.pack(">Q", 4096) + b"hello"


def test_read_hole_is_one_offset_hole_chunk() -> None:
    s = structured()
    s.receive_data(request(p.CMD_READ, 8, 8192, 65536))
    s.reply_hole(8)
    assert chunks(s.data_to_send()) == [
        (p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_HOLE, 8, struct.pack(">QI", 8192, 65536))]


def test_reply_hole_without_structured_sends_zeros() -> None:
    s = session()
    s.receive_data(option(p.OPT_GO, go_data(b"disk")))
    s.data_to_send()
    s.receive_data(request(p.CMD_READ, 9, 0, 100) + request(p.CMD_FLUSH, 10))
    s.reply_hole(9)
    assert s.data_to_send() == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 9) + bytes(100)
    with pytest.raises(LocalProtocolError):
        s.reply_hole(10)


def test_errors_are_error_chunks_with_messages() -> None:
    s = structured()
    # Refused by the session itself: past the end, bad flags, unknown command.
    s.receive_data(request(p.CMD_READ, 1, SIZE, 1) + request(p.CMD_READ, 2, 0, 1, p.CMD_FLAG_NO_HOLE)
                   + request(0x55, 3, 0, 1))
    got = chunks(s.data_to_send())
    assert [(f, t, c) for f, t, c, _ in got] == [
        (p.REPLY_FLAG_DONE, p.REPLY_TYPE_ERROR, cookie) for cookie in (1, 2, 3)]
    assert [error_chunk(payload)[0] for *_, payload in got] == [errno.EINVAL] * 3
    assert "past the end" in error_chunk(got[0][3])[1]
    # Failed by the caller: errno and message reach the client; unknown errnos become EIO.
    s.receive_data(request(p.CMD_READ, 4, 0, 8) + request(p.CMD_FLUSH, 5))
    s.reply(4, errno.ENOSPC, message="disk full")
    s.reply(5, errno.EBADF)
    got = chunks(s.data_to_send())
    assert [(t, c, error_chunk(pl)) for _, t, c, pl in got] == [
        (p.REPLY_TYPE_ERROR, 4, (errno.ENOSPC, "disk full")), (p.REPLY_TYPE_ERROR, 5, (errno.EIO, ""))]


def test_successful_writes_use_simple_replies() -> None:
    s = structured()
    s.receive_data(request(p.CMD_WRITE, 1, 0, 4, p.CMD_FLAG_FUA, b"abcd") + request(p.CMD_FLUSH, 2))
    s.reply(1)
    s.reply(2)
    out = s.data_to_send()
    assert out == b"".join(struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, c) for c in (1, 2))


def test_oversized_write_in_structured_mode_answers_with_error_chunk() -> None:
    s = structured()
    with pytest.raises(NbdProtocolError):
        s.receive_data(request(p.CMD_WRITE, 3, 0, (32 << 20) + 1))
    [(_, rtype, cookie, payload)] = chunks(s.data_to_send())
    assert (rtype, cookie, error_chunk(payload)[0]) == (p.REPLY_TYPE_ERROR, 3, errno.EOVERFLOW)


# --- metadata contexts ----------------------------------------------------------------------


def test_meta_context_options_need_structured_replies() -> None:
    s = session()
    s.receive_data(option(p.OPT_LIST_META_CONTEXT, meta_data(b"disk"))
                   + option(p.OPT_SET_META_CONTEXT, meta_data(b"disk", b"base:allocation")))
    assert [r[1] for r in opt_replies(s.data_to_send())] == [p.REP_ERR_INVALID] * 2
    assert s.meta_contexts == ()


@pytest.mark.parametrize(("queries", "listed"), [
    ((), True),
    ((b"base:",), True),
    ((b"base:allocation",), True),
    ((b"qemu:dirty-bitmap:x", b"base:allocation"), True),
    ((b"qemu:dirty-bitmap:x",), False),
    ((b"base:nonsense",), False),
    ((b"nocolon",), False),
])
def test_list_meta_context(queries: tuple[bytes, ...], listed: bool) -> None:
    s = session()
    s.receive_data(option(p.OPT_STRUCTURED_REPLY))
    s.data_to_send()
    s.receive_data(option(p.OPT_LIST_META_CONTEXT, meta_data(b"disk", *queries)))
    expected = [(p.OPT_LIST_META_CONTEXT, p.REP_META_CONTEXT, b"\x00\x00\x00\x00base:allocation")]
    assert opt_replies(s.data_to_send()) == [*(expected if listed else []),
                                              (p.OPT_LIST_META_CONTEXT, p.REP_ACK, b"")]
    assert s.meta_contexts == ()  # listing selects nothing


def test_set_meta_context_selects_base_allocation() -> None:
    s = session()
    s.receive_data(option(p.OPT_STRUCTURED_REPLY))
    s.data_to_send()
    s.receive_data(option(p.OPT_SET_META_CONTEXT, meta_data(b"disk", b"qemu:x", b"base:allocation")))
    assert opt_replies(s.data_to_send()) == [
        (p.OPT_SET_META_CONTEXT, p.REP_META_CONTEXT,
         struct.pack(">I", p.BASE_ALLOCATION_ID) + b"base:allocation"),
        (p.OPT_SET_META_CONTEXT, p.REP_ACK, b""),
    ]
    assert s.meta_contexts == ("base:allocation",)
    # "base:" is only a wildcard for listing; selecting with it selects nothing (and replaces).
    s.receive_data(option(p.OPT_SET_META_CONTEXT, meta_data(b"disk", b"base:")))
    assert opt_replies(s.data_to_send()) == [(p.OPT_SET_META_CONTEXT, p.REP_ACK, b"")]
    assert s.meta_contexts == ()


@pytest.mark.parametrize("data", [
    b"",
    struct.pack(">I", 4) + b"disk",  # no query count
    struct.pack(">I", 99) + b"disk" + struct.pack(">I", 0),  # name past the end
    meta_data(b"disk", b"base:allocation")[:-1],  # query cut short
    meta_data(b"disk", b"base:allocation") + b"x",  # trailing bytes
    struct.pack(">I", 4) + b"disk" + struct.pack(">I", 2) + struct.pack(">I", 4) + b"base:",
    meta_data(b"disk", b"\xff\xfe"),  # not UTF-8
])
def test_malformed_meta_requests_are_invalid_and_clear_the_selection(data: bytes) -> None:
    s = session()
    s.receive_data(option(p.OPT_STRUCTURED_REPLY)
                   + option(p.OPT_SET_META_CONTEXT, meta_data(b"disk", b"base:allocation")))
    s.data_to_send()
    assert s.meta_contexts == ("base:allocation",)
    s.receive_data(option(p.OPT_SET_META_CONTEXT, data) + option(p.OPT_LIST_META_CONTEXT, data))
    assert [r[1] for r in opt_replies(s.data_to_send())] == [p.REP_ERR_INVALID] * 2
    assert s.meta_contexts == ()
    assert s.phase is Phase.OPTIONS


def test_meta_context_for_unknown_export() -> None:
    s = session()
    s.receive_data(option(p.OPT_STRUCTURED_REPLY))
    s.data_to_send()
    s.receive_data(option(p.OPT_SET_META_CONTEXT, meta_data(b"nope", b"base:allocation")))
    assert [r[1] for r in opt_replies(s.data_to_send())] == [p.REP_ERR_UNKNOWN]


def test_contexts_chosen_for_another_export_do_not_apply() -> None:
    s = session()
    s.receive_data(option(p.OPT_STRUCTURED_REPLY)
                   + option(p.OPT_SET_META_CONTEXT, meta_data(b"other", b"base:allocation"))
                   + option(p.OPT_GO, go_data(b"disk")))
    s.data_to_send()
    assert s.meta_contexts == ()
    assert s.receive_data(request(p.CMD_BLOCK_STATUS, 1, 0, 4096)) == []
    [(_, rtype, _, payload)] = chunks(s.data_to_send())
    assert (rtype, error_chunk(payload)[0]) == (p.REPLY_TYPE_ERROR, errno.EINVAL)


# --- block status ------------------------------------------------------------------------------


def status_chunk(data: bytes) -> tuple[int, int, list[tuple[int, int]]]:
    [(flags, rtype, cookie, payload)] = chunks(data)
    assert (flags, rtype) == (p.REPLY_FLAG_DONE, p.REPLY_TYPE_BLOCK_STATUS)
    (ctx,) = struct.unpack_from(">I", payload)
    pairs = [struct.unpack_from(">II", payload, 4 + 8 * i) for i in range((len(payload) - 4) // 8)]
    assert len(payload) == 4 + 8 * len(pairs)
    return cookie, ctx, pairs


def test_block_status_extents_are_cut_to_the_request() -> None:
    s = structured()
    events = s.receive_data(request(p.CMD_BLOCK_STATUS, 5, 4096, 3 * 4096))
    assert events == [BlockStatus(5, 4096, 3 * 4096, False)]
    hole = p.STATE_HOLE | p.STATE_ZERO
    s.reply_block_status(5, [(4096, 0), (16384, hole), (4096, 0)])
    assert status_chunk(s.data_to_send()) == (5, p.BASE_ALLOCATION_ID, [(4096, 0), (8192, hole)])
    assert s.pending == frozenset()


def test_block_status_req_one_sends_one_extent() -> None:
    s = structured()
    events = s.receive_data(request(p.CMD_BLOCK_STATUS, 6, 0, 8192, p.CMD_FLAG_REQ_ONE))
    assert events == [BlockStatus(6, 0, 8192, True)]
    s.reply_block_status(6, [(65536, 3), (4096, 0)])
    assert status_chunk(s.data_to_send()) == (6, p.BASE_ALLOCATION_ID, [(8192, 3)])


def test_block_status_refusals() -> None:
    s = structured()
    s.receive_data(request(p.CMD_BLOCK_STATUS, 1, SIZE - 512, 1024)
                   + request(p.CMD_BLOCK_STATUS, 2, 0, 0)
                   + request(p.CMD_BLOCK_STATUS, 3, 0, 512, p.CMD_FLAG_NO_HOLE))
    got = chunks(s.data_to_send())
    assert [(c, error_chunk(pl)[0]) for _, _, c, pl in got] == [(1, errno.EINVAL), (2, errno.EINVAL),
                                                                 (3, errno.EINVAL)]
    # Without SET_META_CONTEXT there is nothing to report on.
    s = structured(meta=False)
    assert s.receive_data(request(p.CMD_BLOCK_STATUS, 4, 0, 512)) == []
    [(_, _, cookie, payload)] = chunks(s.data_to_send())
    assert (cookie, error_chunk(payload)[0]) == (4, errno.EINVAL)


def test_block_status_reply_misuse() -> None:
    s = structured()
    s.receive_data(request(p.CMD_BLOCK_STATUS, 1, 0, 512) + request(p.CMD_READ, 2, 0, 512))
    with pytest.raises(LocalProtocolError):
        s.reply_block_status(1, [])
    with pytest.raises(LocalProtocolError):
        s.reply_block_status(1, [(0, 0)])
    with pytest.raises(LocalProtocolError):
        s.reply(1)  # success needs extents
    with pytest.raises(LocalProtocolError):
        s.reply_block_status(2, [(512, 0)])
    assert s.pending == {1, 2}
    s.reply(1, errno.EIO, message="lseek failed")
    [(_, rtype, cookie, payload)] = chunks(s.data_to_send())
    assert (rtype, cookie, error_chunk(payload)) == (p.REPLY_TYPE_ERROR, 1, (errno.EIO, "lseek failed"))


# --- STARTTLS ----------------------------------------------------------------------------------


def test_starttls_refused_when_not_offered() -> None:
    s = session()
    s.receive_data(option(p.OPT_STARTTLS))
    assert [r[1] for r in opt_replies(s.data_to_send())] == [p.REP_ERR_UNSUP]
    assert not s.tls_active


def test_starttls_acks_then_stops_and_forgets_clear_text_state() -> None:
    s = session(tls=True)
    s.receive_data(option(p.OPT_STRUCTURED_REPLY)
                   + option(p.OPT_SET_META_CONTEXT, meta_data(b"disk", b"base:allocation")))
    s.data_to_send()
    s.receive_data(option(p.OPT_STARTTLS, b"x"))
    assert [r[1] for r in opt_replies(s.data_to_send())] == [p.REP_ERR_INVALID]
    assert s.receive_data(option(p.OPT_STARTTLS)) == [StartTls()]
    assert opt_replies(s.data_to_send()) == [(p.OPT_STARTTLS, p.REP_ACK, b"")]
    assert s.tls_active and not s.structured and s.meta_contexts == ()
    # The caller ran the handshake; what follows is decrypted option traffic.
    s.receive_data(option(p.OPT_STARTTLS) + option(p.OPT_GO, go_data(b"disk")))
    replies = opt_replies(s.data_to_send())
    assert replies[0][:2] == (p.OPT_STARTTLS, p.REP_ERR_INVALID)
    assert replies[1] == (p.OPT_GO, p.REP_INFO, struct.pack(">HQH", p.INFO_EXPORT, SIZE, FLAGS))
    assert s.phase is Phase.TRANSMISSION


def test_bytes_after_starttls_before_the_ack_are_a_violation() -> None:
    s = session(tls=True)
    with pytest.raises(NbdProtocolError, match="STARTTLS"):
        s.receive_data(option(p.OPT_STARTTLS) + b"\x16\x03\x01")
    assert s.phase is Phase.CLOSED


def test_tls_required_refuses_everything_before_tls() -> None:
    s = session(tls=True, tls_required=True)
    s.receive_data(option(p.OPT_LIST) + option(p.OPT_INFO, go_data(b"disk"))
                   + option(p.OPT_GO, go_data(b"disk")) + option(p.OPT_STRUCTURED_REPLY)
                   + option(p.OPT_LIST_META_CONTEXT, meta_data(b"disk")) + option(99))
    replies = opt_replies(s.data_to_send())
    assert [(o, r) for o, r, _ in replies] == [
        (o, p.REP_ERR_TLS_REQD) for o in (p.OPT_LIST, p.OPT_INFO, p.OPT_GO, p.OPT_STRUCTURED_REPLY,
                                           p.OPT_LIST_META_CONTEXT, 99)]
    assert s.phase is Phase.OPTIONS and not s.structured
    assert s.receive_data(option(p.OPT_STARTTLS)) == [StartTls()]
    s.data_to_send()
    assert s.receive_data(option(p.OPT_GO, go_data(b"disk"))) == [Negotiated("disk", SIZE)]


def test_tls_required_export_name_before_tls_hangs_up() -> None:
    s = session(tls=True, tls_required=True)
    with pytest.raises(NbdProtocolError, match="TLS"):
        s.receive_data(option(p.OPT_EXPORT_NAME, b"disk"))
    assert s.data_to_send() == b""  # EXPORT_NAME has no error reply: nothing about the export leaks


def test_tls_required_abort_is_acked() -> None:
    s = session(tls=True, tls_required=True)
    assert s.receive_data(option(p.OPT_ABORT)) == [Disconnect()]
    assert opt_replies(s.data_to_send()) == [(p.OPT_ABORT, p.REP_ACK, b"")]


def test_tls_required_needs_tls() -> None:
    with pytest.raises(LocalProtocolError):
        NbdServerSession({"disk": SIZE}, tls_required=True)


def test_whole_structured_conversation_split_everywhere() -> None:
    stream = (struct.pack(">I", 3) + option(p.OPT_STRUCTURED_REPLY)
              + option(p.OPT_SET_META_CONTEXT, meta_data(b"disk", b"base:allocation"))
              + option(p.OPT_GO, go_data(b"disk")) + request(p.CMD_BLOCK_STATUS, 1, 0, 4096)
              + request(p.CMD_READ, 2, 0, 512, p.CMD_FLAG_DF) + request(p.CMD_FLUSH, 3))
    ref = NbdServerSession({"disk": SIZE})
    ref_events = ref.receive_data(stream)
    assert ref_events == [Negotiated("disk", SIZE), BlockStatus(1, 0, 4096), Read(2, 0, 512), Flush(3)]
    for cut in range(0, len(stream) + 1, 3):
        s = NbdServerSession({"disk": SIZE})
        assert s.receive_data(stream[:cut]) + s.receive_data(stream[cut:]) == ref_events
