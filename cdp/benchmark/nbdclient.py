"""A minimal blocking NBD client: enough to write realistic data into an export.

qemu-img bench writes one repeated byte pattern, which flatters any
replicator that compresses or deduplicates. The benchmark writes the same
mix of data as the scan scenarios through this client instead. Fixed
newstyle handshake with NBD_OPT_GO, simple replies, WRITE/FLUSH/DISC, a
window of requests in flight.
"""

from __future__ import annotations

import socket
import struct

from cdp.errors import CdpError

_NBDMAGIC = b"NBDMAGIC"
_IHAVEOPT = b"IHAVEOPT"
_OPT_GO = 7
_REP_ACK = 1
_REP_INFO = 3
_REQUEST_MAGIC = 0x25609513
_SIMPLE_REPLY_MAGIC = 0x67446698
_CMD_WRITE, _CMD_DISC, _CMD_FLUSH = 1, 2, 3
_REQ = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")


class NbdClientError(CdpError):
    """The NBD server refused the export or a request."""


class NbdClient:
    """Connect, negotiate `export`, then write(); close() sends DISC."""

    def __init__(self, address: tuple[str, int] | str, export: str, depth: int = 16) -> None:
        """`address` is (host, port) for TCP or the path of a Unix socket."""
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(60)
            self.sock.connect(address)
        else:
            self.sock = socket.create_connection(address, timeout=60)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.depth = depth
        self.cookie = 0
        self.inflight = 0
        self.size = self._handshake(export)

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise NbdClientError("the NBD server closed the connection")
            buf += chunk
        return bytes(buf)

    def _handshake(self, export: str) -> int:
        hello = self._recv(18)
        if hello[:8] != _NBDMAGIC or hello[8:16] != _IHAVEOPT:
            raise NbdClientError("not a fixed-newstyle NBD server")
        self.sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(_IHAVEOPT + struct.pack(">II", _OPT_GO, len(data)) + data)
        size = -1
        while True:
            _magic, _opt, rtype, length = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(length)
            if rtype == _REP_ACK:
                break
            if rtype == _REP_INFO and len(payload) >= 12 and payload[:2] == b"\0\0":
                size = struct.unpack(">Q", payload[2:10])[0]
            elif rtype & (1 << 31):
                raise NbdClientError(f"export {export!r} refused: {payload.decode(errors='replace')}")
        return size

    def _send(self, cmd: int, offset: int, length: int, data: bytes | bytearray = b"") -> None:
        while self.inflight >= self.depth:
            self._reply()
        self.cookie += 1
        head = _REQ.pack(_REQUEST_MAGIC, 0, cmd, self.cookie, offset, length)
        if data:  # header and payload in one system call, without joining them (a copy)
            sent = self.sock.sendmsg([head, data])
            if sent < len(head) + len(data):
                rest = memoryview(head + bytes(data))[sent:]
                self.sock.sendall(rest)
        else:
            self.sock.sendall(head)
        self.inflight += 1

    def _reply(self) -> None:
        magic, error, _cookie = _REPLY.unpack(self._recv(_REPLY.size))
        if magic != _SIMPLE_REPLY_MAGIC:
            raise NbdClientError("unexpected reply (structured replies are not asked for)")
        self.inflight -= 1
        if error:
            raise NbdClientError(f"the server answered a request with errno {error}")

    def write(self, offset: int, data: bytes | bytearray) -> None:
        self._send(_CMD_WRITE, offset, len(data), data)

    def flush(self) -> None:
        """Wait for every write in flight, then FLUSH and wait for it too."""
        self._send(_CMD_FLUSH, 0, 0)
        while self.inflight:
            self._reply()

    def close(self) -> None:
        while self.inflight:
            self._reply()
        self.sock.sendall(_REQ.pack(_REQUEST_MAGIC, 0, _CMD_DISC, 0, 0, 0))
        self.sock.close()
