"""TLS with client certificates, scan hooks, reflink snapshots, and dedup that must ask again."""

from __future__ import annotations

import datetime
import os
import random
import shutil
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import (
    BS,
    assert_replica_equal,
    make_image,
    scaled,
    wait_converged,
    wait_for,
    write_blocks,
)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer_key, issuer: str, *, ca: bool = False,
          san: str | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_pki(d: Path, ca_name: str = "cdp-test-ca") -> dict[str, Path]:
    """A CA, a receiver certificate for 'localhost' and a client certificate."""
    d.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(ca_name, ca_key, ca_key, ca_name, ca=True)
    out = {"ca": d / "ca.crt"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who, san in (("receiver", "localhost"), ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(who, key, ca_key, ca_name, san=san)
        (d / f"{who}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        kp = d / f"{who}.key"
        kp.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        os.chmod(kp, 0o600)
        out[f"{who}_crt"], out[f"{who}_key"] = d / f"{who}.crt", kp
    return out


def test_tls_with_client_certificates(cdp_env, daemons, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    env = cdp_env(
        receiver_extra=(f'[receiver.tls]\ncert = "{pki["receiver_crt"]}"\n'
                        f'key = "{pki["receiver_key"]}"\nclient_ca = "{pki["ca"]}"'),
        source_extra=(f'[source.tls]\nca = "{pki["ca"]}"\ncert = "{pki["client_crt"]}"\n'
                      f'key = "{pki["client_key"]}"\nserver_name = "localhost"'))
    img = env.source.images["vol1"]
    make_image(img, 8 << 20, random.Random(1))
    rx = daemons.receiver(env, inprocess=True)
    t0 = time.time()
    src = daemons.source(env, inprocess=True)
    wait_converged(env, "vol1", t0, src, rx)
    assert_replica_equal(env, "vol1")
    src.stop()
    rx.stop()


def test_tls_refuses_an_untrusted_receiver(cdp_env, daemons, tmp_path: Path) -> None:
    good = make_pki(tmp_path / "good")
    other = make_pki(tmp_path / "other", ca_name="someone-else")
    env = cdp_env(
        receiver_extra=f'[receiver.tls]\ncert = "{good["receiver_crt"]}"\nkey = "{good["receiver_key"]}"',
        source_extra=f'[source.tls]\nca = "{other["ca"]}"\nserver_name = "localhost"')
    make_image(env.source.images["vol1"], 1 << 20, random.Random(2))
    rx = daemons.receiver(env, inprocess=True)
    src = daemons.source(env, inprocess=True)
    wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in src.log_text(), 30,
             what="the source to report the certificate failure")
    assert env.replica_state("vol1") is None  # nothing was written
    src.stop()
    rx.stop()


def test_plaintext_source_cannot_talk_to_a_tls_receiver(cdp_env, daemons, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    env = cdp_env(receiver_extra=(f'[receiver.tls]\ncert = "{pki["receiver_crt"]}"\n'
                                  f'key = "{pki["receiver_key"]}"'))
    make_image(env.source.images["vol1"], 1 << 20, random.Random(3))
    rx = daemons.receiver(env, inprocess=True)
    src = daemons.source(env, inprocess=True)
    wait_for(lambda: src.log_text().count("reconnecting") >= 2, 30, what="failed attempts")
    assert env.replica_state("vol1") is None
    src.stop()
    rx.stop()


def test_pre_and_post_scan_hooks(cdp_env, daemons, tmp_path: Path) -> None:
    marks = tmp_path / "marks.txt"
    gate = tmp_path / "quiesce-fails"
    pre = f"test ! -e {gate} && echo pre $CDP_VOLUME $CDP_PHASE >> {marks}"
    post = f"echo post $CDP_VOLUME $CDP_PHASE >> {marks}"
    env = cdp_env(volume_extra=f"pre_scan = {pre!r}\npost_scan = {post!r}".replace("'", '"'))
    img = env.source.images["vol1"]
    make_image(img, 4 << 20, random.Random(4))
    rx = daemons.receiver(env, inprocess=True)
    t0 = time.time()
    src = daemons.source(env, inprocess=True)
    wait_converged(env, "vol1", t0, src, rx)
    lines = marks.read_text().splitlines()
    assert lines[:2] == ["pre vol1 pre_scan", "post vol1 post_scan"]
    # while the quiesce command fails, no scan runs, so changes are not replicated
    gate.touch()
    epoch = env.replica_state("vol1")["epoch"]
    write_blocks(img, {3: os.urandom(BS)})
    wait_for(lambda: "pre_scan command failed" in src.log_text(), 30, what="pre_scan failure")
    time.sleep(scaled(1.5))
    assert env.replica_state("vol1")["epoch"] == epoch
    gate.unlink()
    t1 = time.time()
    wait_converged(env, "vol1", t1, src, rx)
    assert_replica_equal(env, "vol1")
    src.stop()
    rx.stop()


def test_reflink_snapshot_on_a_filesystem_without_reflinks(cdp_env, daemons) -> None:
    env = cdp_env(volume_extra='snapshot = "reflink"')
    img = env.source.images["vol1"]
    make_image(img, 1 << 20, random.Random(5))
    rx = daemons.receiver(env, inprocess=True)
    src = daemons.source(env, inprocess=True)
    supported = False

    def reported() -> bool:
        nonlocal supported
        v = env.source.volume_status("vol1") or {}
        if v.get("seeded"):
            supported = True  # this file system has reflinks (XFS, btrfs): scans work
            return True
        return "reflinks" in (v.get("error") or "")

    wait_for(reported, 30, what="a reflink error or a working snapshot")
    if supported:
        assert_replica_equal(env, "vol1")
    else:
        assert "snapshot" in src.log_text() and env.replica_state("vol1")["epoch"] == 0
    src.stop()
    rx.stop()


def test_stale_dedup_reference_is_detected_and_data_resent(cdp_env, daemons) -> None:
    """Guarantee 5: the replica of the referenced block was damaged; the receiver must notice."""
    env = cdp_env({"host1": ["va", "vb"]})
    rng = random.Random(6)
    shared = rng.randbytes(BS)
    va, vb = env.source.images["va"], env.source.images["vb"]
    make_image(va, 2 << 20, rng)
    write_blocks(va, {5: shared})
    with open(vb, "wb") as fh:
        fh.truncate(2 << 20)
    rx = daemons.receiver(env, inprocess=True)
    t0 = time.time()
    src = daemons.source(env, inprocess=True)
    wait_converged(env, "va", t0, src, rx)
    wait_converged(env, "vb", t0, src, rx)
    src.stop()
    rx.stop()
    # damage the replica of va at block 5 behind the receiver's back
    with open(env.replica_image("va"), "r+b") as fh:
        fh.seek(5 * BS)
        fh.write(rng.randbytes(BS))
    rx = daemons.receiver(env, inprocess=True)
    src = daemons.source(env, inprocess=True)
    time.sleep(scaled(1))
    t1 = time.time()
    write_blocks(vb, {9: shared})  # the source will offer block va:5 as a reference
    wait_converged(env, "vb", t1, src, rx)
    assert_replica_equal(env, "vb")
    assert "references not resolvable" in rx.log_text()
    assert env.source.volume_status("vb")["stats"]["needs"] >= 1
    src.stop()
    rx.stop()
    shutil.rmtree(env.root / "images", ignore_errors=True)


def test_guest_is_thawed_even_when_the_snapshot_fails(cdp_env, daemons, tmp_path: Path) -> None:
    """pre_scan froze the guest; whatever happens to the reflink copy, post_scan must run."""
    marks = tmp_path / "marks.txt"
    env = cdp_env(volume_extra=(f'snapshot = "reflink"\npre_scan = "echo pre >> {marks}"\n'
                                f'post_scan = "echo post >> {marks}"'))
    make_image(env.source.images["vol1"], 1 << 20, random.Random(7))
    rx = daemons.receiver(env, inprocess=True)
    src = daemons.source(env, inprocess=True)
    wait_for(lambda: marks.exists() and marks.read_text().count("pre") >= 2, 30,
             what="two scan attempts")
    src.stop()
    rx.stop()
    lines = marks.read_text().split()
    pairs = lines[: len(lines) - len(lines) % 2]
    assert pairs and pairs == ["pre", "post"] * (len(pairs) // 2), lines
