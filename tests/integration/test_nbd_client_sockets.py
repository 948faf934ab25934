"""The asyncio NBD client against cdp's own NBD server on loopback TCP and a Unix socket, and
against servers that misbehave (hang up, stall, send garbage).

Real sockets, one event loop per test; the server side is cdp.nbd.server.NbdServer
over a sparse image file, so holes, data and base:allocation are real.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import pytest
from helpers import scaled

from cdp.nbd import spec as p
from cdp.nbd.client import NbdClient
from cdp.nbd.clientevents import NbdClientError, NbdRefusedError
from cdp.nbd.server import NbdServer

MiB = 1 << 20
SIZE = 64 * MiB


def _image(tmp_path: Path) -> Path:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(SIZE)
        f.seek(MiB)
        f.write(b"a" * 8192)
        f.seek(40 * MiB - 4096)
        f.write(os.urandom(3 * MiB))
    return image


@pytest.mark.parametrize("unix", [False, True])
def test_reads_and_block_status_against_cdps_server(tmp_path: Path, unix: bool) -> None:
    image = _image(tmp_path)
    sock_dir = Path(tempfile.mkdtemp(prefix="cdpnbd", dir="/tmp"))

    async def main() -> None:
        server = NbdServer(image, export="disk", host=None if unix else "127.0.0.1",
                           unix_path=sock_dir / "nbd.sock" if unix else None)
        await server.start()
        try:
            if unix:
                client = await NbdClient.connect_unix(str(sock_dir / "nbd.sock"), "disk",
                                                      contexts=[p.BASE_ALLOCATION], timeout=scaled(10))
            else:
                assert server.tcp_port is not None
                client = await NbdClient.connect_tcp("127.0.0.1", server.tcp_port, "disk",
                                                     contexts=[p.BASE_ALLOCATION], timeout=scaled(10))
            async with client:
                assert client.size == SIZE and client.contexts == (p.BASE_ALLOCATION,)
                want = image.read_bytes()
                # A read larger than the server's maximum payload goes out as several requests.
                got, small = await asyncio.gather(client.read(MiB - 100, 40 * MiB),
                                                  client.read(40 * MiB - 4096, 4096 + 10))
                assert got == want[MiB - 100:41 * MiB - 100]
                assert small == want[40 * MiB - 4096:40 * MiB + 10]
                data = [e for e in await client.extents(p.BASE_ALLOCATION) if not e.flags & p.STATE_HOLE]
                covered = [(e.offset, e.offset + e.length) for e in data]
                for start, end in ((MiB, MiB + 8192), (40 * MiB - 4096, 43 * MiB - 4096)):
                    assert any(a <= start and end <= b for a, b in covered), (start, end, covered)
                assert sum(b - a for a, b in covered) < 8 * MiB  # the rest reads as holes
                with pytest.raises(NbdClientError, match="over 2 extents"):
                    await client.extents(p.BASE_ALLOCATION, max_extents=2)
                assert await client.read(0, 4) == bytes(4)  # the connection goes on
        finally:
            await server.close()

    try:
        asyncio.run(main())
    finally:
        for f in sock_dir.iterdir():
            f.unlink()
        sock_dir.rmdir()


def test_refusals_and_dead_servers_are_nbd_client_errors(tmp_path: Path) -> None:
    image = _image(tmp_path)

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # says nothing until the client gives up

    async def main() -> None:
        server = NbdServer(image, export="disk")
        await server.start()
        assert server.tcp_port is not None
        try:
            with pytest.raises(NbdRefusedError, match="no export 'other'"):
                await NbdClient.connect_tcp("127.0.0.1", server.tcp_port, "other", timeout=scaled(10))
            with pytest.raises(NbdRefusedError, match="qemu:dirty-bitmap:b0"):
                await NbdClient.connect_tcp("127.0.0.1", server.tcp_port, "disk",
                                            contexts=["qemu:dirty-bitmap:b0"], timeout=scaled(10))
            client = await NbdClient.connect_tcp("127.0.0.1", server.tcp_port, "disk", timeout=scaled(10))
            assert await client.read(MiB, 4) == b"aaaa"
            await server.close()  # the server goes away under a connected client
            with pytest.raises(NbdClientError):
                await client.read(MiB, 4)
            await client.close()
        finally:
            await server.close()
        for handler, match in ((garbage, "not an NBD server"), (silent, "did not finish the handshake")):
            fake = await asyncio.start_server(handler, "127.0.0.1", 0)
            port = fake.sockets[0].getsockname()[1]
            try:
                with pytest.raises(NbdClientError, match=match):
                    await NbdClient.connect_tcp("127.0.0.1", port, "disk", timeout=scaled(0.5))
            finally:
                fake.close()
        with pytest.raises(NbdClientError, match="cannot connect"):
            await NbdClient.connect_unix(str(tmp_path / "absent.sock"), "disk", timeout=scaled(5))

    asyncio.run(main())

