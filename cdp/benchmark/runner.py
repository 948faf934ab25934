"""`cdp bench`: reproducible scenarios with real processes on loopback, optionally beside rsync.

Scenarios: seed (first full replication, beside the replica disk's measured
rate of durable sequential writes), seed-tmpfs (the same onto /dev/shm: the
rate when the disk is not the limit), incremental 1% and 10% (random blocks
rewritten in place, then replicated), steady (a continuous write load, RPO
sampled over time from a second in), nbd (write workloads through the
source's NBD export beside plain qemu-nbd, and 1% rewritten through the
export; see cdp/benchmark/nbd.py). Every result is checked byte for byte.

The daemons run with the shipped defaults (cdp/benchmark/minimal.py); tuned
knobs only add rows that carry them in their name and their `config`.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cdp.benchmark import Progress, disk, rescan
from cdp.benchmark.data import BS, generate, rewrite_timed, text_block
from cdp.benchmark.pair import CdpPair, Snapshot
from cdp.benchmark.rsync import RSYNC_ARGS, RsyncDaemon, RsyncRun
from cdp.benchmark.workspace import Workspace, session
from cdp.blocks import Geometry
from cdp.errors import CdpError, UsageError
from cdp.tracker.scan import hash_volume
from cdp.units import format_bytes

GIB = 1 << 30


@dataclass
class Result:
    scenario: str
    tool: str
    seconds: float
    image: int  # bytes of the volume kept in sync
    changed: int  # bytes the scenario changed (the whole image for seed)
    wire: int
    cpu_source: float
    cpu_receiver: float
    peak_source: int
    peak_receiver: int
    equal: bool
    data: int = 0
    compressed: int = 0
    dedup: int = 0
    zero: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    config: str = "defaults"  # cdp rows: "defaults" or "tuned: key=value, ..."; peers: their setup

    @property
    def mbps(self) -> float:
        """Logical MB/s: the bytes of the scenario (the image for a seed, the changes otherwise)."""
        return self.changed / self.seconds / 1e6 if self.seconds > 0 else 0.0

    def cpu_per_gib(self) -> tuple[float, float]:
        """CPU seconds per GiB of volume kept in sync, each side."""
        g = self.image / GIB
        return self.cpu_source / g, self.cpu_receiver / g

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mbps"] = self.mbps
        d["cpu_per_gib_source"], d["cpu_per_gib_receiver"] = self.cpu_per_gib()
        d["compression_ratio"] = self.data / self.compressed if self.compressed else None
        d["dedup_ratio"] = (self.data + self.dedup) / self.data if self.data else None
        return d



def _equal(a: Path, b: Path, size: int) -> bool:
    geo = Geometry(size, BS)
    return b.exists() and b.stat().st_size == size and hash_volume(a, geo) == hash_volume(b, geo)


def _cdp_result(name: str, pair: CdpPair, before: Snapshot, seconds: float, image: Path,
                size: int, changed: int) -> Result:
    after = pair.snapshot()
    c = {k: after.counters.get(k, 0) - before.counters.get(k, 0) for k in after.counters}
    ps, pr = pair.peaks()
    return Result(name, "cdp", seconds, size, changed, c.get("wire", 0),
                  after.cpu_source - before.cpu_source, after.cpu_receiver - before.cpu_receiver,
                  ps, pr, _equal(image, pair.replica, size), c.get("data", 0),
                  c.get("compressed", 0), c.get("dedup", 0), c.get("zero", 0),
                  config=pair.config)


def _rsync_result(name: str, run: RsyncRun, image: Path, dest: Path, size: int,
                  changed: int) -> Result:
    return Result(name, "rsync", run.seconds, size, changed, run.wire, run.cpu_client,
                  run.cpu_daemon, run.peak_client, run.peak_daemon, _equal(image, dest, size),
                  config="rsync " + " ".join(RSYNC_ARGS))


REPEATS = 3  # incremental rows: the median of this many changes, each timed for both tools


def median_of(runs: list[Result]) -> Result:
    """The run with the median time, holding every run's time (extra "runs"); equal only if
    every run's copy was. One change is one sample: on a shared machine a single time can be
    off by 2x either way."""
    ranked = sorted(runs, key=lambda r: r.seconds)
    mid = ranked[(len(ranked) - 1) // 2]
    mid.equal = all(r.equal for r in runs)
    mid.extra = {**mid.extra, "runs": [r.seconds for r in runs]}
    return mid


WARMUP = 1.0  # steady RPO and CPU are sampled from this long after the load began


def _steady(pair: CdpPair, image: Path, size: int, rate: int, seconds: float,
            progress: Progress, name: str = "steady", seed: int = 99) -> Result:
    """Write random blocks at `rate` bytes/s for `seconds`; sample the RPO as it goes.

    The percentiles and the CPU shares cover the steady state, from WARMUP seconds after the
    load began: at its start the replica's newest state is still the idle volume's last scan
    (up to scan_interval old), an age that says nothing about keeping up with the load."""
    before = pair.snapshot()
    pair.reset_peaks()
    stop = threading.Event()
    written = 0
    rng = random.Random(seed)
    blocks = size // BS

    def writer() -> None:
        nonlocal written
        t0 = time.monotonic()
        with open(image, "r+b", buffering=0) as fh:
            while not stop.is_set():
                due = t0 + (written + BS) / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                fh.seek(rng.randrange(blocks) * BS)
                fh.write(text_block(rng) if rng.random() < 0.5 else rng.randbytes(BS))
                written += BS

    samples: list[tuple[float, float]] = []
    warm: Snapshot | None = None
    th = threading.Thread(target=writer, daemon=True)
    start = time.time()
    th.start()
    try:
        while time.time() - start < seconds:
            pair.check_alive()
            now = time.time()
            if warm is None and now - start >= WARMUP:
                warm = pair.snapshot()
            point = pair.rpo_point()
            if point:
                samples.append((now - start, max(0.0, now - point)))
            progress(f"{name}: {now - start:5.1f}/{seconds:.0f}s  written {format_bytes(written)}"
                     f"  RPO {samples[-1][1] if samples else 0:.2f}s", live=True)
            time.sleep(0.1)
    finally:  # an interrupt too: the writer must not go on writing into a folder being removed
        stop.set()
        th.join()
    t_end = time.time()
    end = pair.snapshot()
    pair.wait_current(t_end)
    res = _cdp_result(name, pair, before, t_end - start, image, size, written)
    warm = warm or before
    wall = max(end.at - warm.at, 1e-9)
    res.extra = {"rate": rate, **rpo_stats(samples, WARMUP), "series": samples,
                 "cpu_share_source": (end.cpu_source - warm.cpu_source) / wall,
                 "cpu_share_receiver": (end.cpu_receiver - warm.cpu_receiver) / wall}
    return res


def rpo_stats(samples: list[tuple[float, float]], since: float) -> dict[str, float]:
    """p50, p99 and max of the RPO samples (seconds into the load, lag) taken from `since` on."""
    lags = sorted(lag for t, lag in samples if t >= since) or [0.0]
    return {"sampled_from": since, "samples": sum(1 for t, _ in samples if t >= since),
            "rpo_p50": statistics.median(lags),
            "rpo_p99": lags[min(len(lags) - 1, int(len(lags) * 0.99))], "rpo_max": lags[-1]}


def _rate_cap(root: Path, image: Path, size: int, cap: int, seconds: float,
              progress: Progress, replica_dir: Path | None) -> Result:
    """Seed a fresh replica under `rate_limit = cap`; wire throughput in every 5-second window."""
    pair = CdpPair(root, image, knobs={"rate_limit": str(cap)}, replica_dir=replica_dir)
    try:
        pair.start("receiver")
        t0 = pair.start("source")
        samples: list[tuple[float, float]] = []  # (source's own clock, wire bytes sent)
        last = None
        while time.time() - t0 < seconds:
            pair.check_alive()
            v = pair.source_status()
            try:
                from cdp.durable import read_json
                updated = read_json(root / "state" / "status.json")["updated"]
            except (OSError, ValueError, KeyError):
                updated = None
            if v and updated and updated != last:
                samples.append((updated, float(v["stats"]["wire"])))
                last = updated
                progress(f"rate cap: {updated - t0:5.1f}/{seconds:.0f}s  sent "
                         f"{format_bytes(v['stats']['wire'])}", live=True)
                if v.get("current_as_of", 0) >= t0 and not v.get("pending_epochs"):
                    break  # the whole image went through before the time was up
            time.sleep(0.2)
        before = Snapshot(t0, {}, 0.0, 0.0)
        res = _cdp_result("rate cap", pair, before, samples[-1][0] - t0 if samples else 0.0,
                          image, size, int(samples[-1][1]) if samples else 0)
        res.equal = True  # not a replication check: the run is cut short on purpose
        # windows of 5 s between status samples, after the first second of start-up
        rates = []
        final = samples[-1][1] if samples else 0.0
        # steady state: from a second after the first byte to a second before the last
        # (start-up and the tail of the transfer fall short of a cap by nature, not by fault)
        busy = [x for x in samples if 0 < x[1] < final][1:-1]
        for i, (ta, wa) in enumerate(busy):
            for tb, wb in busy[i + 1:]:
                if tb - ta >= 5.0:
                    rates.append((wb - wa) / (tb - ta))
                    break
        res.extra = {"cap": cap, "windows": len(rates),
                     "min_ratio": min(rates) / cap if rates else None,
                     "max_ratio": max(rates) / cap if rates else None,
                     "per_second": [(round(t - t0, 2), w) for t, w in samples]}
        return res
    finally:
        pair.stop()


def _nbd(root: Path, image: Path, size: int, rs: RsyncDaemon | None, progress: Progress,
         steady_rate: int, steady_seconds: float, replica_dir: Path | None) -> list[Result]:
    """The nbd scenarios on a copy of the image (the scan pair never sees these writes)."""
    from cdp.benchmark import nbd

    if not nbd.have_tools():
        raise UsageError("the nbd scenarios need qemu-img and qemu-nbd (Debian: qemu-utils)")
    img = root / "nbd.raw"
    shutil.copyfile(image, img)
    baseline = nbd.run_baseline(root, img, progress)
    results: list[Result] = []
    for w in nbd.WORKLOADS:
        n = w.count(size, nbd.BUDGET[w.name])
        results.append(Result(f"nbd {w.name}", "qemu-nbd", baseline[w.name], size, n * w.block, 0,
                              0.0, 0.0, 0, 0, True, extra={"iops": n / baseline[w.name]},
                              config="qemu-nbd -f raw --cache=writeback"))
    pair = CdpPair(root / "cdp-nbd", img, mode="nbd", replica_dir=replica_dir)
    try:
        pair.start("receiver")
        progress("nbd: seeding the replica of the export ...")
        t0 = pair.start("source")
        pair.wait_current(t0)

        def result(name: str, p: CdpPair, before: Snapshot, seconds: float, changed: int,
                   extra: dict[str, Any]) -> Result:
            r = _cdp_result(name, p, before, seconds, img, size, changed)
            r.extra = extra
            return r

        results += nbd.run_cdp_workloads(pair, size, baseline, progress, result)  # type: ignore[arg-type]
        progress("nbd steady ...")
        before = pair.snapshot()
        pair.reset_peaks()
        secs, written, lags = nbd.steady(pair, size, steady_rate, steady_seconds, progress, WARMUP)
        r = _cdp_result("nbd steady", pair, before, secs, img, size, written)
        lags = sorted(lags) or [0.0]
        r.extra = {"rate": steady_rate, "sampled_from": WARMUP, "rpo_p50": statistics.median(lags),
                   "rpo_p99": lags[min(len(lags) - 1, int(len(lags) * 0.99))], "rpo_max": lags[-1]}
        results.append(r)
        results += _nbd_incremental(pair, img, size, rs, progress)
    finally:
        codes = pair.stop()
    if any(c != 0 for c in codes):
        raise RuntimeError(f"an nbd-mode daemon did not stop cleanly: exit codes {codes}")
    img.unlink(missing_ok=True)
    return results


def _nbd_incremental(pair: CdpPair, img: Path, size: int, rs: RsyncDaemon | None,
                     progress: Progress) -> list[Result]:
    """1% rewritten through the export, timed from the guest's FLUSH, then rsync on the same
    change (its copy seeded first, untimed); the median of REPEATS each."""
    from cdp.benchmark import nbd

    if rs is not None:
        progress("incremental 1% (nbd): rsync seeds its copy first (not timed) ...")
        rs.run(img)
    ours: list[Result] = []
    theirs: list[Result] = []
    progress(f"incremental 1% (nbd): {REPEATS} changes, each timed for cdp"
             f"{' then rsync' if rs is not None else ''} ...")
    for k in range(REPEATS):  # side by side: each change, then rsync on the same one
        before = pair.snapshot()
        pair.reset_peaks()
        write_s, catch_up, changed = nbd.incremental(pair, size, 0.01, seed=77 + 1000 * k)
        r = _cdp_result("incremental 1% (nbd)", pair, before, catch_up, img, size, changed)
        r.extra = {"write_seconds": write_s}
        ours.append(r)
        if rs is not None:
            theirs.append(_rsync_result("incremental 1% (nbd)", rs.run(img), img,
                                        rs.dest / img.name, size, changed))
    return [median_of(ours), *([median_of(theirs)] if theirs else [])]


SCENARIOS = ("seed", "seed-tmpfs", "incremental", "steady", "nbd")
SHM = Path("/dev/shm")


def run_bench(*, size: int, image: Path | None, compare: str | None, scenarios: list[str],
              steady_rate: int, steady_seconds: float, workdir: Path | None, keep: bool,
              progress: Progress, rate_cap: int = 0, rate_seconds: float = 20.0,
              tuned: dict[str, str] | None = None, replica_dir: Path | None = None) -> list[Result]:
    """Run the scenarios in a work folder that goes when the run ends, however it ends
    (unless `keep`); raises Interrupted on SIGINT/SIGTERM/SIGHUP, CdpError if a run failed.

    The daemons run with the shipped defaults; `tuned` knobs add rows of their own, labelled.
    `replica_dir`: the receivers' data_dir goes into a folder of the run's made there."""
    if replica_dir is not None and not replica_dir.is_dir():
        raise UsageError(f"--replica-dir {replica_dir}: not a folder")
    with session("bench", workdir, keep) as ws:
        for path in ws.swept:
            progress(f"removed {path}, left by an earlier run that was killed")
        try:
            return _run(ws, size=size, image=image, compare=compare, scenarios=scenarios,
                        steady_rate=steady_rate, steady_seconds=steady_seconds,
                        progress=progress, rate_cap=rate_cap, rate_seconds=rate_seconds,
                        tuned=tuned, replica_dir=replica_dir)
        except RuntimeError as exc:  # a daemon or tool failed: say why before the logs go
            tails = "" if keep else ws.log_tails()
            where = (f"logs in {ws.root}" if keep else
                     "--keep keeps the work folder and its logs")
            raise CdpError(f"{exc}" + (f"\n{tails}" if tails else "") + f"\n({where})") from None
    raise AssertionError("unreachable")  # pragma: no cover (session re-raises or returns)


def _rescan_row(img: Path, size: int, progress: Progress) -> Result:
    """How fast the source rereads and hashes the image when it is in the page cache."""
    progress("rescan (hot cache): 5 rescans of the unchanged image ...")
    m = rescan.measure(img)
    return Result("rescan (hot cache)", "scan", m["seconds"], size, m["data_bytes"], 0, 0.0, 0.0, 0, 0,
                  True, extra={k: v for k, v in m.items() if k != "seconds"},
                  config="the source's scan: 64 KiB blocks, " + (
                      "the hash helper process" if m["helpers"] else "one core (one CPU here)"))


def _disk_row(rate: disk.DiskRate) -> Result:
    """The replica folder's durable sequential write rate, as a row beside the seeds."""
    where = f"{rate.fstype or 'file system'} under {rate.folder.parent}"
    return Result(f"disk write ({rate.fstype or '?'})", "fdatasync", rate.seconds, rate.nbytes,
                  rate.nbytes, 0, 0.0, 0.0, 0, 0, True,
                  extra={"folder": str(rate.folder), "fstype": rate.fstype, "mbps": rate.mbps},
                  config=f"4 MiB writes then one fdatasync, {where}")


def _measure_disk(folder: Path, size: int, progress: Progress) -> disk.DiskRate | None:
    n = disk.probe_bytes(size)
    if disk.free_bytes(folder) < n + 3 * size:  # the probe, then the replica and its WAL
        progress(f"not measuring {folder}'s write rate: too little free space")
        return None
    progress(f"disk: {format_bytes(n)} of fdatasync'd 4 MiB writes into {folder} ...")
    return disk.measure(folder, n)


def _seed(pair: CdpPair, image: Path, size: int, name: str, rate: disk.DiskRate | None,
          progress: Progress) -> Result:
    """Start the source with a fresh replica; until the replica is current. Against the disk."""
    before = Snapshot(time.time(), {}, 0.0, 0.0)
    progress(f"{name}: cdp ...")
    t0 = pair.start("source")
    st = pair.wait_current(t0)
    res = _cdp_result(name, pair, before, st["confirmed_at"] - t0, image, size, size)
    if rate is not None and rate.mbps > 0 and res.seconds > 0:
        written = (res.data + res.dedup) / res.seconds / 1e6  # holes are not written
        res.extra = {"device_mbps": rate.mbps, "device_fstype": rate.fstype,
                     "of_device": res.mbps / rate.mbps, "written_mbps": written,
                     "written_of_device": written / rate.mbps}
    return res


def _scan_rows(pair: CdpPair, img: Path, size: int, scenarios: list[str], *, suffix: str,
               salt: int, rs: RsyncDaemon | None, dest: Path | None, rate: disk.DiskRate | None,
               steady_rate: int, steady_seconds: float, progress: Progress) -> list[Result]:
    """Seed, incremental and steady with one pair (its receiver already started). `salt`
    keeps the changes of two passes (defaults, tuned) apart, so neither rewrites what is
    already there; rsync rows only with the defaults."""
    results: list[Result] = []
    if "seed" in scenarios or "incremental" in scenarios:
        results.append(_seed(pair, img, size, "seed" + suffix, rate, progress))
        if rs and dest:
            progress("seed: rsync ...")
            results.append(_rsync_result("seed", rs.run(img), img, dest, size, size))
        if not suffix:
            results.append(_rescan_row(img, size, progress))
    else:
        t0 = pair.start("source")
        pair.wait_current(t0)
    if "incremental" in scenarios:
        for n, frac in enumerate((0.01, 0.10)):
            name = f"incremental {frac:.0%}"
            ours: list[Result] = []
            theirs: list[Result] = []
            progress(f"{name}{suffix}: {REPEATS} changes, each timed for cdp"
                     f"{' then rsync' if rs and dest else ''} ...")
            for k in range(REPEATS):  # side by side: each change, then rsync on the same one
                pair.reset_peaks()
                before = pair.snapshot()
                changed, written = rewrite_timed(img, frac, seed=salt + n + 10 * k)  # < 99: apart
                t1 = time.time()  # the writes are durable on the source: the clock starts
                ours.append(_incremental_result(pair, before, name + suffix, t1, written, img,
                                                size, changed))
                if rs and dest:
                    theirs.append(_rsync_result(name, rs.run(img), img, dest, size, changed))
            results.append(median_of(ours))
            if theirs:
                results.append(median_of(theirs))
    if "steady" in scenarios:
        progress(f"steady{suffix}: {format_bytes(steady_rate)}/s of writes for "
                 f"{steady_seconds:.0f}s ...")
        results.append(_steady(pair, img, size, steady_rate, steady_seconds, progress,
                               name="steady" + suffix, seed=salt + 99))
    return results


def _incremental_result(pair: CdpPair, before: Snapshot, name: str, t1: float, written: float,
                        image: Path, size: int, changed: int) -> Result:
    """The time from t1 (the writes durable on the source) until the replica held them: the
    commit of the last epoch, once the source is current as of a scan that began after the
    last write returned (that scan read every new block, so no later epoch follows; 0 s if
    the replica had them before the fsync ended). When the source *knew* (that scan's end,
    a timer's scan if the writer was descheduled before it read its clock) is in the JSON
    as `source_confirmed_s`: it is bookkeeping, not when the data was safe."""
    st = pair.wait_current(written)
    if st["epoch"] <= before.epoch:
        raise RuntimeError(f"{name}: the change reached the replica in no epoch "
                           f"(still epoch {before.epoch})")
    res = _cdp_result(name, pair, before, max(0.0, st["applied_at"] - t1), image, size, changed)
    res.extra = {"source_confirmed_s": max(0.0, st["confirmed_at"] - t1)}
    return res


def _stopped(pair: CdpPair) -> None:
    codes = pair.stop()
    if any(c != 0 for c in codes):
        raise RuntimeError(f"a daemon did not stop cleanly: exit codes {codes}")


def _seed_tmpfs(ws: Workspace, img: Path, size: int, progress: Progress) -> list[Result]:
    """Seed once more onto /dev/shm: the rate when the replica's disk is not the limit."""
    if disk.fstype(SHM) != "tmpfs":
        raise UsageError("--scenarios seed-tmpfs: /dev/shm is not a tmpfs here; "
                         "--replica-dir DIR puts the replicas on a file system of your choice")
    need = disk.probe_bytes(size) + 3 * size
    if disk.free_bytes(SHM) < need:
        raise UsageError(f"--scenarios seed-tmpfs: /dev/shm has less than {format_bytes(need)} "
                         "free (the image, its WAL, the write probe)")
    folder = ws.folder_in(SHM)
    rate = _measure_disk(folder, size, progress)
    pair = CdpPair(ws.root / "cdp-tmpfs", img, replica_dir=folder)
    try:
        pair.start("receiver")
        res = _seed(pair, img, size, "seed (replica on tmpfs)", rate, progress)
    finally:
        _stopped(pair)
    shutil.rmtree(folder / pair.VOLUME, ignore_errors=True)  # give the memory back now
    return ([_disk_row(rate)] if rate else []) + [res]


def _run(ws: Workspace, *, size: int, image: Path | None, compare: str | None,
         scenarios: list[str], steady_rate: int, steady_seconds: float, progress: Progress,
         rate_cap: int, rate_seconds: float, tuned: dict[str, str] | None,
         replica_dir: Path | None) -> list[Result]:
    root = ws.root
    results: list[Result] = []
    pair: CdpPair | None = None
    rs: RsyncDaemon | None = None
    try:
        img = root / "image.raw"
        if image is not None:
            if not image.is_file():
                raise UsageError(f"--image {image}: not a regular file")
            progress(f"copying {image} (the benchmark rewrites blocks of its own copy) ...")
            shutil.copyfile(image, img)  # sparse-aware enough for a benchmark copy
        else:
            progress(f"generating a {format_bytes(size)} image ...")
            generate(img, size)
        with open(img, "rb") as fh:  # on disk before anything is timed: no writeback meanwhile
            os.fsync(fh.fileno())
        size = img.stat().st_size
        if size < BS * 16:
            raise UsageError("the image is too small to benchmark (16 blocks at least)")
        replicas = ws.folder_in(replica_dir) if replica_dir is not None else None
        if compare == "rsync":
            rs = RsyncDaemon(root / "rsync")
        dest = rs.dest / img.name if rs else None
        if "nbd" in scenarios:
            results += _nbd(root, img, size, rs, progress, steady_rate, steady_seconds, replicas)
        if "seed-tmpfs" in scenarios:
            results += _seed_tmpfs(ws, img, size, progress)
        if {"seed", "incremental", "steady"} & set(scenarios):
            pair = CdpPair(root / "cdp", img, replica_dir=replicas)
            rate = _measure_disk(pair.data_dir, size, progress) if "seed" in scenarios else None
            if rate is not None:
                results.append(_disk_row(rate))
            pair.start("receiver")
            results += _scan_rows(pair, img, size, scenarios, suffix="", salt=1000, rs=rs,
                                  dest=dest, rate=rate, steady_rate=steady_rate,
                                  steady_seconds=steady_seconds, progress=progress)
            _stopped(pair)
            if tuned:
                pair = CdpPair(root / "cdp-tuned", img, knobs=tuned, replica_dir=replicas)
                pair.start("receiver")
                results += _scan_rows(pair, img, size, scenarios, suffix=f" ({pair.config})",
                                      salt=2000, rs=None, dest=None, rate=rate,
                                      steady_rate=steady_rate, steady_seconds=steady_seconds,
                                      progress=progress)
                _stopped(pair)
            pair = None
        if rate_cap:
            progress(f"rate cap: seeding under rate_limit = {format_bytes(rate_cap)}/s ...")
            results.append(_rate_cap(root / "capped", img, size, rate_cap, rate_seconds,
                                     progress, replicas))
    finally:
        if pair:
            pair.stop()  # after a failure: the failure is what to report
        if rs:
            rs.stop()
    return results
