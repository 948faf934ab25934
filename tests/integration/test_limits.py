"""Rate limits with real processes: the network cap holds, and SIGHUP changes it live.

These check that a cap is enforced, not how fast cdp is: the bounds are loose
on purpose (shared CI machines); `cdp bench` measures the precise figures.
"""

from __future__ import annotations

import os
import random
import signal
import time

from helpers import (
    MiB,
    assert_replica_equal,
    make_image,
    wait_converged,
    wait_for,
)

VOL = "vol1"


def _random_image(env, size: int, seed: int) -> None:
    # incompressible and without holes: what is applied is what crossed the wire
    make_image(env.source.images[VOL], size, random.Random(seed), zero=0.0, text=0.0)


def _set_rate_limit(env, value: str) -> None:
    toml = env.source.toml
    lines = [ln for ln in toml.read_text().splitlines() if not ln.startswith("rate_limit")]
    i = lines.index("[source]")
    lines.insert(i + 1, f"rate_limit = {value}")
    toml.write_text("\n".join(lines) + "\n")


def _hup_ready(env, src) -> None:
    """The source has installed its handlers (it writes status only after that)."""
    wait_for(lambda: env.source.status(), 20, what=lambda: f"source status\n{src.tail()}")


def test_network_cap_holds_during_a_seed(cdp_env, daemons):
    cap = 4 * MiB
    size = 24 * MiB
    # small epochs so the receiver's counters move often enough to sample
    env = cdp_env(source_extra='rate_limit = "4MiB"\nmax_epoch_bytes = "1MiB"\n'
                               'batch_bytes = "256KiB"')
    _random_image(env, size, seed=11)
    rx = daemons.receiver(env)
    t0 = time.time()
    src = daemons.source(env)

    samples: list[tuple[float, int]] = []  # (time, bytes the receiver has applied)

    def done() -> bool:
        for d in (src, rx):
            assert d.running, f"{d.verb} exited:\n{d.tail()}"
        st = env.replica_state(VOL)
        if st is not None:
            samples.append((time.monotonic(), st["counters"]["wire"]))
            if st["counters"]["logical"] >= size:
                return True
        return False

    wait_for(done, 120, interval=0.05, what="the seed to be applied")
    wait_converged(env, VOL, t0, src, rx, timeout=60)
    assert_replica_equal(env, VOL)

    moving = [(t, n) for t, n in samples if n > 0]
    first = moving[0]
    last = next(s for s in moving if s[1] == moving[-1][1])  # when the last bytes arrived
    assert last[0] - first[0] >= 5, (
        f"{size} bytes went in {last[0] - first[0]:.1f}s: faster than a {cap}-byte/s cap allows")
    rate = (last[1] - first[1]) / (last[0] - first[0])
    assert abs(rate - cap) <= 0.25 * cap, f"applied {rate / MiB:.2f} MiB/s under a 4 MiB/s cap"

    st = env.source.status()
    assert st["rate_limit"] == cap
    assert st["read_limit"] is None
    assert st["window"] is None
    assert st["volumes"][0]["rate_limit"] is None
    assert "rate limits now: network 4.0 MiB/s" in src.log_text()
    src.stop()
    rx.stop()


def test_sighup_lifts_the_cap_live(cdp_env, daemons):
    size = 32 * MiB  # about two minutes at 256 KiB/s
    env = cdp_env(source_extra='rate_limit = "256KiB"\nmax_epoch_bytes = "1MiB"\n'
                               'batch_bytes = "256KiB"')
    _random_image(env, size, seed=12)
    rx = daemons.receiver(env)
    t0 = time.time()
    src = daemons.source(env)
    _hup_ready(env, src)
    wait_for(lambda: (env.replica_state(VOL) or {}).get("epoch", 0) >= 1, 30,
             what="the first epoch under the small cap")
    assert env.replica_state(VOL)["counters"]["logical"] < size / 4

    _set_rate_limit(env, '"unlimited"')
    os.kill(src.pid, signal.SIGHUP)
    # the rest (24 MiB or more) would need 96 s or more at the old cap: the timeout is far
    # below that, and still below it when stretched by CDP_TEST_TIMEOUT_FACTOR up to 4
    wait_converged(env, VOL, t0, src, rx, timeout=20)
    assert_replica_equal(env, VOL)
    log = src.log_text()
    assert "config reload: source.rate_limit: 256.0 KiB/s -> unlimited" in log
    assert "rate limits now: network unlimited" in log
    assert "needs a restart" not in log
    wait_for(lambda: (env.source.status() or {}).get("rate_limit", 0) is None, 10,
             what="status.json to show no cap")
    src.stop()
    rx.stop()


def test_sighup_with_a_broken_config_keeps_the_old_one(cdp_env, daemons):
    size = 16 * MiB  # a minute at 256 KiB/s
    env = cdp_env(source_extra='rate_limit = "256KiB"\nmax_epoch_bytes = "1MiB"\n'
                               'batch_bytes = "256KiB"')
    _random_image(env, size, seed=13)
    rx = daemons.receiver(env)
    t0 = time.time()
    src = daemons.source(env)
    _hup_ready(env, src)
    good = env.source.toml.read_text()

    _set_rate_limit(env, '"lots"')
    os.kill(src.pid, signal.SIGHUP)
    wait_for(lambda: "config reload failed" in src.log_text(), 20, what="the reload error")
    log = src.log_text()
    assert "source.rate_limit" in log  # the error names the key...
    assert str(env.source.toml.resolve()) in log  # ...and the file
    env.source.toml.write_text(good.replace("[source]", "[source\n"))  # not even TOML
    os.kill(src.pid, signal.SIGHUP)
    wait_for(lambda: "not valid TOML" in src.log_text(), 20, what="the second reload error")

    time.sleep(0.5)
    assert src.running
    st = env.source.status()
    assert st["rate_limit"] == 256 * 1024  # the old cap still applies
    assert (env.replica_state(VOL) or {"counters": {"logical": 0}})["counters"]["logical"] < size

    # a good config again: the cap goes and replication finishes
    env.source.toml.write_text(good)
    _set_rate_limit(env, '"unlimited"')
    os.kill(src.pid, signal.SIGHUP)
    wait_converged(env, VOL, t0, src, rx, timeout=30)
    assert_replica_equal(env, VOL)
    src.stop()
    rx.stop()
