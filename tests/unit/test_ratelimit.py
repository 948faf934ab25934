"""Token bucket and time-of-day schedule (cdp.ratelimit), on a fake clock."""

from __future__ import annotations

import asyncio
import random
import threading
from datetime import datetime

import pytest

from cdp.ratelimit import (
    ALL_DAYS,
    INHERIT,
    MIN_BURST,
    Caps,
    Schedule,
    TokenBucket,
    Window,
    parse_days,
    parse_hours,
    parse_rate,
    take,
    take_blocking,
)

KiB, MiB = 1024, 1024 * 1024


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


def drive(bucket: TokenBucket, clock: FakeClock, sizes: list[int]) -> list[tuple[float, int]]:
    """Send frames one after the other, waiting as told; (time each went, its size)."""
    sent = []
    for n in sizes:
        clock.sleep(bucket.delay(n))
        sent.append((clock.now, n))
    return sent


# -- token bucket ----------------------------------------------------------------


def test_rate_is_held_exactly_over_a_long_run():
    clock = FakeClock()
    rate = 4 * MiB
    b = TokenBucket(rate, clock=clock)
    rng = random.Random(1)
    t0 = clock.now
    sent = drive(b, clock, [rng.randint(1, 2 * MiB) for _ in range(5000)])
    total = sum(n for _, n in sent)
    elapsed = clock.now - t0
    # never more than the burst ahead of the rate, and never behind it
    assert total <= b.burst + rate * elapsed + 1e-6 * total
    assert total >= rate * elapsed - 1e-6 * total
    assert total / elapsed == pytest.approx(rate, rel=0.001)


def test_the_rate_holds_at_every_moment_not_just_on_average():
    clock = FakeClock()
    rate = 1 * MiB
    b = TokenBucket(rate, clock=clock)
    rng = random.Random(2)
    t0 = clock.now
    done = 0
    for _ in range(2000):
        n = rng.randint(100, 300 * KiB)
        clock.sleep(b.delay(n))
        done += n
        assert done <= b.burst + rate * (clock.now - t0) + 1e-3
        clock.sleep(rng.random() * 0.01)  # the caller does other things in between


def test_default_burst_is_small_and_bounds_what_passes_without_waiting():
    clock = FakeClock()
    b = TokenBucket(100 * MiB, clock=clock)
    assert b.burst == pytest.approx(100 * MiB * 0.05)
    assert TokenBucket(1 * MiB, clock=clock).burst == MIN_BURST
    clock.sleep(3600)  # idle for an hour: the bucket holds a burst, not an hour of credit
    free = 0
    while (d := b.delay(16 * KiB)) == 0:
        free += 16 * KiB
    assert free <= b.burst
    assert d > 0


def test_explicit_burst():
    clock = FakeClock()
    b = TokenBucket(1 * MiB, burst=10 * KiB, clock=clock)
    assert b.delay(10 * KiB) == 0
    assert b.delay(1 * KiB) == pytest.approx(1 * KiB / MiB)


def test_a_frame_larger_than_the_burst_passes_paced_and_its_debt_is_paid_by_the_next():
    clock = FakeClock()
    rate = 1 * MiB
    b = TokenBucket(rate, clock=clock)
    big = 8 * MiB  # far more than the 64 KiB burst
    d1 = b.delay(big)
    assert d1 == pytest.approx((big - b.burst) / rate)
    # a second caller reserving at the same instant waits behind the first one's debt
    d2 = b.delay(1 * KiB)
    assert d2 == pytest.approx((big + 1 * KiB - b.burst) / rate)
    clock.sleep(d2)
    assert b.delay(0) == 0


def test_set_rate_mid_stream_keeps_the_accounting():
    clock = FakeClock()
    b = TokenBucket(1 * MiB, clock=clock)
    b.delay(int(b.burst) + 1 * MiB)  # one MiB in debt
    clock.sleep(0.5)  # half of it paid at 1 MiB/s
    b.set_rate(2 * MiB)
    assert b.delay(0) == pytest.approx(0.25)  # the other half, at the new rate
    b.set_rate(1 * MiB)
    assert b.delay(0) == pytest.approx(0.5)  # the same debt, at the old rate again
    clock.sleep(0.5)
    assert b.delay(0) == 0
    # credit earned at one rate is kept (up to the burst) when the rate changes
    clock.sleep(10)
    b.set_rate(1.5 * MiB)
    assert b.delay(MIN_BURST) == 0
    assert b.delay(int(1.5 * MiB)) == pytest.approx(1.0)


def test_set_rate_applies_to_a_reservation_already_waiting():
    clock = FakeClock()
    b = TokenBucket(64 * KiB, clock=clock)
    mark = b.reserve(64 * KiB + 640 * KiB)
    assert b.remaining(mark) == pytest.approx(10.0)
    clock.sleep(5)
    b.set_rate(640 * KiB)  # ten times faster: the other 320 KiB take half a second
    assert b.remaining(mark) == pytest.approx(0.5)
    b.set_rate(None)
    assert b.remaining(mark) == 0


def test_set_rate_lowering_the_burst_caps_the_saved_credit():
    clock = FakeClock()
    b = TokenBucket(100 * MiB, clock=clock)
    clock.sleep(10)
    b.set_rate(1 * MiB)
    assert b.burst == MIN_BURST
    assert b.delay(MIN_BURST) == 0
    assert b.delay(1 * KiB) > 0


def test_unlimited_never_waits_and_can_become_limited():
    clock = FakeClock()
    b = TokenBucket(None, clock=clock)
    assert b.rate is None
    assert all(b.delay(1 << 30) == 0 for _ in range(100))
    b.set_rate(1 * MiB)  # limited from now on, starting with a full (small) bucket
    assert b.delay(int(b.burst)) == 0
    assert b.delay(1 * MiB) == pytest.approx(1.0)
    b.set_rate(None)
    assert b.delay(1 << 30) == 0


@pytest.mark.parametrize("rate", [0, -1, float("nan")])
def test_bad_rates_are_refused(rate):
    with pytest.raises(ValueError):
        TokenBucket(rate)
    with pytest.raises(ValueError):
        TokenBucket(None).set_rate(rate)


def test_negative_reservation_is_refused():
    with pytest.raises(ValueError):
        TokenBucket(1 * MiB).delay(-1)


def test_async_take_waits_and_notices_a_rate_change():
    b = TokenBucket(64 * KiB)

    async def main() -> float:
        loop = asyncio.get_running_loop()
        await take(b, int(b.burst))  # free
        t0 = loop.time()
        task = asyncio.create_task(take(b, 64 * KiB * 60))  # a minute at this rate
        await asyncio.sleep(0.05)
        assert not task.done()
        b.set_rate(None)
        async with asyncio.timeout(2):
            await task
        return loop.time() - t0

    assert asyncio.run(main()) < 2


def test_take_blocking_stops_waiting_when_cancelled():
    b = TokenBucket(64 * KiB)
    take_blocking(b, int(b.burst))
    stop = threading.Event()
    t = threading.Thread(target=take_blocking, args=(b, 64 * KiB * 60, stop.is_set))
    t.start()
    stop.set()
    t.join(5)
    assert not t.is_alive()


def test_unlimited_take_returns_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """No cap: neither take nor take_blocking sleeps, however much is taken, and nothing is owed."""
    clock = FakeClock()  # never advances: any wait would have to sleep

    def no_sleep(seconds: float, *args: object) -> None:
        raise AssertionError(f"an unlimited bucket slept {seconds}s")

    async def no_async_sleep(seconds: float, *args: object) -> None:
        no_sleep(seconds)

    monkeypatch.setattr("cdp.ratelimit.time.sleep", no_sleep)
    monkeypatch.setattr("cdp.ratelimit.asyncio.sleep", no_async_sleep)
    b = TokenBucket(None, clock=clock)
    for _ in range(3):
        take_blocking(b, 1 << 40)
        asyncio.run(take(b, 1 << 40))
    assert b.delay(1 << 40) == 0
    assert b.remaining(b.reserve(1 << 40)) == 0
    b.set_rate(64 * KiB)  # capping it later starts from a full bucket, not from the bytes taken
    assert b.delay(int(b.burst)) == 0
    assert b.delay(64 * KiB) == pytest.approx(1.0)


# -- parsing ---------------------------------------------------------------------


@pytest.mark.parametrize(("text", "want"), [
    ("50MiB", 50 * MiB), ("50MiB/s", 50 * MiB), ("50 MiB / s", 50 * MiB), ("64KiB", 64 * KiB),
    ("100Mbit/s", 100e6 / 8), ("1Gbit", 1e9 / 8), ("1.5GiB/s", 1.5 * 1024 * MiB),
    ("2MB", 2e6), (1048576, 1 * MiB), ("unlimited", None), ("Unlimited", None),
])
def test_parse_rate(text, want):
    assert parse_rate(text) == want


@pytest.mark.parametrize("text", ["0", 0, "-5MiB", "fast", "50Mbps", "1bit", "100B", True, "",
                                  float("inf"), "50MiB/h"])
def test_parse_rate_refuses(text):
    with pytest.raises(ValueError):
        parse_rate(text)


def test_parse_days():
    assert parse_days("mon-fri") == frozenset({0, 1, 2, 3, 4})
    assert parse_days("sat,sun") == frozenset({5, 6})
    assert parse_days("Fri-Mon") == frozenset({4, 5, 6, 0})
    assert parse_days(["monday", "wed-thu"]) == frozenset({0, 2, 3})
    assert parse_days("all") == ALL_DAYS
    for bad in ("mo", "mon-", "funday", "", "mon,,tue", 3, ["mon", 1]):
        with pytest.raises(ValueError):
            parse_days(bad)


def test_parse_hours():
    assert parse_hours("08:00-18:00") == (480, 1080)
    assert parse_hours("22:00-06:00") == (1320, 360)
    assert parse_hours("00:00-24:00") == (0, 1440)
    assert parse_hours("18:30-24:00") == (1110, 1440)
    for bad in ("8-18", "08:00-08:00", "24:00-06:00", "07:60-08:00", "25:00-01:00", "10:00-24:30", 8):
        with pytest.raises(ValueError):
            parse_hours(bad)


# -- schedule --------------------------------------------------------------------

# 2024-01-01 was a Monday
def at(day: int, hh: int, mm: int = 0) -> datetime:
    return datetime(2024, 1, 1 + day, hh, mm)


BUSINESS = Window(parse_days("mon-fri"), *parse_hours("08:00-18:00"), rate_limit=50 * MiB,
                  label="business")
NIGHT = Window(ALL_DAYS, *parse_hours("22:00-06:00"), rate_limit=None, read_limit=None,
               label="night")


def test_schedule_days_and_hours():
    s = Schedule(rate_limit=10 * MiB, read_limit=20 * MiB, windows=(BUSINESS,))
    assert s.active(at(0, 9)) == Caps(50 * MiB, 20 * MiB, "business")  # read cap inherited
    assert s.active(at(4, 17, 59)).window == "business"
    assert s.active(at(4, 18, 0)) == Caps(10 * MiB, 20 * MiB, None)  # end is exclusive
    assert s.active(at(0, 7, 59)).window is None
    assert s.active(at(5, 9)).window is None  # saturday
    assert s.active(at(6, 12)).window is None  # sunday


def test_schedule_window_wrapping_midnight_belongs_to_the_day_it_starts():
    fri_night = Window(parse_days("fri"), *parse_hours("22:00-06:00"), rate_limit=1 * MiB,
                       label="fri night")
    s = Schedule(windows=(fri_night,))
    assert s.active(at(4, 22)).window == "fri night"  # friday 22:00
    assert s.active(at(4, 23, 59)).window == "fri night"
    assert s.active(at(5, 0)).window == "fri night"  # saturday 00:00
    assert s.active(at(5, 5, 59)).window == "fri night"
    assert s.active(at(5, 6)).window is None
    assert s.active(at(4, 3)).window is None  # friday early morning: thursday night, not listed
    assert s.active(at(5, 22)).window is None  # saturday night
    assert s.active(at(4, 21, 59)).window is None


def test_schedule_first_match_wins_and_unlimited_overrides_the_base():
    s = Schedule(rate_limit=10 * MiB, read_limit=5 * MiB, windows=(NIGHT, BUSINESS))
    assert s.active(at(2, 23)) == Caps(None, None, "night")
    assert s.active(at(2, 12)) == Caps(50 * MiB, 5 * MiB, "business")
    overlap = Window(ALL_DAYS, *parse_hours("12:00-13:00"), rate_limit=1 * MiB, label="lunch")
    assert Schedule(windows=(BUSINESS, overlap)).active(at(2, 12, 30)).window == "business"
    assert Schedule(windows=(overlap, BUSINESS)).active(at(2, 12, 30)).window == "lunch"


def test_schedule_falls_back_to_the_base_caps():
    assert Schedule().active(at(0, 12)) == Caps(None, None, None)
    s = Schedule(rate_limit=3 * MiB, windows=(BUSINESS,))
    assert s.active(at(6, 12)) == Caps(3 * MiB, None, None)


def test_window_defaults_cover_every_moment():
    w = Window(read_limit=1 * MiB, label="always")
    assert w.rate_limit is INHERIT
    s = Schedule(rate_limit=2 * MiB, windows=(w,))
    for d in range(7):
        for h in (0, 12, 23):
            assert s.active(at(d, h, 59)) == Caps(2 * MiB, 1 * MiB, "always")
