"""`cdp plan`: measure how volumes change, then size the link, the seeding and the archive window.

Measuring (`measure`, `VolumeProbe`): nothing is sent anywhere. Each volume
is read once in full (its data size, a zstd sample for seeding, its block
hashes), then rescanned every `interval` seconds comparing block hashes
(xxh3-128) with the previous pass, exactly as the scan tracker does. For
each changed block the probe records whether it is zero, a repeat of content
already in the volume or earlier in the changes (dedup), and how small zstd
(level 1, as the source sends) makes the rest. NBD volumes are measured the
same way, by scanning their image (the source need not be running; if it is,
its writes reach the same file).

Calculations (`summarize`, pure): change rate per window (mean over the
whole run, p95 over windows), the wire ratio (bytes on the wire per changed
byte after zero detection, dedup and compression), and from them:

- link needed for an RPO: the p95 over RPO-long windows of the change rate,
  times the wire ratio: with that link, 95% of RPO-long bursts are sent
  within the next RPO;
- seeding time: volume data size / (link x seed compression);
- archive window: how long one incremental archive run uploads over the link
  (changes of one archive interval, at most the data size, / (link x
  compression)).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cdp.blocks import Geometry
from cdp.codec import compress
from cdp.tracker.scan import scan, volume_size

GiB = 1024**3
SEED_SAMPLE_EVERY = 8  # seeding compression: every 8th data block of the first pass is compressed


# -- pure calculations --------------------------------------------------------------------


@dataclass
class Pass:
    """One rescan of one volume: what changed since the previous pass."""

    time: float  # when the pass started
    changed: int = 0  # bytes of changed blocks
    zero: int = 0  # of which now all zero (sent as a run, no data)
    dup: int = 0  # of which repeats of content seen before (sent as references)
    unique: int = 0  # of which new content
    compressed: int = 0  # what zstd made of the new content
    read: int = 0  # bytes read by the pass
    cpu: float = 0.0  # CPU seconds spent (read, hash, compress)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    k = max(0, math.ceil(q / 100 * len(s)) - 1)
    return s[min(k, len(s) - 1)]


def window_rates(passes: list[Pass], window: float, start: float, end: float) -> list[float]:
    """Change rate (bytes/s) of one volume in consecutive windows of about `window` seconds.

    A pass finds the changes made since the previous pass (the first: since
    `start`); it counts in the window holding its time, and a window's rate
    is its passes' changes over the time those passes cover (so a window
    holding one pass more than another is not a burst).
    """
    if end <= start or window <= 0:
        return []
    n = max(1, int((end - start) / window + 0.5))
    span = (end - start) / n
    sums = [0] * n
    covered = [0.0] * n
    prev = start
    for p in passes:
        if start < p.time <= end:
            # a pass covers (previous pass, its time]: one on a boundary closes the earlier window
            k = min(n - 1, max(0, math.ceil((p.time - start) / span) - 1))
            sums[k] += p.changed
            covered[k] += p.time - prev
        prev = p.time
    return [s / c if c > 0 else 0.0 for s, c in zip(sums, covered, strict=True)]


def total_rates(volumes: list[list[Pass]], window: float, start: float, end: float) -> list[float]:
    """Window rates of several volumes added up (same windows)."""
    rates = [window_rates(ps, window, start, end) for ps in volumes]
    return [sum(r) for r in zip(*rates, strict=True)] if rates else []


def windows_for(duration: float) -> tuple[float, str]:
    """1-minute windows; shorter when the run is short (at least 5 windows), with a note."""
    if duration >= 300:
        return 60.0, ""
    w = max(duration / 5, 0.5)
    return w, (f"the run is short ({duration:.0f}s): rates are over {w:.1f}s windows instead "
               "of 1 minute; p95 is noisier and bursts count for more")


@dataclass
class Figures:
    """What the plan reports for one volume or for all of them."""

    name: str
    size: int = 0
    data_bytes: int = 0  # non-zero blocks in the first pass
    seed_compression: float = 1.0
    changed_bytes: int = 0
    seconds: float = 0.0
    rate_mean: float = 0.0  # bytes/s
    rate_p95: float = 0.0  # over `window`-long windows
    rate_p95_rpo: float = 0.0  # over RPO-long windows
    compression: float = 1.0  # changed new content: raw / zstd
    dedup: float = 1.0  # changed non-zero bytes / new content bytes
    zero_fraction: float = 0.0
    wire_ratio: float = 1.0  # wire bytes per changed byte
    cpu_s_per_gib: float = 0.0
    link_needed: float = 0.0  # bytes/s to hold the RPO
    seed_seconds: float | None = None  # over the given link
    archive_bytes: int = 0  # one archive interval's upload
    archive_seconds: float | None = None
    rates: list[float] = field(default_factory=list)  # per window, for the plot

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(name: str, volumes: list[list[Pass]], *, start: float, end: float, window: float,
              rpo: float, link: float | None, size: int, data_bytes: int,
              seed_compression: float, archive_every: float, first_read: int = 0,
              first_cpu: float = 0.0) -> Figures:
    """The figures of one volume, or of several together, from their passes (one list each)."""
    f = Figures(name, size=size, data_bytes=data_bytes, seed_compression=seed_compression)
    passes = [p for ps in volumes for p in ps]
    f.seconds = max(end - start, 1e-9)
    f.changed_bytes = sum(p.changed for p in passes)
    f.rate_mean = f.changed_bytes / f.seconds
    f.rates = total_rates(volumes, window, start, end)
    f.rate_p95 = percentile(f.rates, 95)
    gap = max((_pass_gap(ps) for ps in volumes), default=0.0)
    f.rate_p95_rpo = percentile(total_rates(volumes, max(rpo, gap), start, end), 95)
    zero = sum(p.zero for p in passes)
    dup = sum(p.dup for p in passes)
    unique = sum(p.unique for p in passes)
    comp = sum(p.compressed for p in passes)
    f.compression = unique / comp if comp else 1.0
    f.dedup = (unique + dup) / unique if unique else 1.0
    f.zero_fraction = zero / f.changed_bytes if f.changed_bytes else 0.0
    f.wire_ratio = comp / f.changed_bytes if f.changed_bytes else 1.0
    read = first_read + sum(p.read for p in passes)
    cpu = first_cpu + sum(p.cpu for p in passes)
    f.cpu_s_per_gib = cpu / (read / GiB) if read else 0.0
    f.link_needed = f.rate_p95_rpo * f.wire_ratio
    f.archive_bytes = int(min(f.rate_mean * archive_every, data_bytes or size) * f.wire_ratio)
    if link:
        f.seed_seconds = seeding_seconds(data_bytes, link, seed_compression)
        f.archive_seconds = f.archive_bytes / link
    return f


def seeding_seconds(data_bytes: int, link: float, compression: float) -> float:
    """Volume data size / (link x compression)."""
    return data_bytes / (link * max(compression, 1e-9))


def _pass_gap(passes: list[Pass]) -> float:
    gaps = [b.time - a.time for a, b in itertools.pairwise(passes)]
    return max(gaps, default=0.0)


# -- measuring ----------------------------------------------------------------------------


class VolumeProbe:
    """Rescans one volume and records what changed between passes (no network, no writes)."""

    def __init__(self, name: str, path: Path, block_size: int, index_cap: int = 4_000_000) -> None:
        self.name, self.path = name, path
        self.geo = Geometry(volume_size(path), block_size)
        self.smap = bytearray(self.geo.blocks * 16)  # all-zero entries match no real hash
        self.seen: set[bytes] = set()  # content hashes in the volume or in its changes (dedup)
        self.index_cap = index_cap
        self.passes: list[Pass] = []
        self.data_bytes = 0
        self.seed_raw = self.seed_comp = 0
        self.first_read = 0
        self.first_cpu = 0.0

    def first(self) -> None:
        """The first full pass: hashes, data size, a compression sample for seeding."""
        c0 = time.process_time()
        k = 0
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, h, content in scan(fd, self.geo, self.smap):
                self.smap[i * 16:(i + 1) * 16] = h
                if content is None:
                    continue
                self.data_bytes += len(content)
                self._remember(h)
                if k % SEED_SAMPLE_EVERY == 0:
                    self.seed_raw += len(content)
                    self.seed_comp += len(compress(content))
                k += 1
        finally:
            os.close(fd)
        self.first_read = self.geo.size
        self.first_cpu = time.process_time() - c0

    def rescan(self) -> Pass:
        p = Pass(time.time())
        c0 = time.process_time()
        read = [0]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, h, content in scan(fd, self.geo, self.smap,
                                      progress=lambda n: read.__setitem__(0, read[0] + n)):
                n = self.geo.length(i)
                self.smap[i * 16:(i + 1) * 16] = h
                p.changed += n
                if content is None:
                    p.zero += n
                elif h in self.seen:
                    p.dup += n
                else:
                    p.unique += n
                    p.compressed += len(compress(content))
                    self._remember(h)
        finally:
            os.close(fd)
        p.read = read[0]
        p.cpu = time.process_time() - c0
        self.passes.append(p)
        return p

    def _remember(self, h: bytes) -> None:
        if len(self.seen) < self.index_cap:
            self.seen.add(h)

    @property
    def seed_compression(self) -> float:
        return self.seed_raw / self.seed_comp if self.seed_comp else 1.0


def measure(probes: list[VolumeProbe], duration: float, interval: float,
            progress: Callable[[float], None] | None = None,
            stop: Callable[[], bool] | None = None) -> tuple[float, float]:
    """First passes, then rescans every `interval` seconds for `duration`; (start, end) times."""
    for pr in probes:
        pr.first()
    start = time.time()
    end = start + duration
    nxt = start + interval
    while True:
        now = time.time()
        if now < nxt:
            time.sleep(min(nxt - now, 0.5))
            continue
        for pr in probes:
            pr.rescan()
        if progress:
            progress(min(1.0, (time.time() - start) / duration))
        if nxt >= end - 1e-6 or (stop and stop()):
            break
        nxt = min(nxt + interval, end)
    return start, max(p.time for pr in probes for p in pr.passes) if probes[0].passes else end


def interval_for(duration: float) -> float:
    """Seconds between passes: every 5 s, more often on a short run (at least 20 passes)."""
    return max(0.2, min(5.0, duration / 20))


def plan(probes: list[VolumeProbe], start: float, end: float, *, window: float, rpo: float,
         link: float | None, archive_every: float) -> list[Figures]:
    """Figures per volume, then the total (named "total")."""
    out = [summarize(pr.name, [pr.passes], start=start, end=end, window=window, rpo=rpo, link=link,
                     size=pr.geo.size, data_bytes=pr.data_bytes,
                     seed_compression=pr.seed_compression, archive_every=archive_every,
                     first_read=pr.first_read, first_cpu=pr.first_cpu) for pr in probes]
    seed_raw = sum(pr.seed_raw for pr in probes)
    seed_comp = sum(pr.seed_comp for pr in probes)
    out.append(summarize(
        "total", [pr.passes for pr in probes], start=start, end=end, window=window, rpo=rpo,
        link=link, size=sum(pr.geo.size for pr in probes),
        data_bytes=sum(pr.data_bytes for pr in probes),
        seed_compression=seed_raw / seed_comp if seed_comp else 1.0, archive_every=archive_every,
        first_read=sum(pr.first_read for pr in probes),
        first_cpu=sum(pr.first_cpu for pr in probes)))
    return out
