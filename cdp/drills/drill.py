"""`cdp failover test`: clone a recovery point while replication runs, check it, report RPO/RTO.

RPO is the age of the point (now minus its capture time at the source);
RTO is how long it took from the command's start until the clone was ready
to boot (choosing the point, copying it out, making the overlay). Checks
come after and are timed separately.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cdp.drills.checks import CheckResult, run_checks
from cdp.drills.clone import Clone, make_clone
from cdp.errors import PointError, UsageError
from cdp.replica.groups import member_point
from cdp.replica.points import Point, empty_point_message, find_point, list_points
from cdp.replica.pointview import open_view
from cdp.units import parse_duration


@dataclass
class DrillReport:
    volume: str
    epoch: int
    point_time: float
    rpo: float
    rto: float
    clone: Clone
    kept: bool = False
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(c.failed for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {"volume": self.volume, "ok": self.ok,
                "point": {"epoch": self.epoch, "time": self.point_time, "age": self.rpo},
                "rpo": self.rpo, "rto": self.rto, "clone": str(self.clone.path),
                "clone_format": self.clone.format, "kept": self.kept,
                "checks": [c.to_json() for c in self.checks]}


def parse_at(text: str, now: float | None = None) -> float:
    """--at: a Unix time, an ISO date-time (local time unless it says otherwise), or an age
    such as "30m" / "2h" meaning that long ago."""
    now = time.time() if now is None else now
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        pass
    try:
        return now - parse_duration(text.removesuffix(" ago"))
    except ValueError:
        raise UsageError(f"--at {text!r}: expected a Unix time, an ISO date-time such as "
                         "2026-11-26T14:00:00, or an age such as 2h") from None


def choose_point(vol_dir: Path, point: int | None, at: float | None) -> Point:
    """--point (an epoch), --at, or the latest. --at on a disk of a consistency group takes
    the group's newest cut every member holds (groups.py), so that each disk drilled at
    the same --at is one of a set of disks that existed together."""
    if at is not None and (held := member_point(vol_dir, at)) is not None:
        return held
    points = list_points(vol_dir)
    if at is not None:
        p = find_point(points, at)
        if p is None:
            first = next((q for q in points if q.epoch > 0), None)
            oldest = ("nothing is replicated yet" if first is None else
                      f"the oldest is epoch {first.epoch}, captured {datetime.fromtimestamp(first.time)}")
            raise PointError(f"no point captured at or before {datetime.fromtimestamp(at)} is "
                             f"kept ({oldest}); give a later --at, or see `cdp points`")
        return p
    chosen = points[-1] if point is None else next((p for p in points if p.epoch == point), None)
    if point == 0 or (chosen is not None and chosen.epoch == 0):
        raise PointError(empty_point_message(vol_dir.name, points))
    if chosen is None:
        raise PointError(f"point {point} is not kept (kept: epochs {points[0].epoch} to "
                         f"{points[-1].epoch}; `cdp points` lists them)")
    return chosen


def run_drill(data_dir: Path, volume: str, clone_root: Path, fmt: str, *,
              point: int | None = None, at: float | None = None,
              commands: list[str] | None = None, keep: bool = False,
              timeout: float = 600.0) -> DrillReport:
    t0 = time.monotonic()
    chosen = choose_point(data_dir / volume, point, at)
    dest = clone_root / f"{volume}-{chosen.epoch}-{time.strftime('%Y%m%dT%H%M%S')}-{id(t0) % 997}"
    with open_view(data_dir, volume, chosen.epoch) as view:
        clone = make_clone(view, dest, fmt)
        point_time = view.time
    rto = time.monotonic() - t0
    rep = DrillReport(volume, chosen.epoch, point_time, time.time() - point_time, rto, clone,
                      kept=keep)
    try:
        env = {"CDP_CLONE": str(clone.path), "CDP_CLONE_RAW": str(clone.raw),
               "CDP_CLONE_FORMAT": clone.format, "CDP_VOLUME": volume,
               "CDP_POINT": str(chosen.epoch), "CDP_POINT_TIME": f"{point_time:.3f}"}
        rep.checks = run_checks(clone, commands or [], env, timeout)
    finally:
        if not keep:
            clone.remove()
    return rep
