"""NBD option negotiation, client side: the greeting and each option up to transmission.

The handshake half of cdp.nbd.clientsession.NbdClientSession (a base class of
it, sharing its buffer). Fixed newstyle only, one option at a time as the spec
asks (the client waits for an option's final reply before the next)::

    greeting -> client flags, STRUCTURED_REPLY -> [SET_META_CONTEXT] -> GO -> transmission

Everything the server sends is checked: magics, the option a reply answers,
reply lengths (MAX_OPTION_DATA), how many replies one option may get, context
ids and names (only those asked for), the export's size and block sizes.
A refusal the server states in-band (no such export, a context it does not
offer) is NbdRefusedError; anything malformed is NbdBadServerError.
"""

from __future__ import annotations

import struct
from enum import Enum

from cdp.errors import LocalProtocolError
from cdp.nbd.clientevents import ClientEvent, NbdBadServerError, NbdRefusedError, Ready
from cdp.nbd.spec import (
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_BLOCK_SIZE_REPLY,
    INFO_EXPORT,
    INFO_EXPORT_REPLY,
    MAX_NAME,
    MAX_OPTION_DATA,
    MAX_REQUEST,
    NBDMAGIC,
    OPT_GO,
    OPT_HEADER,
    OPT_REPLY,
    OPT_REPLY_MAGIC,
    OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_TLS_REQD,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META_CONTEXT,
    TFLAG_HAS_FLAGS,
    U16,
    U32,
)
from cdp.textsafe import printable

GREETING = struct.Struct(">QQH")  # NBDMAGIC | IHAVEOPT | u16 handshake flags
MAX_OPTION_REPLIES = 64  # replies to one option before its final one (INFO, META_CONTEXT)
REP_ERR_BIT = 1 << 31


class ClientPhase(Enum):
    """Where a client session is."""

    GREETING = "greeting"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class ClientHello:
    """The greeting and options, parsed from the session's buffer (see NbdClientSession)."""

    # Session state this half reads and writes; NbdClientSession.__init__ sets it all.
    export: str
    wanted_contexts: tuple[str, ...]
    phase: ClientPhase
    structured: bool
    size: int
    transmission_flags: int
    min_block: int
    preferred_block: int
    max_block: int
    _contexts: dict[int, str]  # granted context id -> name
    _awaiting: int  # the option whose final reply we wait for
    _replies: int  # replies to it so far
    _seen_export_info: bool
    _buf: bytearray
    _pos: int
    _out: list[bytes]

    def _greeting(self) -> bool:
        if len(self._buf) - self._pos < GREETING.size:
            return False
        magic, opt_magic, flags = GREETING.unpack_from(self._buf, self._pos)
        self._pos += GREETING.size
        if magic != NBDMAGIC:
            raise NbdBadServerError(f"not an NBD server (greeting magic {magic:#x})")
        if opt_magic != IHAVEOPT:
            raise NbdBadServerError("NBD server speaks oldstyle negotiation; cdp needs fixed newstyle")
        if not flags & FLAG_FIXED_NEWSTYLE:
            raise NbdBadServerError("NBD server does not offer fixed newstyle negotiation")
        client_flags = FLAG_C_FIXED_NEWSTYLE | (FLAG_C_NO_ZEROES if flags & FLAG_NO_ZEROES else 0)
        self._out.append(U32.pack(client_flags))
        self.phase = ClientPhase.OPTIONS
        self._send_option(OPT_STRUCTURED_REPLY)
        return True

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self._out.append(OPT_HEADER.pack(IHAVEOPT, option, len(data)) + data)
        self._awaiting = option
        self._replies = 0

    def _option_reply(self, events: list[ClientEvent]) -> bool:
        start = self._pos
        if len(self._buf) - start < OPT_REPLY.size:
            return False
        magic, option, reply, length = OPT_REPLY.unpack_from(self._buf, start)
        if magic != OPT_REPLY_MAGIC:
            raise NbdBadServerError(f"bad NBD option reply magic {magic:#x}")
        if option != self._awaiting:
            raise NbdBadServerError(f"NBD server answered option {option}, but {self._awaiting} was asked")
        if length > MAX_OPTION_DATA:
            raise NbdBadServerError(f"NBD option reply of {length} bytes, over {MAX_OPTION_DATA}")
        end = start + OPT_REPLY.size + length
        if len(self._buf) < end:
            return False
        data = bytes(self._buf[start + OPT_REPLY.size:end])
        self._pos = end
        self._replies += 1
        if self._replies > MAX_OPTION_REPLIES:
            raise NbdBadServerError(f"NBD server sent over {MAX_OPTION_REPLIES} replies to option {option}")
        if reply & REP_ERR_BIT:
            self._option_error(option, reply, message_text(data))
        elif option == OPT_STRUCTURED_REPLY:
            self._expect_ack(option, reply, data)
            self.structured = True
            self._after_structured()
        elif option == OPT_SET_META_CONTEXT:
            self._meta_reply(reply, data)
        else:
            self._go_reply(reply, data, events)
        return True

    def _expect_ack(self, option: int, reply: int, data: bytes) -> None:
        if reply != REP_ACK or data:
            raise NbdBadServerError(f"NBD server answered option {option} with reply type {reply}")

    def _option_error(self, option: int, reply: int, message: str) -> None:
        said = f": {message}" if message else ""
        if reply == REP_ERR_TLS_REQD:
            raise NbdRefusedError(f"NBD server requires TLS{said}; cdp's NBD client does not speak TLS: "
                                  "serve the export on a Unix socket or without tls-creds")
        if option == OPT_STRUCTURED_REPLY:  # an old server: plain replies (no block status)
            self.structured = False
            self._after_structured()
        elif option == OPT_SET_META_CONTEXT:
            raise NbdRefusedError(f"NBD server refused metadata contexts {list(self.wanted_contexts)} "
                                  f"on export {self.export!r}{said}")
        elif reply == REP_ERR_UNKNOWN:
            raise NbdRefusedError(f"NBD server has no export {self.export!r}{said}")
        elif reply == REP_ERR_UNSUP:
            raise NbdRefusedError(f"NBD server does not support NBD_OPT_GO (too old){said}")
        else:
            raise NbdRefusedError(f"NBD server refused export {self.export!r} (reply {reply:#x}){said}")

    def _after_structured(self) -> None:
        if not self.wanted_contexts:
            self._send_go()
        elif not self.structured:
            raise NbdRefusedError("NBD server does not offer structured replies, which block status needs")
        else:
            name = self.export.encode()
            queries = [q.encode() for q in self.wanted_contexts]
            self._send_option(OPT_SET_META_CONTEXT, U32.pack(len(name)) + name + U32.pack(len(queries))
                              + b"".join(U32.pack(len(q)) + q for q in queries))

    def _meta_reply(self, reply: int, data: bytes) -> None:
        if reply == REP_ACK:
            self._expect_ack(OPT_SET_META_CONTEXT, reply, data)
            missing = [c for c in self.wanted_contexts if c not in self._contexts.values()]
            if missing:
                raise NbdRefusedError(
                    f"NBD export {self.export!r} does not offer metadata context(s) {missing}: for "
                    "qemu:dirty-bitmap:NAME the export must name the bitmap (block-export-add ... "
                    "bitmaps: [NAME])")
            self._send_go()
            return
        if reply != REP_META_CONTEXT or len(data) < 5:
            raise NbdBadServerError(f"NBD server answered SET_META_CONTEXT with reply type {reply} "
                                    f"({len(data)} bytes)")
        (ctx_id,) = U32.unpack_from(data)
        try:
            name = data[4:].decode()
        except UnicodeDecodeError:
            raise NbdBadServerError("NBD metadata context name is not UTF-8") from None
        if name not in self.wanted_contexts or name in self._contexts.values() or ctx_id in self._contexts:
            raise NbdBadServerError(f"NBD server granted context {printable(name)!r} (id {ctx_id}): "
                                    "not asked for, or granted twice")
        self._contexts[ctx_id] = name

    def _send_go(self) -> None:
        name = self.export.encode()
        self._send_option(OPT_GO, U32.pack(len(name)) + name + U16.pack(1) + U16.pack(INFO_BLOCK_SIZE))

    def _go_reply(self, reply: int, data: bytes, events: list[ClientEvent]) -> None:
        if reply == REP_INFO:
            self._info(data)
            return
        self._expect_ack(OPT_GO, reply, data)
        if not self._seen_export_info:
            raise NbdBadServerError("NBD server ended NBD_OPT_GO without the export's size")
        self.phase = ClientPhase.TRANSMISSION
        events.append(Ready(self.export, self.size, self.transmission_flags, self.structured,
                            self.min_block, self.preferred_block, self.max_block,
                            tuple(self._contexts.values())))

    def _info(self, data: bytes) -> None:
        if len(data) < 2:
            raise NbdBadServerError("NBD_REP_INFO without an information type")
        (kind,) = U16.unpack_from(data)
        if kind == INFO_EXPORT:
            if len(data) != INFO_EXPORT_REPLY.size:
                raise NbdBadServerError(f"NBD_INFO_EXPORT of {len(data)} bytes")
            _, size, flags = INFO_EXPORT_REPLY.unpack(data)
            if size >= 1 << 63 or not flags & TFLAG_HAS_FLAGS:
                raise NbdBadServerError(f"NBD export size {size} or flags {flags:#x} are not valid")
            self.size, self.transmission_flags = size, flags
            self._seen_export_info = True
        elif kind == INFO_BLOCK_SIZE:
            if len(data) != INFO_BLOCK_SIZE_REPLY.size:
                raise NbdBadServerError(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes")
            _, minimum, preferred, maximum = INFO_BLOCK_SIZE_REPLY.unpack(data)
            if (not 1 <= minimum <= 65536 or minimum & (minimum - 1) or preferred < minimum
                    or maximum < minimum or (maximum % minimum and maximum != 0xFFFFFFFF)):
                raise NbdBadServerError(f"NBD block sizes {minimum}/{preferred}/{maximum} are not valid")
            self.min_block, self.preferred_block = minimum, preferred
            self.max_block = min(maximum, MAX_REQUEST)
        # Other information types (name, description) are not needed; the spec says ignore them.

    def _check_export_name(self) -> None:
        names = (self.export, *self.wanted_contexts)
        if any(len(n.encode()) > MAX_NAME for n in names):
            raise LocalProtocolError("NBD export or context name longer than 4096 bytes")


def message_text(data: bytes) -> str:
    """An error message from the server, safe to log (at most MAX_NAME bytes of it)."""
    return printable(data[:MAX_NAME].decode(errors="replace"))
