"""Length-prefixed msgpack framing with size limits. Pure: bytes in, messages out.

A frame is a 4-byte big-endian payload length followed by that many bytes of
msgpack. The length is checked against the limit before anything is buffered,
and msgpack is decoded with limits on every container and string, because the
peer is not trusted (borg's restricted unpacker is the model).
"""

from __future__ import annotations

import struct

import msgpack

from cdp.errors import LocalProtocolError, RemoteProtocolError
from cdp.wire.messages import Message, from_wire, to_wire

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 32 * 1024 * 1024


BIG_BLOB = 64 * 1024  # a last field at least this large is joined into the frame as it is


def _bin_header(n: int) -> bytes:
    """msgpack's header of a bin of n bytes, in the shortest form (as msgpack packs it)."""
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def encode(msg: Message, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """One frame for one message.

    A message that ends in a large bytes field (Data's compressed blocks) is packed
    without it, and the frame is one join of header, the packed fields and the blob: its
    data is copied once on its way into the frame (a packer would copy it into a buffer
    it grows by reallocating, then the join again). The bytes are the same msgpack."""
    fields = to_wire(msg)
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    blob = fields[-1]
    if isinstance(blob, bytes) and len(blob) >= BIG_BLOB:
        packer.pack_array_header(len(fields))
        for f in fields[:-1]:
            packer.pack(f)
        tail: tuple[bytes, ...] = (_bin_header(len(blob)), blob)
    else:
        packer.pack(fields)
        tail = ()
    with packer.getbuffer() as head:
        size = len(head) + sum(len(t) for t in tail)
        if size > max_frame:
            raise LocalProtocolError(f"{type(msg).__name__} frame of {size} bytes exceeds "
                                     f"the {max_frame}-byte limit")
        return b"".join((HEADER.pack(size), head, *tail))


def decode_payload(payload: bytes | memoryview, max_frame: int = DEFAULT_MAX_FRAME) -> Message:
    """The message in one frame's payload; RemoteProtocolError for anything malformed."""
    try:
        obj = msgpack.unpackb(
            payload, raw=False, use_list=True, strict_map_key=True,
            max_bin_len=max_frame, max_str_len=65536, max_array_len=65536,
            max_map_len=0, max_ext_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            UnicodeDecodeError, TypeError) as exc:
        raise RemoteProtocolError(f"malformed frame: {type(exc).__name__}: {exc}") from None
    return from_wire(obj)


class FrameDecoder:
    """Feed bytes as they arrive; take whole messages out.

    Two ways in: push() copies bytes someone else read, and the buffer protocol
    (get_buffer() / buffer_updated(), what asyncio.BufferedProtocol calls) lets the
    socket read straight into the decoder's buffer, so a received byte is copied once,
    by the kernel, before msgpack takes its fields out. A frame larger than the buffer
    gets a buffer of its own size as soon as its header is in, and the rest of it is
    read into place; a buffer grown for large frames is kept while large frames come
    (a seed) and given back after the first small one.

    Memory stays bounded by max_frame plus one read: a header announcing more is an
    error at once, before the body arrives. Messages are decoded straight from the
    buffer (msgpack copies out only the fields it returns); taken frames are dropped
    by moving an offset, and the buffer is compacted only when room is needed.
    """

    CHUNK = 256 * 1024  # the buffer's usual size, and the least room offered to a read

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray(self.CHUNK)
        self._start = 0  # first byte not taken yet
        self._end = 0  # end of the bytes received
        self.sizes: list[int] = []  # frame sizes (header included) of the last feed's messages

    def _frame_length(self) -> int | None:
        """The whole size (header included) of the frame at _start, once its header is in."""
        if self._end - self._start < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buf, self._start)
        if length > self.max_frame:  # refuse at once, before the body arrives
            raise RemoteProtocolError(
                f"frame of {length} bytes exceeds the {self.max_frame}-byte limit")
        return HEADER.size + length

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Room for the next read, at the end of what is buffered (the frame in progress
        gets a buffer that holds it whole)."""
        held = self._end - self._start
        need = max(self._frame_length() or 0, held + self.CHUNK // 4)
        if self._start + need > len(self._buf):
            if need <= len(self._buf):
                self._buf[:held] = self._buf[self._start:self._end]  # compact
            else:
                grown = bytearray(need + self.CHUNK)  # and room for the next frame's start
                grown[:held] = self._buf[self._start:self._end]
                self._buf = grown
            self._start, self._end = 0, held
        return memoryview(self._buf)[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        """`nbytes` were read into the room get_buffer() gave."""
        self._end += nbytes
        self._frame_length()  # a header announcing too much: refused now

    def push(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer received bytes; take messages out with pop()."""
        data = memoryview(data).cast("B")
        while data:
            room = self.get_buffer()
            n = min(len(room), len(data))
            room[:n] = data[:n]
            room.release()
            self.buffer_updated(n)
            data = data[n:]

    def has_frame(self) -> bool:
        """A whole frame is buffered (a reader may stop reading until it is taken)."""
        n = self._frame_length()
        return n is not None and self._end - self._start >= n

    def pop(self) -> tuple[Message, int] | None:
        """The next whole message and its frame size, or None until more bytes arrive."""
        n = self._frame_length()
        if n is None or self._end - self._start < n:
            return None
        pos = self._start
        with memoryview(self._buf) as mv, mv[pos + HEADER.size:pos + n] as payload:
            msg = decode_payload(payload, self.max_frame)
        self._start = pos + n
        if self._start == self._end:  # all taken: reuse the buffer from its start
            self._start = self._end = 0
            if len(self._buf) > self.CHUNK and n <= self.CHUNK:
                self._buf = bytearray(self.CHUNK)  # large frames are over: give their room back
        return msg, n

    def feed(self, data: bytes) -> list[Message]:
        """push() then pop() until empty; frame sizes go to `sizes`."""
        self.push(data)
        out: list[Message] = []
        self.sizes = []
        while (item := self.pop()) is not None:
            out.append(item[0])
            self.sizes.append(item[1])
        return out

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet make a whole frame."""
        return self._end - self._start
