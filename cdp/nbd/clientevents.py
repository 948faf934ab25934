"""What an NBD client session hands its caller (frozen dataclasses) and the errors it raises.

Kept apart from the session (cdp.nbd.clientsession and its handshake half,
cdp.nbd.clienthello), which both produce them, and the asyncio client
(cdp.nbd.client), which turns them into return values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from cdp.errors import RemoteProtocolError, TrackerError


class NbdBadServerError(RemoteProtocolError):
    """The NBD server broke the protocol (malformed, out-of-range or oversized replies): hang up."""


class NbdClientError(TrackerError):
    """An NBD connection to a server (QEMU's export) failed, timed out or was closed."""


class NbdRefusedError(NbdClientError):
    """The NBD server refused what cdp needs: the export, a metadata context, structured replies."""


class NbdRequestError(NbdClientError):
    """The NBD server answered a request with an error; errno is NBD's (Linux numbering)."""

    def __init__(self, what: str, err: int, message: str) -> None:
        reason = os.strerror(err) if err else "error"
        super().__init__(f"NBD server failed {what}: {reason}" + (f" ({message})" if message else ""))
        self.errno = err
        self.server_message = message


class Extent(NamedTuple):
    """offset and length in bytes, and the metadata context's status flags for them."""

    offset: int
    length: int
    flags: int


@dataclass(frozen=True)
class Ready:
    """Handshake done: transmission on this export, with the metadata contexts the server granted."""

    export: str
    size: int
    flags: int  # transmission flags (NBD_FLAG_*)
    structured: bool
    min_block: int
    preferred_block: int
    max_block: int  # largest READ payload the server accepts
    contexts: tuple[str, ...]


@dataclass(frozen=True)
class ReadDone:
    """A READ succeeded: exactly the requested bytes, holes as zeros."""

    cookie: int
    data: bytearray


@dataclass(frozen=True)
class StatusDone:
    """A BLOCK_STATUS succeeded: per context, consecutive extents from the request's offset.

    They lie inside the requested range but may cover only its start (the
    server may answer less; ask again from where they end).
    """

    cookie: int
    extents: Mapping[str, tuple[Extent, ...]]


@dataclass(frozen=True)
class Failed:
    """The server answered a request with an error (errno, message); the connection goes on."""

    cookie: int
    errno: int
    message: str


ClientEvent = Ready | ReadDone | StatusDone | Failed
