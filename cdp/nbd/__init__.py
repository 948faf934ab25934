"""Serving volumes over NBD: a sans-I/O server session and an asyncio server that drives it.

The source will serve each protected volume to its VM over NBD so that every
write passes through cdp (write intercept instead of rescanning the image).
`protocol` is pure (bytes in, events out); `server` does the file and socket I/O.
"""

from __future__ import annotations

from cdp.nbd.protocol import (
    Disconnect,
    Flush,
    NbdProtocolError,
    NbdServerSession,
    Negotiated,
    Read,
    Trim,
    Write,
    WriteZeroes,
)

__all__ = [
    "Disconnect",
    "Flush",
    "NbdProtocolError",
    "NbdServerSession",
    "Negotiated",
    "Read",
    "Trim",
    "Write",
    "WriteZeroes",
]
