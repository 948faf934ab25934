"""When an archive job is due: "hourly", "daily 02:00", "weekly sun 03:30", "every 6h", "manual".

A schedule names moments (slots); a job is due when a slot has passed since
its last run (a missed slot runs once, not once per missed slot). "every D"
is due when D has passed since the last run. Local time.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from cdp.units import parse_duration

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HHMM = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True)
class Schedule:
    kind: str  # "manual" | "every" | "hourly" | "daily" | "weekly"
    interval: float = 0.0  # every: seconds
    minute: int = 0  # hourly: minute of the hour; daily/weekly: minute of the day
    weekday: int = 0  # weekly: 0 = Monday

    def last_slot(self, now: dt.datetime) -> dt.datetime:
        """The latest slot at or before `now` (hourly, daily, weekly)."""
        if self.kind == "hourly":
            s = now.replace(minute=self.minute, second=0, microsecond=0)
            return s if s <= now else s - dt.timedelta(hours=1)
        s = now.replace(hour=self.minute // 60, minute=self.minute % 60, second=0, microsecond=0)
        if self.kind == "daily":
            return s if s <= now else s - dt.timedelta(days=1)
        s -= dt.timedelta(days=(now.weekday() - self.weekday) % 7)
        return s if s <= now else s - dt.timedelta(days=7)


def parse_schedule(text: str) -> Schedule:
    """Schedule from its text; ValueError says what is accepted."""
    words = str(text).strip().lower().split()
    help_ = ('expected "manual", "hourly", "hourly :15", "daily 02:00", "weekly sun 03:00" or '
             f'"every 6h", got {text!r}')
    if words == ["manual"]:
        return Schedule("manual")
    if len(words) == 2 and words[0] == "every":
        secs = parse_duration(words[1])
        if secs < 60:
            raise ValueError("the interval must be at least 1 minute")
        return Schedule("every", interval=secs)
    if words and words[0] == "hourly" and len(words) <= 2:
        minute = 0
        if len(words) == 2:
            m = re.fullmatch(r":([0-5]\d)", words[1])
            if not m:
                raise ValueError(help_)
            minute = int(m.group(1))
        return Schedule("hourly", minute=minute)
    if len(words) in (1, 2) and words[0] == "daily":
        return Schedule("daily", minute=_minute(words[1] if len(words) == 2 else "00:00", help_))
    if len(words) in (2, 3) and words[0] == "weekly" and words[1][:3] in _DAYS:
        return Schedule("weekly", minute=_minute(words[2] if len(words) == 3 else "00:00", help_),
                        weekday=_DAYS.index(words[1][:3]))
    raise ValueError(help_)


def _minute(hhmm: str, help_: str) -> int:
    m = _HHMM.fullmatch(hhmm)
    if not m:
        raise ValueError(help_)
    return int(m.group(1)) * 60 + int(m.group(2))


def is_due(schedule: Schedule, last_run: float | None, now: float) -> bool:
    """True when the job should run now, given when it last ran (None: never)."""
    if schedule.kind == "manual":
        return False
    if last_run is None:
        return True
    if schedule.kind == "every":
        return now - last_run >= schedule.interval
    slot = schedule.last_slot(dt.datetime.fromtimestamp(now)).timestamp()
    return last_run < slot <= now
