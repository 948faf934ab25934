"""Link reads the socket straight into the session's frame buffer (transport._Reads), over
plain TCP and TLS: what arrives before the Link exists is kept, frames of any size come out
whole and in order, a refused header and the peer's close come out as errors."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cdp.errors import PeerClosed, RemoteProtocolError
from cdp.wire.frames import HEADER, encode
from cdp.wire.messages import Data, Message, Ping
from cdp.wire.session import Session
from cdp.wire.transport import Link


class Plain(Session):
    """A session with no rules: every message may come and go (the subject is the transport)."""

    def _accept(self, msg: Message) -> bool:
        return True

    def _sent(self, msg: Message) -> None:
        pass


def _tls(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    (tmp / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp / "c.pem", tmp / "k.pem")
    client = ssl.create_default_context(cafile=str(tmp / "c.pem"))
    return server, client


MSGS = [Ping(1), *(Data("v", 1, b"", b"", n, bytes([n % 251]) * n)
                     for n in (10, 300_000, 4 << 20, 7, 2 << 20)), Ping(2)]


async def _exchange(tls: tuple[ssl.SSLContext, ssl.SSLContext] | None, tail: bytes) -> list:
    got: list = []
    done = asyncio.get_running_loop().create_future()
    all_in = asyncio.Event()  # the client closes only then: a TLS peer's close can reset the
    # connection, and what TCP or TLS still held unread is lost with it (streams or not)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.2)  # the first frames wait in the StreamReader meanwhile
        link = Link(Plain(64 << 20), reader, writer)
        assert link._reads is not None  # reads go straight into the session's buffer
        try:
            while True:
                got.extend(await link.receive(timeout=10))
                if len(got) >= len(MSGS):
                    all_in.set()
        except Exception as exc:  # the test looks at which
            got.append(exc)
        finally:
            writer.close()
            done.set_result(None)

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls[0] if tls else None)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls[1] if tls else None,
        server_hostname="localhost" if tls else None)
    for m in MSGS:
        writer.write(encode(m, 64 << 20))
        await writer.drain()
    async with asyncio.timeout(30):
        await all_in.wait()
        writer.write(tail)
        await writer.drain()
        if tail:
            await done
        writer.close()
        await done
    server.close()
    return got


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_frames_of_any_size_come_out_whole_and_in_order(tmp_path: Path, tls: bool) -> None:
    got = asyncio.run(_exchange(_tls(tmp_path) if tls else None, b""))
    assert got[:-1] == MSGS
    assert isinstance(got[-1], PeerClosed)


def test_a_header_announcing_too_much_is_refused_before_its_body() -> None:
    got = asyncio.run(_exchange(None, HEADER.pack((64 << 20) + 1)))
    assert got[:-1] == MSGS
    assert isinstance(got[-1], RemoteProtocolError) and "exceeds" in str(got[-1])
