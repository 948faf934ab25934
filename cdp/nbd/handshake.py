"""NBD option negotiation, server side: the client flags and every option up to transmission.

The handshake half of cdp.nbd.protocol.NbdServerSession (a base class of it,
sharing its buffers): it parses client flags and options out of the received
bytes and queues option replies. EXPORT_NAME or GO enters transmission with a
Negotiated event, STARTTLS hands the caller a StartTls event, ABORT a Disconnect.
What the client negotiated (structured replies, metadata contexts, TLS, the
export and its size) stays on the session for the transmission half.
"""

from __future__ import annotations

from cdp.nbd.events import Disconnect, Event, Negotiated, StartTls
from cdp.nbd.spec import (
    BASE_ALLOCATION,
    BASE_ALLOCATION_ID,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_BLOCK_SIZE_REPLY,
    INFO_EXPORT,
    INFO_EXPORT_REPLY,
    MAX_NAME,
    MAX_OPTION_DATA,
    MAX_OPTIONS,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_HEADER,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_REPLY,
    OPT_REPLY_MAGIC,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    PREFERRED_BLOCK,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_TLS_REQD,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    TFLAG_SEND_DF,
    TRANSMISSION_FLAGS,
    U16,
    U32,
    U64,
    NbdProtocolError,
    Phase,
)


class Handshake:
    """Client flags and options, parsed from the session's buffer (see NbdServerSession)."""

    # The session state this half reads and writes; NbdServerSession.__init__ sets it all.
    exports: dict[str, int]
    max_request: int
    tls_offered: bool
    tls_required: bool
    tls_active: bool
    phase: Phase
    export: str | None
    size: int
    no_zeroes: bool
    structured: bool
    meta_contexts: tuple[str, ...]
    _meta_export: str | None
    _options_seen: int
    _rbuf: bytearray
    _rview: memoryview
    _start: int
    _end: int
    _need: int
    _out: list[bytes]

    @property
    def transmission_flags(self) -> int:
        """What the client is told it may use: SEND_DF only once structured replies are on."""
        return TRANSMISSION_FLAGS | (TFLAG_SEND_DF if self.structured else 0)

    def _client_flags(self) -> bool:
        if self._end - self._start < 4:
            return False
        (flags,) = U32.unpack_from(self._rbuf, self._start)
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
        if self._end - start < OPT_HEADER.size:
            return False
        magic, option, length = OPT_HEADER.unpack_from(self._rbuf, start)
        if magic != IHAVEOPT:
            raise NbdProtocolError(f"bad NBD option magic {magic:#x}")
        if length > MAX_OPTION_DATA:
            raise NbdProtocolError(f"NBD option {option} carries {length} bytes, over {MAX_OPTION_DATA}")
        end = start + OPT_HEADER.size + length
        if self._end < end:
            self._need = end - start
            return False
        self._need = 0
        data = bytes(self._rview[start + OPT_HEADER.size:end])
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
                    self._opt_reply(option, REP_SERVER, U32.pack(len(encoded)) + encoded)
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
        self._out.append(OPT_REPLY.pack(OPT_REPLY_MAGIC, option, reply_type, len(data)) + data)

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
        self._out.append(U64.pack(size) + U16.pack(self.transmission_flags))
        if not self.no_zeroes:
            self._out.append(bytes(124))
        self._enter_transmission(name, events)

    def _info_or_go(self, option: int, data: bytes, events: list[Event]) -> None:
        if len(data) < 6:
            self._opt_reply(option, REP_ERR_INVALID, b"option data too short")
            return
        (name_len,) = U32.unpack_from(data)
        if name_len > len(data) - 6:
            self._opt_reply(option, REP_ERR_INVALID, b"export name length past the option data")
            return
        raw = data[4:4 + name_len]
        (count,) = U16.unpack_from(data, 4 + name_len)
        if len(data) != 6 + name_len + 2 * count:
            self._opt_reply(option, REP_ERR_INVALID, b"information request count does not match length")
            return
        requests = {U16.unpack_from(data, 6 + name_len + 2 * i)[0] for i in range(count)}
        name = self._lookup(raw)
        if name is None:
            self._opt_reply(option, REP_ERR_UNKNOWN, b"no such export")
            return
        size = self.exports[name]
        self._opt_reply(option, REP_INFO, INFO_EXPORT_REPLY.pack(INFO_EXPORT, size, self.transmission_flags))
        if INFO_BLOCK_SIZE in requests:
            self._opt_reply(option, REP_INFO, INFO_BLOCK_SIZE_REPLY.pack(
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
                self._opt_reply(option, REP_META_CONTEXT, U32.pack(0) + BASE_ALLOCATION.encode())
        elif BASE_ALLOCATION in queries:
            self.meta_contexts = (BASE_ALLOCATION,)
            self._meta_export = name
            self._opt_reply(option, REP_META_CONTEXT,
                            U32.pack(BASE_ALLOCATION_ID) + BASE_ALLOCATION.encode())
        self._opt_reply(option, REP_ACK)

    def _enter_transmission(self, name: str, events: list[Event]) -> None:
        self.export = name
        self.size = self.exports[name]
        if self._meta_export != name:  # contexts were chosen for another export: none apply
            self.meta_contexts = ()
        self.phase = Phase.TRANSMISSION
        events.append(Negotiated(name, self.size))


def _parse_meta_request(data: bytes) -> tuple[bytes, list[str]] | None:
    """(export name, queries) of a LIST/SET_META_CONTEXT request, or None if malformed."""
    if len(data) < 8:
        return None
    (name_len,) = U32.unpack_from(data)
    if name_len > MAX_NAME or 8 + name_len > len(data):
        return None
    raw = data[4:4 + name_len]
    (count,) = U32.unpack_from(data, 4 + name_len)
    pos = 8 + name_len
    queries = []
    for _ in range(count):  # every query takes at least 4 bytes, so this ends with the data
        if pos + 4 > len(data):
            return None
        (qlen,) = U32.unpack_from(data, pos)
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
