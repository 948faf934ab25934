"""A bounded soak: writes, restarts and link faults together, then a byte-for-byte check.

    python3 bench/soak.py                          # 3 minutes, 64 MiB volume, scan mode
    python3 bench/soak.py --minutes 10 --mode nbd --size 256MiB --json

A real receiver and source run as separate processes on 127.0.0.1 with the
fault-injecting proxy of the tests (tests/faultproxy.py) between them. For
the whole run a writer rewrites random 64 KiB blocks (in place for scan mode,
through the NBD export for nbd mode), the proxy drops, resets, stalls, delays
and cuts connections (one fault every --fault-interval seconds on average),
and every 15-40 s one daemon is stopped (SIGTERM) or killed (SIGKILL) and
started again. Then the faults and writes stop, the
replica must catch up and hash equal to the source image.

Printed: seconds, MiB written, epochs applied, restarts and kills, faults by
kind, reconnects, RPO samples (p50/p99/max of the source's lag, sampled each
second while the source was connected), bytes logical and on the wire, MiB the
source read, and the verdict. Exit status 0 only if the replica is identical.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from faultproxy import FaultProxy  # noqa: E402
from helpers import (  # noqa: E402
    BS,
    Daemons,
    MiB,
    file_hash,
    free_port,
    make_image,
    wait_converged,
    write_env,
    write_random_blocks,
)

from cdp.units import parse_size  # noqa: E402

VOL = "vol1"


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p * len(xs)))], 2)


def soak(minutes: float, size: int, mode: str, seed: int, root: Path, log: Any,
         fault_interval: float = 3.0) -> dict[str, Any]:
    rng = random.Random(seed)
    port = free_port()
    proxy = FaultProxy(port, seed=seed, interval=fault_interval, delay=0.005)
    env = write_env(root, port=port, receiver_addr=f"127.0.0.1:{proxy.port}", mode=mode)
    image = env.source.images[VOL]
    make_image(image, size, rng)
    ds = Daemons()
    out: dict[str, Any] = {"mode": mode, "size_mib": size / MiB, "seed": seed,
                           "fault_interval_s": fault_interval}
    try:
        rx, src = ds.receiver(env), ds.source(env)
        t0 = time.time()
        wait_converged(env, VOL, t0, src, rx, timeout=600)
        out["seed_s"] = round(time.time() - t0, 2)
        log(f"seeded {size / MiB:.0f} MiB in {out['seed_s']} s")

        stop = threading.Event()
        written = [0]
        lock = threading.Lock()  # the writer pauses while the source restarts (nbd client)

        def writer() -> None:
            wrng = random.Random(seed + 1)
            client = None
            while not stop.is_set():
                with lock:
                    try:
                        if mode == "nbd":
                            from cdp.benchmark.nbdclient import NbdClient

                            if client is None:
                                nbd_port = int(env.source.nbd_urls[VOL].rsplit(":", 1)[1]
                                               .split("/")[0])
                                client = NbdClient(("127.0.0.1", nbd_port), VOL)
                            for _ in range(4):
                                client.write(wrng.randrange(size // BS) * BS, wrng.randbytes(BS))
                            client.flush()
                        else:
                            write_random_blocks(image, wrng.sample(range(size // BS), 4), wrng)
                        written[0] += 4 * BS
                    except OSError:
                        client = None  # the export went away with a source restart
                        time.sleep(0.5)
                time.sleep(0.05)
            if client is not None:
                client.close()

        lags: list[float] = []
        restarts = {"receiver_term": 0, "receiver_kill": 0, "source_term": 0, "source_kill": 0}
        proxy.start_chaos()
        wt = threading.Thread(target=writer, daemon=True)
        wt.start()
        end = time.monotonic() + minutes * 60
        next_event = time.monotonic() + rng.uniform(15, 40)
        while time.monotonic() < end:
            time.sleep(1)
            v = env.source.volume_status(VOL) or {}
            st = env.source.status() or {}
            if st.get("connected") and v.get("lag") is not None:
                lags.append(float(v["lag"]))
            if time.monotonic() >= next_event:
                next_event = time.monotonic() + rng.uniform(15, 40)
                who = rng.choice(["receiver", "source"])
                how = rng.choice(["term", "kill"])
                d = rx if who == "receiver" else src
                ctx = lock if who == "source" else threading.Lock()
                with ctx:
                    if how == "kill":
                        d.kill()
                    else:
                        d.stop()
                    d.start()
                restarts[f"{who}_{how}"] += 1
                log(f"{time.monotonic() - end + minutes * 60:6.0f} s: {who} {how} + start; "
                    f"{written[0] / MiB:.0f} MiB written, faults {dict(proxy.faults)}")
        stop.set()
        wt.join()
        proxy.calm()
        t1 = time.time()
        v = wait_converged(env, VOL, t1, src, rx, timeout=600)
        out["catch_up_s"] = round(time.time() - t1, 2)
        same = file_hash(image) == file_hash(env.replica_image(VOL))
        counters = env.counters(VOL)
        out.update({
            "seconds": round(minutes * 60), "written_mib": round(written[0] / MiB, 1),
            "epochs_applied": counters["epochs"], "restarts": restarts,
            "faults": dict(proxy.faults), "connections": proxy.connections,
            "rpo_p50_s": _pct(lags, 0.5), "rpo_p99_s": _pct(lags, 0.99),
            "rpo_max_s": _pct(lags, 1.0), "rpo_samples": len(lags),
            "logical_mib": round(counters["logical"] / MiB, 1),
            "wire_mib": round(counters["wire"] / MiB, 1),
            "source_read_mib_since_last_start": round(v["stats"]["scanned"] / MiB, 1),
            "identical": same,
        })
        rx.stop()
        src.stop()
        return out
    finally:
        ds.cleanup()
        proxy.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--size", default="64MiB", help="volume size (default 64MiB)")
    p.add_argument("--mode", choices=["scan", "nbd"], default="scan")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--fault-interval", type=float, default=3.0,
                   help="mean seconds between link faults (default 3)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="cdp-soak-"))

    def log(msg: str) -> None:
        if not a.json:
            print(msg, flush=True)

    try:
        out = soak(a.minutes, parse_size(a.size), a.mode, a.seed, root / "env", log,
                   a.fault_interval)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        width = max(map(len, out))
        for k, v in out.items():
            print(f"{k:<{width}}  {v}")
        print("OK: replica identical" if out["identical"] else "FAILED: replica differs")
    return 0 if out["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
