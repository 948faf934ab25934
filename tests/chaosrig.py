"""The chaos rig shared by tests/integration/test_chaos.py and bench/chaos_soak.py.

A receiver and a source run as real processes (`python -m cdp ...`, helpers.Daemon) with a
FaultProxy between them, one client ("host1") protecting a scan volume, an nbd volume or
both. The daemons run with their shipped liveness and retry defaults: helpers.write_env's shorter
reconnect_min/reconnect_max are taken out of the source config, and nothing else about
timeouts is set (only the scan intervals, as the other integration tests do).

While the load runs:
- one writer thread per volume rewrites 2 random 64 KiB blocks every `pace` seconds (in
  place for the scan volume, through the source's NBD export for the nbd volume);
- a sampler reads, every 0.1 s and per volume, the source's acknowledged epoch
  (status.json `acked_epoch`) and then the replica's epoch (state.json). It records a
  violation when the replica's epoch goes backwards, or is below an epoch the source had
  reported acknowledged before: an acknowledged epoch lost.

"Replication resumed" after a fault (measure_resume):
- resume: for every volume, the replica's state.json epoch advanced past its value at the
  moment the link was healthy again (the writers keep writing, so new epochs keep coming);
- fresh (stricter): for every volume, the replica holds an epoch whose capture time (the
  source's clock, state.json `epoch_time`) is at or after that moment: changes made after
  the link healed have arrived, the backlog included.
After a SIGKILL and restart of a daemon, resume is measured by the fresh rule from the
restart (see measure_resume).

`busy_refusals()` greps the receiver log for `busy` refusals of the client's own volumes
(`volume stopped client=... volume=V code=busy`), which session takeover should make 0.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faultproxy import Fault, FaultPlan, FaultProxy
from helpers import (
    BS,
    CdpEnv,
    Daemon,
    Daemons,
    MiB,
    file_hash,
    free_port,
    make_image,
    run_cdp,
    scaled,
    wait_converged,
    wait_for,
    write_env,
    write_random_blocks,
)

from cdp.benchmark.nbdclient import NbdClient
from cdp.errors import CdpError

CLIENT = "host1"
VOLUMES = {"scan": "vscan", "nbd": "vnbd"}  # mode -> volume name
_BUSY = re.compile(r"\bbusy\b", re.IGNORECASE)


@dataclass
class Resume:
    """How long after `healthy` (monotonic) replication of every volume resumed."""

    what: str  # a fault kind, or kill-receiver / kill-source
    detail: str
    healthy: float
    resume_s: float | None = None  # None: not within the timeout
    fresh_s: float | None = None
    per_volume: dict[str, float] = field(default_factory=dict)


class ChaosRig:
    def __init__(self, root: Path, modes: Sequence[str], *, seed: int, size: int = 8 * MiB,
                 pace: float = 0.1, scan_interval: str = "1s", daemons: Daemons | None = None,
                 log: Callable[[str], None] = lambda _m: None) -> None:
        self.modes = tuple(modes)
        self.volumes = [VOLUMES[m] for m in self.modes]
        self.size, self.pace, self.seed, self.log = size, pace, seed, log
        port = free_port()
        self.proxy = FaultProxy(port, seed=seed, delay=0)
        self.env: CdpEnv = write_env(root, {CLIENT: self.volumes}, port=port,
                                     receiver_addr=f"127.0.0.1:{self.proxy.port}",
                                     scan_interval=scan_interval)
        self._configure()
        self.daemons = daemons or Daemons()
        self.rx: Daemon = self.daemons.receiver(self.env, start=False)
        self.src: Daemon = self.daemons.source(self.env, start=False)
        self.written = dict.fromkeys(self.volumes, 0)
        self.write_errors = 0
        self.violations: list[str] = []  # distinct messages, in the order first seen
        self.samples = 0
        self._max_epoch = dict.fromkeys(self.volumes, 0)
        self._max_acked = dict.fromkeys(self.volumes, 0)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.kills = {"receiver": 0, "source": 0}

    # -- setup ---------------------------------------------------------------------------

    def _configure(self) -> None:
        """Shipped retry defaults (helpers.write_env sets reconnect_min/max for speed) and the
        volumes' modes: write_env writes every volume in scan mode."""
        sf = self.env.source
        text = sf.toml.read_text()
        text = re.sub(r'(?m)^reconnect_(min|max) = .*\n', "", text)
        parts = text.split("[[volume]]")
        for i, part in enumerate(parts[1:], 1):
            name = re.search(r'(?m)^name = "([^"]+)"', part)
            assert name is not None
            vol = name.group(1)
            if vol == VOLUMES["nbd"]:
                nbd_port = free_port()
                parts[i] = part.replace('mode = "scan"',
                                        f'mode = "nbd"\nnbd_listen = "127.0.0.1:{nbd_port}"')
                sf.nbd_urls[vol] = f"nbd://127.0.0.1:{nbd_port}/{vol}"
        sf.toml.write_text("[[volume]]".join(parts))

    def nbd_port(self, vol: str) -> int:
        return int(self.env.source.nbd_urls[vol].rsplit(":", 1)[1].split("/")[0])

    def image(self, vol: str) -> Path:
        return self.env.source.images[vol]

    def start(self, timeout: float = 120) -> float:
        """Images, daemons, the seed of every volume; returns the seconds the seed took."""
        rng = random.Random(self.seed)
        for vol in self.volumes:
            make_image(self.image(vol), self.size, rng)
        t0 = time.time()
        self.rx.start()
        self.src.start()
        self._wait_exports()
        for vol in self.volumes:
            wait_converged(self.env, vol, t0, self.src, self.rx, timeout=timeout)
        return time.time() - t0

    def _wait_exports(self) -> None:
        for vol in self.volumes:
            if vol in self.env.source.nbd_urls:

                def served(v: str = vol) -> bool:
                    return bool((self.env.source.volume_status(v) or {}).get("nbd")
                                and self._port_open(self.nbd_port(v)))

                wait_for(served, 30, what=f"the NBD export of {vol}")

    @staticmethod
    def _port_open(port: int) -> bool:
        import socket

        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            return False

    # -- load and observers --------------------------------------------------------------

    def start_load(self) -> None:
        self._stop.clear()
        for i, vol in enumerate(self.volumes):
            self._spawn(self._writer, vol, random.Random(self.seed * 1000 + i))
        self._spawn(self._sampler)

    def stop_load(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(scaled(90))
        self._threads.clear()

    def _spawn(self, fn: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _writer(self, vol: str, rng: random.Random) -> None:
        blocks = self.size // BS
        nbd = vol in self.env.source.nbd_urls
        client: NbdClient | None = None
        while not self._stop.wait(self.pace):
            try:
                if not nbd:
                    write_random_blocks(self.image(vol), rng.sample(range(blocks), 2), rng)
                else:
                    if client is None:
                        client = NbdClient(("127.0.0.1", self.nbd_port(vol)), vol)
                    for _ in range(2):
                        client.write(rng.randrange(blocks) * BS, rng.randbytes(BS))
                    client.flush()
                self.written[vol] += 2 * BS
            except (OSError, CdpError):  # the export went away with the source: reconnect
                self.write_errors += 1
                if client is not None:
                    client.sock.close()
                client = None
                self._stop.wait(0.2)
        if client is not None:
            try:
                client.close()
            except (OSError, CdpError):
                client.sock.close()

    def _sampler(self) -> None:
        while not self._stop.wait(0.1):
            self.sample()

    def sample(self) -> None:
        """One look at acknowledged and replica epochs; records violations."""
        acked: dict[str, int] = {}
        for vol in self.volumes:
            v = self.env.source.volume_status(vol) or {}
            acked[vol] = int(v.get("acked_epoch") or 0)
        for vol in self.volumes:
            st = self.env.replica_state(vol)
            if st is None:
                continue
            epoch = int(st["epoch"])
            if epoch < self._max_epoch[vol]:
                self._violation(f"{vol}: the replica's epoch went back from "
                                f"{self._max_epoch[vol]} to {epoch}")
            if epoch < self._max_acked[vol]:
                self._violation(f"{vol}: epoch {self._max_acked[vol]} was acknowledged to the "
                                f"source, the replica is at {epoch}")
            self._max_epoch[vol] = max(self._max_epoch[vol], epoch)
            self._max_acked[vol] = max(self._max_acked[vol], acked[vol])
        self.samples += 1

    def _violation(self, msg: str) -> None:
        if msg not in self.violations:
            self.violations.append(msg)
            self.log(f"  VIOLATION {msg}")

    def epochs(self) -> dict[str, tuple[int, float]]:
        out = {}
        for vol in self.volumes:
            st = self.env.replica_state(vol) or {}
            out[vol] = (int(st.get("epoch", 0)), float(st.get("epoch_time", 0.0)))
        return out

    def check_running(self) -> None:
        for d in (self.rx, self.src):
            if not d.running:
                raise AssertionError(f"{d.verb} exited with {d.returncode}:\n{d.tail()}")

    # -- faults --------------------------------------------------------------------------

    def wait_link(self, timeout: float = 30) -> bool:
        """Until the proxy carries a connection no fault has touched (False on timeout)."""
        deadline = time.monotonic() + scaled(timeout)
        while time.monotonic() < deadline:
            self.check_running()
            if self.proxy.live():
                return True
            time.sleep(0.05)
        return False

    def inject(self, plan: FaultPlan) -> Fault:
        fault = self.proxy.inject(plan)
        self.log(f"  inject {plan.describe()} ({fault.connections} connection(s))")
        return fault

    def kill(self, who: str) -> tuple[float, float]:
        """SIGKILL the receiver or the source and start it again; returns the moment it was
        started again (monotonic, wall)."""
        d = self.rx if who == "receiver" else self.src
        d.kill()
        d.start()
        self.kills[who] += 1
        self.log(f"  SIGKILL {who}, started again")
        return time.monotonic(), time.time()

    def measure_resume(self, what: str, detail: str, healthy: float, healthy_wall: float,
                       timeout: float = 120, strict: bool = False) -> Resume:
        """From `healthy` on, until every volume's replica epoch advanced past its value now
        (resume) and holds a change captured after healthy_wall (fresh); see the docstring.

        strict (after a daemon restart): resume is fresh. A restarted receiver may replay a
        committed epoch from its WAL, and the receiver settles the sealed epochs of a killed
        source's connection: the epoch advances then, with nothing resumed."""
        base = self.epochs()
        r = Resume(what, detail, healthy)
        resumed: dict[str, float] = {}
        fresh: dict[str, float] = {}
        deadline = time.monotonic() + scaled(timeout)
        while time.monotonic() < deadline:
            self.check_running()
            now = time.monotonic()
            for vol, (epoch, etime) in self.epochs().items():
                if vol not in resumed and epoch > base[vol][0] and (
                        not strict or etime >= healthy_wall):
                    resumed[vol] = now - healthy
                if vol not in fresh and epoch > base[vol][0] and etime >= healthy_wall:
                    fresh[vol] = now - healthy
            if len(fresh) == len(self.volumes):
                break
            time.sleep(0.05)
        if len(resumed) == len(self.volumes):
            r.resume_s = max(resumed.values())
        if len(fresh) == len(self.volumes):
            r.fresh_s = max(fresh.values())
        r.per_volume = resumed
        return r

    # -- the end -------------------------------------------------------------------------

    def converge(self, timeout: float = 120) -> dict[str, bool]:
        """Writes stopped and the link healed: wait until the source reports every volume
        current, then hash both images. Returns volume -> identical."""
        since = time.time()
        for vol in self.volumes:
            wait_converged(self.env, vol, since, self.src, self.rx, timeout=timeout)
        self.sample()
        return {vol: file_hash(self.image(vol)) == file_hash(self.env.replica_image(vol))
                for vol in self.volumes}

    def verify_replica(self) -> tuple[int, list[dict[str, Any]] | None, str]:
        """`cdp verify --replica -c receiver.toml --json`: (exit status, results, stderr)."""
        r = run_cdp("verify", "--replica", "-c", self.env.receiver_toml, "--json", timeout=300)
        try:
            results = json.loads(r.stdout)
        except ValueError:
            results = None
        return r.returncode, results, r.stderr

    def busy_refusals(self) -> list[str]:
        """Receiver log lines refusing one of this client's volumes as busy."""
        own = [(f"volume={v}", f"'{v}'") for v in self.volumes]
        return [line for line in self.rx.log_text().splitlines()
                if _BUSY.search(line) and any(a in line or b in line for a, b in own)]

    def connection_refusals(self) -> list[str]:
        """Receiver log lines refusing a whole connection (max_connections and the like)."""
        return [line for line in self.rx.log_text().splitlines()
                if "refusing a connection" in line]

    def takeovers(self) -> int:
        return self.rx.log_text().count("session takeover")

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self.daemons.cleanup()
        self.proxy.close()
