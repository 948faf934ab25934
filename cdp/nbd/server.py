"""Asyncio NBD server for one raw image file: pumps bytes through NbdServerSession.

The session decides what is valid; this module only moves bytes and does the
file I/O, blocking calls in `asyncio.to_thread`. Requests of one connection
are executed in order, which keeps "write, then on_write" and "flush covers
every completed write" trivially true.

A `ChangeTracker` is where the CDP source plugs in. `before_change(offset,
length)` is awaited before a WRITE, TRIM or WRITE_ZEROES touches the file (the
source makes the range dirty in its persistent map first, so a crash between
the write and the capture can never lose track of it); `changed(offset,
length)` runs after the change reached the file and before the client hears
success (the source captures the blocks for the open epoch); `flushed()` is
awaited after a FLUSH made the image durable and before the client hears
success (the source cuts an epoch there). A hook that raises turns the request
into an EIO reply: the client must not believe in a write that cdp did not
track.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from pathlib import Path
from typing import Protocol

from cdp.durable import write_zeros
from cdp.errors import CdpError
from cdp.nbd.protocol import (
    Disconnect,
    Event,
    Flush,
    NbdProtocolError,
    NbdServerSession,
    Negotiated,
    Read,
    Trim,
    Write,
    WriteZeroes,
)

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
_ZERO_CHUNK = bytes(1 << 20)


class NbdServerError(CdpError):
    """The NBD server could not open its image or bind its address."""


class ChangeTracker(Protocol):
    """What the server tells the CDP source about changes; see the module docstring."""

    async def before_change(self, offset: int, length: int) -> None: ...

    def changed(self, offset: int, length: int) -> None: ...

    async def flushed(self) -> None: ...


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    parts = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:  # the file shrank under us: what lies past its end reads as zeros
            parts.append(bytes(length))
            break
        parts.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(parts)


def _write_zero_bytes(fd: int, offset: int, length: int) -> None:
    """Zeros written as data: for WRITE_ZEROES with NO_HOLE, where deallocating is forbidden."""
    while length > 0:
        n = min(length, len(_ZERO_CHUNK))
        _pwrite_all(fd, memoryview(_ZERO_CHUNK)[:n], offset)
        offset += n
        length -= n


class NbdServer:
    """Serve one raw image file as one NBD export on TCP and/or a Unix socket.

    Use `await start()`, then `await close()` (or `async with`). Connections
    share the file descriptor; pread/pwrite at explicit offsets need no lock.
    """

    def __init__(
        self,
        image: Path | str,
        *,
        export: str = "",
        host: str | None = "127.0.0.1",
        port: int = 0,
        unix_path: Path | str | None = None,
        tracker: ChangeTracker | None = None,
    ) -> None:
        self.image = Path(image)
        self.export = export
        self.host = host
        self.port = port
        self.unix_path = Path(unix_path) if unix_path is not None else None
        self.tracker = tracker
        self.size = 0
        self._fd = -1
        self._servers: list[asyncio.Server] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> NbdServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def tcp_port(self) -> int | None:
        """The bound TCP port (useful with port=0), or None without TCP."""
        for server in self._servers:
            for sock in server.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    return int(sock.getsockname()[1])
        return None

    async def start(self) -> None:
        """Open the image and start listening; NbdServerError if either fails."""
        if self.host is None and self.unix_path is None:
            raise NbdServerError("NBD server needs a TCP host or a Unix socket path")
        try:
            self._fd = os.open(self.image, os.O_RDWR | os.O_CLOEXEC)
            self.size = os.fstat(self._fd).st_size
            if self.host is not None:
                self._servers.append(await asyncio.start_server(self._connection, self.host, self.port))
            if self.unix_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.unix_path.unlink()
                self._servers.append(await asyncio.start_unix_server(self._connection, self.unix_path))
        except OSError as exc:
            await self.close()
            raise NbdServerError(f"cannot serve {self.image} over NBD: {exc}") from exc
        log.info("serving %s (%d bytes) as NBD export %r on %s%s", self.image, self.size, self.export,
                 f"{self.host}:{self.tcp_port}" if self.host is not None else "",
                 f" {self.unix_path}" if self.unix_path is not None else "")

    async def close(self) -> None:
        """Stop accepting, close connections, wait for their handlers, then close the image."""
        for server in self._servers:
            server.close()
        for writer in list(self._writers):
            writer.close()
        for server in self._servers:
            await server.wait_closed()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        self._servers.clear()
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.unix_path.unlink()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        peer = writer.get_extra_info("peername") or "unix"
        session = NbdServerSession({self.export: self.size})
        try:
            await self._serve(session, reader, writer)
        except NbdProtocolError as exc:
            log.warning("NBD client %s broke the protocol: %s", peer, exc)
            with contextlib.suppress(OSError):
                writer.write(session.data_to_send())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.info("NBD client %s went away: %s", peer, exc)
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()
            self._handlers.discard(task)

    async def _serve(self, session: NbdServerSession, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        writer.write(session.data_to_send())
        await writer.drain()
        while True:
            data = await reader.read(READ_CHUNK)
            if not data:
                return
            events = session.receive_data(data)
            for event in events:
                if isinstance(event, Disconnect):
                    writer.write(session.data_to_send())
                    await writer.drain()
                    return
                if isinstance(event, Negotiated):
                    log.debug("NBD client negotiated export %r", event.export)
                    continue
                error, payload = await self._execute(event)
                session.reply(event.cookie, error, payload)
            out = session.data_to_send()
            if out:
                writer.write(out)
                await writer.drain()

    async def _execute(self, event: Event) -> tuple[int, bytes]:
        """(errno, read data) for one request; OSError becomes its errno, a failing hook EIO."""
        fd = self._fd
        try:
            if isinstance(event, Read):
                return 0, await asyncio.to_thread(_pread_exact, fd, event.length, event.offset)
            tracker = self.tracker
            if isinstance(event, Write):
                if tracker is not None:
                    await tracker.before_change(event.offset, len(event.data))
                await asyncio.to_thread(self._write, fd, event.data, event.offset, event.fua)
                if tracker is not None:
                    tracker.changed(event.offset, len(event.data))
            elif isinstance(event, (WriteZeroes, Trim)):
                if tracker is not None:
                    await tracker.before_change(event.offset, event.length)
                # Trimmed contents are unspecified; zeroing them keeps source and replica equal.
                no_hole = isinstance(event, WriteZeroes) and event.no_hole
                await asyncio.to_thread(self._zero, fd, event.offset, event.length, no_hole, event.fua)
                if tracker is not None:
                    tracker.changed(event.offset, event.length)
            elif isinstance(event, Flush):
                await asyncio.to_thread(os.fdatasync, fd)
                if tracker is not None:
                    await tracker.flushed()
            return 0, b""
        except OSError as exc:
            log.warning("NBD %s failed: %s", type(event).__name__, exc)
            return exc.errno or errno.EIO, b""
        except Exception:
            log.exception("NBD hook failed for %s", type(event).__name__)
            return errno.EIO, b""

    @staticmethod
    def _write(fd: int, data: bytes, offset: int, fua: bool) -> None:
        _pwrite_all(fd, data, offset)
        if fua:
            os.fdatasync(fd)

    @staticmethod
    def _zero(fd: int, offset: int, length: int, no_hole: bool, fua: bool) -> None:
        if no_hole:
            _write_zero_bytes(fd, offset, length)
        else:
            write_zeros(fd, offset, length)
        if fua:
            os.fdatasync(fd)
