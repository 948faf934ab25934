"""Flow control: memory stays bounded on both sides whatever the amount of change."""

from __future__ import annotations

import os
from pathlib import Path

from cdp.benchmark.pair import CdpPair

MiB = 1 << 20


def test_seeding_more_than_fits_keeps_both_sides_bounded(tmp_path: Path) -> None:
    # 384 MiB of incompressible data: were either side to buffer what is in flight,
    # its peak memory would grow with the image; the bound is well below the image size
    image = tmp_path / "image.raw"
    with open(image, "wb") as fh:
        for _ in range(384):
            fh.write(os.urandom(MiB))
    pair = CdpPair(tmp_path / "pair", image)
    try:
        pair.start("receiver")
        t0 = pair.start("source")
        pair.wait_current(t0, timeout=300)
        src_peak, rx_peak = pair.peaks()
    finally:
        codes = pair.stop()
    assert codes == [0, 0]
    assert src_peak < 250 * MiB, f"source peaked at {src_peak // MiB} MiB"
    assert rx_peak < 250 * MiB, f"receiver peaked at {rx_peak // MiB} MiB"
    assert (tmp_path / "pair" / "replicas" / "bench" / "image").read_bytes() == image.read_bytes()
