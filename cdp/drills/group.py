"""Drills and promote for a whole VM: every disk of a consistency group at one cut.

`cdp failover test --group G` takes the group's newest cut that every member holds (or
the one --at or a --point label names; cdp.replica.groups), pins every member's point,
clones them all and checks each clone. RPO is the cut's age; RTO is the time until the
last clone was ready (a VM boots with all its disks). Each disk also gets its own report.

`cdp failover promote --group G` records its decision first, durably, in
``<data_dir>/.group-G.promote.json`` (the cut and each member's epoch), then promotes
the members one after the other at those epochs (drills/promote.py). A rerun after a
crash finishes the same cut; members already promoted are left as they are.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdp.drills.checks import run_checks
from cdp.drills.clone import Clone, make_clone
from cdp.drills.drill import DrillReport
from cdp.drills.promote import connected_source, promote
from cdp.durable import atomic_write_json, read_json
from cdp.errors import DrillError, UsageError
from cdp.replica.groups import choose_cut, members, open_views
from cdp.replica.store import PROMOTED


@dataclass
class GroupDrillReport:
    group: str
    time: float  # the cut: every disk is as it was at this instant
    rpo: float
    rto: float
    disks: list[DrillReport] = field(default_factory=list)
    kept: bool = False

    @property
    def ok(self) -> bool:
        return all(d.ok for d in self.disks)

    def to_json(self) -> dict[str, Any]:
        return {"group": self.group, "ok": self.ok,
                "cut": {"time": self.time, "age": self.rpo}, "rpo": self.rpo, "rto": self.rto,
                "kept": self.kept, "volumes": [d.to_json() for d in self.disks]}


def run_group_drill(data_dir: Path, group: str, clone_root: Path, fmt: str, *,
                    label: str | None = None, at: float | None = None,
                    commands: list[str] | None = None, keep: bool = False,
                    timeout: float = 600.0) -> GroupDrillReport:
    t0 = time.monotonic()
    cut = choose_cut(data_dir, group, at=at, label=label)
    root = clone_root / f"{group}-{time.strftime('%Y%m%dT%H%M%S')}-{id(cut) % 997}"
    clones: dict[str, tuple[Clone, float, float]] = {}  # member -> clone, point time, ready at
    try:
        views = open_views(data_dir, cut)  # pinned together: retention keeps every point
        try:
            for m, view in views.items():
                clones[m] = (make_clone(view, root / m, fmt), view.time, time.monotonic() - t0)
        finally:
            for view in views.values():
                view.close()
        rto = time.monotonic() - t0
        rep = GroupDrillReport(group, cut.time, time.time() - cut.time, rto, kept=keep)
        for m, (clone, point_time, ready) in clones.items():
            epoch = cut.points[m].epoch
            disk = DrillReport(m, epoch, point_time, time.time() - cut.time, ready, clone, kept=keep)
            env = {"CDP_CLONE": str(clone.path), "CDP_CLONE_RAW": str(clone.raw),
                   "CDP_CLONE_FORMAT": clone.format, "CDP_VOLUME": m, "CDP_POINT": str(epoch),
                   "CDP_POINT_TIME": f"{point_time:.3f}", "CDP_GROUP": group,
                   "CDP_CUT_TIME": f"{cut.time:.3f}"}
            disk.checks = run_checks(clone, commands or [], env, timeout)
            rep.disks.append(disk)
        return rep
    finally:
        if not keep:
            for clone, _, _ in clones.values():
                clone.remove()
            with contextlib.suppress(OSError):
                root.rmdir()


def group_record(data_dir: Path, group: str) -> Path:
    return Path(data_dir) / f".group-{group}.promote.json"


def promote_group(data_dir: Path, group: str, *, label: str | None = None,
                  at: float | None = None, force: bool = False,
                  wait: float = 60.0) -> dict[str, Any]:
    """Promote every member of `group` at one cut; see the module docstring."""
    path = group_record(data_dir, group)
    views = {}
    if path.exists():
        rec = read_json(path)
        if rec.get("state") == "promoted":
            raise DrillError(f"group {group!r} was already promoted at its cut of "
                             f"{rec.get('time')} ({path}); its images are live")
        if label is not None or at is not None:
            raise UsageError(f"a promote of group {group!r} was started and not finished ({path}); "
                             "run it again without --point/--at to finish it")
    else:
        names = members(data_dir, group)
        busy = [f"{m} ({c})" for m in names if (c := connected_source(data_dir / m)) is not None]
        if busy and not force:
            raise DrillError(f"still connected and replicating: {', '.join(busy)}; stop the source "
                             "first (the production side may still be live), or pass --force")
        done = [m for m in names if (data_dir / m / PROMOTED).exists()]
        if done:
            raise DrillError(f"{', '.join(done)} of group {group!r} was promoted on its own; "
                             "promote the other members alone, at the same time as it was")
        cut = choose_cut(data_dir, group, at=at, label=label)
        views = open_views(data_dir, cut)  # retention keeps each point until its promote starts
        rec = {"state": "promoting", "group": group, "time": cut.time, "forced": force,
               "requested_at": time.time(),
               "points": {m: p.epoch for m, p in cut.points.items()}}
        atomic_write_json(path, rec)
    results: dict[str, Any] = {}
    try:
        for m, epoch in rec["points"].items():
            view = views.pop(m, None)
            if view is not None:
                view.close()
            marker = data_dir / m / PROMOTED
            prior: dict[str, Any] = {}
            with contextlib.suppress(OSError, ValueError):
                prior = read_json(marker) if marker.exists() else {}
            if prior.get("state") == "promoted" and prior.get("point") == epoch:
                results[m] = prior
                continue
            results[m] = promote(data_dir, m, int(epoch), force=force, wait=wait)
    finally:
        for view in views.values():
            view.close()
    rec = {**rec, "state": "promoted", "promoted_at": time.time(),
           "volumes": {m: {k: r.get(k) for k in ("epoch", "previous_epoch", "rolled_back_epochs",
                                                  "image", "size")}
                       for m, r in results.items()}}
    atomic_write_json(path, rec)
    return rec
