"""Pack files: many chunks in one object, self-describing so the index can be rebuilt from packs.

Layout of ``data/<xx>/<name>`` where name = sha256 of the whole pack, hex::

    0        8  magic b"CDPPACK\\x01"
    8        .. blob 0 | blob 1 | ...     each blob sealed (see crypto.py), aad = chunk id;
                                          inside: 1 flag byte (0 raw, 1 zstd) + payload
    T        .. trailer: sealed msgpack [[id, offset, length, raw_length], ...], aad b"pack trailer"
    end-12   4  trailer length, u32 little-endian
    end-8    8  magic b"CDPPEND\\x01"

Pack names are content hashes, so writing a pack twice stores it once, a pack
that is already there after a crash is recognised and not uploaded again, and
`verify --read-data` checks a whole pack against its name.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import msgpack

from cdp import codec
from cdp.archive.crypto import ID_LEN, Keys
from cdp.errors import ArchiveCorruptError, RemoteProtocolError

MAGIC = b"CDPPACK\x01"
END = b"CDPPEND\x01"
TAIL = 12  # trailer length + end magic
TRAILER_AAD = b"pack trailer"
RAW, ZSTD = 0, 1
MAX_TRAILER = 64 << 20


@dataclass(frozen=True)
class Entry:
    """Where one chunk lives: its pack, the blob's byte range there, and its plain length."""

    pack: str
    offset: int
    length: int
    raw_length: int


def pack_name(name: str) -> str:
    """The object name of a pack."""
    return f"data/{name[:2]}/{name}"


def encode_blob(keys: Keys, chunk_id: bytes, chunk: bytes, level: int) -> bytes:
    """A chunk as stored: compressed when that helps, then sealed."""
    z = codec.compress(chunk, level)
    body = bytes([ZSTD]) + z if len(z) < len(chunk) else bytes([RAW]) + chunk
    return keys.seal(body, chunk_id)


def decode_blob(keys: Keys, chunk_id: bytes, blob: bytes | memoryview, raw_length: int) -> bytes:
    """Inverse of encode_blob, checked: the result must hash to `chunk_id`."""
    what = f"chunk {chunk_id.hex()}"
    body = keys.open(blob, chunk_id, what)
    if not body:
        raise ArchiveCorruptError(f"{what} is empty")
    try:
        data = codec.decompress(body[1:], raw_length) if body[0] == ZSTD else body[1:]
    except RemoteProtocolError as exc:
        raise ArchiveCorruptError(f"{what}: {exc}") from None
    if len(data) != raw_length or keys.chunk_id(data) != chunk_id:
        raise ArchiveCorruptError(f"{what} does not hash to its id: it is damaged")
    return data


class PackWriter:
    """Collects blobs in memory until the pack is big enough to seal."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.parts: list[bytes] = [MAGIC]
        self.size = len(MAGIC)
        self.entries: list[tuple[bytes, int, int, int]] = []

    def add(self, chunk_id: bytes, blob: bytes, raw_length: int) -> None:
        self.entries.append((chunk_id, self.size, len(blob), raw_length))
        self.parts.append(blob)
        self.size += len(blob)

    def __len__(self) -> int:
        return len(self.entries)

    def seal(self) -> tuple[str, bytes, list[tuple[bytes, int, int, int]]]:
        """(name, pack bytes, entries)."""
        trailer = self.keys.seal(msgpack.packb([list(e) for e in self.entries]), TRAILER_AAD)
        self.parts += [trailer, struct.pack("<I", len(trailer)), END]
        data = b"".join(self.parts)
        self.parts = []
        return hashlib.sha256(data).hexdigest(), data, self.entries


def trailer_span(tail: bytes, pack_size: int, where: str) -> tuple[int, int]:
    """(offset, length) of the trailer from the pack's last TAIL bytes."""
    if len(tail) != TAIL or tail[4:] != END:
        raise ArchiveCorruptError(f"{where}: not a pack (no end marker)")
    (n,) = struct.unpack("<I", tail[:4])
    if n > MAX_TRAILER or n + TAIL + len(MAGIC) > pack_size:
        raise ArchiveCorruptError(f"{where}: trailer length {n} is impossible")
    return pack_size - TAIL - n, n


def parse_trailer(keys: Keys, name: str, trailer: bytes, pack_size: int) -> list[tuple[bytes, Entry]]:
    """(chunk id, entry) for every blob a pack's trailer lists, bounds-checked against the pack."""
    where = f"pack {name}"
    raw = keys.open(trailer, TRAILER_AAD, f"{where} trailer")
    limit = pack_size - TAIL - len(trailer)
    try:
        items = msgpack.unpackb(raw, raw=False, max_array_len=1 << 22, max_bin_len=ID_LEN)
        out = []
        for cid, off, ln, rl in items:
            if (not isinstance(cid, bytes) or len(cid) != ID_LEN or off < len(MAGIC) or ln < 0
                    or off + ln > limit or not 0 <= rl <= 1 << 30):
                raise ValueError("entry out of range")
            out.append((cid, Entry(name, off, ln, rl)))
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ArchiveCorruptError(f"{where}: trailer is malformed: {exc}") from None
    return out


def parse_pack(keys: Keys, name: str, data: bytes) -> list[tuple[bytes, Entry]]:
    """The entries of a whole pack held in memory (verify --read-data)."""
    if not data.startswith(MAGIC):
        raise ArchiveCorruptError(f"pack {name}: bad magic")
    off, n = trailer_span(data[-TAIL:], len(data), f"pack {name}")
    return parse_trailer(keys, name, data[off:off + n], len(data))
