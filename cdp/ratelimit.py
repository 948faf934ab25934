"""Rate limits: a token bucket with an injectable clock, and time-of-day windows.

`TokenBucket` is synchronous and pure apart from its clock: callers reserve
bytes and get back how long to wait before sending them. The bucket lets a
reservation go into debt, so a frame larger than the burst still passes,
just later; the debt is paid by whoever reserves next. Bytes that have been
let through by time t never exceed `burst + rate * t`. `take` (asyncio) and
`take_blocking` (threads) do the waiting, in short slices so that a rate
changed with `set_rate` also applies to callers that are already waiting.

`Schedule` picks the caps in force at a moment from time-of-day windows:
the first window that matches wins, otherwise the base caps apply. It is a
pure function of a datetime (local time of the source host).
"""

from __future__ import annotations

import asyncio
import enum
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from cdp.units import format_bytes

MIN_BURST = 64 * 1024
BURST_SECONDS = 0.05  # default burst: this much time at the full rate (smooth, not bursty)
MIN_RATE = 1024.0  # bytes per second; below this a single frame would take minutes
MAX_SLICE = 0.25  # waiters re-check the bucket this often, so set_rate applies to them too

Clock = Callable[[], float]


class TokenBucket:
    """Paces a byte stream to `rate` bytes per second; rate None means no cap.

    Thread-safe: one bucket may be shared by the event loop and scan threads.
    """

    def __init__(self, rate: float | None, burst: float | None = None,
                 clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._fixed_burst = burst
        self._t = clock()
        self._tokens = 0.0  # may be negative: debt that later reservations wait for
        self._earned = 0.0  # tokens credited so far; a reservation waits for a mark on this scale
        self.rate: float | None = None
        self.burst = 0.0
        self._set(_check_rate(rate))

    def _burst_for(self, rate: float | None) -> float:
        if rate is None:
            return 0.0
        if self._fixed_burst is not None:
            return float(self._fixed_burst)
        return max(float(MIN_BURST), rate * BURST_SECONDS)

    def _set(self, rate: float | None) -> None:
        old = self.rate
        self.rate = rate
        self.burst = self._burst_for(rate)
        if rate is None:
            self._tokens = 0.0
        elif old is None:
            self._tokens = self.burst  # a fresh bucket starts full
        else:
            self._tokens = min(self._tokens, self.burst)  # debt is kept, surplus capped

    def _refill(self) -> None:
        now = self._clock()
        dt = max(0.0, now - self._t)
        self._t = now
        if self.rate is None:
            return
        gain = min(dt * self.rate, max(0.0, self.burst - self._tokens))
        self._tokens += gain
        self._earned += gain

    def set_rate(self, rate: float | None) -> None:
        """Change the rate from now on; what was earned and owed so far is kept."""
        rate = _check_rate(rate)
        with self._lock:
            self._refill()  # at the old rate, up to now
            self._set(rate)

    def reserve(self, n: int) -> float:
        """Take n bytes now; returns a mark to pass to `remaining` (debt is allowed)."""
        if n < 0:
            raise ValueError(f"cannot reserve a negative number of bytes ({n})")
        with self._lock:
            self._refill()
            if self.rate is None:
                return self._earned
            self._tokens -= n
            return self._earned + max(0.0, -self._tokens)

    def remaining(self, mark: float) -> float:
        """Seconds until the reservation that returned `mark` may go (0 when it may go now)."""
        with self._lock:
            self._refill()
            if self.rate is None:
                return 0.0
            return max(0.0, (mark - self._earned) / self.rate)

    def delay(self, n: int) -> float:
        """Reserve n bytes and return how long the caller must wait before sending them."""
        if n < 0:
            raise ValueError(f"cannot reserve a negative number of bytes ({n})")
        with self._lock:
            self._refill()
            if self.rate is None:
                return 0.0
            self._tokens -= n
            return max(0.0, -self._tokens / self.rate)


def _check_rate(rate: float | None) -> float | None:
    if rate is not None and not rate > 0:
        raise ValueError(f"a rate must be positive (or None for no cap), got {rate!r}")
    return None if rate is None else float(rate)


async def take(bucket: TokenBucket, n: int) -> None:
    """Wait until n bytes may be sent under `bucket` (asyncio)."""
    if bucket.rate is None:
        return
    mark = bucket.reserve(n)
    while (d := bucket.remaining(mark)) > 0:
        await asyncio.sleep(min(d, MAX_SLICE))


def take_blocking(bucket: TokenBucket, n: int, cancelled: Callable[[], bool] | None = None) -> None:
    """Wait until n bytes may be read under `bucket` (threads); returns early once cancelled()."""
    if bucket.rate is None:
        return
    mark = bucket.reserve(n)
    while (d := bucket.remaining(mark)) > 0:
        if cancelled is not None and cancelled():
            return
        time.sleep(min(d, MAX_SLICE))


def format_rate(rate: float | None) -> str:
    """'50.0 MiB/s' or 'unlimited', for logs."""
    return "unlimited" if rate is None else f"{format_bytes(rate)}/s"


# -- parsing -------------------------------------------------------------------

_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*(?:/\s*s)?\s*$")
_PREFIX = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
           "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def parse_rate(value: int | float | str) -> float | None:
    """Bytes per second from '50MiB', '50MiB/s', '100Mbit/s' or a number; None for 'unlimited'.

    Sizes read as in `parse_size` (KiB = 1024, kB = 1000); 'bit' units are
    bits (decimal prefixes, as links are sold). Raises ValueError.
    """
    if isinstance(value, bool):
        raise ValueError("expected a rate such as 50MiB/s or \"unlimited\", got a boolean")
    if isinstance(value, int | float):
        rate = float(value)
    elif isinstance(value, str) and value.strip().lower() == "unlimited":
        return None
    else:
        m = _RATE.match(str(value))
        unit = m.group(2).lower() if m else ""
        bits = unit.endswith("bit")
        prefix = unit[:-3] if bits else unit.removesuffix("b")
        if not m or prefix not in _PREFIX:
            raise ValueError(
                f"expected a rate such as 50MiB/s, 100Mbit/s or \"unlimited\", got {value!r}")
        rate = float(m.group(1)) * _PREFIX[prefix] / (8 if bits else 1)
    if not MIN_RATE <= rate < float("inf"):
        raise ValueError(
            f"a rate must be at least 1KiB/s (use \"unlimited\" for no cap), got {value!r}")
    return rate


DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
ALL_DAYS = frozenset(range(7))


def _day(name: str) -> int:
    key = name.strip().lower()
    for i, (short, full) in enumerate(zip(DAY_NAMES, _FULL_NAMES, strict=True)):
        if key in (short, full):
            return i
    raise ValueError(f"unknown day {name.strip()!r} (use mon, tue, wed, thu, fri, sat, sun)")


def parse_days(value: str | Iterable[str]) -> frozenset[int]:
    """Weekdays (0 = Monday) from 'mon-fri', 'sat,sun', 'fri-mon' or a list of such. Raises ValueError."""
    if not isinstance(value, str | list | tuple):
        raise ValueError(f"expected days such as \"mon-fri\" or \"sat,sun\", got {value!r}")
    parts = [value] if isinstance(value, str) else list(value)
    days: set[int] = set()
    for part in parts:
        if not isinstance(part, str):
            raise ValueError(f"expected days such as \"mon-fri\" or \"sat,sun\", got {part!r}")
        for item in part.split(","):
            if not item.strip():
                raise ValueError(f"expected days such as \"mon-fri\" or \"sat,sun\", got {part!r}")
            if item.strip().lower() in ("all", "*"):
                days.update(ALL_DAYS)
                continue
            first, sep, last = item.partition("-")
            a = _day(first)
            b = _day(last) if sep else a
            d = a
            while True:  # 'fri-mon' wraps over the weekend
                days.add(d)
                if d == b:
                    break
                d = (d + 1) % 7
    if not days:
        raise ValueError("expected at least one day")
    return frozenset(days)


_HOURS = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


def parse_hours(value: str) -> tuple[int, int]:
    """(start, end) in minutes after midnight from '08:00-18:00'; end < start wraps midnight.

    '00:00-24:00' is the whole day. Raises ValueError.
    """
    m = _HOURS.match(value) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"expected hours such as \"08:00-18:00\" or \"22:00-06:00\", got {value!r}")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2):
        raise ValueError(f"{value!r} is not a time of day (00:00 to 24:00)")
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end:
        raise ValueError(f"{value!r} is empty; use \"00:00-24:00\" for the whole day")
    return start, end


# -- windows -------------------------------------------------------------------


class Inherit(enum.Enum):
    """A window that does not set a cap keeps the base one."""

    INHERIT = "inherit"


INHERIT = Inherit.INHERIT
Cap = float | None  # bytes per second; None: no cap


@dataclass(frozen=True)
class Window:
    """Caps in force on `days` between `start` and `end` (minutes after midnight, local time).

    A window that wraps midnight (start > end) belongs to the day it starts
    on: 'fri 22:00-06:00' covers Friday night until Saturday 06:00.
    """

    days: frozenset[int] = ALL_DAYS
    start: int = 0
    end: int = 1440
    rate_limit: Cap | Inherit = INHERIT
    read_limit: Cap | Inherit = INHERIT
    label: str = ""

    def matches(self, when: datetime) -> bool:
        minute = when.hour * 60 + when.minute
        day = when.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        if minute >= self.start:
            return day in self.days
        return minute < self.end and (day - 1) % 7 in self.days


@dataclass(frozen=True)
class Caps:
    """The caps in force: network, scan reads, and which window set them (None: the base caps)."""

    rate_limit: Cap
    read_limit: Cap
    window: str | None = None


@dataclass(frozen=True)
class Schedule:
    """Base caps plus time-of-day windows; the first matching window wins."""

    rate_limit: Cap = None
    read_limit: Cap = None
    windows: tuple[Window, ...] = ()

    def active(self, when: datetime) -> Caps:
        for w in self.windows:
            if w.matches(when):
                rate = self.rate_limit if w.rate_limit is INHERIT else w.rate_limit
                read = self.read_limit if w.read_limit is INHERIT else w.read_limit
                return Caps(rate, read, w.label or "window")
        return Caps(self.rate_limit, self.read_limit, None)
