"""A receiver and a source as real processes on loopback, with one volume, for measuring."""

from __future__ import annotations

import functools
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdp.benchmark.minimal import describe, receiver_config, source_config
from cdp.benchmark.procs import free_port, peak_rss, reset_peak, spawn, stop_all, wait_port
from cdp.config import load_receiver, load_source
from cdp.durable import read_json
from cdp.proccpu import cpu_seconds


@functools.cache
def daemon_env(cache: Path) -> tuple[tuple[str, str], ...]:
    """The daemons' environment, with cdp's modules byte-compiled as an installed package has
    them (pip compiles at install; Python writes .pyc files on first import). Where that is
    switched off (PYTHONDONTWRITEBYTECODE, as on some build machines), every daemon start
    would compile all of cdp again, 0.3-0.5 CPU-s inside the timed seed: the modules are
    compiled once into `cache` (PYTHONPYCACHEPREFIX, nothing written beside the package)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if env.get("PYTHONDONTWRITEBYTECODE"):
        del env["PYTHONDONTWRITEBYTECODE"]
        env["PYTHONPYCACHEPREFIX"] = str(cache)
        package = Path(__file__).resolve().parents[1]
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return tuple(env.items())


@dataclass
class Snapshot:
    """Counters of both sides at one moment."""

    at: float
    counters: dict[str, int]
    cpu_source: float
    cpu_receiver: float
    epoch: int = 0  # the replica's last applied epoch


class CdpPair:
    """Writes configs for one volume, runs `cdp receiver` and `cdp source`, reads their state."""

    VOLUME = "bench"

    def __init__(self, root: Path, image: Path, *, mode: str = "scan",
                 knobs: dict[str, str] | None = None, replica_dir: Path | None = None) -> None:
        """Configs as `cdp init` and a user's minimal config would have them: names, addresses,
        paths and the token, every tuning knob at its shipped default; `knobs` (key -> TOML
        value, see minimal.py) sets some anyway, for the rows labelled as tuned; `replica_dir`
        puts the receiver's data_dir there instead of beside the configs."""
        self.root = root
        self.image = image
        self.knobs = dict(knobs or {})
        self.port = free_port()
        self.nbd_port = free_port() if mode == "nbd" else 0
        self.data_dir = replica_dir or root / "replicas"
        root.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        token = root / "bench.token"
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        (root / "receiver.toml").write_text(
            receiver_config(self.port, self.VOLUME, None if replica_dir is None else self.data_dir))
        nbd_listen = f"127.0.0.1:{self.nbd_port}, unix:nbd.sock" if mode == "nbd" else None
        (root / "source.toml").write_text(
            source_config(self.port, self.VOLUME, image, mode, nbd_listen, self.knobs))
        load_receiver(root / "receiver.toml")  # a bad knob: a config error now, not a dead daemon
        load_source(root / "source.toml")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def config(self) -> str:
        """Which config the rows of this pair used: "defaults", or "tuned: key=value, ..."."""
        return describe(self.knobs)

    @property
    def nbd_socket(self) -> Path:
        return self.root / "nbd.sock"

    @property
    def nbd_url(self) -> str:
        """The export over its Unix socket, as a local VM opens it."""
        return f"nbd+unix:///{self.VOLUME}?socket={self.nbd_socket}"

    @property
    def replica(self) -> Path:
        return self.data_dir / self.VOLUME / "image"

    def start(self, which: str) -> float:
        """Start 'receiver' or 'source'; returns the time just before it was started."""
        log = open(self.root / f"{which}.log", "ab")
        t = time.time()
        self.procs[which] = spawn(
            [sys.executable, "-P", "-m", "cdp", which, "-c", str(self.root / f"{which}.toml")],
            name=which, stdout=log, stderr=subprocess.STDOUT,
            env=dict(daemon_env(self.root.parent / "pycache")))
        log.close()
        if which == "receiver":
            wait_port(self.port, self.procs[which])
        return t

    def stop(self) -> list[int]:
        return stop_all([p for p in (self.procs.get("receiver"), self.procs.get("source")) if p])

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"cdp {name} exited with status {p.returncode}; see "
                                   f"{self.root / (name + '.log')}")

    def state(self) -> dict[str, Any] | None:
        try:
            return read_json(self.data_dir / self.VOLUME / "state.json")
        except (OSError, ValueError):
            return None

    def source_status(self) -> dict[str, Any] | None:
        try:
            return read_json(self.root / "state" / "status.json")["volumes"][0]
        except (OSError, ValueError, KeyError, IndexError):
            return None

    def rpo_point(self) -> float:
        """The source time of the newest state the replica holds (0 if none yet)."""
        st = self.state() or {}
        try:
            live = read_json(self.data_dir / self.VOLUME / "status.json")
        except (OSError, ValueError):
            live = {}
        return max(st.get("epoch_time", 0.0), live.get("current_as_of", 0.0))

    def wait_current(self, since: float, timeout: float = 600) -> dict[str, Any]:
        """Until the replica is current as of a scan that started after `since`; the state then."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.check_alive()
            v = self.source_status()
            if v and v.get("current_as_of", 0) >= since and not v.get("pending_epochs"):
                st = self.state()
                assert st is not None
                # when the source knew: the ack of the last epoch, or the end of a scan that
                # found nothing more (the price of knowing, in scan mode)
                st["confirmed_at"] = v.get("confirmed_at", st["applied_at"])
                return st
            time.sleep(0.02)
        raise RuntimeError(f"replica not current {timeout:.0f}s after the change")

    def snapshot(self) -> Snapshot:
        st = self.state() or {"counters": {}}
        return Snapshot(time.time(), dict(st["counters"]), cpu_seconds(self.procs["source"].pid),
                        cpu_seconds(self.procs["receiver"].pid), st.get("epoch", 0))

    def peaks(self) -> tuple[int, int]:
        return peak_rss(self.procs["source"].pid), peak_rss(self.procs["receiver"].pid)

    def reset_peaks(self) -> None:
        for p in self.procs.values():
            reset_peak(p.pid)
