"""Sans-I/O NBD client session: fixed-newstyle handshake, structured replies, READ and BLOCK_STATUS.

No sockets. Feed what the server sent to `receive_data()`; it returns events
(cdp.nbd.clientevents): Ready once the handshake is through, then ReadDone,
StatusDone or Failed per request, matched by cookie. Send what `data_to_send()`
returns. `read()`, `block_status()` and `disconnect()` queue requests and
return their cookie; any number may be in flight. The handshake half is the base
class ClientHello (cdp.nbd.clienthello); the wire layout and numbers are
cdp.nbd.spec.

States::

    GREETING --greeting--> OPTIONS --GO acked (Ready)--> TRANSMISSION --disconnect()--> CLOSED
    any state --server breaks the protocol (NbdBadServerError) or refuses (NbdRefusedError)--> CLOSED

The server is not trusted. Every reply must answer a request in flight and fit
it: a chunk's length is checked against its type and the request before any
of its payload is buffered (so nothing the server says makes the client hold
more than the largest request it sent), READ content must lie inside the
requested range without overlapping earlier content and, without an error, cover
all of it; block status extents must be non-empty, consecutive from the
request's offset, inside the range (the last one is cut at its end), at most
one chunk per negotiated context and MAX_STATUS_EXTENTS per chunk; one reply
may have at most MAX_CHUNKS chunks. Every violation is NbdBadServerError and
closes the session: the caller hangs up.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from cdp.errors import LocalProtocolError
from cdp.nbd.clientevents import (
    ClientEvent,
    Extent,
    Failed,
    NbdBadServerError,
    NbdClientError,
    ReadDone,
    StatusDone,
)
from cdp.nbd.clienthello import ClientHello, ClientPhase, message_text
from cdp.nbd.spec import (
    CHUNK,
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_FLAG_DF,
    CMD_FLAG_REQ_ONE,
    CMD_READ,
    ERROR,
    EXTENT,
    HOLE,
    MAX_NAME,
    MAX_REQUEST,
    PREFERRED_BLOCK,
    REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR,
    REPLY_TYPE_ERROR_OFFSET,
    REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    TFLAG_SEND_DF,
    U32,
    U64,
)

MAX_STATUS_EXTENTS = 1 << 17  # per BLOCK_STATUS chunk: QEMU sends up to 1 MiB of extents (2^17)
MAX_CHUNKS = 1 << 17  # per reply: a 32 MiB read in 256-byte pieces; stops a server dribbling forever
MAX_ERROR_CHUNK = 64 * 1024  # an error chunk of a type we do not know
MAX_STATUS_LENGTH = 0xFFFFFFFF  # a BLOCK_STATUS request's length field is 32 bits


@dataclass
class _Pending:
    """A request in flight and what its reply has delivered so far."""

    command: int
    offset: int
    length: int
    flags: int
    data: bytearray | None = None  # READ: the reassembled bytes (zeros where nothing came yet)
    starts: list[int] = field(default_factory=list)  # READ: content chunks seen, sorted, as
    ends: list[int] = field(default_factory=list)  # ... [starts[i], ends[i]) relative to offset
    covered: int = 0
    chunks: int = 0
    statuses: dict[str, tuple[Extent, ...]] = field(default_factory=dict)
    error: tuple[int, str] | None = None


class NbdClientSession(ClientHello):
    """One NBD connection, client side, without I/O; see the module docstring.

    contexts: metadata contexts to select (e.g. "base:allocation",
    "qemu:dirty-bitmap:NAME"); the handshake fails with NbdRefusedError unless
    the server grants all of them.
    """

    def __init__(self, export: str, contexts: tuple[str, ...] | list[str] = ()) -> None:
        self.export = export
        self.wanted_contexts = tuple(dict.fromkeys(contexts))
        self._check_export_name()
        self.phase = ClientPhase.GREETING
        self.structured = False
        self.size = 0
        self.transmission_flags = 0
        self.min_block, self.preferred_block, self.max_block = 1, PREFERRED_BLOCK, MAX_REQUEST
        self._contexts = {}
        self._awaiting = 0
        self._replies = 0
        self._seen_export_info = False
        self._buf = bytearray()
        self._pos = 0
        self._out = []
        self._pending: dict[int, _Pending] = {}
        self._next_cookie = 0
        self._closing = False

    # --- public API -------------------------------------------------------------------------

    @property
    def contexts(self) -> tuple[str, ...]:
        """The metadata contexts the server granted."""
        return tuple(self._contexts.values())

    @property
    def pending(self) -> frozenset[int]:
        """Cookies of requests sent and not yet answered."""
        return frozenset(self._pending)

    def data_to_send(self) -> bytes:
        """Bytes to write to the server, in order; empties the outgoing buffer."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ClientEvent]:
        """Every event in the received bytes; NbdBadServerError or NbdRefusedError (and CLOSED) on
        a violation or refusal. Bytes after the session closed are ignored."""
        if self.phase is ClientPhase.CLOSED:
            return []
        self._buf += data
        events: list[ClientEvent] = []
        try:
            while self.phase is not ClientPhase.CLOSED:
                if self.phase is ClientPhase.GREETING:
                    done = self._greeting()
                elif self.phase is ClientPhase.OPTIONS:
                    done = self._option_reply(events)
                else:
                    done = self._reply(events)
                if not done:
                    break
        except (NbdClientError, NbdBadServerError):
            self._close()
            raise
        del self._buf[:self._pos]
        self._pos = 0
        return events

    def read(self, offset: int, length: int, *, df: bool = False) -> int:
        """Queue a READ of length bytes at offset (at most max_block); its cookie.

        df asks for one content chunk (only if the server offers it).
        """
        if not 0 < length <= self.max_block:
            raise LocalProtocolError(f"NBD read of {length} bytes (1..{self.max_block} allowed)")
        flags = CMD_FLAG_DF if df and self.transmission_flags & TFLAG_SEND_DF else 0
        cookie = self._request(CMD_READ, offset, length, flags)
        self._pending[cookie].data = bytearray(length)
        return cookie

    def block_status(self, offset: int, length: int, *, req_one: bool = False) -> int:
        """Queue a BLOCK_STATUS over [offset, offset+length) for every granted context; its cookie."""
        if not self._contexts:
            raise LocalProtocolError("NBD block status needs a metadata context (none was granted)")
        if not 0 < length <= MAX_STATUS_LENGTH:
            raise LocalProtocolError(f"NBD block status of {length} bytes (1..{MAX_STATUS_LENGTH} allowed)")
        return self._request(CMD_BLOCK_STATUS, offset, length, CMD_FLAG_REQ_ONE if req_one else 0)

    def disconnect(self) -> None:
        """Queue NBD_CMD_DISC; no request may follow. Replies still in flight are decoded."""
        if self.phase is ClientPhase.TRANSMISSION and not self._closing:
            self._out.append(REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
            self._closing = True
        if not self._pending:
            self._close()

    # --- requests ---------------------------------------------------------------------------

    def _request(self, command: int, offset: int, length: int, flags: int) -> int:
        if self.phase is not ClientPhase.TRANSMISSION or self._closing:
            raise LocalProtocolError(f"NBD request in phase {self.phase.value}")
        if offset < 0 or offset + length > self.size:
            raise LocalProtocolError(f"NBD request [{offset}, {offset + length}) past the export's "
                                     f"{self.size} bytes")
        self._next_cookie += 1
        cookie = self._next_cookie
        self._pending[cookie] = _Pending(command, offset, length, flags)
        self._out.append(REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length))
        return cookie

    def _close(self) -> None:
        self.phase = ClientPhase.CLOSED
        self._pending.clear()
        self._buf = bytearray()
        self._pos = 0

    # --- replies ----------------------------------------------------------------------------

    def _reply(self, events: list[ClientEvent]) -> bool:
        start = self._pos
        avail = len(self._buf) - start
        if avail < 4:
            return False
        (magic,) = U32.unpack_from(self._buf, start)
        if magic == SIMPLE_REPLY_MAGIC:
            return self._simple(events)
        if magic != STRUCTURED_REPLY_MAGIC:
            raise NbdBadServerError(f"bad NBD reply magic {magic:#x}")
        if not self.structured:
            raise NbdBadServerError("NBD server sent a structured reply that was not negotiated")
        if avail < CHUNK.size:
            return False
        _, flags, kind, cookie, length = CHUNK.unpack_from(self._buf, start)
        p = self._pending_for(cookie)
        _check_chunk_length(kind, length, p)
        end = start + CHUNK.size + length
        if len(self._buf) < end:
            return False
        payload = memoryview(self._buf)[start + CHUNK.size:end]
        try:
            p.chunks += 1
            if p.chunks > MAX_CHUNKS:
                raise NbdBadServerError(f"NBD reply with over {MAX_CHUNKS} chunks")
            self._chunk(p, kind, payload)
        finally:
            payload.release()  # the buffer is resized next: no view may outlive this
        self._pos = end
        if flags & REPLY_FLAG_DONE:
            del self._pending[cookie]
            events.append(self._finish(cookie, p))
            if self._closing and not self._pending:
                self._close()
        elif kind == REPLY_TYPE_NONE:
            raise NbdBadServerError("NBD_REPLY_TYPE_NONE without the DONE flag")
        return True

    def _pending_for(self, cookie: int) -> _Pending:
        try:
            return self._pending[cookie]
        except KeyError:
            raise NbdBadServerError(f"NBD reply for cookie {cookie:#x}, which is not in flight") from None

    def _simple(self, events: list[ClientEvent]) -> bool:
        start = self._pos
        if len(self._buf) - start < SIMPLE_REPLY.size:
            return False
        _, err, cookie = SIMPLE_REPLY.unpack_from(self._buf, start)
        p = self._pending_for(cookie)
        if err:
            if p.command == CMD_READ and self.structured:
                raise NbdBadServerError("NBD simple reply to a READ after structured replies were agreed")
            self._pos = start + SIMPLE_REPLY.size
            del self._pending[cookie]
            events.append(Failed(cookie, err, ""))
        elif p.command == CMD_READ and not self.structured:
            end = start + SIMPLE_REPLY.size + p.length
            if len(self._buf) < end:
                return False
            assert p.data is not None
            p.data[:] = self._buf[start + SIMPLE_REPLY.size:end]
            self._pos = end
            del self._pending[cookie]
            events.append(ReadDone(cookie, p.data))
        else:
            # Success without payload answers neither a structured READ nor a BLOCK_STATUS.
            raise NbdBadServerError(f"NBD simple success reply to command {p.command}, which needs data")
        if self._closing and not self._pending:
            self._close()
        return True

    def _chunk(self, p: _Pending, kind: int, payload: memoryview) -> None:
        if kind == REPLY_TYPE_OFFSET_DATA:
            (offset,) = U64.unpack_from(payload)
            self._content(p, offset, len(payload) - 8)
            assert p.data is not None
            rel = offset - p.offset
            p.data[rel:rel + len(payload) - 8] = payload[8:]
        elif kind == REPLY_TYPE_OFFSET_HOLE:
            offset, size = HOLE.unpack_from(payload)
            if size == 0:
                raise NbdBadServerError("NBD hole chunk of size 0")
            self._content(p, offset, size)  # the buffer holds zeros there already
        elif kind == REPLY_TYPE_BLOCK_STATUS:
            self._status(p, payload)
        elif kind & 0x8000:  # an error chunk, of a type we may not know
            err, msg_len = ERROR.unpack_from(payload)
            tail = 8 if kind == REPLY_TYPE_ERROR_OFFSET else 0
            if err == 0 or ERROR.size + msg_len + tail > len(payload):
                raise NbdBadServerError(f"NBD error chunk with errno {err}, message of {msg_len} bytes")
            if kind == REPLY_TYPE_ERROR_OFFSET:
                (at,) = U64.unpack_from(payload, ERROR.size + msg_len)
                if not p.offset <= at < p.offset + p.length:
                    raise NbdBadServerError(f"NBD error offset {at} outside the request")
            if p.error is None:
                p.error = (err, message_text(bytes(payload[ERROR.size:ERROR.size + msg_len])))
        # REPLY_TYPE_NONE carries nothing; _check_chunk_length refused every other type.

    def _content(self, p: _Pending, offset: int, size: int) -> None:
        """Record a READ content chunk at [offset, offset+size); refuse overlap and stray ranges."""
        rel = offset - p.offset
        if rel < 0 or rel + size > p.length:
            raise NbdBadServerError(f"NBD read chunk [{offset}, {offset + size}) outside the request "
                                    f"[{p.offset}, {p.offset + p.length})")
        if p.flags & CMD_FLAG_DF and p.starts:
            raise NbdBadServerError("NBD server split a read the client asked not to fragment")
        i = bisect.bisect_right(p.starts, rel)
        if (i and p.ends[i - 1] > rel) or (i < len(p.starts) and p.starts[i] < rel + size):
            raise NbdBadServerError(f"NBD read chunk at {offset} overlaps an earlier one")
        p.starts.insert(i, rel)
        p.ends.insert(i, rel + size)
        p.covered += size

    def _status(self, p: _Pending, payload: memoryview) -> None:
        (ctx_id,) = U32.unpack_from(payload)
        name = self._contexts.get(ctx_id)
        if name is None or name in p.statuses:
            raise NbdBadServerError(f"NBD block status for context id {ctx_id}: not granted, or repeated")
        count = (len(payload) - 4) // 8
        if p.flags & CMD_FLAG_REQ_ONE and count > 1:
            raise NbdBadServerError(f"NBD block status with {count} extents for a one-extent request")
        pos, end = p.offset, p.offset + p.length
        extents = []
        for length, flags in EXTENT.iter_unpack(payload[4:]):
            if length == 0 or pos >= end:
                raise NbdBadServerError(f"NBD block status extent of {length} bytes at {pos}: empty, or "
                                        f"past the requested end {end}")
            take = min(length, end - pos)
            extents.append(Extent(pos, take, flags))
            pos += take
        p.statuses[name] = tuple(extents)

    def _finish(self, cookie: int, p: _Pending) -> ClientEvent:
        if p.error is not None:
            return Failed(cookie, *p.error)
        if p.command == CMD_READ:
            if p.covered != p.length:
                raise NbdBadServerError(f"NBD read reply covers {p.covered} of {p.length} bytes")
            assert p.data is not None
            return ReadDone(cookie, p.data)
        if len(p.statuses) != len(self._contexts):
            raise NbdBadServerError("NBD block status reply lacks a negotiated context")
        return StatusDone(cookie, dict(p.statuses))


def _check_chunk_length(kind: int, length: int, p: _Pending) -> None:
    """Refuse a chunk whose type does not answer the request or whose length cannot be right,
    before buffering its payload: this bounds what a server can make the client hold."""
    read = p.command == CMD_READ
    if kind == REPLY_TYPE_NONE:
        ok = length == 0
    elif kind == REPLY_TYPE_OFFSET_DATA:
        ok = read and 9 <= length <= 8 + p.length
    elif kind == REPLY_TYPE_OFFSET_HOLE:
        ok = read and length == HOLE.size
    elif kind == REPLY_TYPE_BLOCK_STATUS:
        ok = (p.command == CMD_BLOCK_STATUS and 12 <= length <= 4 + 8 * MAX_STATUS_EXTENTS
              and (length - 4) % 8 == 0)
    elif kind == REPLY_TYPE_ERROR:
        ok = ERROR.size <= length <= ERROR.size + MAX_NAME
    elif kind == REPLY_TYPE_ERROR_OFFSET:
        ok = ERROR.size + 8 <= length <= ERROR.size + MAX_NAME + 8
    elif kind & 0x8000:
        ok = ERROR.size <= length <= MAX_ERROR_CHUNK
    else:
        raise NbdBadServerError(f"NBD reply chunk of unknown type {kind}")
    if not ok:
        raise NbdBadServerError(f"NBD reply chunk of type {kind} and {length} bytes cannot answer "
                                f"command {p.command} of {p.length} bytes")
