"""The nbd scenarios of `cdp bench`: the write path with replication on, beside plain qemu-nbd.

Same workloads, same client (cdp/benchmark/nbdload.py: the data mix of the
scan scenarios, every 4 KiB unique, at the workload's block size and queue
depth; not `qemu-img bench`, whose one repeated pattern dedup and
compression remove), over a Unix socket as a local VM would open the disk,
one after the other on this machine: first through `qemu-nbd` serving a copy
of the image (the baseline: no replication at all), then through the cdp
source's export with a real receiver applying every epoch. Reported: IOPS,
MB/s, the share of qemu-nbd's throughput, the dedup and compression ratios
cdp saw (a degenerate workload shows there), and the RPO sampled while the
load runs (how far the replica's newest state is behind the guest) and the
catch-up time after it.

"incremental 1% (nbd)" rewrites 1% of the blocks with the generated data mix
through a small NBD client and times how long after the guest's last FLUSH
the replica holds it: nothing needs scanning, so this is what to compare with
rsync's incremental run on the same change.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cdp.benchmark import Progress
from cdp.benchmark.data import BS, text_block
from cdp.benchmark.nbdclient import NbdClient
from cdp.benchmark.pair import CdpPair
from cdp.benchmark.procs import run, spawn, stop_all
from cdp.errors import UsageError


@dataclass(frozen=True)
class Workload:
    name: str
    block: int
    depth: int
    sequential: bool
    flush_every: int  # requests between FLUSHes

    def count(self, size: int, budget: int) -> int:
        return max(16, min(size, budget) // self.block)

    def argv(self, socket: Path, export: str, count: int, seed: int) -> list[str]:
        """The nbdload command line for `count` requests of this workload."""
        return [sys.executable, "-P", "-m", "cdp.benchmark.nbdload", str(socket), export,
                "--block", str(self.block), "--depth", str(self.depth), "--count", str(count),
                "--flush-every", str(self.flush_every), "--seed", str(seed),
                *(["--sequential"] if self.sequential else [])]


WORKLOADS = (
    Workload("4k random", 4096, 16, False, 4096),
    Workload("64k random", 65536, 16, False, 256),
    Workload("1M sequential", 1 << 20, 4, True, 16),
)
BUDGET = {"4k random": 64 << 20, "64k random": 256 << 20, "1M sequential": 512 << 20}


def have_tools() -> bool:
    return shutil.which("qemu-nbd") is not None


def drive(socket: Path, export: str, w: Workload, count: int, seed: int) -> float:
    """Seconds the nbdload writer took for `count` requests of `w` against an export."""
    out = run(w.argv(socket, export, count, seed), timeout=1800, name="nbd load")
    if out.returncode != 0:
        raise RuntimeError(f"the nbd load writer failed: {out.stderr.strip()[-800:]}")
    try:
        return float(json.loads(out.stdout)["seconds"])
    except (ValueError, KeyError) as exc:
        raise RuntimeError(f"the nbd load writer said: {out.stdout.strip()[-300:]}") from exc


def run_baseline(root: Path, image: Path, progress: Progress) -> dict[str, float]:
    """Seconds per workload through qemu-nbd serving a plain copy of the image."""
    copy = root / "qemu-nbd.raw"
    shutil.copyfile(image, copy)
    sock = root / "qemu-nbd.sock"
    proc = spawn(["qemu-nbd", "-f", "raw", "-t", "-k", str(sock), "-x", "bench",
                  "--cache=writeback", str(copy)], stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError("qemu-nbd did not start serving the baseline copy")
            time.sleep(0.02)
        size = copy.stat().st_size
        out = {}
        for i, w in enumerate(WORKLOADS):
            progress(f"nbd {w.name}: qemu-nbd (baseline) ...")
            out[w.name] = drive(sock, "bench", w, w.count(size, BUDGET[w.name]), 0x30 + i)
        return out
    finally:
        stop_all([proc])
        copy.unlink(missing_ok=True)


def _sample_rpo(pair: CdpPair, stop: threading.Event, samples: list[float],
                since: float = 0.0) -> None:
    """Every 50 ms until `stop`, from the time.time() `since` on: how old the replica is."""
    while not stop.is_set():
        point = pair.rpo_point()
        now = time.time()
        if point and now >= since:
            samples.append(max(0.0, now - point))
        stop.wait(0.05)


def run_cdp_workloads(pair: CdpPair, size: int, baseline: dict[str, float], progress: Progress,
                      result: Callable[..., object]) -> list[object]:
    """Each workload through the cdp export with replication on; RPO sampled meanwhile."""
    results = []
    for i, w in enumerate(WORKLOADS):
        progress(f"nbd {w.name}: cdp export, replicating ...")
        before = pair.snapshot()
        pair.reset_peaks()
        samples: list[float] = []
        stop = threading.Event()
        th = threading.Thread(target=_sample_rpo, args=(pair, stop, samples), daemon=True)
        th.start()
        try:
            seconds = drive(pair.nbd_socket, pair.VOLUME, w, w.count(size, BUDGET[w.name]),
                            0x30 + i)
            t_end = time.time()
            catch_up = pair.wait_current(t_end)["confirmed_at"] - t_end  # when the source knew
        finally:
            stop.set()
            th.join()
        n = w.count(size, BUDGET[w.name])
        base = baseline.get(w.name)
        lags = sorted(samples) or [0.0]
        extra = {"iops": n / seconds, "ops": n, "block": w.block, "catch_up": catch_up,
                 "rpo_p50": statistics.median(lags),
                 "rpo_p99": lags[min(len(lags) - 1, int(len(lags) * 0.99))], "rpo_max": lags[-1],
                 "baseline_seconds": base,
                 "of_baseline": (base / seconds) if base else None}
        results.append(result(f"nbd {w.name}", pair, before, seconds, n * w.block, extra))
    return results


def incremental(pair: CdpPair, size: int, fraction: float, seed: int) -> tuple[float, float, int]:
    """Rewrite `fraction` of the blocks through the export; (write s, catch-up s, bytes)."""
    rng = random.Random(seed)
    blocks = size // BS
    chosen = rng.sample(range(blocks), max(1, int(blocks * fraction)))
    client = NbdClient(str(pair.nbd_socket), pair.VOLUME)
    if client.size != size:
        raise UsageError(f"the export is {client.size} bytes, expected {size}")
    t0 = time.time()
    for b in chosen:
        client.write(b * BS, text_block(rng) if rng.random() < 0.5 else rng.randbytes(BS))
    t_flush = time.time()
    client.flush()
    client.close()
    st = pair.wait_current(t_flush)
    return t_flush - t0, st["confirmed_at"] - t_flush, len(chosen) * BS


def steady(pair: CdpPair, size: int, rate: int, seconds: float, progress: Progress,
           warmup: float) -> tuple[float, int, list[float]]:
    """Write 64 KiB blocks of the data mix at `rate` bytes/s through the export for `seconds`,
    flushing every 64 writes; sample the RPO from `warmup` seconds in (the steady state).
    Returns (seconds, bytes written, lags)."""
    rng = random.Random(31)
    blocks = size // BS
    client = NbdClient(str(pair.nbd_socket), pair.VOLUME)
    samples: list[float] = []
    stop = threading.Event()
    th = threading.Thread(target=_sample_rpo, args=(pair, stop, samples, time.time() + warmup),
                          daemon=True)
    written = n = 0
    start = time.monotonic()
    th.start()
    try:
        while time.monotonic() - start < seconds:
            delay = start + (written + BS) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            client.write(rng.randrange(blocks) * BS,
                         text_block(rng) if rng.random() < 0.5 else rng.randbytes(BS))
            written += BS
            n += 1
            if n % 64 == 0:
                client.flush()
                progress(f"nbd steady: {time.monotonic() - start:5.1f}/{seconds:.0f}s, "
                         f"RPO {samples[-1] if samples else 0:.2f}s", live=True)
        client.flush()
        client.close()
        t_end = time.time()
        pair.wait_current(t_end - 0.001)
    finally:
        stop.set()
        th.join()
    return time.monotonic() - start, written, samples
