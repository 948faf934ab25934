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
from cdp.replica.journal import generation, list_points, remove_label, resolve_point
from cdp.replica.store import PROMOTED
from cdp.units import format_bytes


def register(sub: Any) -> None:
    s = sub.add_parser("points", help="list the recovery points kept for a volume",
                       description="Recovery points of a replica, oldest first: epoch, capture "
                       "time at the source, age (the RPO if you recovered to it now) and the "
                       "journal bytes only that point needs.")
    s.add_argument("-c", "--config", type=Path, required=True, help="receiver.toml")
    s.add_argument("volume")
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
             "current": p.current} for p in points]
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
