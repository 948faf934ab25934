"""Who can reach an NBD export: beyond loopback only clients with a certificate; Unix sockets 0600.

Issue 13, defect 3: with only `cert` and `key` in [volume.nbd_tls] and
nbd_listen = "0.0.0.0:...", a client without a certificate completed
STARTTLS, read the disk and wrote into it. Now a non-loopback export needs
client_ca (or the explicit, loudly logged allow_any_client = true), checked
by the config loader and again by the server. For local hypervisors the
export can be a Unix socket, created 0600 and never through a symlink or over
a file or a live socket. Real peers: qemu-io and nbdinfo.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from helpers import free_port, scaled, wait_for
from test_nbd_qemu import _serve
from test_nbd_qemu import qemu_io as qemu_io_checked
from test_nbd_tls import Pki, make_pki, qemu_tls
from test_nbdmode import start_nbd

from cdp.config import load_source
from cdp.errors import ConfigError
from cdp.nbd.listen import NbdServerError
from cdp.nbd.server import NbdServer

MiB = 1 << 20
SIZE = 8 * MiB

pytestmark = pytest.mark.skipif(shutil.which("qemu-io") is None or shutil.which("nbdinfo") is None,
                                reason="needs qemu-io (qemu-utils) and nbdinfo (libnbd-bin)")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki") / "ok")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as fh:
        fh.truncate(SIZE)
    return path


def no_cert_dir(pki: Pki, where: Path) -> Path:
    """TLS credentials that trust the server but hold no client certificate."""
    where.mkdir()
    shutil.copy(pki.client_dir / "ca-cert.pem", where / "ca-cert.pem")
    return where


def cert_only_context(pki: Pki) -> ssl.SSLContext:
    """What [volume.nbd_tls] with cert and key but no client_ca gives the server."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    return ctx


# -- config: client_ca or an explicit opt-out beyond loopback ------------------------------


def _source_toml(tmp_path: Path, pki: Pki, listen: str, tls_extra: str) -> Path:
    token = tmp_path / "t.token"
    token.write_text("00" * 32)
    token.chmod(0o600)
    path = tmp_path / "source.toml"
    path.write_text(
        f'[source]\nname = "host1"\nreceiver = "127.0.0.1:7400"\ntoken_file = "{token}"\n'
        f'state_dir = "{tmp_path / "state"}"\n[[volume]]\nname = "vol1"\n'
        f'path = "{tmp_path / "disk.raw"}"\nmode = "nbd"\nnbd_listen = "{listen}"\n'
        f'[volume.nbd_tls]\ncert = "{pki.server_cert}"\nkey = "{pki.server_key}"\n{tls_extra}')
    return path


def test_config_refuses_a_non_loopback_export_without_client_ca(tmp_path: Path, pki: Pki) -> None:
    path = _source_toml(tmp_path, pki, "0.0.0.0:10809", "")
    with pytest.raises(ConfigError) as err:
        load_source(path)
    msg = str(err.value)
    assert str(path) in msg and "volume[0].nbd_tls.client_ca" in msg
    assert "not a loopback address" in msg and "allow_any_client" in msg
    # with client_ca, with the explicit opt-out, or on loopback: accepted
    assert load_source(_source_toml(tmp_path, pki, "0.0.0.0:10809", f'client_ca = "{pki.ca}"\n'))
    vol = load_source(_source_toml(tmp_path, pki, "0.0.0.0:10809", "allow_any_client = true\n")).volumes[0]
    assert vol.nbd_any_client and vol.nbd_tls is not None and vol.nbd_tls.client_ca is None
    assert load_source(_source_toml(tmp_path, pki, "127.0.0.1:10809", ""))
    bad = _source_toml(tmp_path, pki, "0.0.0.0:10809", 'allow_any_client = "yes"\n')
    with pytest.raises(ConfigError, match="allow_any_client"):
        load_source(bad)


# -- the server checks it too --------------------------------------------------------------


def test_server_refuses_to_listen_beyond_loopback_without_client_certificates(image: Path,
                                                                             pki: Pki) -> None:
    async def main() -> None:
        for kw in ({"tls": cert_only_context(pki), "tls_required": True}, {},
                   {"tls": pki.server_context()}):  # no client certs / no TLS / TLS optional
            server = NbdServer(image, export="disk", host="0.0.0.0", port=0, **kw)
            with pytest.raises(NbdServerError, match="beyond this machine"):
                await server.start()
            assert server.tcp_port is None  # nothing was left listening

    asyncio.run(main())


def test_a_client_without_a_certificate_gets_nothing_beyond_loopback(image: Path, pki: Pki,
                                                                    tmp_path: Path) -> None:
    port = free_port()
    outside = _WideServer(image, pki.server_context(), port)  # client_ca: certificates required
    try:
        bare = no_cert_dir(pki, tmp_path / "bare")
        proc = qemu_tls("qemu-io", port, bare, "-c", "write -P 0x66 0 4k")
        assert proc.returncode != 0, proc.stdout + proc.stderr
        url = f"nbds://127.0.0.1:{port}/disk?tls-certificates={bare}"
        proc = subprocess.run(["nbdinfo", url], capture_output=True, text=True, timeout=scaled(60))
        assert proc.returncode != 0, proc.stdout
        assert image.read_bytes()[:4096] == bytes(4096)  # nothing was written
        ok = qemu_tls("qemu-io", port, pki.client_dir, "-c", "write -P 0x67 0 4k", "-c", "read -P 0x67 0 4k")
        assert ok.returncode == 0 and "failed" not in ok.stdout + ok.stderr, ok.stdout + ok.stderr
    finally:
        outside.close()


def test_allow_any_client_is_the_explicit_opt_out(image: Path, pki: Pki, tmp_path: Path) -> None:
    port = free_port()
    outside = _WideServer(image, cert_only_context(pki), port, allow_any_client=True)
    try:
        bare = no_cert_dir(pki, tmp_path / "bare")
        ok = qemu_tls("qemu-io", port, bare, "-c", "write -P 0x68 0 4k")
        assert ok.returncode == 0 and "failed" not in ok.stdout + ok.stderr, ok.stdout + ok.stderr
    finally:
        outside.close()


def test_the_source_warns_loudly_about_allow_any_client(cdp_env, daemons, pki: Pki) -> None:
    tls = (f'[volume.nbd_tls]\ncert = "{pki.server_cert}"\nkey = "{pki.server_key}"\n'
           'allow_any_client = true\n')
    env, _url = start_nbd(cdp_env, daemons, SIZE, volume_extra=tls)
    src = daemons.all[1]
    port = free_port()
    text = env.source.toml.read_text().replace('nbd_listen = "127.0.0.1:', f'nbd_listen = "0.0.0.0:{port}" #')
    env.source.toml.write_text(text)
    src.stop()
    src.start()
    log = wait_for(lambda: (t := src.log_text()) and "allow_any_client" in t and t, scaled(20),
                   what="the allow_any_client warning in the source log")
    assert "level=warning" in log and "SECURITY" in log and f"0.0.0.0:{port}" in log


class _WideServer:
    """An NbdServer on 0.0.0.0 in its own loop thread (the shape of a non-loopback export)."""

    def __init__(self, image: Path, ctx: ssl.SSLContext, port: int, **kw: object) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = NbdServer(image, export="disk", host="0.0.0.0", port=port, tls=ctx,
                                tls_required=True, **kw)  # type: ignore[arg-type]
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(scaled(10))

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(scaled(10))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(scaled(10))
        self.loop.close()


# -- Unix socket exports -------------------------------------------------------------------


def test_unix_socket_is_0600_whatever_the_umask(image: Path, tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    old = os.umask(0)
    try:
        gen = _serve(image, "disk", path)
        running = next(gen)
    finally:
        os.umask(old)
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers
        qemu_io_checked(running.url, "write -P 0x31 0 64k", "read -P 0x31 0 64k")
    finally:
        with contextlib.suppress(StopIteration):
            next(gen)
    assert not path.exists()


def test_unix_socket_never_replaces_a_file_or_follows_a_symlink(image: Path, tmp_path: Path) -> None:
    async def refused(path: Path) -> str:
        server = NbdServer(image, export="disk", host=None, unix_path=path)
        with pytest.raises(NbdServerError) as err:
            await server.start()
        return str(err.value)

    precious = tmp_path / "precious.conf"
    precious.write_text("keep me")
    plain = tmp_path / "plain.sock"
    plain.write_text("not a socket")
    link = tmp_path / "link.sock"
    link.symlink_to(precious)
    dangling = tmp_path / "dangling.sock"
    dangling.symlink_to(tmp_path / "nowhere")
    assert "not a socket" in asyncio.run(refused(plain))
    assert "symlink" in asyncio.run(refused(link))
    assert "symlink" in asyncio.run(refused(dangling))
    assert plain.read_text() == "not a socket" and precious.read_text() == "keep me"
    assert os.readlink(link) == str(precious) and os.readlink(dangling) == str(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


def test_a_stale_socket_is_replaced_a_live_one_is_not(image: Path, tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a crashed run's socket: nobody accepts on it
    stale.close()
    for first in _serve(image, "disk", path):
        qemu_io_checked(first.url, "write -P 0x41 0 4k")

        async def second() -> str:
            server = NbdServer(image, export="disk", host=None, unix_path=path)
            with pytest.raises(NbdServerError) as err:
                await server.start()
            await server.close()  # must leave the first server's socket alone
            return str(err.value)

        assert "another process serves" in asyncio.run(second())
        qemu_io_checked(first.url, "read -P 0x41 0 4k")  # the first one still serves
    assert not path.exists()


def test_close_leaves_a_socket_that_is_not_ours(image: Path, tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    gen = _serve(image, "disk", path)
    next(gen)
    path.unlink()  # someone removed ours and another server took the path
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(path))
    try:
        with contextlib.suppress(StopIteration):
            next(gen)  # closes the first server
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        other.close()
