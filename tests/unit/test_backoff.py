"""Reconnect backoff: doubles, never waits longer than its cap, starts over after a success."""

from __future__ import annotations

import random

from cdp.wire.transport import Backoff


def test_delays_double_up_to_the_cap_and_never_exceed_it() -> None:
    b = Backoff(0.5, 5.0, random.Random(1))
    delays = [b.next() for _ in range(50)]
    assert all(0.25 <= d <= 5.0 for d in delays)
    assert delays[0] <= 0.5
    assert max(delays[10:]) > 2.5  # reached the cap's range
    assert min(delays[10:]) >= 2.5  # jitter is within [cap/2, cap]


def test_jitter_spreads_sources_apart() -> None:
    firsts = {round(Backoff(1.0, 10.0, random.Random(seed)).next(), 3) for seed in range(20)}
    assert len(firsts) > 10


def test_reset_starts_over() -> None:
    b = Backoff(0.5, 10.0, random.Random(2))
    for _ in range(10):
        b.next()
    b.reset()
    assert b.next() <= 0.5
