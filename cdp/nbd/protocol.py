"""Sans-I/O NBD server session: fixed-newstyle handshake, STARTTLS, option haggling, simple and
structured replies, `base:allocation` block status.

No sockets, no files. Feed received bytes to `receive_data()` (or receive
straight into `get_buffer()` and call `buffer_updated()`, which saves a copy);
both return validated events. Send what `data_to_send()` returns; answer each
request event with `reply(cookie, error, data)`, a READ that is all zeros with
`reply_hole()` and a BlockStatus with `reply_block_status()`. Anything the client gets wrong
that we can answer in-band (a range past the end, an unknown command) is
answered with an errno by the session itself and never becomes an event, so the
caller only sees requests it can execute as they stand.

Wire layout (all integers big-endian), from the NBD protocol spec (doc/proto.md)::

    server greeting  "NBDMAGIC" | "IHAVEOPT" | u16 handshake flags (FIXED_NEWSTYLE|NO_ZEROES)
    client flags     u32
    option request   "IHAVEOPT" | u32 option | u32 length | data
    option reply     u64 0x3e889045565a9 | u32 option | u32 reply type | u32 length | data
    meta option data u32 name length | name | u32 query count | (u32 length | query)*
    request          u32 0x25609513 | u16 flags | u16 type | u64 cookie | u64 offset | u32 length
                     [+ length bytes of payload for WRITE]
    simple reply     u32 0x67446698 | u32 error | u64 cookie [+ data for a successful READ]
    structured chunk u32 0x668e33ef | u16 flags (DONE) | u16 type | u64 cookie | u32 length | payload
      OFFSET_DATA    u64 offset | data               OFFSET_HOLE  u64 offset | u32 size
      BLOCK_STATUS   u32 context id | (u32 extent length | u32 status flags)+
      ERROR          u32 errno | u16 message length | message

States::

    CLIENT_FLAGS --flags--> OPTIONS --GO / EXPORT_NAME--> TRANSMISSION --DISC--> CLOSED
    OPTIONS --STARTTLS (StartTls event: the caller upgrades the stream)--> OPTIONS over TLS
    OPTIONS --ABORT--> CLOSED;   any state --protocol violation (NbdProtocolError)--> CLOSED

Once the client negotiated structured replies, a READ is answered by exactly one
OFFSET_DATA or OFFSET_HOLE chunk (so NBD_CMD_FLAG_DF always holds and SEND_DF is
advertised), a BLOCK_STATUS by one BLOCK_STATUS chunk, every error by an ERROR
chunk carrying a message, and other successes by simple replies (the spec allows
them when there is no payload). TLS: with `tls=True` the session accepts
STARTTLS and leaves it to the client; with `tls_required=True` it runs the
spec's FORCEDTLS mode: before TLS every option but STARTTLS and ABORT gets
NBD_REP_ERR_TLS_REQD and EXPORT_NAME hangs up, because it cannot be refused.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterable
from enum import Enum

from cdp.errors import LocalProtocolError, RemoteProtocolError
from cdp.nbd.events import (
    BlockStatus,
    Disconnect,
    Event,
    Flush,
    Negotiated,
    Read,
    StartTls,
    Trim,
    Write,
    WriteZeroes,
)

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# Option reply types.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6

# Info types.
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# Transmission flags.
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TRANSMISSION_FLAGS = (TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM
                      | TFLAG_SEND_WRITE_ZEROES)

# Command flags and types.
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

# Structured reply flags and chunk types.
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# The one metadata context we serve, its id in SET_META_CONTEXT replies and its status flags.
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# The errno values NBD defines; the numbers are the Linux ones. The spec asks for quota and
# file-size errors to be reported as ENOSPC; any other errno goes out as EIO.
NBD_ERRNOS = frozenset({errno.EPERM, errno.EIO, errno.ENOMEM, errno.EINVAL, errno.ENOSPC,
                        errno.EOVERFLOW, errno.ENOTSUP, errno.ESHUTDOWN})
_ERRNO_ALIASES = {errno.EDQUOT: errno.ENOSPC, errno.EFBIG: errno.ENOSPC}

MAX_REQUEST = 32 * 1024 * 1024  # largest READ/WRITE payload; advertised as the maximum block size
PREFERRED_BLOCK = 4096
MAX_OPTION_DATA = 64 * 1024  # names are at most 4096 bytes; nothing we accept needs more
MAX_OPTIONS = 256  # options haggled before transmission; stops a client looping forever
MAX_NAME = 4096
MAX_EXTENTS = 1 << 16  # per BLOCK_STATUS reply (the spec's ceiling is 2^20); clients ask again
RECV_BUFFER = 64 * 1024  # initial receive buffer: enough for the handshake of an idle connection
RECV_BUFFER_MAX = 4 << 20  # grows (instead of compacting) up to this; back to it when a huge WRITE is done
MIN_RECV_ROOM = 64 * 1024  # get_buffer() never offers less free space than this

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_OPT_HEADER = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_CHUNK_OFFSET = struct.Struct(">IHHQIQ")  # chunk header + the u64 offset of OFFSET_DATA
_HOLE = struct.Struct(">QI")
_ERROR = struct.Struct(">IH")
_EXTENT = struct.Struct(">II")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")


class NbdProtocolError(RemoteProtocolError):
    """The NBD client broke the protocol; the connection must be closed (flush data_to_send first)."""


class Phase(Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


# Which command flags each command may carry. SEND_FUA is advertised, so the spec says FUA must
# be accepted (and may be ignored) on every command. DF needs structured replies (checked apart).
_ALLOWED_FLAGS = {
    CMD_READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
    CMD_BLOCK_STATUS: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
}


class NbdServerSession:
    """One NBD connection, server side, without I/O.

    exports maps export name to size in bytes. Requests may be answered in
    any order (the client matches replies by cookie), but each exactly once.
    tls: the caller can upgrade the stream, so STARTTLS is accepted;
    tls_required: nothing but STARTTLS and ABORT is served before TLS.
    """

    def __init__(self, exports: dict[str, int], *, max_request: int = MAX_REQUEST, tls: bool = False,
                 tls_required: bool = False) -> None:
        for name, size in exports.items():
            if len(name.encode()) > MAX_NAME or not 0 <= size < 1 << 63:
                raise LocalProtocolError(f"bad NBD export {name!r} of size {size}")
        if tls_required and not tls:
            raise LocalProtocolError("NBD session cannot require TLS it cannot offer")
        self.exports = dict(exports)
        self.max_request = max_request
        self.tls_offered = tls
        self.tls_required = tls_required
        self.tls_active = False
        self.phase = Phase.CLIENT_FLAGS
        self.export: str | None = None
        self.size = 0
        self.no_zeroes = False
        self.structured = False
        self.meta_contexts: tuple[str, ...] = ()  # selected by the last SET_META_CONTEXT ...
        self._meta_export: str | None = None  # ... for this export
        self._options_seen = 0
        # Received bytes live in _rbuf[_start:_end]; _need is the size of the incomplete message
        # at _start (0 if unknown), so get_buffer() can make room for all of it at once.
        self._rbuf = bytearray(RECV_BUFFER)
        self._rview = memoryview(self._rbuf)
        self._start = 0
        self._end = 0
        self._need = 0
        self._out: list[bytes] = []
        # cookie -> (command, offset, length, flags) of requests handed out and not answered yet
        self._pending: dict[int, tuple[int, int, int, int]] = {}
        self._out.append(_U64.pack(NBDMAGIC) + _U64.pack(IHAVEOPT)
                         + _U16.pack(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))

    # --- public API -------------------------------------------------------------------------

    @property
    def pending(self) -> frozenset[int]:
        """Cookies of requests handed out and not yet replied to."""
        return frozenset(self._pending)

    @property
    def transmission_flags(self) -> int:
        """What the client is told it may use: SEND_DF only once structured replies are on."""
        return TRANSMISSION_FLAGS | (TFLAG_SEND_DF if self.structured else 0)

    def data_to_send(self) -> bytes:
        """Bytes to write to the client, in order; empties the outgoing buffer."""
        out = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Every event in the received bytes; NbdProtocolError (and CLOSED) on any violation.

        On a violation, requests decoded earlier in the same call are dropped
        unexecuted (they were never acknowledged). Bytes after the session closed
        (after DISC, ABORT or an error) are ignored. A StartTls event is always
        the last of its call.
        """
        if self.phase is Phase.CLOSED:
            return []
        n = len(data)
        self._make_room(n)
        self._rview[self._end:self._end + n] = data
        self._end += n
        return self._parse()

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Free space to receive into without a copy (asyncio.BufferedProtocol.get_buffer).

        Write received bytes to its start, then call buffer_updated(count). The
        view is only valid until the next call into the session.
        """
        room = max(sizehint, MIN_RECV_ROOM)
        if self._need:
            room = max(room, self._need - (self._end - self._start))
        self._make_room(room)
        return self._rview[self._end:]

    def buffer_updated(self, nbytes: int) -> list[Event]:
        """Like receive_data() for nbytes written into the view get_buffer() returned."""
        if self.phase is Phase.CLOSED:
            return []
        if not 0 <= nbytes <= len(self._rbuf) - self._end:
            raise LocalProtocolError(f"NBD buffer_updated({nbytes}) past the offered buffer")
        self._end += nbytes
        return self._parse()

    def _make_room(self, n: int) -> None:
        """At least n free bytes after _end: grow while small, else move the unparsed bytes to the
        front (a memmove of at most one partial request per RECV_BUFFER_MAX bytes received)."""
        capacity = len(self._rbuf)
        if capacity - self._end >= n:
            return
        avail = self._end - self._start
        if avail + n <= capacity and capacity >= RECV_BUFFER_MAX:
            # Never resizes the bytearray, so views a transport still holds stay valid.
            self._rview[:avail] = self._rview[self._start:self._end]
        else:
            bigger = bytearray(max(min(2 * capacity, RECV_BUFFER_MAX), avail + n))
            bigger[:avail] = self._rview[self._start:self._end]
            self._rbuf, self._rview = bigger, memoryview(bigger)
        self._start, self._end = 0, avail

    def _parse(self) -> list[Event]:
        events: list[Event] = []
        try:
            while self.phase is not Phase.CLOSED:
                if self.phase is Phase.CLIENT_FLAGS:
                    done = self._client_flags()
                elif self.phase is Phase.OPTIONS:
                    done = self._option(events)
                else:
                    done = self._request(events)
                if not done:
                    break
        except NbdProtocolError:
            # Requests decoded in this call are never handed out: the client gets no
            # reply for them and the connection goes down, so forget them too.
            for event in events:
                if isinstance(event, Read | Write | Flush | Trim | WriteZeroes | BlockStatus):
                    self._pending.pop(event.cookie, None)
            self.phase = Phase.CLOSED
            self._start = self._end = 0
            raise
        if self._start == self._end:
            self._start = self._end = 0
            if len(self._rbuf) > RECV_BUFFER_MAX:  # a huge WRITE is done: give the memory back
                self._rbuf = bytearray(RECV_BUFFER_MAX)
                self._rview = memoryview(self._rbuf)
        if self.phase is Phase.CLOSED:
            self._start = self._end = 0
        return events

    def reply(self, cookie: int, error: int = 0, data: bytes = b"", message: str = "") -> None:
        """Answer a request event. error is an errno (0 for success); data only for a successful READ.

        EDQUOT and EFBIG are sent as ENOSPC, other errnos NBD does not define as
        EIO; message reaches the client in structured mode. LocalProtocolError for
        an unknown cookie or data of the wrong length: a bug in the caller.
        """
        command, offset, length, _ = self._answering(cookie)
        if error < 0:
            raise LocalProtocolError(f"NBD reply with negative errno {error}")
        if error == 0 and command == CMD_READ:
            if len(data) != length:
                raise LocalProtocolError(f"NBD read reply of {len(data)} bytes for a {length}-byte read")
        elif data:
            raise LocalProtocolError("NBD reply data is only for a successful READ")
        elif error == 0 and command == CMD_BLOCK_STATUS:
            raise LocalProtocolError("NBD BLOCK_STATUS success needs reply_block_status()")
        del self._pending[cookie]
        if error:
            self._error(cookie, error, message)
        elif command != CMD_READ:
            self._out.append(_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie))
        elif self.structured:
            self._out.append(_CHUNK_OFFSET.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                                REPLY_TYPE_OFFSET_DATA, cookie, 8 + length, offset))
            self._out.append(data)
        else:
            self._out.append(_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie))
            self._out.append(data)

    def reply_hole(self, cookie: int) -> None:
        """Answer a READ whose whole range reads as zeros: one OFFSET_HOLE chunk, or zeros."""
        command, offset, length, _ = self._answering(cookie)
        if command != CMD_READ:
            raise LocalProtocolError("NBD reply_hole is only for a READ")
        del self._pending[cookie]
        if self.structured:
            self._out.append(_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE,
                                         cookie, _HOLE.size) + _HOLE.pack(offset, length))
        else:
            self._out.append(_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie) + bytes(length))

    def reply_block_status(self, cookie: int, extents: Iterable[tuple[int, int]]) -> None:
        """Answer a BlockStatus with consecutive (length, status flags) extents from its offset.

        Extents past the requested range are cut off (and after the first one
        for req_one), so the caller may describe more than was asked. At least one
        extent inside the range is required.
        """
        command, offset, length, flags = self._answering(cookie)
        if command != CMD_BLOCK_STATUS:
            raise LocalProtocolError("NBD reply_block_status is only for a BLOCK_STATUS")
        end = offset + length
        limit = 1 if flags & CMD_FLAG_REQ_ONE else MAX_EXTENTS
        pos = offset
        parts = [_U32.pack(BASE_ALLOCATION_ID)]
        for ext_len, status in extents:
            if ext_len <= 0 or not 0 <= status < 1 << 32:
                raise LocalProtocolError(f"NBD extent ({ext_len}, {status:#x}) is malformed")
            take = min(ext_len, end - pos)
            parts.append(_EXTENT.pack(take, status))
            pos += take
            if pos >= end or len(parts) > limit:
                break
        if len(parts) == 1:
            raise LocalProtocolError("NBD block status reply needs at least one extent")
        del self._pending[cookie]
        payload = b"".join(parts)
        self._out.append(_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS,
                                     cookie, len(payload)) + payload)

    def _answering(self, cookie: int) -> tuple[int, int, int, int]:
        if self.phase is not Phase.TRANSMISSION and not (self.phase is Phase.CLOSED and self._pending):
            raise LocalProtocolError(f"NBD reply in phase {self.phase.value}")
        try:
            return self._pending[cookie]
        except KeyError:
            raise LocalProtocolError(f"NBD reply to unknown cookie {cookie:#x}") from None

    # --- handshake --------------------------------------------------------------------------

    def _client_flags(self) -> bool:
        if self._end - self._start < 4:
            return False
        (flags,) = _U32.unpack_from(self._rbuf, self._start)
        self._start += 4
        if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            raise NbdProtocolError(f"NBD client sent unknown client flags {flags:#x}")
        if not flags & FLAG_C_FIXED_NEWSTYLE:
            raise NbdProtocolError("NBD client does not speak fixed newstyle negotiation")
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self.phase = Phase.OPTIONS
        return True

    def _option(self, events: list[Event]) -> bool:
        start = self._start
        if self._end - start < _OPT_HEADER.size:
            return False
        magic, option, length = _OPT_HEADER.unpack_from(self._rbuf, start)
        if magic != IHAVEOPT:
            raise NbdProtocolError(f"bad NBD option magic {magic:#x}")
        if length > MAX_OPTION_DATA:
            raise NbdProtocolError(f"NBD option {option} carries {length} bytes, over {MAX_OPTION_DATA}")
        end = start + _OPT_HEADER.size + length
        if self._end < end:
            self._need = end - start
            return False
        self._need = 0
        data = bytes(self._rview[start + _OPT_HEADER.size:end])
        self._start = end
        self._options_seen += 1
        if self._options_seen > MAX_OPTIONS:
            raise NbdProtocolError(f"NBD client sent more than {MAX_OPTIONS} options")
        if option == OPT_ABORT:
            self._opt_reply(option, REP_ACK)
            self.phase = Phase.CLOSED
            events.append(Disconnect())
        elif option == OPT_STARTTLS:
            return self._starttls(data, events)
        elif self.tls_required and not self.tls_active:
            if option == OPT_EXPORT_NAME:  # cannot be refused in-band: the spec says hang up
                raise NbdProtocolError("NBD client chose an export before starting the required TLS")
            self._opt_reply(option, REP_ERR_TLS_REQD, b"TLS is required: send NBD_OPT_STARTTLS first")
        elif option == OPT_EXPORT_NAME:
            self._export_name(data, events)
        elif option == OPT_LIST:
            if data:
                self._opt_reply(option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
            else:
                for name in self.exports:
                    encoded = name.encode()
                    self._opt_reply(option, REP_SERVER, _U32.pack(len(encoded)) + encoded)
                self._opt_reply(option, REP_ACK)
        elif option in (OPT_INFO, OPT_GO):
            self._info_or_go(option, data, events)
        elif option == OPT_STRUCTURED_REPLY:
            if data:
                self._opt_reply(option, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")
            else:
                self.structured = True
                self._opt_reply(option, REP_ACK)
        elif option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            self._meta_context(option, data)
        else:
            self._opt_reply(option, REP_ERR_UNSUP, b"option not supported")
        return True

    def _opt_reply(self, option: int, reply_type: int, data: bytes = b"") -> None:
        self._out.append(_OPT_REPLY.pack(OPT_REPLY_MAGIC, option, reply_type, len(data)) + data)

    def _starttls(self, data: bytes, events: list[Event]) -> bool:
        if not self.tls_offered:
            self._opt_reply(OPT_STARTTLS, REP_ERR_UNSUP, b"TLS is not configured on this server")
            return True
        if self.tls_active:
            self._opt_reply(OPT_STARTTLS, REP_ERR_INVALID, b"TLS is already active")
            return True
        if data:
            self._opt_reply(OPT_STARTTLS, REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
            return True
        if self._end > self._start:
            # The client must wait for our ACK before its TLS handshake; anything else is garbage.
            raise NbdProtocolError("NBD client sent data after NBD_OPT_STARTTLS without waiting")
        self._opt_reply(OPT_STARTTLS, REP_ACK)
        # The spec: nothing negotiated in clear text survives the upgrade.
        self.tls_active = True
        self.structured = False
        self.meta_contexts = ()
        self._meta_export = None
        events.append(StartTls())
        return False  # stop parsing: the next bytes are TLS records for the caller to decrypt

    def _lookup(self, raw: bytes) -> str | None:
        try:
            name = raw.decode()
        except UnicodeDecodeError:
            return None
        return name if name in self.exports else None

    def _export_name(self, data: bytes, events: list[Event]) -> None:
        # The old-style option has no error reply: an unknown export means hanging up.
        name = self._lookup(data)
        if name is None:
            raise NbdProtocolError(f"NBD client asked for unknown export {data[:100]!r}")
        size = self.exports[name]
        self._out.append(_U64.pack(size) + _U16.pack(self.transmission_flags))
        if not self.no_zeroes:
            self._out.append(bytes(124))
        self._enter_transmission(name, events)

    def _info_or_go(self, option: int, data: bytes, events: list[Event]) -> None:
        if len(data) < 6:
            self._opt_reply(option, REP_ERR_INVALID, b"option data too short")
            return
        (name_len,) = _U32.unpack_from(data)
        if name_len > len(data) - 6:
            self._opt_reply(option, REP_ERR_INVALID, b"export name length past the option data")
            return
        raw = data[4:4 + name_len]
        (count,) = _U16.unpack_from(data, 4 + name_len)
        if len(data) != 6 + name_len + 2 * count:
            self._opt_reply(option, REP_ERR_INVALID, b"information request count does not match length")
            return
        requests = {_U16.unpack_from(data, 6 + name_len + 2 * i)[0] for i in range(count)}
        name = self._lookup(raw)
        if name is None:
            self._opt_reply(option, REP_ERR_UNKNOWN, b"no such export")
            return
        size = self.exports[name]
        self._opt_reply(option, REP_INFO, _INFO_EXPORT.pack(INFO_EXPORT, size, self.transmission_flags))
        if INFO_BLOCK_SIZE in requests:
            self._opt_reply(option, REP_INFO, _INFO_BLOCK_SIZE.pack(
                INFO_BLOCK_SIZE, 1, PREFERRED_BLOCK, self.max_request))
        self._opt_reply(option, REP_ACK)
        if option == OPT_GO:
            self._enter_transmission(name, events)

    def _meta_context(self, option: int, data: bytes) -> None:
        if option == OPT_SET_META_CONTEXT:  # replaces the selection, even when it fails
            self.meta_contexts = ()
            self._meta_export = None
        if not self.structured:
            self._opt_reply(option, REP_ERR_INVALID, b"negotiate structured replies first")
            return
        parsed = _parse_meta_request(data)
        if parsed is None:
            self._opt_reply(option, REP_ERR_INVALID, b"malformed metadata context request")
            return
        raw, queries = parsed
        name = self._lookup(raw)
        if name is None:
            self._opt_reply(option, REP_ERR_UNKNOWN, b"no such export")
            return
        if option == OPT_LIST_META_CONTEXT:
            # No query lists everything; "base:" is the namespace wildcard the spec requires.
            if not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries):
                self._opt_reply(option, REP_META_CONTEXT, _U32.pack(0) + BASE_ALLOCATION.encode())
        elif BASE_ALLOCATION in queries:
            self.meta_contexts = (BASE_ALLOCATION,)
            self._meta_export = name
            self._opt_reply(option, REP_META_CONTEXT,
                            _U32.pack(BASE_ALLOCATION_ID) + BASE_ALLOCATION.encode())
        self._opt_reply(option, REP_ACK)

    def _enter_transmission(self, name: str, events: list[Event]) -> None:
        self.export = name
        self.size = self.exports[name]
        if self._meta_export != name:  # contexts were chosen for another export: none apply
            self.meta_contexts = ()
        self.phase = Phase.TRANSMISSION
        events.append(Negotiated(name, self.size))

    # --- transmission -----------------------------------------------------------------------

    def _request(self, events: list[Event]) -> bool:
        start = self._start
        if self._end - start < _REQUEST.size:
            return False
        magic, flags, command, cookie, offset, length = _REQUEST.unpack_from(self._rbuf, start)
        if magic != REQUEST_MAGIC:
            raise NbdProtocolError(f"bad NBD request magic {magic:#x}")
        end = start + _REQUEST.size
        if command == CMD_WRITE:
            if length > self.max_request:
                # The payload cannot be skipped safely: answer, then hang up.
                self._error(cookie, errno.EOVERFLOW, "write larger than the maximum payload")
                raise NbdProtocolError(f"NBD write of {length} bytes exceeds {self.max_request}")
            end += length
            if self._end < end:
                self._need = end - start
                return False
            self._need = 0
            data = bytes(self._rview[start + _REQUEST.size:end])  # the one copy of a payload
        else:
            data = b""
        self._start = end
        if command == CMD_DISC:
            self.phase = Phase.CLOSED
            events.append(Disconnect())
            return True
        if cookie in self._pending:
            raise NbdProtocolError(f"NBD cookie {cookie:#x} reused while its request is in flight")
        err, why = self._check(flags, command, offset, length)
        if err:
            self._error(cookie, err, why)
            return True
        fua = bool(flags & CMD_FLAG_FUA)
        event: Event
        if command == CMD_WRITE:
            event = Write(cookie, offset, data, fua)
        elif command == CMD_READ:
            event = Read(cookie, offset, length)
        elif command == CMD_FLUSH:
            event = Flush(cookie)
        elif command == CMD_TRIM:
            event = Trim(cookie, offset, length, fua)
        elif command == CMD_WRITE_ZEROES:
            event = WriteZeroes(cookie, offset, length, fua, bool(flags & CMD_FLAG_NO_HOLE))
        else:
            event = BlockStatus(cookie, offset, length, bool(flags & CMD_FLAG_REQ_ONE))
        self._pending[cookie] = (command, offset, length, flags)
        events.append(event)
        return True

    def _check(self, flags: int, command: int, offset: int, length: int) -> tuple[int, str]:
        """(errno, why) to refuse a request with, or (0, "") to hand it to the caller."""
        allowed = _ALLOWED_FLAGS.get(command)
        if allowed is None:
            return errno.EINVAL, f"command {command} is not supported"
        if flags & ~allowed or (flags & CMD_FLAG_DF and not self.structured):
            return errno.EINVAL, f"flags {flags:#x} are not valid for command {command}"
        if command == CMD_FLUSH:
            return 0, ""
        if command == CMD_BLOCK_STATUS and not self.meta_contexts:
            return errno.EINVAL, "no metadata context was negotiated for this export"
        if command == CMD_READ and length > self.max_request:
            return errno.EOVERFLOW, f"read larger than the maximum payload {self.max_request}"
        if length == 0:
            return errno.EINVAL, "zero-length request"
        if offset + length > self.size:
            # The spec asks for ENOSPC when a write would go past the end.
            err = errno.ENOSPC if command in (CMD_WRITE, CMD_WRITE_ZEROES) else errno.EINVAL
            return err, "request goes past the end of the export"
        return 0, ""

    def _error(self, cookie: int, err: int, message: str = "") -> None:
        """An error reply: an ERROR chunk once structured replies are on, else a simple reply."""
        err = _ERRNO_ALIASES.get(err, err)
        if err not in NBD_ERRNOS:
            err = errno.EIO
        if self.structured:
            text = message.encode()[:MAX_NAME]
            self._out.append(_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie,
                                         _ERROR.size + len(text)) + _ERROR.pack(err, len(text)) + text)
        else:
            self._out.append(_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, err, cookie))


def _parse_meta_request(data: bytes) -> tuple[bytes, list[str]] | None:
    """(export name, queries) of a LIST/SET_META_CONTEXT request, or None if malformed."""
    if len(data) < 8:
        return None
    (name_len,) = _U32.unpack_from(data)
    if name_len > MAX_NAME or 8 + name_len > len(data):
        return None
    raw = data[4:4 + name_len]
    (count,) = _U32.unpack_from(data, 4 + name_len)
    pos = 8 + name_len
    queries = []
    for _ in range(count):  # every query takes at least 4 bytes, so this ends with the data
        if pos + 4 > len(data):
            return None
        (qlen,) = _U32.unpack_from(data, pos)
        pos += 4
        if qlen > MAX_NAME or pos + qlen > len(data):
            return None
        try:
            queries.append(data[pos:pos + qlen].decode())
        except UnicodeDecodeError:
            return None
        pos += qlen
    if pos != len(data):
        return None
    return raw, queries
