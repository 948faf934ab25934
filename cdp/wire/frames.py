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


def encode(msg: Message, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """One frame for one message.

    Packed once into the packer's own buffer and joined with the header from there:
    a Data frame's block data is copied twice on its way into the frame, not three times."""
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    packer.pack(to_wire(msg))
    with packer.getbuffer() as payload:
        if len(payload) > max_frame:
            raise LocalProtocolError(f"{type(msg).__name__} frame of {len(payload)} bytes exceeds "
                                     f"the {max_frame}-byte limit")
        return b"".join((HEADER.pack(len(payload)), payload))


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

    Memory stays bounded by max_frame plus one read: a header announcing more
    is an error at once, before the body arrives. Messages are decoded straight
    from the buffer (msgpack copies out only the fields it returns), and taken
    frames are dropped by moving an offset: the buffer is compacted when the
    next read arrives, so each received byte is copied into it once at most (a
    read that starts a frame boundary with nothing pending is not copied at all).
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf: bytes | bytearray = b""
        self._pos = 0  # start of the first frame not taken yet
        self.sizes: list[int] = []  # frame sizes (header included) of the last feed's messages

    def push(self, data: bytes) -> None:
        """Buffer received bytes; take messages out with pop()."""
        if self._pos >= len(self._buf):  # nothing pending: decode from the read itself
            self._buf, self._pos = (data if isinstance(data, bytes) else bytes(data)), 0
        else:
            if self._pos or not isinstance(self._buf, bytearray):
                self._buf = bytearray(memoryview(self._buf)[self._pos:])
                self._pos = 0
            self._buf += data
        self._check_head()

    def _check_head(self) -> None:
        if len(self._buf) - self._pos >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf, self._pos)
            if length > self.max_frame:  # refuse at once, before the body arrives
                raise RemoteProtocolError(
                    f"frame of {length} bytes exceeds the {self.max_frame}-byte limit")

    def pop(self) -> tuple[Message, int] | None:
        """The next whole message and its frame size, or None until more bytes arrive."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(buf, pos)
        if length > self.max_frame:
            raise RemoteProtocolError(
                f"frame of {length} bytes exceeds the {self.max_frame}-byte limit")
        end = pos + HEADER.size + length
        if len(buf) < end:
            return None
        with memoryview(buf) as mv, mv[pos + HEADER.size:end] as payload:
            msg = decode_payload(payload, self.max_frame)
        self._pos = end
        if end >= len(buf):  # all taken: let the read go
            self._buf, self._pos = b"", 0
        return msg, end - pos

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
        return len(self._buf) - self._pos
