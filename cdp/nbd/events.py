"""The events an NBD server session hands to its caller: frozen dataclasses, one per request kind.

Kept apart from the session (cdp.nbd.protocol and its handshake half,
cdp.nbd.handshake), which both produce them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Negotiated:
    """Handshake done: transmission starts on this export."""

    export: str
    size: int


@dataclass(frozen=True)
class StartTls:
    """The client asked for TLS and was told yes: send data_to_send(), then run the TLS handshake
    as the server before feeding more bytes (they are TLS records from now on)."""


@dataclass(frozen=True)
class Read:
    """Read length bytes at offset; reply with exactly that many bytes (or reply_hole)."""

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
class BlockStatus:
    """Describe the base:allocation status of the range; answer with reply_block_status().

    req_one: the client wants one extent only (the session trims the answer for it).
    """

    cookie: int
    offset: int
    length: int
    req_one: bool = False


@dataclass(frozen=True)
class Disconnect:
    """The client ended the session (NBD_CMD_DISC or NBD_OPT_ABORT); close after flushing."""


Request = Read | Write | Flush | Trim | WriteZeroes | BlockStatus
Event = Negotiated | StartTls | Request | Disconnect
