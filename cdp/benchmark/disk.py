"""How fast the replica's folder takes durable sequential writes: the ceiling for a seed.

A replica that is durable at every acknowledged epoch cannot be seeded faster
than its disk writes it. Measured like `dd bs=4M conv=fdatasync`: one file,
4 MiB writes of incompressible data, one fdatasync at the end, the time of
the whole; the file is removed afterwards.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

CHUNK = 4 << 20
MIN_BYTES, MAX_BYTES = 64 << 20, 1 << 30


@dataclass(frozen=True)
class DiskRate:
    folder: Path
    nbytes: int
    seconds: float
    fstype: str

    @property
    def mbps(self) -> float:
        return self.nbytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


def probe_bytes(image_size: int) -> int:
    """As much as the seed writes, within 64 MiB..1 GiB, in whole 4 MiB writes."""
    n = min(MAX_BYTES, max(MIN_BYTES, image_size))
    return max(CHUNK, n // CHUNK * CHUNK)


def fstype(folder: Path) -> str:
    """The file-system type `folder` is on ("ext4", "tmpfs", ...; "" if unknown)."""
    best, kind = "", ""
    try:
        with open("/proc/self/mounts") as fh:
            mounts = [line.split() for line in fh]
    except OSError:
        return ""
    target = str(folder.resolve())
    for m in mounts:
        if len(m) >= 3:
            point = m[1].replace("\\040", " ")
            if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                best, kind = point, m[2]
    return kind


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def measure(folder: Path, nbytes: int) -> DiskRate:
    """Write `nbytes` into a new file in `folder`, fdatasync it, time the whole, remove it."""
    buf = os.urandom(CHUNK)
    path = folder / ".cdp-bench-disk-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        done = 0
        while done < nbytes:
            done += os.write(fd, buf[: min(CHUNK, nbytes - done)])
        os.fdatasync(fd)
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return DiskRate(folder, nbytes, seconds, fstype(folder))
