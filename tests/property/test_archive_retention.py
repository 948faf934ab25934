"""Retention keeps exactly what the policy says: checked against an independent oracle."""

from __future__ import annotations

import datetime as dt

from hypothesis import given, settings
from hypothesis import strategies as st

from cdp.archive.retention import select
from cdp.config import KeepPolicy

UTC = dt.UTC
T0 = 1_700_000_000.0


def _period(kind: str, t: float) -> str:
    """The calendar period as text, computed differently from cdp's bucket()."""
    d = dt.datetime.fromtimestamp(t, UTC)
    return {"hourly": d.strftime("%Y-%m-%d %H"), "daily": d.strftime("%Y-%m-%d"),
            "weekly": "{}-W{:02d}".format(*d.isocalendar()[:2]), "monthly": d.strftime("%Y-%m")}[kind]


def oracle(times: list[float], p: KeepPolicy) -> set[int]:
    """Kept = the `last` newest, plus the newest snapshot of each of the n newest periods per rule."""
    if not (p.last or p.hourly or p.daily or p.weekly or p.monthly):
        return set(range(len(times)))
    keep: set[int] = set()
    by_age = sorted(range(len(times)), key=lambda i: -times[i])
    keep.update(by_age[:p.last])
    for kind, n in (("hourly", p.hourly), ("daily", p.daily), ("weekly", p.weekly),
                    ("monthly", p.monthly)):
        newest: dict[str, int] = {}
        for i in by_age:
            newest.setdefault(_period(kind, times[i]), i)
        periods = sorted(newest, key=lambda k: -times[newest[k]])[:n]
        keep.update(newest[k] for k in periods)
    return keep


times_st = st.lists(st.floats(min_value=T0, max_value=T0 + 400 * 86400, allow_nan=False),
                    max_size=60, unique=True)
policy_st = st.builds(KeepPolicy, *(st.integers(0, 8) for _ in range(5)))


@settings(max_examples=300, deadline=None)
@given(times_st, policy_st)
def test_keeps_exactly_what_the_policy_says(times: list[float], policy: KeepPolicy) -> None:
    kept = select(times, policy, UTC)
    assert set(kept) == oracle(times, policy)


@settings(max_examples=200, deadline=None)
@given(times_st, policy_st)
def test_kept_snapshots_have_reasons_and_bounds(times: list[float], policy: KeepPolicy) -> None:
    kept = select(times, policy, UTC)
    if times and any(vars(policy).values()):
        newest = max(range(len(times)), key=lambda i: times[i])
        assert newest in kept  # any non-empty rule keeps the newest snapshot
        assert len(kept) <= sum(vars(policy).values())
    assert all(reasons for reasons in kept.values())


def test_daily_keeps_newest_of_each_day() -> None:
    day, midnight = 86400.0, 1_699_920_000.0  # 2023-11-14 00:00 UTC
    times = [midnight + d * day + h * 3600 for d in range(5) for h in (1, 5, 9)]
    kept = select(times, KeepPolicy(daily=3), UTC)
    assert sorted(times[i] for i in kept) == [midnight + d * day + 9 * 3600 for d in (2, 3, 4)]


def test_empty_policy_keeps_all() -> None:
    assert set(select([T0, T0 + 1, T0 + 2], KeepPolicy(), UTC)) == {0, 1, 2}
