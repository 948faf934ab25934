"""Hostile peers at the protocol level: what a stranger or a misbehaving source sends before
and after authentication is refused before it costs memory, forges a log line or crashes a
handler (issue 13: pre-auth frames, names and times, log injection)."""

from __future__ import annotations

import logging
import os
import struct

import msgpack
import pytest
from helpers import feed
from test_protocol import Pair, ready

from cdp.blocks import Geometry, pack_u64
from cdp.cli.logs import LogfmtFormatter
from cdp.errors import RemoteProtocolError
from cdp.wire.frames import encode
from cdp.wire.messages import PROTOCOL_VERSION, Begin, Current, FilePut, Hello, Open, Opened, Zero
from cdp.wire.receiver_session import ReceiverSession
from cdp.wire.session import MAX_ZERO_RUNS, PREAUTH_MAX_FRAME

CLIENTS = {"host1": (b"0123456789abcdef0123456789abcdef", ("vm1",))}


def test_a_stranger_cannot_announce_a_big_frame() -> None:
    """Before authentication a frame over a few KiB is refused from its header alone."""
    rcv = ReceiverSession(CLIENTS.get, 32 << 20)
    with pytest.raises(RemoteProtocolError, match=f"{PREAUTH_MAX_FRAME}-byte limit"):
        rcv.receive_data(struct.pack(">I", PREAUTH_MAX_FRAME + 1) + b"\x00" * 100)


def test_after_authentication_the_full_frame_size_applies() -> None:
    p = ready()
    big = Begin("vm1", 1, 1.0)
    assert p.src_send(big) == [big]
    put = FilePut("set", "a", b"h" * 16, 3, 1.0, 0o644, 1.0, os.urandom(64 * 1024))
    frame = encode(put)
    assert len(frame) > PREAUTH_MAX_FRAME
    p.rcv.receive_data(frame)  # no size error: the session is authenticated (FilePut is judged later)


def test_hello_name_must_be_a_valid_client_name() -> None:
    rcv = ReceiverSession(CLIENTS.get)
    forged = 'x\nts=2026-01-01T00:00:00.000 level=info msg="client authenticated client=host1"'
    with pytest.raises(RemoteProtocolError, match="invalid client name"):
        feed(rcv, encode(Hello(PROTOCOL_VERSION, forged, os.urandom(32))))


@pytest.mark.parametrize("when", [float("inf"), float("-inf"), 1e300])
def test_times_must_be_finite_and_sane(when: float) -> None:
    p = ready()
    frame = msgpack.packb([Begin.TYPE, "vm1", 1, when], use_bin_type=True)
    with pytest.raises(RemoteProtocolError, match=r"Begin\.time"):
        feed(p.rcv, struct.pack(">I", len(frame)) + frame)


def test_current_on_a_read_only_volume_is_a_protocol_error() -> None:
    p = Pair()
    p.handshake()
    assert p.src_send(Open("vm1", 10 * 65536, 65536, readonly=True))
    p.rcv_send(Opened("vm1", "r", 3, 1.0))
    with pytest.raises(RemoteProtocolError, match="read-only"):
        feed(p.rcv, encode(Current("vm1", 3, 5.0)))


def test_log_lines_cannot_be_forged_or_carry_terminal_escapes() -> None:
    evil = 'h\nts=2026 level=info msg="client authenticated client=host1"\r\x1b[2J\u2028"'
    rec = logging.LogRecord("cdp.receiver", logging.WARNING, __file__, 1,
                            "closing connection client=%s", (evil,), None)
    line = LogfmtFormatter().format(rec)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\u2028" not in line
    assert line.count('msg="') == 1  # the forged msg= is inside the escaped value
    assert line.endswith('\\""')


def _bomb(size: int) -> tuple[bytes, bytes]:
    """A small zstd frame that expands to `size` zero bytes, and the hash of those bytes."""
    import xxhash
    import zstandard

    cctx = zstandard.ZstdCompressor(level=3)
    chunk = bytes(1 << 20)
    h = xxhash.xxh3_128()
    with cctx.stream_writer(out := _Sink(), size=size) as w:
        for _ in range(size // len(chunk)):
            w.write(chunk)
            h.update(chunk)
    return out.data(), h.digest()


class _Sink:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, b: bytes) -> int:
        self.parts.append(bytes(b))
        return len(b)

    def data(self) -> bytes:
        return b"".join(self.parts)


def test_a_small_fileput_cannot_make_the_receiver_allocate_its_claimed_size(tmp_path) -> None:
    """A 1 GiB file of zeros in a ~40 KiB frame: over the limit it is refused before anything
    is decompressed; within a (raised) limit it is hashed as a stream, never held whole."""
    import resource

    from cdp.replica.files import FileSets, FileTooLarge

    blob, digest = _bomb(1 << 30)
    assert len(blob) < 64 * 1024
    store = FileSets(tmp_path).open("set")
    with pytest.raises(FileTooLarge, match="over the receiver's limit"):
        store.put("a", digest, 1 << 30, 1.0, 0o644, 1.0, blob)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    assert store.put("a", digest, 1 << 30, 1.0, 0o644, 1.0, blob, max_size=2 << 30) == 1
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grew < 200 * 1024, f"peak memory grew by {grew} KiB hashing a 1 GiB stream"
    with pytest.raises(RemoteProtocolError):  # claims less than it holds
        store.put("b", digest, (1 << 30) - 1, 1.0, 0o644, 1.0, blob, max_size=2 << 30)


def test_more_runs_than_a_frame_may_carry_are_refused() -> None:
    p = ready()
    p.src_send(Begin("vm1", 1, 1.0))
    ok = Zero("vm1", 1, pack_u64([0, 1] * MAX_ZERO_RUNS))
    assert feed(p.rcv, encode(ok)) == [ok]
    too_many = encode(Zero("vm1", 1, pack_u64([0, 1] * (MAX_ZERO_RUNS + 1))))
    with pytest.raises(RemoteProtocolError, match="at most"):
        feed(p.rcv, too_many)


def test_status_shows_peer_errors_escaped(tmp_path, capsys) -> None:
    """An error text a peer chose reaches `cdp status`: no terminal escape, no rich markup."""
    import json

    from cdp.cli.main import main
    from cdp.replica import Replica

    data = tmp_path / "replicas"
    Replica.open(data, "vol1", Geometry(1 << 20, 65536), create=True).close()
    (data / "vol1" / "status.json").write_text(json.dumps({
        "client": "host1", "connected": True, "current_as_of": 0, "rate": 0, "wire_rate": 0,
        "error": "x\x1b[2J[bold red]forged[/] line\nnext", "updated": 0, "pid": 0}))
    cfg = tmp_path / "receiver.toml"
    cfg.write_text(f'[receiver]\ndata_dir = "{data}"\n')
    rc = main(["status", "-c", str(cfg)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "\x1b" not in out.out
    assert "x\\x1b[2J[bold red]forged[/]" in out.out, out.out  # shown, not obeyed
    assert "line\\nnext" in out.out, out.out  # one row, the newline visible
