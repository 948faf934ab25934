"""`cdp points -c receiver.toml VOL`: the recovery points a replica keeps."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from cdp.config import load_receiver, valid_name
from cdp.durable import read_json
from cdp.errors import UsageError
from cdp.replica.points import generation, list_points, remove_label, resolve_point
from cdp.replica.store import PROMOTED
from cdp.units import format_bytes


def register(sub: Any) -> None:
    s = sub.add_parser("points", help="list the recovery points kept for a volume",
                       description="Recovery points of a replica, oldest first: epoch, capture "
                       "time at the source, age (the RPO if you recovered to it now) and the "
                       "journal bytes only that point needs.")
    s.add_argument("-c", "--config", type=Path, required=True, help="receiver.toml")
    s.add_argument("volume", nargs="?", help="the volume (or --group)")
    s.add_argument("--group", help="the cuts every disk of this consistency group holds: the "
                   "points a group drill or promote can take")
    s.add_argument("--unlabel", metavar="EPOCH", help="remove the label of this point (an epoch "
                   "or its label): retention may then drop it like any other")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=run)


def volume_dir(data_dir: Path, volume: str) -> Path:
    """The replica folder of `volume`; UsageError (exit 2) if there is none."""
    if not valid_name(volume):
        raise UsageError(f"{volume!r} is not a volume name")
    path = data_dir / volume
    if not (path / "state.json").exists():
        raise UsageError(f"no replica of volume {volume!r} in {data_dir} (check the name and "
                         "the receiver config)")
    return path


def fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def fmt_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def promoted(vol_dir: Path) -> dict[str, Any] | None:
    """promoted.json of a replica folder (state "promoting" or "promoted"), None if absent."""
    try:
        rec = read_json(vol_dir / PROMOTED)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"state": "unreadable"}
    return rec if isinstance(rec, dict) else {"state": "unreadable"}


def collect(data_dir: Path, volume: str) -> dict[str, Any]:
    vol_dir = volume_dir(data_dir, volume)
    points = list_points(vol_dir)
    now = time.time()
    rows = [{"epoch": p.epoch, "time": p.time, "until": max(p.time, p.until),
             "age": now - p.time if p.time else None,
             "size": p.size, "keep_bytes": p.keep_bytes, "label": p.label,
             "current": p.current, "group": p.group} for p in points]
    return {"volume": volume, "data_dir": str(data_dir), "count": len(rows),
            "journal_bytes": sum(p.size for p in points),
            "oldest": rows[0] if rows else None, "points": rows,
            "generation": generation(vol_dir), "promoted": promoted(vol_dir)}


def promoted_line(volume: str, rec: dict[str, Any]) -> str:
    if rec.get("state") == "promoted":
        return (f"volume {volume} was PROMOTED at epoch {rec.get('epoch')} "
                f"({fmt_time(float(rec.get('promoted_at') or 0))}): its image is a live disk "
                "now, not a replica; it has no recovery points and takes no epochs until "
                "`cdp failback finish`")
    if rec.get("state") == "promoting":
        return (f"volume {volume}: a promote was started and not finished; run `cdp failover "
                "promote` again to finish it")
    return f"volume {volume}: {PROMOTED} is unreadable; the receiver takes no epochs for it"


def run(args: argparse.Namespace) -> int:
    cfg = load_receiver(args.config)
    if (args.volume is None) == (args.group is None):
        raise UsageError("name a volume or --group NAME (not both)")
    if args.group is not None:
        return _group(cfg.data_dir, args)
    if args.unlabel is not None:
        vol_dir = volume_dir(cfg.data_dir, args.volume)
        epoch = resolve_point(vol_dir, args.unlabel)
        gone = remove_label(vol_dir, epoch)
        if gone is None:
            raise UsageError(f"point {epoch} of {args.volume!r} has no label")
        if args.json:
            print(json.dumps({"volume": args.volume, "epoch": epoch, "unlabelled": gone}))
        else:
            print(f"point {epoch} of {args.volume}: label {gone!r} removed")
        return 0
    report = collect(cfg.data_dir, args.volume)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    if report["promoted"] is not None:
        print(promoted_line(args.volume, report["promoted"]))
    print(f"{'epoch':>8}  {'time':19}  {'age':>8}  {'size':>10}  label")
    for p in report["points"]:
        age = fmt_age(p["age"]) if p["age"] is not None else "-"
        size = "current" if p["current"] else format_bytes(p["size"])
        print(f"{p['epoch']:>8}  {fmt_time(p['time']):19}  {age:>8}  {size:>10}  "
              f"{p['label'] or ''}")
    print(f"{report['count']} point(s), journal {format_bytes(report['journal_bytes'])}")
    return 0


def _group(data_dir: Path, args: argparse.Namespace) -> int:
    """--group: the instants every member holds, each member's point at it (groups.py)."""
    from cdp.replica.groups import group_cuts, members

    if args.unlabel is not None:
        raise UsageError("--unlabel takes a volume: unlabel each disk of the group")
    names = members(data_dir, args.group)
    cuts = group_cuts(data_dir, args.group)
    now = time.time()
    if args.json:
        print(json.dumps({"group": args.group, "members": names, "count": len(cuts),
                          "cuts": [{"time": c.time, "age": now - c.time,
                                    "epochs": {m: p.epoch for m, p in c.points.items()},
                                    "labels": {m: p.label for m, p in c.points.items()
                                               if p.label}} for c in cuts]}, indent=1))
        return 0
    print(f"{'time':19}  {'age':>8}  " + "  ".join(f"{m:>12}" for m in names))
    for c in cuts:
        print(f"{fmt_time(c.time):19}  {fmt_age(now - c.time):>8}  "
              + "  ".join(f"{c.points[m].epoch:>12}" for m in names))
    print(f"{len(cuts)} cut(s) of group {args.group} held by every member")
    return 0
