"""Asyncio NBD client: pumps bytes through NbdClientSession over a Unix socket or TCP.

The session (cdp.nbd.clientsession) decides what is valid; this module only
connects, runs the handshake under a timeout, and keeps one reader task that
feeds received bytes to the session and hands each reply to the request
waiting for its cookie. Requests may be issued concurrently (they are
pipelined on the one connection). What cdp reads from QEMU's export:

    client = await NbdClient.connect_unix(path, "disk0", contexts=["qemu:dirty-bitmap:cdp-1"])
    try:
        dirty = await client.extents("qemu:dirty-bitmap:cdp-1")   # the whole export, merged
        data = await client.read(offset, length)
    finally:
        await client.close()

Failures are NbdClientError: NbdRefusedError from the handshake, NbdRequestError
for an error reply (the connection goes on), plain NbdClientError when the
connection is lost, times out, or the server breaks the protocol (then the
client hangs up; the cause is chained).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence

from cdp.errors import LocalProtocolError
from cdp.nbd.clientevents import (
    ClientEvent,
    Extent,
    Failed,
    NbdBadServerError,
    NbdClientError,
    NbdRequestError,
    ReadDone,
    Ready,
    StatusDone,
)
from cdp.nbd.clientsession import MAX_STATUS_LENGTH, NbdClientSession

log = logging.getLogger(__name__)

TIMEOUT = 30.0  # seconds for connect + handshake, and for each request's reply
RECV = 256 * 1024
MAX_EXTENTS = 1 << 22  # merged extents extents() returns (~100 bytes each in memory)

Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class NbdClient:
    """One NBD connection in transmission; make it with connect_unix() or connect_tcp()."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 session: NbdClientSession, ready: Ready, where: str, timeout: float) -> None:
        self.ready = ready
        self.where = where
        self.timeout = timeout
        self._reader = reader
        self._writer = writer
        self._session = session
        self._waiters: dict[int, asyncio.Future[ClientEvent]] = {}
        self._failure: NbdClientError | None = None
        self._pump = asyncio.get_running_loop().create_task(self._receive())

    @property
    def size(self) -> int:
        return self.ready.size

    @property
    def contexts(self) -> tuple[str, ...]:
        return self.ready.contexts

    @classmethod
    async def connect_unix(cls, path: str, export: str, *, contexts: Sequence[str] = (),
                           timeout: float = TIMEOUT) -> NbdClient:
        """Connect to an NBD server's Unix socket and negotiate export and metadata contexts."""
        return await cls._connect(f"unix:{path}", lambda: asyncio.open_unix_connection(path, limit=RECV),
                                  export, contexts, timeout)

    @classmethod
    async def connect_tcp(cls, host: str, port: int, export: str, *, contexts: Sequence[str] = (),
                          timeout: float = TIMEOUT) -> NbdClient:
        """Connect to an NBD server over TCP (no TLS) and negotiate export and metadata contexts."""
        return await cls._connect(f"{host}:{port}", lambda: asyncio.open_connection(host, port, limit=RECV),
                                  export, contexts, timeout)

    @classmethod
    async def _connect(cls, where: str, opener: Opener, export: str, contexts: Sequence[str],
                       timeout: float) -> NbdClient:
        session = NbdClientSession(export, tuple(contexts))
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await opener()
                sock = writer.get_extra_info("socket")
                if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                ready = await _handshake(reader, writer, session)
        except TimeoutError:
            await _close_writer(writer)
            raise NbdClientError(f"NBD server at {where} did not finish the handshake within "
                                 f"{timeout:g} s") from None
        except OSError as exc:
            await _close_writer(writer)
            raise NbdClientError(f"cannot connect to the NBD server at {where}: "
                                 f"{exc.strerror or exc}") from exc
        except NbdBadServerError as exc:
            await _close_writer(writer)
            raise NbdClientError(f"NBD server at {where} broke the protocol: {exc}") from exc
        except BaseException:
            await _close_writer(writer)
            raise
        log.debug("NBD connected to %s, export %r (%d bytes, contexts %s)", where, export, ready.size,
                  ready.contexts)
        return cls(reader, writer, session, ready, where, timeout)

    async def read(self, offset: int, length: int) -> bytearray:
        """length bytes at offset (holes as zeros), in requests of at most the server's maximum."""
        if length <= 0:
            return bytearray()
        step = self.ready.max_block
        pieces = [(o, min(step, offset + length - o)) for o in range(offset, offset + length, step)]
        cookies = [self._session.read(o, n) for o, n in pieces]
        replies = await self._await(cookies)
        out = bytearray()
        for (o, n), reply in zip(pieces, replies, strict=True):
            if isinstance(reply, Failed):
                raise NbdRequestError(f"READ of {n} bytes at {o} ({self.where})", reply.errno, reply.message)
            assert isinstance(reply, ReadDone)
            if len(pieces) == 1:
                return reply.data
            out += reply.data
        return out

    async def block_status(self, offset: int, length: int) -> dict[str, tuple[Extent, ...]]:
        """One BLOCK_STATUS: per granted context, extents from offset; they may cover only a prefix."""
        (reply,) = await self._await([self._session.block_status(offset, min(length, MAX_STATUS_LENGTH))])
        if isinstance(reply, Failed):
            raise NbdRequestError(f"BLOCK_STATUS of {length} bytes at {offset} ({self.where})",
                                  reply.errno, reply.message)
        assert isinstance(reply, StatusDone)
        return dict(reply.extents)

    async def extents(self, context: str, offset: int = 0, length: int | None = None, *,
                      max_extents: int = MAX_EXTENTS) -> list[Extent]:
        """Every extent of one context over [offset, offset+length) (default: to the end), asking
        again where the server's answer stops short, neighbours with equal flags merged.

        NbdClientError past max_extents (after merging): a server flipping flags every few bytes
        must not grow the list without bound; ask for a shorter range instead.
        """
        if context not in self.ready.contexts:
            raise LocalProtocolError(f"NBD context {context!r} was not negotiated")
        end = self.size if length is None else offset + length
        out: list[Extent] = []
        pos = offset
        while pos < end:
            got = (await self.block_status(pos, end - pos))[context]
            for e in got:
                if out and out[-1].flags == e.flags and out[-1].offset + out[-1].length == e.offset:
                    out[-1] = Extent(out[-1].offset, out[-1].length + e.length, e.flags)
                else:
                    out.append(e)
            if len(out) > max_extents:
                raise NbdClientError(f"NBD server at {self.where} describes [{offset}, {end}) of "
                                     f"{context} in over {max_extents} extents; ask for a shorter range")
            pos = got[-1].offset + got[-1].length  # > pos: the session refuses empty answers
        return out

    async def close(self) -> None:
        """NBD_CMD_DISC, then close the socket; never raises."""
        if self._failure is None and not self._writer.is_closing():
            with contextlib.suppress(Exception):
                self._session.disconnect()
                self._writer.write(self._session.data_to_send())
        self._fail(NbdClientError(f"NBD connection to {self.where} is closed"))
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump
        await _close_writer(self._writer)

    async def __aenter__(self) -> NbdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _await(self, cookies: list[int]) -> list[ClientEvent]:
        if self._failure is not None:
            raise self._failure
        loop = asyncio.get_running_loop()
        futures = []
        for cookie in cookies:
            fut: asyncio.Future[ClientEvent] = loop.create_future()
            self._waiters[cookie] = fut
            futures.append(fut)
        try:
            async with asyncio.timeout(self.timeout):
                self._writer.write(self._session.data_to_send())
                await self._writer.drain()
                return list(await asyncio.gather(*futures))
        except TimeoutError:
            error = NbdClientError(f"NBD server at {self.where} did not answer within {self.timeout:g} s")
            self._fail(error)
            raise error from None
        except OSError as exc:
            error = NbdClientError(f"NBD connection to {self.where} failed: {exc.strerror or exc}")
            self._fail(error)
            raise error from exc
        finally:
            for cookie in cookies:
                self._waiters.pop(cookie, None)

    async def _receive(self) -> None:
        try:
            while True:
                data = await self._reader.read(RECV)
                if not data:
                    raise NbdClientError(f"NBD server at {self.where} closed the connection")
                for event in self._session.receive_data(data):
                    cookie = getattr(event, "cookie", None)
                    fut = self._waiters.get(cookie) if cookie is not None else None
                    if fut is not None and not fut.done():
                        fut.set_result(event)
        except NbdBadServerError as exc:
            error = NbdClientError(f"NBD server at {self.where} broke the protocol: {exc}")
            error.__cause__ = exc
            self._fail(error)
        except NbdClientError as exc:
            self._fail(exc)
        except OSError as exc:
            self._fail(NbdClientError(f"NBD connection to {self.where} failed: {exc.strerror or exc}"))
        if not self._writer.is_closing():
            self._writer.close()

    def _fail(self, error: NbdClientError) -> None:
        if self._failure is None:
            self._failure = error
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(self._failure)
        self._waiters.clear()


async def _handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     session: NbdClientSession) -> Ready:
    while True:
        data = await reader.read(RECV)
        if not data:
            raise NbdClientError("the NBD server closed the connection during the handshake")
        events = session.receive_data(data)
        out = session.data_to_send()
        if out:
            writer.write(out)
            await writer.drain()
        for event in events:
            if isinstance(event, Ready):
                return event


async def _close_writer(writer: asyncio.StreamWriter | None) -> None:
    if writer is None:
        return
    writer.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5):
            await writer.wait_closed()
