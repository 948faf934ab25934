"""Consistency groups at the receiver: which replicas form a group, and the cuts they all hold.

The source cuts every member of a group at one instant (tracker/journal.py) and says so
with each epoch that ends at a cut (message Cut, protocol 2): the instant, the group and
its members, and `since`, the cut through which the volume still held its previous epoch.
The receiver keeps that with the epoch (WAL record CUT; then ``state.json`` "cut" and
"group", and the next undo file's meta "cut" and "base_cut"); a Current from the source
while the volume is idle adds "the newest epoch held through T" (``held.json``)::

    member A   point 7 (cut at t7) ....... held through since(8) .... point 8 (cut at t8)
    member B   point 3 (cut at t5) .. point 4 (cut at t7) .. point 5 (cut at t8)

So for every point P of a member the receiver knows the instants at which that disk was
exactly P: from P's cut time through ``Point.held``. A member *holds* the group cut T if
its newest point captured at or before T is a cut of the group that held through T. A
time T is a recovery point of the group only if every member holds it. A member whose
sender fell behind merges epochs (its points get coarser) and simply holds fewer cuts;
group queries take the newest cut they all hold, so a pair that never existed together
is never restored. Everything is checked here, from what the replicas recorded.

Membership: each replica's ``state.json`` "group" names its group and members as the
source's config declares them (the source may only name volumes its client may write);
all members must agree, and each must have a replica.
"""

from __future__ import annotations

import bisect
import contextlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cdp.durable import read_json
from cdp.errors import PointError, UsageError
from cdp.replica.points import Point, list_points, resolve_point
from cdp.replica.pointview import PointView, open_view


@dataclass(frozen=True)
class GroupCut:
    """One instant of a consistency group, and each member's point holding it."""

    group: str
    time: float
    points: dict[str, Point]


def group_of(vol_dir: Path) -> tuple[str, list[str]] | None:
    """The group a replica belongs to and its members, per its source (None: no group)."""
    try:
        g = read_json(vol_dir / "state.json").get("group")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(g, dict) or not g.get("name"):
        return None
    return str(g["name"]), [str(m) for m in g.get("members", [])]


def members(data_dir: Path, group: str) -> list[str]:
    """The members of `group`; UsageError if no replica names it, PointError if they disagree
    or one has no replica yet."""
    found: dict[str, list[str]] = {}
    with contextlib.suppress(FileNotFoundError):
        for d in sorted(Path(data_dir).iterdir()):
            if d.name.startswith(".") or not d.is_dir():
                continue
            g = group_of(d)
            if g is not None and g[0] == group:
                found[d.name] = sorted(g[1])
    if not found:
        raise UsageError(f"no replica in {data_dir} belongs to consistency group {group!r} (the "
                         "source sets `group` on its [[volume]]s, nbd mode; the receiver learns "
                         "it with their first epochs)")
    lists = {tuple(m) for m in found.values()}
    if len(lists) > 1:
        raise PointError(f"the replicas of group {group!r} disagree on its members ("
                         + "; ".join(f"{v}: {', '.join(m)}" for v, m in found.items())
                         + "): a member's newest epoch is older than the change of `group`; "
                         "wait until every member has replicated since")
    names = list(next(iter(lists)))
    missing = [m for m in names if m not in found]
    if missing:
        raise PointError(f"group {group!r}: {', '.join(missing)} has no replica here yet (or "
                         "has not replicated since joining the group)")
    return names


class _Member:
    """One member's points, indexed by capture time."""

    def __init__(self, points: list[Point]) -> None:
        self.points = points
        order = sorted(range(len(points)), key=lambda i: (points[i].time, i))
        self.times = [points[i].time for i in order]
        self.newest: list[int] = []  # prefix maximum: the newest point among the first k
        best = -1
        for i in order:
            best = max(best, i)
            self.newest.append(best)

    def holding(self, group: str, t: float) -> Point | None:
        """The point holding the group cut at `t`, or None if this member does not hold it."""
        k = bisect.bisect_right(self.times, t)
        if k == 0:
            return None
        p = self.points[self.newest[k - 1]]
        return p if p.group == group and p.epoch > 0 and p.held >= t else None


def _load(data_dir: Path, names: list[str]) -> dict[str, _Member]:
    return {m: _Member(list_points(Path(data_dir) / m)) for m in names}


def _cuts(group: str, loaded: dict[str, _Member]) -> list[GroupCut]:
    times = sorted({p.time for m in loaded.values() for p in m.points if p.group == group})
    out = []
    for t in times:
        held = {name: m.holding(group, t) for name, m in loaded.items()}
        if all(p is not None for p in held.values()):
            out.append(GroupCut(group, t, {n: p for n, p in held.items() if p is not None}))
    return out


def group_cuts(data_dir: Path, group: str) -> list[GroupCut]:
    """Every cut each member of `group` holds, oldest first."""
    return _cuts(group, _load(data_dir, members(data_dir, group)))


def choose_cut(data_dir: Path, group: str, *, at: float | None = None,
               label: str | None = None) -> GroupCut:
    """The group's newest common cut (at or before `at`), or the cut its members' points
    labelled `label` hold together (cdp checkpoint --group); PointError if there is none."""
    names = members(data_dir, group)
    loaded = _load(data_dir, names)
    if label is not None:
        return _labelled(data_dir, group, loaded, label)
    cuts = [c for c in _cuts(group, loaded) if at is None or c.time <= at]
    if cuts:
        return cuts[-1]
    when = "" if at is None else f" at or before {datetime.fromtimestamp(at)}"
    raise PointError(f"no cut of group {group!r} that every member ({', '.join(names)}) holds "
                     f"is kept{when}; {_lagging(group, loaded, at)}")


def _labelled(data_dir: Path, group: str, loaded: dict[str, _Member], label: str) -> GroupCut:
    if label.isdigit():
        raise UsageError("with --group, --point takes a label (cdp checkpoint --group): epoch "
                         "numbers differ between the members")
    chosen = {m: resolve_point(Path(data_dir) / m, label) for m in loaded}
    by_epoch = {m: next((p for p in loaded[m].points if p.epoch == e), None)
                for m, e in chosen.items()}
    gone = [m for m, p in by_epoch.items() if p is None]
    if gone:
        raise PointError(f"label {label!r}: the point of {', '.join(gone)} is not kept")
    t = max(p.time for p in by_epoch.values() if p is not None)
    for m, want in chosen.items():
        p = loaded[m].holding(group, t)
        if p is None or p.epoch != want:
            raise PointError(f"label {label!r} does not name one cut of group {group!r}: "
                             f"{m}'s point {want} was not its state at {datetime.fromtimestamp(t)}"
                             "; label the group's disks together with `cdp checkpoint --group`")
    return GroupCut(group, t, {m: p for m, p in by_epoch.items() if p is not None})


def _lagging(group: str, loaded: dict[str, _Member], at: float | None) -> str:
    """Which members hold no cut near `at`: the hint in a refusal."""
    newest = max((p.time for m in loaded.values() for p in m.points
                  if p.group == group and (at is None or p.time <= at)), default=None)
    if newest is None:
        return "no member has a group cut there yet (the source may be older than protocol 2)"
    behind = [n for n, m in loaded.items() if m.holding(group, newest) is None]
    return (f"at the newest group cut there ({datetime.fromtimestamp(newest)}), "
            f"{', '.join(behind)} held no known state (behind, resyncing or not connected)")


def member_point(vol_dir: Path, at: float) -> Point | None:
    """--at on one disk of a group: its point at the group's newest common cut at or before
    `at` (None: the volume is in no group). Drilling each disk alone at the same time then
    gives disks that existed together."""
    g = group_of(vol_dir)
    if g is None:
        return None
    return choose_cut(vol_dir.parent, g[0], at=at).points[vol_dir.name]


def open_views(data_dir: Path, cut: GroupCut) -> dict[str, PointView]:
    """Pinned views of every member at the cut (retention keeps them until closed)."""
    views: dict[str, PointView] = {}
    try:
        for m, p in cut.points.items():
            views[m] = open_view(data_dir, m, p.epoch)
    except BaseException:
        for v in views.values():
            v.close()
        raise
    return views


def to_json(cut: GroupCut) -> dict[str, Any]:
    return {"group": cut.group, "time": cut.time,
            "members": {m: {"epoch": p.epoch, "time": p.time} for m, p in cut.points.items()}}
