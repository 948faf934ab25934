"""The "rescan (hot cache)" row of `cdp bench`: how fast a scan volume is reread and hashed.

A scan-mode volume is reread whole on every change, so this rate bounds how soon a
change is found. Measured as the source does it with the shipped defaults: the same
scan code, 64 KiB blocks, the hash helper process when there are two cores or more
(cdp/tracker/hashworker.py), an image already in the page cache (a first scan reads it
in and makes the map), nothing changed. Reported: the median of five rescans in GB/s of
data read (holes are skipped without reading, so they do not count), and beside it the
rate on one core, measured in the same run.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

from cdp.blocks import Geometry
from cdp.codec import HASH_LEN
from cdp.limits import DEFAULT_BLOCK_SIZE
from cdp.tracker.hashworker import HashHelper, HashHelpers
from cdp.tracker.scan import scan, zero_map

RUNS = 5


def measure(image: Path) -> dict[str, Any]:
    """Seconds per rescan (median of RUNS) with the source's setup and on one core."""
    geo = Geometry(image.stat().st_size, DEFAULT_BLOCK_SIZE)  # a scan volume's default
    fd = os.open(image, os.O_RDONLY)
    try:
        smap = zero_map(geo)
        read = [0]

        def count(n: int) -> None:
            read[0] += n

        for i, h, _ in scan(fd, geo, zero_map(geo), progress=count, holes=lambda n: None):
            smap[i * HASH_LEN:(i + 1) * HASH_LEN] = h
        data = read[0]

        def runs(helper: HashHelper | None) -> list[float]:
            out = []
            for _ in range(RUNS):
                t = time.perf_counter()
                for _change in scan(fd, geo, smap, helper=helper):
                    raise RuntimeError(f"{image} changed while the rescan was measured")
                out.append(time.perf_counter() - t)
            return out

        pool = HashHelpers()
        try:
            with pool.lend() as helper:
                shipped = runs(helper)
                helpers = 0 if helper is None else 1
        finally:
            pool.close()
        alone = runs(None)
    finally:
        os.close(fd)
    med, one = statistics.median(shipped), statistics.median(alone)
    return {"seconds": med, "data_bytes": data, "gbps": data / med / 1e9, "runs": shipped,
            "one_core_gbps": data / one / 1e9, "helpers": helpers, "logical_gbps": geo.size / med / 1e9}
