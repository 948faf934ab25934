"""Which snapshots a keep policy retains: a pure function over snapshot times.

Semantics (those of restic's ``forget``): ``last = n`` keeps the n newest
snapshots; ``hourly/daily/weekly/monthly = n`` keep, for each of the n newest
hours/days/ISO weeks/months *that have snapshots*, the newest snapshot in it.
A snapshot is kept if any rule keeps it. A policy with every count at zero
keeps everything: forgetting all snapshots is never a default.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cdp.config import KeepPolicy

KINDS = ("last", "hourly", "daily", "weekly", "monthly")


def keeps_all(policy: KeepPolicy) -> bool:
    return not any(getattr(policy, k) for k in KINDS)


def bucket(kind: str, t: float, tz: dt.tzinfo | None = None) -> tuple[int, ...]:
    """The calendar period of a time for one rule (local time unless tz is given)."""
    d = dt.datetime.fromtimestamp(t, tz) if tz is not None else dt.datetime.fromtimestamp(t)
    if kind == "hourly":
        return (d.year, d.month, d.day, d.hour)
    if kind == "daily":
        return (d.year, d.month, d.day)
    if kind == "weekly":
        iso = d.isocalendar()
        return (iso.year, iso.week)
    if kind == "monthly":
        return (d.year, d.month)
    raise ValueError(kind)


def select(times: Sequence[float], policy: KeepPolicy, tz: dt.tzinfo | None = None
           ) -> dict[int, list[str]]:
    """Indices into `times` of the snapshots to keep, each with the rules that keep it."""
    if keeps_all(policy):
        return {i: ["all"] for i in range(len(times))}
    order = sorted(range(len(times)), key=lambda i: times[i], reverse=True)
    keep: dict[int, list[str]] = {}
    for i in order[:policy.last]:
        keep.setdefault(i, []).append("last")
    for kind in KINDS[1:]:
        n = getattr(policy, kind)
        seen: list[tuple[int, ...]] = []
        for i in order:
            if len(seen) >= n:
                break
            b = bucket(kind, times[i], tz)
            if b not in seen:
                seen.append(b)
                keep.setdefault(i, []).append(kind)
    return keep
