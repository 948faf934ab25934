"""Sans-I/O NBD server session: fixed-newstyle handshake, option haggling, simple replies.

No sockets, no files. Feed received bytes to `receive_data()`, which returns
validated events; send what `data_to_send()` returns; answer each request event
with `reply(cookie, error, data)`. Anything the client gets wrong that we can
answer in-band (a range past the end, an unknown command) is answered with an
errno by the session itself and never becomes an event, so the caller only sees
requests it can execute as they stand.

Wire layout (all integers big-endian), from the NBD protocol spec (doc/proto.md)::

    server greeting  "NBDMAGIC" | "IHAVEOPT" | u16 handshake flags (FIXED_NEWSTYLE|NO_ZEROES)
    client flags     u32
    option request   "IHAVEOPT" | u32 option | u32 length | data
    option reply     u64 0x3e889045565a9 | u32 option | u32 reply type | u32 length | data
    request          u32 0x25609513 | u16 flags | u16 type | u64 cookie | u64 offset | u32 length
                     [+ length bytes of payload for WRITE]
    simple reply     u32 0x67446698 | u32 error | u64 cookie [+ data for a successful READ]

States::

    CLIENT_FLAGS --flags--> OPTIONS --GO / EXPORT_NAME--> TRANSMISSION --DISC--> CLOSED
    OPTIONS --ABORT--> CLOSED;   any state --protocol violation (NbdProtocolError)--> CLOSED

Only simple replies are spoken: NBD_OPT_STRUCTURED_REPLY is refused with
NBD_REP_ERR_UNSUP (the spec allows it), so SEND_DF is not advertised either.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from enum import Enum

from cdp.errors import LocalProtocolError, RemoteProtocolError

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

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

# Option reply types.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
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
TRANSMISSION_FLAGS = (TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM
                      | TFLAG_SEND_WRITE_ZEROES)

# Command flags and types.
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6

# The errno values NBD defines; the numbers are the Linux ones.
NBD_ERRNOS = frozenset({errno.EPERM, errno.EIO, errno.ENOMEM, errno.EINVAL, errno.ENOSPC,
                        errno.EOVERFLOW, errno.ENOTSUP, errno.ESHUTDOWN})

MAX_REQUEST = 32 * 1024 * 1024  # largest READ/WRITE payload; advertised as the maximum block size
PREFERRED_BLOCK = 4096
MAX_OPTION_DATA = 64 * 1024  # names are at most 4096 bytes; nothing we accept needs more
MAX_OPTIONS = 256  # options haggled before transmission; stops a client looping forever
MAX_NAME = 4096

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_OPT_HEADER = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")


class NbdProtocolError(RemoteProtocolError):
    """The NBD client broke the protocol; the connection must be closed (flush data_to_send first)."""


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Negotiated:
    """Handshake done: transmission starts on this export."""

    export: str
    size: int


@dataclass(frozen=True)
class Read:
    """Read length bytes at offset; reply with exactly that many bytes."""

    cookie: int
    offset: int
    length: int


@dataclass(frozen=True)
class Write:
    """Write data at offset; fua asks for it to be durable before the reply."""

    cookie: int
    offset: int
    data: bytes
    fua: bool = False


@dataclass(frozen=True)
class Flush:
    """Make every completed write durable before replying."""

    cookie: int


@dataclass(frozen=True)
class Trim:
    """The client no longer needs this range; its contents become unspecified."""

    cookie: int
    offset: int
    length: int
    fua: bool = False


@dataclass(frozen=True)
class WriteZeroes:
    """Zero a range; no_hole forbids deallocating it (punching a hole)."""

    cookie: int
    offset: int
    length: int
    fua: bool = False
    no_hole: bool = False


@dataclass(frozen=True)
class Disconnect:
    """The client ended the session (NBD_CMD_DISC or NBD_OPT_ABORT); close after flushing."""


Event = Negotiated | Read | Write | Flush | Trim | WriteZeroes | Disconnect


class Phase(Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


# Which command flags each command may carry (we negotiate neither DF nor FAST_ZERO).
_ALLOWED_FLAGS = {
    CMD_READ: 0,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: 0,
    CMD_FLUSH: 0,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
}


class NbdServerSession:
    """One NBD connection, server side, without I/O.

    exports maps export name to size in bytes. Requests may be answered in
    any order (the client matches replies by cookie), but each exactly once.
    """

    def __init__(self, exports: dict[str, int], *, max_request: int = MAX_REQUEST) -> None:
        for name, size in exports.items():
            if len(name.encode()) > MAX_NAME or not 0 <= size < 1 << 63:
                raise LocalProtocolError(f"bad NBD export {name!r} of size {size}")
        self.exports = dict(exports)
        self.max_request = max_request
        self.phase = Phase.CLIENT_FLAGS
        self.export: str | None = None
        self.size = 0
        self.no_zeroes = False
        self._options_seen = 0
        self._buf = bytearray()
        self._out = bytearray()
        self._pending: dict[int, tuple[int, int]] = {}  # cookie -> (command, read length)
        self._out += _U64.pack(NBDMAGIC) + _U64.pack(IHAVEOPT)
        self._out += _U16.pack(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    # --- public API -------------------------------------------------------------------------

    @property
    def pending(self) -> frozenset[int]:
        """Cookies of requests handed out and not yet replied to."""
        return frozenset(self._pending)

    def data_to_send(self) -> bytes:
        """Bytes to write to the client, in order; empties the outgoing buffer."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> list[Event]:
        """Every event in the received bytes; NbdProtocolError (and CLOSED) on any violation.

        On a violation, requests decoded earlier in the same call are dropped
        unexecuted (they were never acknowledged). Bytes after the session closed
        (after DISC, ABORT or an error) are ignored.
        """
        if self.phase is Phase.CLOSED:
            return []
        self._buf += data
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
                if isinstance(event, Read | Write | Flush | Trim | WriteZeroes):
                    self._pending.pop(event.cookie, None)
            self.phase = Phase.CLOSED
            self._buf.clear()
            raise
        if self.phase is Phase.CLOSED:
            self._buf.clear()
        return events

    def reply(self, cookie: int, error: int = 0, data: bytes = b"") -> None:
        """Answer a request event. error is an errno (0 for success); data only for a successful READ.

        Errnos NBD does not define are sent as EIO. LocalProtocolError for an
        unknown cookie or data of the wrong length: a bug in the caller.
        """
        if self.phase is not Phase.TRANSMISSION and not (self.phase is Phase.CLOSED and self._pending):
            raise LocalProtocolError(f"NBD reply in phase {self.phase.value}")
        if cookie not in self._pending:
            raise LocalProtocolError(f"NBD reply to unknown cookie {cookie:#x}")
        command, length = self._pending[cookie]
        if error < 0:
            raise LocalProtocolError(f"NBD reply with negative errno {error}")
        if error == 0 and command == CMD_READ:
            if len(data) != length:
                raise LocalProtocolError(f"NBD read reply of {len(data)} bytes for a {length}-byte read")
        elif data:
            raise LocalProtocolError("NBD reply data is only for a successful READ")
        del self._pending[cookie]
        if error and error not in NBD_ERRNOS:
            error = errno.EIO
        self._out += _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)
        if data:
            self._out += data

    # --- handshake --------------------------------------------------------------------------

    def _client_flags(self) -> bool:
        if len(self._buf) < 4:
            return False
        (flags,) = _U32.unpack_from(self._buf)
        del self._buf[:4]
        if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            raise NbdProtocolError(f"NBD client sent unknown client flags {flags:#x}")
        if not flags & FLAG_C_FIXED_NEWSTYLE:
            raise NbdProtocolError("NBD client does not speak fixed newstyle negotiation")
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self.phase = Phase.OPTIONS
        return True

    def _option(self, events: list[Event]) -> bool:
        if len(self._buf) < _OPT_HEADER.size:
            return False
        magic, option, length = _OPT_HEADER.unpack_from(self._buf)
        if magic != IHAVEOPT:
            raise NbdProtocolError(f"bad NBD option magic {magic:#x}")
        if length > MAX_OPTION_DATA:
            raise NbdProtocolError(f"NBD option {option} carries {length} bytes, over {MAX_OPTION_DATA}")
        if len(self._buf) < _OPT_HEADER.size + length:
            return False
        data = bytes(self._buf[_OPT_HEADER.size:_OPT_HEADER.size + length])
        del self._buf[:_OPT_HEADER.size + length]
        self._options_seen += 1
        if self._options_seen > MAX_OPTIONS:
            raise NbdProtocolError(f"NBD client sent more than {MAX_OPTIONS} options")
        if option == OPT_EXPORT_NAME:
            self._export_name(data, events)
        elif option == OPT_ABORT:
            self._opt_reply(option, REP_ACK)
            self.phase = Phase.CLOSED
            events.append(Disconnect())
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
            self._opt_reply(option, REP_ERR_UNSUP, b"structured replies are not supported")
        else:
            self._opt_reply(option, REP_ERR_UNSUP, b"option not supported")
        return True

    def _opt_reply(self, option: int, reply_type: int, data: bytes = b"") -> None:
        self._out += _OPT_REPLY.pack(OPT_REPLY_MAGIC, option, reply_type, len(data)) + data

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
        self._out += _U64.pack(size) + _U16.pack(TRANSMISSION_FLAGS)
        if not self.no_zeroes:
            self._out += bytes(124)
        self._start(name, events)

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
        self._opt_reply(option, REP_INFO, _INFO_EXPORT.pack(INFO_EXPORT, size, TRANSMISSION_FLAGS))
        if INFO_BLOCK_SIZE in requests:
            self._opt_reply(option, REP_INFO, _INFO_BLOCK_SIZE.pack(
                INFO_BLOCK_SIZE, 1, PREFERRED_BLOCK, self.max_request))
        self._opt_reply(option, REP_ACK)
        if option == OPT_GO:
            self._start(name, events)

    def _start(self, name: str, events: list[Event]) -> None:
        self.export = name
        self.size = self.exports[name]
        self.phase = Phase.TRANSMISSION
        events.append(Negotiated(name, self.size))

    # --- transmission -----------------------------------------------------------------------

    def _request(self, events: list[Event]) -> bool:
        if len(self._buf) < _REQUEST.size:
            return False
        magic, flags, command, cookie, offset, length = _REQUEST.unpack_from(self._buf)
        if magic != REQUEST_MAGIC:
            raise NbdProtocolError(f"bad NBD request magic {magic:#x}")
        if command == CMD_WRITE:
            if length > self.max_request:
                # The payload cannot be skipped safely: answer, then hang up.
                self._error(cookie, errno.EOVERFLOW)
                raise NbdProtocolError(f"NBD write of {length} bytes exceeds {self.max_request}")
            if len(self._buf) < _REQUEST.size + length:
                return False
            data = bytes(self._buf[_REQUEST.size:_REQUEST.size + length])
            del self._buf[:_REQUEST.size + length]
        else:
            data = b""
            del self._buf[:_REQUEST.size]
        if command == CMD_DISC:
            self.phase = Phase.CLOSED
            events.append(Disconnect())
            return True
        if cookie in self._pending:
            raise NbdProtocolError(f"NBD cookie {cookie:#x} reused while its request is in flight")
        err = self._check(flags, command, offset, length)
        if err:
            self._error(cookie, err)
            return True
        fua = bool(flags & CMD_FLAG_FUA)
        event: Event
        if command == CMD_READ:
            event = Read(cookie, offset, length)
        elif command == CMD_WRITE:
            event = Write(cookie, offset, data, fua)
        elif command == CMD_FLUSH:
            event = Flush(cookie)
        elif command == CMD_TRIM:
            event = Trim(cookie, offset, length, fua)
        else:
            event = WriteZeroes(cookie, offset, length, fua, bool(flags & CMD_FLAG_NO_HOLE))
        self._pending[cookie] = (command, length if command == CMD_READ else 0)
        events.append(event)
        return True

    def _check(self, flags: int, command: int, offset: int, length: int) -> int:
        """The errno to refuse a request with, or 0 to hand it to the caller."""
        allowed = _ALLOWED_FLAGS.get(command)
        if allowed is None or flags & ~allowed:
            return errno.EINVAL
        if command == CMD_FLUSH:
            return 0
        if command == CMD_READ and length > self.max_request:
            return errno.EOVERFLOW
        if length == 0:
            return errno.EINVAL
        if offset + length > self.size:
            # The spec asks for ENOSPC when a write would go past the end.
            return errno.ENOSPC if command in (CMD_WRITE, CMD_WRITE_ZEROES) else errno.EINVAL
        return 0

    def _error(self, cookie: int, err: int) -> None:
        self._out += _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, err, cookie)
