"""`cdp failover test|promote`: prove the replica boots; make it live."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from cdp.cli.points import fmt_age, fmt_time, promoted, promoted_line, volume_dir
from cdp.config import ReceiverConfig, load_receiver
from cdp.errors import UsageError


def register(sub: Any) -> None:
    f = sub.add_parser("failover", help="failover drills: test a point, promote the replica")
    fsub = f.add_subparsers(dest="action", metavar="ACTION", required=True)

    t = fsub.add_parser(
        "test", help="clone a recovery point (replication keeps running), check it, report "
        "RPO and RTO",
        description="Makes a writable clone of a recovery point (a qcow2 overlay over a sparse "
        "copy, or a sparse raw copy), checks that it opens as an image and that its ext2/3/4 "
        "file systems (whole disk or MBR/GPT partitions) pass e2fsck -fn, runs your --check "
        "commands with the clone's path (last argument, or {}; also $CDP_CLONE), and removes "
        "the clone unless --keep. Exit 1 if a check fails. With --group, every disk of a "
        "consistency group is cloned at one cut that all of them hold, and RPO/RTO are "
        "reported for the group as well as per disk.")
    t.add_argument("-c", "--config", type=Path, required=True, help="receiver.toml")
    t.add_argument("volume", nargs="?", help="the volume (or --group)")
    t.add_argument("--group", help="every disk of this consistency group, at one cut")
    which = t.add_mutually_exclusive_group()
    which.add_argument("--point", help="epoch or label of the point (default: the latest)")
    which.add_argument("--at", help="the newest point captured at or before TIME (Unix time, "
                       "ISO date-time, or an age such as 2h)")
    t.add_argument("--check", action="append", default=[], metavar="CMD",
                   help="a command to run on the clone (repeatable)")
    t.add_argument("--check-timeout", type=float, default=600.0, help="seconds per check")
    t.add_argument("--format", choices=["auto", "qcow2", "raw"], default=None,
                   help="clone format (default: [receiver] drill_format, else auto)")
    t.add_argument("--dir", type=Path, help="where to make the clone (default: [receiver] "
                   "drill_dir, else <data_dir>/.drills)")
    t.add_argument("--keep", action="store_true", help="keep the clone (its path is reported)")
    t.add_argument("--json", action="store_true")
    t.set_defaults(run=run_test)

    p = fsub.add_parser(
        "promote", help="stop replicating a volume and roll its image back to a point: the "
        "DR machine boots <data_dir>/VOL/image",
        description="Refuses while the source is connected (unless --force). The receiver "
        "stops accepting epochs for the volume for good (a source that opens it gets a "
        "'promoted' error); the image is rolled back to the point with the journal and "
        "left as a writable raw disk image; promoted.json in the volume folder records it. "
        "With --group, every disk of a consistency group is promoted at one cut (the newest "
        "all of them hold, or the one a label names); <data_dir>/.group-NAME.promote.json "
        "records it.")
    p.add_argument("-c", "--config", type=Path, required=True, help="receiver.toml")
    p.add_argument("volume", nargs="?", help="the volume (or --group)")
    p.add_argument("--group", help="every disk of this consistency group, at one cut")
    p.add_argument("--point", help="epoch or label to go back to (default: the latest; with "
                   "--group a label given by cdp checkpoint --group)")
    p.add_argument("--force", action="store_true", help="even if the source is connected")
    p.add_argument("--wait", type=float, default=60.0,
                   help="seconds to wait for the receiver to let go of the replica")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run_promote)


def run_test(args: argparse.Namespace) -> int:
    from cdp.drills.drill import parse_at, run_drill

    cfg = load_receiver(args.config)
    if _group(args):
        return _run_group_test(args, cfg)
    if (rec := promoted(volume_dir(cfg.data_dir, args.volume))) is not None:
        raise UsageError(f"{promoted_line(args.volume, rec)}; there is no point to drill (check "
                         "the live disk directly)")
    if args.check_timeout <= 0:
        raise UsageError("--check-timeout must be more than 0")
    at = parse_at(args.at) if args.at else None
    point = _point(cfg.data_dir, args.volume, args.point)
    rep = run_drill(cfg.data_dir, args.volume, args.dir or cfg.drill_dir or
                    cfg.data_dir / ".drills", args.format or cfg.drill_format,
                    point=point, at=at, commands=args.check, keep=args.keep,
                    timeout=args.check_timeout)
    if args.json:
        print(json.dumps(rep.to_json(), indent=1))
    else:
        print(f"volume {rep.volume}: point epoch {rep.epoch}, captured "
              f"{fmt_time(rep.point_time)}")
        print(f"  RPO (age of the point): {fmt_age(rep.rpo)}")
        print(f"  RTO (clone ready):      {rep.rto:.2f}s")
        print(f"  clone ({rep.clone.format}): {rep.clone.path}"
              f"{'' if rep.kept else ' (removed)'}")
        for c in rep.checks:
            print(f"  [{c.result.upper():4}] {c.name} ({c.seconds:.1f}s)")
            if c.result != "pass" and c.output:
                print("         " + c.output.replace("\n", "\n         "))
        print("drill passed" if rep.ok else "drill FAILED: a check failed")
    return 0 if rep.ok else 1


def run_promote(args: argparse.Namespace) -> int:
    from cdp.drills.promote import promote

    cfg = load_receiver(args.config)
    if _group(args):
        return _run_group_promote(args, cfg)
    volume_dir(cfg.data_dir, args.volume)
    point = _point(cfg.data_dir, args.volume, args.point)
    rec = promote(cfg.data_dir, args.volume, point, force=args.force, wait=args.wait)
    if args.json:
        print(json.dumps(rec, indent=1))
    else:
        print(f"volume {args.volume} promoted at epoch {rec['epoch']} (captured "
              f"{fmt_time(rec['point_time'])}, {fmt_age(time.time() - rec['point_time'])} ago; "
              f"{rec['rolled_back_epochs']} newer epoch(s) rolled back)")
        print(f"the live disk: {rec['image']} (raw, {rec['size']} bytes)")
        print("the receiver accepts no more epochs for this volume")
    return 0


def _point(data_dir: Path, volume: str, text: str | None) -> int | None:
    """--point: an epoch number or a point's label (cdp checkpoint)."""
    from cdp.replica.points import resolve_point

    return None if text is None else resolve_point(data_dir / volume, text)


# -- a whole VM: --group --------------------------------------------------------------------


def _group(args: argparse.Namespace) -> bool:
    if (args.volume is None) == (args.group is None):
        raise UsageError("name a volume or --group NAME (not both)")
    return args.group is not None


def _run_group_test(args: argparse.Namespace, cfg: ReceiverConfig) -> int:
    from cdp.drills.drill import parse_at
    from cdp.drills.group import run_group_drill

    if args.check_timeout <= 0:
        raise UsageError("--check-timeout must be more than 0")
    rep = run_group_drill(cfg.data_dir, args.group, args.dir or cfg.drill_dir or
                          cfg.data_dir / ".drills", args.format or cfg.drill_format,
                          label=args.point, at=parse_at(args.at) if args.at else None,
                          commands=args.check, keep=args.keep, timeout=args.check_timeout)
    if args.json:
        print(json.dumps(rep.to_json(), indent=1))
        return 0 if rep.ok else 1
    print(f"group {rep.group}: cut at {fmt_time(rep.time)}, every disk as it was then")
    print(f"  RPO (age of the cut):    {fmt_age(rep.rpo)}")
    print(f"  RTO (all clones ready):  {rep.rto:.2f}s")
    for d in rep.disks:
        print(f"  {d.volume}: point epoch {d.epoch} (captured {fmt_time(d.point_time)}), clone "
              f"ready in {d.rto:.2f}s ({d.clone.format}): {d.clone.path}"
              f"{'' if d.kept else ' (removed)'}")
        for c in d.checks:
            print(f"    [{c.result.upper():4}] {c.name} ({c.seconds:.1f}s)")
            if c.result != "pass" and c.output:
                print("           " + c.output.replace("\n", "\n           "))
    print("drill passed" if rep.ok else "drill FAILED: a check failed")
    return 0 if rep.ok else 1


def _run_group_promote(args: argparse.Namespace, cfg: ReceiverConfig) -> int:
    from cdp.drills.group import promote_group

    rec = promote_group(cfg.data_dir, args.group, label=args.point, force=args.force,
                        wait=args.wait)
    if args.json:
        print(json.dumps(rec, indent=1))
        return 0
    print(f"group {args.group} promoted at its cut of {fmt_time(rec['time'])} "
          f"({fmt_age(time.time() - rec['time'])} ago)")
    for m, v in rec["volumes"].items():
        print(f"  {m}: epoch {v['epoch']} ({v['rolled_back_epochs']} newer epoch(s) rolled "
              f"back), live disk {v['image']}")
    print("the receiver accepts no more epochs for these volumes")
    return 0
