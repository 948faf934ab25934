"""Serving volumes over NBD: a sans-I/O server session and an asyncio server that drives it.

The source will serve each protected volume to its VM over NBD so that every
write passes through cdp (write intercept instead of rescanning the image).
`protocol` is pure (bytes in, `events` out) and speaks the handshake (in
`handshake`), STARTTLS, structured replies and `base:allocation` block status,
with the wire layout and numbers in `spec`; `server` does the file, socket and
TLS I/O.
"""

from __future__ import annotations

from cdp.nbd.events import (
    BlockStatus,
    Disconnect,
    Flush,
    Negotiated,
    Read,
    StartTls,
    Trim,
    Write,
    WriteZeroes,
)
from cdp.nbd.protocol import NbdServerSession
from cdp.nbd.spec import NbdProtocolError

__all__ = [
    "BlockStatus",
    "Disconnect",
    "Flush",
    "NbdProtocolError",
    "NbdServerSession",
    "Negotiated",
    "Read",
    "StartTls",
    "Trim",
    "Write",
    "WriteZeroes",
]
