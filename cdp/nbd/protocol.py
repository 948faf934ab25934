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

The session is split in two along the protocol's phases: option negotiation
is its base class Handshake (cdp.nbd.handshake), transmission (requests and
replies) is here; the wire layout and every number live in cdp.nbd.spec.

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
from collections.abc import Iterable

from cdp.errors import LocalProtocolError
from cdp.nbd.events import (
    BlockStatus,
    Disconnect,
    Event,
    Flush,
    Read,
    Trim,
    Write,
    WriteZeroes,
)
from cdp.nbd.handshake import Handshake
from cdp.nbd.spec import (
    ALLOWED_FLAGS,
    BASE_ALLOCATION_ID,
    CHUNK,
    CHUNK_OFFSET,
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_FLAG_DF,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    ERRNO_ALIASES,
    ERROR,
    EXTENT,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    HOLE,
    IHAVEOPT,
    MAX_EXTENTS,
    MAX_NAME,
    MAX_REQUEST,
    MIN_RECV_ROOM,
    NBD_ERRNOS,
    NBDMAGIC,
    RECV_BUFFER,
    RECV_BUFFER_MAX,
    REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR,
    REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    U16,
    U32,
    U64,
    NbdProtocolError,
    Phase,
)


class NbdServerSession(Handshake):
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
        self._out.append(U64.pack(NBDMAGIC) + U64.pack(IHAVEOPT)
                         + U16.pack(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))

    # --- public API -------------------------------------------------------------------------

    @property
    def pending(self) -> frozenset[int]:
        """Cookies of requests handed out and not yet replied to."""
        return frozenset(self._pending)

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
            self._out.append(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie))
        elif self.structured:
            self._out.append(CHUNK_OFFSET.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                                REPLY_TYPE_OFFSET_DATA, cookie, 8 + length, offset))
            self._out.append(data)
        else:
            self._out.append(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie))
            self._out.append(data)

    def reply_hole(self, cookie: int) -> None:
        """Answer a READ whose whole range reads as zeros: one OFFSET_HOLE chunk, or zeros."""
        command, offset, length, _ = self._answering(cookie)
        if command != CMD_READ:
            raise LocalProtocolError("NBD reply_hole is only for a READ")
        del self._pending[cookie]
        if self.structured:
            self._out.append(CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE,
                                         cookie, HOLE.size) + HOLE.pack(offset, length))
        else:
            self._out.append(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie) + bytes(length))

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
        parts = [U32.pack(BASE_ALLOCATION_ID)]
        for ext_len, status in extents:
            if ext_len <= 0 or not 0 <= status < 1 << 32:
                raise LocalProtocolError(f"NBD extent ({ext_len}, {status:#x}) is malformed")
            take = min(ext_len, end - pos)
            parts.append(EXTENT.pack(take, status))
            pos += take
            if pos >= end or len(parts) > limit:
                break
        if len(parts) == 1:
            raise LocalProtocolError("NBD block status reply needs at least one extent")
        del self._pending[cookie]
        payload = b"".join(parts)
        self._out.append(CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS,
                                     cookie, len(payload)) + payload)

    def _answering(self, cookie: int) -> tuple[int, int, int, int]:
        if self.phase is not Phase.TRANSMISSION and not (self.phase is Phase.CLOSED and self._pending):
            raise LocalProtocolError(f"NBD reply in phase {self.phase.value}")
        try:
            return self._pending[cookie]
        except KeyError:
            raise LocalProtocolError(f"NBD reply to unknown cookie {cookie:#x}") from None
    # --- transmission -----------------------------------------------------------------------

    def _request(self, events: list[Event]) -> bool:
        start = self._start
        if self._end - start < REQUEST.size:
            return False
        magic, flags, command, cookie, offset, length = REQUEST.unpack_from(self._rbuf, start)
        if magic != REQUEST_MAGIC:
            raise NbdProtocolError(f"bad NBD request magic {magic:#x}")
        end = start + REQUEST.size
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
            data = bytes(self._rview[start + REQUEST.size:end])  # the one copy of a payload
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
        allowed = ALLOWED_FLAGS.get(command)
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
        err = ERRNO_ALIASES.get(err, err)
        if err not in NBD_ERRNOS:
            err = errno.EIO
        if self.structured:
            text = message.encode()[:MAX_NAME]
            self._out.append(CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie,
                                         ERROR.size + len(text)) + ERROR.pack(err, len(text)) + text)
        else:
            self._out.append(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, err, cookie))
