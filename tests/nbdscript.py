"""Server bytes for NBD client tests: a scripted handshake and reply chunks, built by hand.

The client session must cope with servers that are not cdp's (QEMU, nbdkit) and
with hostile ones, so its tests feed it bytes written here from the spec
rather than only what cdp's own server session produces.
"""

from __future__ import annotations

import struct

from cdp.nbd import spec as p
from cdp.nbd.clientevents import ClientEvent, Ready
from cdp.nbd.clientsession import NbdClientSession

SIZE = 1 << 20
EXPORT = "d"
BITMAP = "qemu:dirty-bitmap:b0"


def greeting(flags: int = p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES) -> bytes:
    return struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, flags)


def rep(option: int, kind: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", p.OPT_REPLY_MAGIC, option, kind, len(data)) + data


def info_export(size: int = SIZE, flags: int = p.TRANSMISSION_FLAGS | p.TFLAG_SEND_DF) -> bytes:
    return rep(p.OPT_GO, p.REP_INFO, struct.pack(">HQH", p.INFO_EXPORT, size, flags))


def handshake(contexts: dict[int, str] | None = None, size: int = SIZE, structured: bool = True) -> bytes:
    """Everything a well-behaved server answers to the client's options, in order."""
    out = greeting()
    out += rep(p.OPT_STRUCTURED_REPLY, p.REP_ACK if structured else p.REP_ERR_UNSUP)
    if contexts:
        for ctx_id, name in contexts.items():
            out += rep(p.OPT_SET_META_CONTEXT, p.REP_META_CONTEXT, struct.pack(">I", ctx_id) + name.encode())
        out += rep(p.OPT_SET_META_CONTEXT, p.REP_ACK)
    out += info_export(size)
    out += rep(p.OPT_GO, p.REP_INFO, struct.pack(">HIII", p.INFO_BLOCK_SIZE, 1, 4096, 1 << 16))
    out += rep(p.OPT_GO, p.REP_ACK)
    return out


def chunk(cookie: int, kind: int, payload: bytes = b"", done: bool = True) -> bytes:
    return struct.pack(">IHHQI", p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE if done else 0, kind, cookie,
                       len(payload)) + payload


def data_chunk(cookie: int, offset: int, data: bytes, done: bool = True) -> bytes:
    return chunk(cookie, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", offset) + data, done)


def hole_chunk(cookie: int, offset: int, size: int, done: bool = True) -> bytes:
    return chunk(cookie, p.REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", offset, size), done)


def status_chunk(cookie: int, ctx_id: int, extents: list[tuple[int, int]], done: bool = True) -> bytes:
    payload = struct.pack(">I", ctx_id) + b"".join(struct.pack(">II", n, f) for n, f in extents)
    return chunk(cookie, p.REPLY_TYPE_BLOCK_STATUS, payload, done)


def error_chunk(cookie: int, err: int, message: bytes = b"", done: bool = True) -> bytes:
    return chunk(cookie, p.REPLY_TYPE_ERROR, struct.pack(">IH", err, len(message)) + message, done)


def simple(cookie: int, err: int = 0, data: bytes = b"") -> bytes:
    return struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, err, cookie) + data


def ready_client(contexts: dict[int, str] | None = None, size: int = SIZE,
                 structured: bool = True) -> tuple[NbdClientSession, Ready]:
    """A client session in transmission against the scripted handshake."""
    client = NbdClientSession(EXPORT, list((contexts or {}).values()))
    events: list[ClientEvent] = client.receive_data(handshake(contexts, size, structured))
    client.data_to_send()
    assert len(events) == 1 and isinstance(events[0], Ready), events
    return client, events[0]
