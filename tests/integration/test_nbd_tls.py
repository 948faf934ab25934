"""NBD over TLS (NBD_OPT_STARTTLS) with real clients: qemu-io/qemu-img and nbdinfo.

Certificates come from a throwaway CA made with `cryptography`, laid out the way
qemu's tls-creds-x509 and libnbd's tls-certificates want them (ca-cert.pem,
client-cert.pem, client-key.pem in one folder). The server requires a client
certificate signed by that CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from helpers import scaled, wait_for

from tests.integration.test_nbd_qemu import Running, _serve

MiB = 1024 * 1024
SIZE = 8 * MiB


@dataclass
class Pki:
    client_dir: Path  # ca-cert.pem, client-cert.pem, client-key.pem
    ca: Path
    server_cert: Path
    server_key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca))
        ctx.load_cert_chain(self.server_cert, self.server_key)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey,
           *, ca: bool = False, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate | None = None,
           key: ec.EllipticCurvePrivateKey | None = None) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
    return path


def make_pki(root: Path, name: str = "cdp test CA") -> Pki:
    root.mkdir(parents=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue(name, ca_key, name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_dir = root / "client"
    client_dir.mkdir()
    _write(client_dir / "ca-cert.pem", ca_cert)
    _write(client_dir / "client-cert.pem", _issue("client", client_key, name, ca_key))
    _write(client_dir / "client-key.pem", key=client_key)
    return Pki(client_dir, _write(root / "ca.pem", ca_cert),
               _write(root / "server-cert.pem", _issue("localhost", server_key, name, ca_key, server=True)),
               _write(root / "server-key.pem", key=server_key))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki") / "ok")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as fh:
        fh.truncate(SIZE)
    return path


@pytest.fixture
def tls_required(image: Path, pki: Pki) -> Iterator[Running]:
    yield from _serve(image, "disk", None, tls=pki.server_context(), tls_required=True)


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not on PATH")


def qemu_tls(tool: str, port: int, certs: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """qemu-io/qemu-img on the export with x509 client credentials from the certs folder.

    For qemu-img, args[0] is the subcommand (it must come first).
    """
    opts = (f"driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={port},file.export=disk,"
            f"file.tls-creds=tls0")
    head = [tool, args[0]] if tool == "qemu-img" else [tool]
    rest = args[1:] if tool == "qemu-img" else args
    return subprocess.run([*head, "--object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=client",
                           *rest, "--image-opts", opts], capture_output=True, text=True,
                          timeout=scaled(60))


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "failed" not in out and "error" not in out.lower(), out
    return out


def test_qemu_io_over_tls(tls_required: Running, pki: Pki) -> None:
    need("qemu-io")
    port = tls_required.server.tcp_port
    assert port is not None
    ok(qemu_tls("qemu-io", port, pki.client_dir, "-c", "write -P 0x5c 64k 1M", "-c", "flush",
                "-c", "read -P 0x5c 64k 1M"))
    data = tls_required.image.read_bytes()
    assert data[65536:65536 + MiB] == b"\x5c" * MiB
    assert sum(length for _, length in tls_required.dirty()) == MiB
    assert tls_required.flushes


def test_qemu_img_info_over_tls(tls_required: Running, pki: Pki) -> None:
    need("qemu-img")
    port = tls_required.server.tcp_port
    assert port is not None
    out = ok(qemu_tls("qemu-img", port, pki.client_dir, "info"))
    assert str(SIZE) in out


def test_plain_clients_are_refused_when_tls_is_required(tls_required: Running) -> None:
    need("qemu-io", "nbdinfo")
    proc = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", tls_required.url],
                          capture_output=True, text=True, timeout=scaled(60))
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "TLS" in proc.stdout + proc.stderr
    proc = subprocess.run(["nbdinfo", tls_required.url], capture_output=True, text=True,
                          timeout=scaled(60))
    assert proc.returncode != 0
    assert tls_required.dirty() == []
    assert tls_required.image.read_bytes() == bytes(SIZE)


def test_nbdinfo_over_tls(tls_required: Running, pki: Pki) -> None:
    need("nbdinfo")
    port = tls_required.server.tcp_port
    url = f"nbds://127.0.0.1:{port}/disk?tls-certificates={pki.client_dir}"
    proc = subprocess.run(["nbdinfo", "--json", url], capture_output=True, text=True, timeout=scaled(60))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["TLS"] is True
    assert doc["structured"] is True  # renegotiated inside TLS, as the spec requires
    [export] = doc["exports"]
    assert export["export-size"] == SIZE
    assert "base:allocation" in export["contexts"]


def test_client_cert_from_another_ca_is_refused(tls_required: Running, pki: Pki, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    need("qemu-io")
    port = tls_required.server.tcp_port
    assert port is not None
    # The client trusts our CA too (so only the server can object: qemu checks its own cert
    # against its CA list), but its cert comes from a CA the server does not know.
    stranger = make_pki(tmp_path / "stranger", name="some other CA")
    with open(stranger.client_dir / "ca-cert.pem", "ab") as fh:
        fh.write(pki.ca.read_bytes())
    caplog.set_level(logging.WARNING, logger="cdp.nbd.server")
    proc = qemu_tls("qemu-io", port, stranger.client_dir, "-c", "write -P 1 0 4k")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    # The server logs from its own thread, possibly just after qemu gave up.
    wait_for(lambda: any("failed the TLS handshake" in r.getMessage()
                         and "certificate verify failed" in r.getMessage() for r in caplog.records),
             10, what=lambda: f"the server to log the refused certificate; log: {caplog.text!r}")
    assert tls_required.dirty() == []
    # The server goes on serving clients it trusts.
    ok(qemu_tls("qemu-io", port, pki.client_dir, "-c", "write -P 0x21 0 4k", "-c", "read -P 0x21 0 4k"))
    assert tls_required.dirty() == [(0, 4096)]


def test_tls_offered_but_optional(image: Path, pki: Pki) -> None:
    need("qemu-io")
    for running in _serve(image, "disk", None, tls=pki.server_context()):
        port = running.server.tcp_port
        assert port is not None
        proc = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x0a 0 4k", running.url],
                              capture_output=True, text=True, timeout=scaled(60))
        ok(proc)
        ok(qemu_tls("qemu-io", port, pki.client_dir, "-c", "read -P 0x0a 0 4k", "-c", "write -P 0x0b 4k 4k"))
        assert running.dirty() == [(0, 4096), (4096, 4096)]
