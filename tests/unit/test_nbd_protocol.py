"""The sans-I/O NBD server session: exact handshake bytes, option replies, requests split anywhere.

Structured replies, metadata contexts, block status and STARTTLS are in
test_nbd_structured.py.
"""

from __future__ import annotations

import errno
import struct

import pytest

from cdp.errors import LocalProtocolError, ProtocolError
from cdp.nbd import spec as p
from cdp.nbd.events import Disconnect, Flush, Negotiated, Read, Trim, Write, WriteZeroes
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


def request(cmd: int, cookie: int = 1, offset: int = 0, length: int = 0, flags: int = 0,
            payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


def parse_opt_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while data:
        magic, opt, rtype, length = struct.unpack_from(">QIII", data)
        assert magic == p.OPT_REPLY_MAGIC
        out.append((opt, rtype, data[20:20 + length]))
        data = data[20 + length:]
    return out


def simple_reply(data: bytes) -> tuple[int, int, bytes]:
    magic, error, cookie = struct.unpack_from(">IIQ", data)
    assert magic == p.SIMPLE_REPLY_MAGIC
    return error, cookie, data[16:]


def negotiating() -> NbdServerSession:
    s = NbdServerSession({"disk": SIZE, "": 4096})
    s.data_to_send()
    assert s.receive_data(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES)) == []
    return s


def transmitting() -> NbdServerSession:
    s = negotiating()
    events = s.receive_data(option(p.OPT_GO, go_data(b"disk")))
    assert events == [Negotiated("disk", SIZE)]
    s.data_to_send()
    return s


# --- handshake ---------------------------------------------------------------------------------


def test_greeting_bytes() -> None:
    s = NbdServerSession({"disk": SIZE})
    assert s.data_to_send() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert s.data_to_send() == b""


@pytest.mark.parametrize("flags", [0, p.FLAG_C_NO_ZEROES, 1 << 2, 0xFFFFFFFF])
def test_bad_client_flags_close(flags: int) -> None:
    s = NbdServerSession({"disk": SIZE})
    with pytest.raises(NbdProtocolError):
        s.receive_data(struct.pack(">I", flags))
    assert s.phase is Phase.CLOSED
    assert s.receive_data(b"anything") == []


def test_error_is_a_cdp_protocol_error() -> None:
    assert issubclass(NbdProtocolError, ProtocolError)


def test_go_replies_info_export_then_ack() -> None:
    s = negotiating()
    events = s.receive_data(option(p.OPT_GO, go_data(b"disk")))
    assert events == [Negotiated("disk", SIZE)]
    replies = parse_opt_replies(s.data_to_send())
    assert replies == [
        (p.OPT_GO, p.REP_INFO, struct.pack(">HQH", p.INFO_EXPORT, SIZE, FLAGS)),
        (p.OPT_GO, p.REP_ACK, b""),
    ]
    assert s.phase is Phase.TRANSMISSION and s.export == "disk"


def test_info_with_block_size_stays_in_options() -> None:
    s = negotiating()
    assert s.receive_data(option(p.OPT_INFO, go_data(b"", p.INFO_BLOCK_SIZE, 2))) == []
    replies = parse_opt_replies(s.data_to_send())
    assert replies == [
        (p.OPT_INFO, p.REP_INFO, struct.pack(">HQH", p.INFO_EXPORT, 4096, FLAGS)),
        (p.OPT_INFO, p.REP_INFO, struct.pack(">HIII", p.INFO_BLOCK_SIZE, 1, 4096, 32 << 20)),
        (p.OPT_INFO, p.REP_ACK, b""),
    ]
    assert s.phase is Phase.OPTIONS


def test_go_unknown_export_and_malformed() -> None:
    s = negotiating()
    s.receive_data(option(p.OPT_GO, go_data(b"nope")))
    assert [r[1] for r in parse_opt_replies(s.data_to_send())] == [p.REP_ERR_UNKNOWN]
    s.receive_data(option(p.OPT_GO, b"\x00\x00"))
    s.receive_data(option(p.OPT_GO, struct.pack(">I", 100) + b"disk\x00\x00"))
    s.receive_data(option(p.OPT_GO, go_data(b"disk") + b"\x00"))
    s.receive_data(option(p.OPT_GO, go_data(b"\xff\xfe")))
    expected = [p.REP_ERR_INVALID] * 3 + [p.REP_ERR_UNKNOWN]
    assert [r[1] for r in parse_opt_replies(s.data_to_send())] == expected
    assert s.phase is Phase.OPTIONS


def test_list() -> None:
    s = negotiating()
    s.receive_data(option(p.OPT_LIST))
    assert parse_opt_replies(s.data_to_send()) == [
        (p.OPT_LIST, p.REP_SERVER, b"\x00\x00\x00\x04disk"),
        (p.OPT_LIST, p.REP_SERVER, b"\x00\x00\x00\x00"),
        (p.OPT_LIST, p.REP_ACK, b""),
    ]
    s.receive_data(option(p.OPT_LIST, b"x"))
    assert [r[1] for r in parse_opt_replies(s.data_to_send())] == [p.REP_ERR_INVALID]


@pytest.mark.parametrize("opt", [p.OPT_STARTTLS, 4, 11, 99, 0xFFFFFFFF])
def test_unsupported_options(opt: int) -> None:
    s = negotiating()
    assert s.receive_data(option(opt, b"xyz")) == []
    [(o, rtype, _)] = parse_opt_replies(s.data_to_send())
    assert (o, rtype) == (opt, p.REP_ERR_UNSUP)
    assert s.phase is Phase.OPTIONS


def test_abort() -> None:
    s = negotiating()
    assert s.receive_data(option(p.OPT_ABORT)) == [Disconnect()]
    assert parse_opt_replies(s.data_to_send()) == [(p.OPT_ABORT, p.REP_ACK, b"")]
    assert s.phase is Phase.CLOSED


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name(no_zeroes: bool) -> None:
    s = NbdServerSession({"disk": SIZE})
    s.data_to_send()
    s.receive_data(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | (p.FLAG_C_NO_ZEROES if no_zeroes else 0)))
    assert s.receive_data(option(p.OPT_EXPORT_NAME, b"disk")) == [Negotiated("disk", SIZE)]
    expected = struct.pack(">QH", SIZE, FLAGS) + (b"" if no_zeroes else bytes(124))
    assert s.data_to_send() == expected


def test_export_name_unknown_closes() -> None:
    s = negotiating()
    with pytest.raises(NbdProtocolError):
        s.receive_data(option(p.OPT_EXPORT_NAME, b"nope"))


def test_bad_option_magic_and_oversized_option() -> None:
    s = negotiating()
    with pytest.raises(NbdProtocolError, match="magic"):
        s.receive_data(b"IHAVEOPX" + bytes(8))
    s = negotiating()
    with pytest.raises(NbdProtocolError, match="bytes"):
        s.receive_data(struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, 1 << 30))


def test_too_many_options() -> None:
    s = negotiating()
    with pytest.raises(NbdProtocolError, match="options"):
        s.receive_data(option(p.OPT_LIST) * (p.MAX_OPTIONS + 1))


def test_whole_handshake_split_at_every_point() -> None:
    stream = (struct.pack(">I", 3) + option(p.OPT_LIST) + option(p.OPT_GO, go_data(b"disk", 3))
              + request(p.CMD_READ, 7, 512, 512))
    reference = NbdServerSession({"disk": SIZE})
    ref_events = reference.receive_data(stream)
    ref_out = reference.data_to_send()
    assert ref_events == [Negotiated("disk", SIZE), Read(7, 512, 512)]
    for cut in range(len(stream) + 1):
        s = NbdServerSession({"disk": SIZE})
        events = s.receive_data(stream[:cut]) + s.receive_data(stream[cut:])
        assert events == ref_events
        assert s.data_to_send() == ref_out


# --- transmission ------------------------------------------------------------------------------


def test_read_reply() -> None:
    s = transmitting()
    assert s.receive_data(request(p.CMD_READ, 0xDEADBEEF, 4096, 8)) == [Read(0xDEADBEEF, 4096, 8)]
    assert s.pending == {0xDEADBEEF}
    s.reply(0xDEADBEEF, data=b"abcdefgh")
    assert s.data_to_send() == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 0xDEADBEEF) + b"abcdefgh"
    assert s.pending == frozenset()


def test_write_split_byte_by_byte() -> None:
    s = transmitting()
    payload = bytes(range(256)) * 4
    stream = request(p.CMD_WRITE, 5, 1024, len(payload), p.CMD_FLAG_FUA, payload)
    events = []
    for i in range(len(stream)):
        events += s.receive_data(stream[i:i + 1])
    assert events == [Write(5, 1024, payload, True)]
    s.reply(5)
    assert simple_reply(s.data_to_send()) == (0, 5, b"")


def test_other_commands() -> None:
    s = transmitting()
    stream = (request(p.CMD_FLUSH, 1) + request(p.CMD_TRIM, 2, 0, 4096)
              + request(p.CMD_WRITE_ZEROES, 3, 4096, 4096, p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_FUA)
              + request(p.CMD_DISC, 4) + request(p.CMD_READ, 9, 0, 1))
    assert s.receive_data(stream) == [
        Flush(1), Trim(2, 0, 4096, False), WriteZeroes(3, 4096, 4096, True, True), Disconnect()]
    assert s.phase is Phase.CLOSED
    # Requests in flight before DISC are still answered.
    for cookie in (1, 2, 3):
        s.reply(cookie)
    assert len(s.data_to_send()) == 3 * 16


@pytest.mark.parametrize(("cmd", "offset", "length", "flags", "err"), [
    (p.CMD_READ, SIZE - 1, 2, 0, errno.EINVAL),
    (p.CMD_READ, 0, 0, 0, errno.EINVAL),
    (p.CMD_READ, 0, (32 << 20) + 1, 0, errno.EOVERFLOW),
    (p.CMD_READ, (1 << 64) - 1, 1, 0, errno.EINVAL),
    (p.CMD_READ, 0, 1, p.CMD_FLAG_DF, errno.EINVAL),  # DF needs structured replies
    (p.CMD_READ, 0, 1, p.CMD_FLAG_NO_HOLE, errno.EINVAL),
    (p.CMD_TRIM, SIZE, 1, 0, errno.EINVAL),
    (p.CMD_TRIM, 0, 1, p.CMD_FLAG_NO_HOLE, errno.EINVAL),
    (p.CMD_WRITE_ZEROES, SIZE - 512, 1024, 0, errno.ENOSPC),
    (p.CMD_WRITE_ZEROES, 0, 1, 1 << 4, errno.EINVAL),  # FAST_ZERO was not negotiated
    (p.CMD_FLUSH, 0, 0, p.CMD_FLAG_NO_HOLE, errno.EINVAL),
    (5, 0, 1, 0, errno.EINVAL),  # CACHE not advertised
    (7, 0, 1, 0, errno.EINVAL),  # BLOCK_STATUS without meta contexts
    (0xFFFF, 0, 1, 0, errno.EINVAL),
])
def test_refused_requests_are_answered_in_band(cmd: int, offset: int, length: int, flags: int,
                                               err: int) -> None:
    s = transmitting()
    assert s.receive_data(request(cmd, 42, offset, length, flags)) == []
    assert simple_reply(s.data_to_send()) == (err, 42, b"")
    assert s.phase is Phase.TRANSMISSION and s.pending == frozenset()


def test_fua_is_accepted_on_every_command() -> None:
    # SEND_FUA is advertised, so the spec says the server MUST accept FUA on any command.
    s = transmitting()
    events = s.receive_data(request(p.CMD_READ, 1, 0, 8, p.CMD_FLAG_FUA)
                            + request(p.CMD_FLUSH, 2, 0, 0, p.CMD_FLAG_FUA))
    assert events == [Read(1, 0, 8), Flush(2)]
    assert s.data_to_send() == b""


def test_write_past_end_consumes_payload_and_says_enospc() -> None:
    s = transmitting()
    events = s.receive_data(request(p.CMD_WRITE, 1, SIZE - 2, 4, payload=b"wxyz") + request(p.CMD_FLUSH, 2))
    assert events == [Flush(2)]
    assert simple_reply(s.data_to_send()) == (errno.ENOSPC, 1, b"")


def test_oversized_write_answers_then_closes() -> None:
    s = transmitting()
    with pytest.raises(NbdProtocolError, match="exceeds"):
        s.receive_data(request(p.CMD_WRITE, 3, 0, (32 << 20) + 1))
    assert simple_reply(s.data_to_send()) == (errno.EOVERFLOW, 3, b"")
    assert s.phase is Phase.CLOSED


def test_bad_request_magic() -> None:
    s = transmitting()
    with pytest.raises(NbdProtocolError, match="magic"):
        s.receive_data(b"\x25\x60\x95\x14" + bytes(24))


def test_reused_cookie_in_flight() -> None:
    s = transmitting()
    s.receive_data(request(p.CMD_READ, 1, 0, 1))
    with pytest.raises(NbdProtocolError, match="cookie"):
        s.receive_data(request(p.CMD_READ, 1, 0, 1))


def test_reply_misuse_is_local_error() -> None:
    s = transmitting()
    with pytest.raises(LocalProtocolError):
        s.reply(1)
    s.receive_data(request(p.CMD_READ, 1, 0, 4) + request(p.CMD_FLUSH, 2))
    with pytest.raises(LocalProtocolError):
        s.reply(1, data=b"abc")
    with pytest.raises(LocalProtocolError):
        s.reply(2, data=b"x")
    with pytest.raises(LocalProtocolError):
        s.reply(2, error=-1)
    assert s.data_to_send() == b""
    s.reply(1, error=errno.EIO)
    s.reply(2, error=errno.EBADF)  # not an NBD errno: sent as EIO
    out = s.data_to_send()
    assert simple_reply(out[:16]) == (errno.EIO, 1, b"")
    assert simple_reply(out[16:]) == (errno.EIO, 2, b"")
    s.receive_data(request(p.CMD_WRITE, 3, 0, 1, payload=b"x") + request(p.CMD_WRITE, 4, 0, 1, payload=b"y"))
    s.reply(3, error=errno.EDQUOT)  # the spec: quota and file size errors are ENOSPC
    s.reply(4, error=errno.EFBIG)
    out = s.data_to_send()
    assert [simple_reply(out[i:i + 16])[0] for i in (0, 16)] == [errno.ENOSPC, errno.ENOSPC]


def test_reply_before_transmission() -> None:
    s = negotiating()
    with pytest.raises(LocalProtocolError):
        s.reply(1)


def test_bad_exports_refused() -> None:
    with pytest.raises(LocalProtocolError):
        NbdServerSession({"x" * 5000: 1})
    with pytest.raises(LocalProtocolError):
        NbdServerSession({"x": -1})


# --- zero-copy reception (get_buffer / buffer_updated) ------------------------------------------


def feed_via_buffer(s: NbdServerSession, stream: bytes, sizes: list[int]) -> list[object]:
    """Deliver stream like asyncio.BufferedProtocol would, at most sizes[i] bytes per call."""
    events: list[object] = []
    pos, i = 0, 0
    while pos < len(stream):
        view = s.get_buffer(-1)
        n = min(len(view), sizes[i % len(sizes)], len(stream) - pos)
        view[:n] = stream[pos:pos + n]
        events += s.buffer_updated(n)
        pos += n
        i += 1
    return events


def test_buffer_reception_matches_receive_data() -> None:
    payloads = [bytes([i]) * (i * 1000 + 1) for i in range(1, 40)]
    stream = struct.pack(">I", 3) + option(p.OPT_GO, go_data(b"disk"))
    for i, payload in enumerate(payloads):
        stream += request(p.CMD_WRITE, i, i * 4096, len(payload), payload=payload)
        stream += request(p.CMD_READ, 1000 + i, 0, 512)
    reference = NbdServerSession({"disk": SIZE})
    expected = reference.receive_data(stream)
    assert len(expected) == 1 + 2 * len(payloads)
    for sizes in ([1, 999, 13], [7, 300, 5000], [65536], [1 << 20]):
        s = NbdServerSession({"disk": SIZE})
        assert feed_via_buffer(s, stream, sizes) == expected


def test_buffer_grows_for_a_large_write_and_shrinks_after() -> None:
    big = p.RECV_BUFFER_MAX + 12345
    s = NbdServerSession({"disk": 2 * big}, max_request=2 * big)
    payload = bytes(range(256)) * (big // 256) + b"x" * (big % 256)
    stream = struct.pack(">I", 3) + option(p.OPT_GO, go_data(b"disk"))
    header = request(p.CMD_WRITE, 9, 0, len(payload))
    assert len(s.get_buffer(-1)) >= p.MIN_RECV_ROOM
    assert feed_via_buffer(s, stream + header + payload[:1000], [1 << 16]) == [Negotiated("disk", 2 * big)]
    # The rest of the payload fits in one offered buffer: one recv_into could take it all.
    assert len(s.get_buffer(-1)) >= len(payload) - 1000
    assert feed_via_buffer(s, payload[1000:], [1 << 30]) == [Write(9, 0, payload)]
    assert len(s.get_buffer(-1)) <= p.RECV_BUFFER_MAX


def test_buffer_updated_past_the_offer_is_a_local_error() -> None:
    s = NbdServerSession({"disk": SIZE})
    view = s.get_buffer(-1)
    with pytest.raises(LocalProtocolError):
        s.buffer_updated(len(view) + 1)
