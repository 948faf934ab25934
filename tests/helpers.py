"""Helpers for cdp tests: configs on disk, real daemons, hashing and writing, waiting.

Integration tests run the receiver and sources on 127.0.0.1 with real files in tmp_path:
in the test's own process (`inprocess=True`, tests/inprocess.py) unless the test's subject is
a crash, a kill or a real process, then as `python -m cdp receiver|source` subprocesses.
Every timeout goes through `scaled()`, so a slow machine sets CDP_TEST_TIMEOUT_FACTOR=3
instead of editing tests; no test asserts how long something took. The fixtures that use
these live in conftest.py; test files import helpers from here (`from helpers import ...`).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

BS = 64 * 1024
MiB = 1024 * 1024
TIMEOUT_FACTOR = float(os.environ.get("CDP_TEST_TIMEOUT_FACTOR", "1") or 1)


def scaled(seconds: float) -> float:
    """A timeout, stretched by CDP_TEST_TIMEOUT_FACTOR."""
    return seconds * TIMEOUT_FACTOR


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
             what: str | Callable[[], str] = "condition") -> Any:
    """Poll `cond` until it returns something truthy; return that. AssertionError on timeout.

    `what` describes the condition (or is called for a description) in the failure message.
    """
    deadline = time.monotonic() + scaled(timeout)
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            desc = what() if callable(what) else what
            raise AssertionError(f"timed out after {scaled(timeout):.0f}s waiting for {desc}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- files -------------------------------------------------------------------


def file_hash(path: Path | str) -> str:
    """xxh3-128 of a whole file, hex."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while chunk := fh.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def bytes_hash(data: bytes | bytearray | memoryview) -> str:
    return xxhash.xxh3_128_hexdigest(data)


WORDS = (b"alpha beta gamma delta epsilon lorem ipsum kernel block epoch replica volume "
         b"journal commit fsync cluster node disk sector inode extent ").split()


def text_block(rng: random.Random, size: int = BS) -> bytes:
    """Compressible, text-like content."""
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choice(WORDS) for _ in range(12)) + b"\n"
    return bytes(out[:size])


def write_blocks(path: Path, blocks: dict[int, bytes], bs: int = BS, sync: bool = True) -> None:
    """Overwrite whole blocks of a file in place."""
    with open(path, "r+b") as fh:
        for i, data in sorted(blocks.items()):
            os.pwrite(fh.fileno(), data, i * bs)
        if sync:
            os.fsync(fh.fileno())


def write_random_blocks(path: Path, indices: Iterable[int], rng: random.Random,
                        bs: int = BS) -> list[int]:
    """Overwrite the given blocks with random bytes; returns the indices written."""
    idx = list(indices)
    write_blocks(path, {i: rng.randbytes(bs) for i in idx}, bs)
    return idx


def make_image(path: Path, size: int, rng: random.Random, *, zero: float = 0.25,
               text: float = 0.35, bs: int = BS) -> None:
    """A disk-like image: regions of holes, text and random data, in runs of 1-64 blocks."""
    blocks = size // bs
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.truncate(size)
        i = 0
        while i < blocks:
            run = min(blocks - i, rng.randint(1, 64))
            r = rng.random()
            if r >= zero:
                kind_text = r < zero + text
                buf = b"".join(text_block(rng, bs) if kind_text else rng.randbytes(bs)
                               for _ in range(run))
                os.pwrite(fh.fileno(), buf, i * bs)
            i += run
        os.fsync(fh.fileno())


def replace_atomically(path: Path, data: bytes | bytearray) -> None:
    """Write a whole new version beside `path` and rename it over: readers see old or new."""
    tmp = path.with_name(f".{path.name}.next")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any | None:
    """A JSON file, or None if it is missing or half-written."""
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


# -- configs -----------------------------------------------------------------


@dataclass
class SourceFiles:
    client: str
    toml: Path
    state_dir: Path
    images: dict[str, Path]
    nbd_urls: dict[str, str] = field(default_factory=dict)  # nbd mode: volume -> nbd://... URL

    def status(self) -> dict[str, Any] | None:
        return read_json(self.state_dir / "status.json")

    def volume_status(self, volume: str) -> dict[str, Any] | None:
        st = self.status()
        if not st:
            return None
        return next((v for v in st.get("volumes", []) if v.get("volume") == volume), None)


@dataclass
class CdpEnv:
    """Configs, tokens and folders for one receiver and its sources, written into `root`."""

    root: Path
    port: int
    receiver_toml: Path
    data_dir: Path
    sources: dict[str, SourceFiles] = field(default_factory=dict)
    tokens: dict[str, Path] = field(default_factory=dict)

    @property
    def source(self) -> SourceFiles:
        """The first (often the only) source."""
        return next(iter(self.sources.values()))

    def replica_dir(self, volume: str) -> Path:
        return self.data_dir / volume

    def replica_image(self, volume: str) -> Path:
        return self.data_dir / volume / "image"

    def replica_state(self, volume: str) -> dict[str, Any] | None:
        return read_json(self.data_dir / volume / "state.json")

    def counters(self, volume: str) -> dict[str, int]:
        st = self.replica_state(volume)
        assert st is not None, f"no state.json for replica {volume}"
        return dict(st["counters"])

    def token(self, client: str) -> bytes:
        return self.tokens[client].read_bytes().strip()


def _toml_str(v: str | Path) -> str:
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def write_env(root: Path, clients: dict[str, list[str]] | None = None, *,
              data_dir: Path | None = None, scan_interval: str = "1s",
              min_scan_interval: str = "0.1s", receiver_extra: str = "",
              source_extra: str = "", volume_extra: str = "",
              receiver_addr: str | None = None, port: int | None = None,
              mode: str = "scan") -> CdpEnv:
    """Write receiver.toml, one source-<client>.toml per client and a 0600 token each.

    clients maps a client name to the volumes it may write and replicates
    (default: host1 -> [vol1]). Images live in root/images/<volume>.raw; the
    caller creates them. receiver_addr points the sources elsewhere (a proxy);
    port is the receiver's (default: a free one). mode "nbd" serves each volume
    on a free loopback port (SourceFiles.nbd_urls).
    """
    clients = clients or {"host1": ["vol1"]}
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    data_dir = data_dir or root / "replicas"
    env = CdpEnv(root, port, root / "receiver.toml", data_dir)
    rx = ["[receiver]", f'listen = "127.0.0.1:{port}"', f"data_dir = {_toml_str(data_dir)}",
          receiver_extra, ""]
    for name, vols in clients.items():
        token = root / f"{name}.token"
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(os.urandom(32).hex() + "\n")
        os.chmod(token, 0o600)
        env.tokens[name] = token
        rx += ["[[receiver.client]]", f'name = "{name}"', f"token_file = {_toml_str(token)}",
               f"volumes = {json.dumps(vols)}", ""]
        state_dir = root / f"state-{name}"
        images = {v: root / "images" / f"{v}.raw" for v in vols}
        nbd_urls: dict[str, str] = {}
        src = ["[source]", f'name = "{name}"',
               f'receiver = "{receiver_addr or f"127.0.0.1:{port}"}"',
               f"token_file = {_toml_str(token)}", f"state_dir = {_toml_str(state_dir)}",
               'reconnect_min = "0.2s"', 'reconnect_max = "2s"', source_extra, ""]
        for v, img in images.items():
            src += ["[[volume]]", f'name = "{v}"', f"path = {_toml_str(img)}", f'mode = "{mode}"',
                    f'scan_interval = "{scan_interval}"',
                    f'min_scan_interval = "{min_scan_interval}"', volume_extra, ""]
            if mode == "nbd":
                nbd_port = free_port()
                src.insert(-2, f'nbd_listen = "127.0.0.1:{nbd_port}"')  # before volume_extra
                nbd_urls[v] = f"nbd://127.0.0.1:{nbd_port}/{v}"
        toml = root / f"source-{name}.toml"
        toml.write_text("\n".join(src))
        env.sources[name] = SourceFiles(name, toml, state_dir, images, nbd_urls)
    (root / "images").mkdir(exist_ok=True)
    env.receiver_toml.write_text("\n".join(rx))
    return env


# -- daemons -----------------------------------------------------------------


class Daemon:
    """One `python -m cdp VERB -c CONFIG` process, logging to a file."""

    def __init__(self, verb: str, config: Path, log: Path, port: int | None = None) -> None:
        self.verb, self.config, self.log, self.port = verb, config, log, port
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, wait: bool = True) -> Daemon:
        assert not self.running, f"{self.verb} is already running"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as fh:
            fh.write(f"---- start #{self.starts + 1} of {self.verb} ----\n".encode())
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cdp", "--log-level", "debug", self.verb, "-c",
                 str(self.config)],
                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self.starts += 1
        if wait and self.port is not None:
            self.wait_port()
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_port(self, timeout: float = 20) -> None:
        assert self.port is not None

        def listening() -> bool:
            if not self.running:
                raise AssertionError(f"{self.verb} exited with {self.returncode}:\n{self.tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return True
            except OSError:
                return False

        wait_for(listening, timeout, what=f"{self.verb} to listen on port {self.port}")

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def stop(self, timeout: float = 30, expect: int | None = 0) -> int:
        """SIGTERM and wait; asserts the exit status (default 0)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(scaled(timeout))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.verb} did not stop on SIGTERM:\n{self.tail()}") from None
        if expect is not None:
            assert rc == expect, f"{self.verb} exited with {rc}, expected {expect}:\n{self.tail()}"
        return rc

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, like a power cut for this process."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class Daemons:
    """Starts receivers and sources for a test and makes sure none outlives it.

    inprocess=True runs one in a thread of the test's process (tests/inprocess.py: the same
    interface, no process start-up) for tests whose subject is not a crash, a kill or a real
    peer; subprocesses (the default) for those that are."""

    def __init__(self) -> None:
        self.all: list[Any] = []  # Daemon or inprocess.InProcessDaemon

    def _make(self, verb: str, config: Path, log: Path, port: int | None,
              inprocess: bool) -> Any:
        if inprocess:
            from inprocess import InProcessDaemon

            return InProcessDaemon(verb, config, log, port)
        return Daemon(verb, config, log, port)

    def receiver(self, env: CdpEnv, start: bool = True, *, inprocess: bool = False) -> Any:
        d = self._make("receiver", env.receiver_toml, env.root / "receiver.log", env.port,
                       inprocess)
        self.all.append(d)
        return d.start() if start else d

    def source(self, env: CdpEnv, client: str | None = None, start: bool = True, *,
               inprocess: bool = False) -> Any:
        sf = env.sources[client] if client else env.source
        d = self._make("source", sf.toml, env.root / f"source-{sf.client}.log", None, inprocess)
        self.all.append(d)
        return d.start() if start else d

    def cleanup(self) -> list[str]:
        leftovers = []
        for d in self.all:
            if d.running:
                leftovers.append(d.verb)
                if isinstance(d, Daemon):
                    d.kill()
                else:  # in-process: an orderly stop, whatever its exit status
                    d.stop(expect=None)
        return leftovers

    def tails(self) -> str:
        return "\n".join(f"== {d.verb} {d.config.name} ({d.log}) ==\n{d.tail(25)}"
                         for d in self.all)


# -- waiting for replication -------------------------------------------------


def wait_converged(env: CdpEnv, volume: str, since: float, src: Daemon | None = None,
                   rx: Daemon | None = None, timeout: float = 60,
                   client: str | None = None) -> dict[str, Any]:
    """Until the source reports the replica current as of a scan started after `since`,
    with nothing pending; returns that volume status."""
    sf = env.sources[client] if client else env.source

    def ready() -> dict[str, Any] | None:
        for d in (src, rx):
            if d is not None and not d.running:
                raise AssertionError(f"{d.verb} exited with {d.returncode}:\n{d.tail()}")
        v = sf.volume_status(volume)
        if v and v.get("current_as_of", 0) >= since and not v.get("pending_epochs"):
            return v
        return None

    def describe() -> str:
        return (f"volume {volume} to converge (since {since:.2f}); source says "
                f"{sf.volume_status(volume)}\n" + "\n".join(
                    f"== {d.verb} ==\n{d.tail(20)}" for d in (src, rx) if d is not None))

    return wait_for(ready, timeout, what=describe)


def assert_replica_equal(env: CdpEnv, volume: str, image: Path | None = None) -> str:
    """The replica image hashes like the source image, and agrees with its own hash map
    (what `cdp verify --replica` checks: a replica whose image is right but whose hash map is
    not would mislead the next dedup or verify); returns the hash."""
    from cdp.replica.check import check_replica

    image = image or env.source.images[volume]
    want, got = file_hash(image), file_hash(env.replica_image(volume))
    assert got == want, f"replica of {volume} differs from the source image"
    res = check_replica(env.replica_dir(volume))
    assert not res.error and not res.differing, (
        f"replica of {volume}: image and hash map disagree at blocks {res.differing[:10]} "
        f"{res.error}")
    return got


def run_cdp(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m cdp ARGS` to completion; stdout and stderr captured as text."""
    return subprocess.run([sys.executable, "-m", "cdp", *map(str, args)], capture_output=True,
                          text=True, timeout=scaled(timeout), stdin=subprocess.DEVNULL)


def run_main(capsys: Any, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """`cdp ARGS` in this process (cdp.cli.main.main), its output taken from pytest's `capsys`:
    what run_cdp returns, without starting a process. The root logger is put back after."""
    import logging

    from cdp.cli.main import main

    argv = list(map(str, args))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    capsys.readouterr()  # only this command's output
    try:
        rc: int | str | None = main(argv)
    except SystemExit as exc:  # usage errors (argparse)
        rc = exc.code
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    out = capsys.readouterr()
    code = rc if isinstance(rc, int) else 0 if rc is None else 1
    return subprocess.CompletedProcess(["cdp", *argv], code, out.out, out.err)


# -- file sets -------------------------------------------------------------------------------


def add_fileset(env: CdpEnv, name: str, paths: list[Path], *, client: str | None = None,
                allow: list[str] | None = None, extra: str = "") -> None:
    """Add a [[fileset]] to a client's source config, and list it in the receiver config for
    the clients in `allow` (default: that client) as `filesets = [...]`."""
    sf = env.sources[client] if client else env.source
    with open(sf.toml, "a") as fh:
        fh.write("\n".join(["", "[[fileset]]", f'name = "{name}"',
                            f"paths = [{', '.join(_toml_str(p) for p in paths)}]", extra, ""]))
    lines = env.receiver_toml.read_text().split("\n")
    for who in [sf.client] if allow is None else allow:
        at = lines.index(f'name = "{who}"')
        while not lines[at].startswith("volumes = "):
            at += 1
        if at + 1 < len(lines) and lines[at + 1].startswith("filesets = "):
            have = json.loads(lines[at + 1].removeprefix("filesets = "))
            lines[at + 1] = f"filesets = {json.dumps([*have, name])}"
        else:
            lines.insert(at + 1, f"filesets = {json.dumps([name])}")
    env.receiver_toml.write_text("\n".join(lines))


def files_list(env: CdpEnv, *args: str) -> Any:
    """`cdp files list -c receiver.toml ARGS --json`, parsed; AssertionError if it fails."""
    r = run_cdp("files", "list", "-c", env.receiver_toml, *args, "--json")
    assert r.returncode == 0, f"cdp files list {args} exited {r.returncode}: {r.stderr}"
    return json.loads(r.stdout)


def one_volume_source(tmp_path: Path) -> Path:
    """A minimal source config with one 64 KiB scan volume "v" (for unit tests of the source's
    per-volume objects; the receiver address is never dialled)."""
    (tmp_path / "vol.img").write_bytes(b"\0" * 65536)
    (tmp_path / "t").write_text("x" * 64 + "\n")
    (tmp_path / "t").chmod(0o600)
    (tmp_path / "s.toml").write_text(
        '[source]\nname = "h"\nreceiver = "127.0.0.1:1"\ntoken_file = "t"\nstate_dir = "st"\n'
        '[[volume]]\nname = "v"\npath = "vol.img"\n')
    return tmp_path / "s.toml"


def feed(session: Any, data: bytes) -> list[Any]:
    """The messages a wire session takes from `data` (receive_data, then events_received)."""
    session.receive_data(data)
    return session.events_received()


def sent(session: Any, msg: Any = None) -> bytes:
    """The bytes a wire session writes for `msg` (send, then data_to_send); with no `msg`,
    those it holds already (after start(), challenge(), auth() or welcome())."""
    if msg is not None:
        session.send(msg)
    return session.data_to_send()
