"""Every exported metric means what it says (issue 15), not only that it exists.

A known seed, then (source restarted: its counters are per run) a known incremental change;
each byte counter must equal what was actually read, sent and applied. Blocks of 64 KiB:

    seed          0..15 random, 16..31 text, 32..39 copies of 0..7, 40..47 written zeros,
                  48..127 a hole
    incremental   48..51 new random, 52..53 copies of 16..17, 0..1 zeroed

Exact where the protocol makes it exact (block bytes, compressed bytes, epochs, blocks);
wire bytes within the Begin/Commit frames that only the source counts; gauges equal
state.json and status.json. A clean run with a `cdp verify` counts no error.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

from helpers import (
    BS,
    MiB,
    assert_replica_equal,
    free_port,
    read_json,
    run_cdp,
    text_block,
    wait_converged,
    wait_for,
)
from test_metrics import Samples, scrape, val, wait_metrics_port

from cdp.replica.points import list_points

VOL = "vol1"
SIZE = 8 * MiB
FRAME_SLACK = 200  # bytes per epoch the source sends beyond the receiver's wire counter


def allocated(path: Path) -> int:
    """Bytes a hole-aware reader must read: the file's data extents (SEEK_DATA/SEEK_HOLE)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos, n = os.fstat(fd).st_size, 0, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            n, pos = n + end - start, end
        return n
    finally:
        os.close(fd)


def errors(m: Samples) -> float:
    return sum(v for (name, _), v in m.items() if name.endswith("_errors_total"))


def source_counters(m: Samples) -> dict[str, float]:
    kinds = ("scanned", "skipped", "logical", "data", "compressed", "zero", "dedup", "wire")
    return {k: val(m, "cdp_source_bytes_total", volume=VOL, kind=k) for k in kinds}


def check_source_run(s: Samples, image: Path, *, changed: int, data: int, dedup: int,
                     zero: int, rx_before: dict[str, int], rx_after: dict[str, int]) -> None:
    """One source run's counters against the image and the receiver's counters' growth."""
    c = source_counters(s)
    read = allocated(image)
    assert c["scanned"] == read, c  # holes are not read...
    assert c["skipped"] == SIZE - read  # ...they are skipped, and said so
    assert val(s, "cdp_source_scans_total", volume=VOL) == 1
    assert val(s, "cdp_source_blocks_changed_total", volume=VOL) == changed
    assert c["logical"] == changed * BS
    assert (c["data"], c["dedup"], c["zero"]) == (data * BS, dedup * BS, zero * BS)
    grew = {k: rx_after[k] - rx_before.get(k, 0) for k in rx_after}
    for k in ("logical", "data", "dedup", "zero", "compressed"):
        assert c[k] == grew[k], (k, c[k], grew[k])  # what was sent is what was applied
    assert grew["blocks"] == changed
    epochs = val(s, "cdp_source_epochs_acked_total", volume=VOL)
    assert epochs == grew["epochs"] >= 1
    assert 0 < c["wire"] - grew["wire"] <= FRAME_SLACK * epochs, (c["wire"], grew["wire"])
    assert c["compressed"] <= c["data"] * 1.01 + 128  # random data: zstd's frame overhead
    assert c["wire"] >= c["compressed"]
    assert val(s, "cdp_source_progress_bytes", volume=VOL) == SIZE
    assert val(s, "cdp_source_progress_total_bytes", volume=VOL) == SIZE
    assert val(s, "cdp_source_needs_total", volume=VOL) == 0
    assert val(s, "cdp_source_pending_epochs", volume=VOL) == 0
    assert val(s, "cdp_source_volume_error", volume=VOL) == 0
    phases = {dict(lb)["phase"] for (n, lb), v in s.items() if n == "cdp_source_volume_phase" and v}
    assert phases == {"idle"}, phases  # converged: nothing pending, waiting for the next scan
    assert 0 <= val(s, "cdp_source_throughput_bytes_per_second", volume=VOL) <= c["logical"]
    assert val(s, "cdp_source_connected") == 1
    assert val(s, "cdp_source_connections_total") == 1
    assert val(s, "cdp_source_connection_failing_since_timestamp_seconds") == 0
    assert val(s, "cdp_source_next_connect_timestamp_seconds") == 0
    assert errors(s) == 0


def check_receiver(m: Samples, env, st: dict) -> None:
    """Receiver gauges and counters against state.json and the journal on disk."""
    cnt = st["counters"]
    assert val(m, "cdp_receiver_epoch", volume=VOL) == st["epoch"]
    assert val(m, "cdp_receiver_epochs_applied_total", volume=VOL) == cnt["epochs"]
    assert val(m, "cdp_receiver_blocks_applied_total", volume=VOL) == cnt["blocks"]
    for k in ("logical", "data", "compressed", "dedup", "zero", "wire"):
        assert val(m, "cdp_receiver_bytes_total", volume=VOL, kind=k) == cnt[k], k
    assert val(m, "cdp_receiver_last_apply_timestamp_seconds", volume=VOL) == st["applied_at"]
    assert val(m, "cdp_receiver_apply_seconds_count", volume=VOL) == cnt["epochs"]  # this run
    points = list_points(env.replica_dir(VOL))
    assert val(m, "cdp_receiver_recovery_points", volume=VOL) == len(points)
    assert val(m, "cdp_receiver_journal_bytes", volume=VOL) == sum(p.size for p in points)
    window = val(m, "cdp_receiver_recovery_window_seconds", volume=VOL)  # age of the oldest
    if points[0].time:
        assert time.time() - points[0].time - 10 <= window <= time.time() - points[0].time
    else:  # the empty replica before the first epoch was never captured: no age
        assert window == 0
    assert val(m, "cdp_receiver_pending_epochs", volume=VOL) == 0
    assert val(m, "cdp_receiver_volume_connected", volume=VOL) == 1
    assert val(m, "cdp_receiver_volume_error", volume=VOL) == 0
    assert val(m, "cdp_receiver_volume_promoted", volume=VOL) == 0
    assert val(m, "cdp_receiver_volume_size_bytes", volume=VOL) == SIZE
    assert val(m, "cdp_receiver_takeovers_total") == 0
    for kind in ("logical", "wire"):
        assert 0 <= val(m, "cdp_receiver_throughput_bytes_per_second", volume=VOL,
                        kind=kind) <= cnt[kind]
    assert errors(m) == 0


def test_every_metric_means_what_it_says(cdp_env, daemons):
    rx_port, src_port = free_port(), free_port()
    env = cdp_env(receiver_extra=f'metrics_listen = "127.0.0.1:{rx_port}"',
                  source_extra=f'metrics_listen = "127.0.0.1:{src_port}"',
                  scan_interval="1h")  # one scan per run: scanned is one pass over the image
    image = env.source.images[VOL]
    rng = random.Random(6)
    blocks = {i: rng.randbytes(BS) for i in range(16)}
    blocks.update({i: text_block(rng) for i in range(16, 32)})
    blocks.update({i: blocks[i - 32] for i in range(32, 40)})
    blocks.update({i: bytes(BS) for i in range(40, 48)})
    with open(image, "wb") as fh:
        fh.truncate(SIZE)
        for i, b in blocks.items():
            os.pwrite(fh.fileno(), b, i * BS)
        os.fsync(fh.fileno())

    rx = daemons.receiver(env, inprocess=True)
    t0 = time.time()
    src = daemons.source(env, inprocess=True)
    wait_metrics_port(rx_port)
    wait_metrics_port(src_port)
    wait_converged(env, VOL, t0, src, rx)
    assert_replica_equal(env, VOL)
    st = env.replica_state(VOL)
    # the receiver holds the source's newest state: the same instant on both sides
    vstat = env.source.volume_status(VOL)
    wait_for(lambda: val(scrape(rx_port), "cdp_receiver_current_as_of_timestamp_seconds",
                         volume=VOL) == vstat["current_as_of"], 10, what="Current to arrive")
    s, m = scrape(src_port), scrape(rx_port)
    check_source_run(s, image, changed=40, data=32, dedup=8, zero=0, rx_before={},
                     rx_after=st["counters"])
    check_receiver(m, env, st)
    assert val(s, "cdp_source_acked_epoch", volume=VOL) == st["epoch"]
    assert 0 <= val(s, "cdp_source_lag_seconds", volume=VOL) <= time.time() - t0
    assert val(m, "cdp_receiver_lag_seconds", volume=VOL) <= time.time() - t0

    # a read-only inspection is no error, and no write
    r = run_cdp("verify", "-c", env.source.toml)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: val(scrape(rx_port), "cdp_receiver_open_connections") == 1, 10,
             what="verify's connection to close")
    m = scrape(rx_port)
    assert errors(m) == 0, {k: v for k, v in m.items() if k[0].endswith("_errors_total")}
    assert val(m, "cdp_receiver_connections_total") == 2  # the source's, verify's
    assert val(m, "cdp_receiver_epoch", volume=VOL) == st["epoch"]

    # the incremental change, seen by a fresh source run (its counters start at zero)
    src.stop()
    for i in range(48, 52):
        blocks[i] = rng.randbytes(BS)
    blocks[52], blocks[53] = blocks[16], blocks[17]
    blocks[0] = blocks[1] = bytes(BS)
    with open(image, "r+b") as fh:
        for i in (0, 1, 48, 49, 50, 51, 52, 53):
            os.pwrite(fh.fileno(), blocks[i], i * BS)
        os.fsync(fh.fileno())
    t1 = time.time()
    src.start()
    wait_converged(env, VOL, t1, src, rx)
    assert_replica_equal(env, VOL)
    st2 = env.replica_state(VOL)
    vstat = env.source.volume_status(VOL)
    wait_for(lambda: val(scrape(rx_port), "cdp_receiver_current_as_of_timestamp_seconds",
                         volume=VOL) == vstat["current_as_of"], 10, what="Current to arrive")
    wait_metrics_port(src_port)
    s, m = scrape(src_port), scrape(rx_port)
    check_source_run(s, image, changed=8, data=4, dedup=2, zero=2,
                     rx_before=st["counters"], rx_after=st2["counters"])
    check_receiver(m, env, st2)
    assert val(m, "cdp_receiver_connections_total") == 3
    assert val(s, "cdp_source_acked_epoch", volume=VOL) == st2["epoch"]
    assert read_json(env.source.state_dir / "status.json")["connected"]
    src.stop()
    rx.stop()
