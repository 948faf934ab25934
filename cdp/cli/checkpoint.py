"""`cdp checkpoint -c source.toml VOL|--group NAME --label TEXT`: a labelled recovery point.

Asks the running source over its control channel (cdp/source/control.py) to
cut an epoch now and label its point on the receiver; waits until the
receiver recorded the label, then prints the epoch. Exit 1 if that does not
happen within --timeout (the source may still label it later), 2 on usage or
when the label already names another point: a label names one point, and
only --move takes it off the old one (which then loses its protection from
retention); the receiver decides, so two racing checkpoints cannot both win.
With --group, every disk of the consistency group is cut at one instant and
each disk's point is labelled: `cdp failover test|promote --group NAME --point
TEXT` then takes them together.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cdp.cli.points import fmt_time
from cdp.config import load_source
from cdp.errors import CdpError, LabelTakenError, UsageError
from cdp.units import parse_duration
from cdp.wire.messages import valid_label


def register(sub: Any) -> None:
    s = sub.add_parser(
        "checkpoint", help="cut an epoch now and label its recovery point (a baseline)",
        description="The running source cuts an epoch at once (scan volumes: pre_scan hook, "
        "then a scan; nbd volumes: a cut of the write journal) and the receiver labels the "
        "resulting recovery point. Labelled points outlive retention until `cdp points "
        "--unlabel`; `--point LABEL` names them in `cdp failover`. A label names one point: "
        "one that names another point already is refused unless --move. Exit 0 labelled, 1 "
        "not done within --timeout (or the source failed), 2 usage or label taken.")
    s.add_argument("-c", "--config", type=Path, required=True, help="source.toml")
    s.add_argument("volume", nargs="?", help="the volume (or --group)")
    s.add_argument("--group", help="every volume of this consistency group, cut together")
    s.add_argument("--label", required=True, help="1-128 printable characters, not only digits")
    s.add_argument("--move", action="store_true",
                   help="if the label names another point, move it to the new one (the old "
                   "point is then kept only by retention); without it, exit 2")
    s.add_argument("--timeout", default="60s", help="how long to wait (default 60s)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from cdp.source.controlclient import request_checkpoint

    cfg = load_source(args.config)
    if (args.volume is None) == (args.group is None):
        raise UsageError("name a volume or --group NAME (not both)")
    if args.group is not None and not any(v.group == args.group for v in cfg.volumes):
        raise UsageError(f"no volume in {cfg.path} has group = {args.group!r}")
    if args.volume is not None and cfg.volume(args.volume) is None:
        raise UsageError(f"no volume {args.volume!r} in {cfg.path}")
    if not valid_label(args.label):
        raise UsageError("--label: 1-128 printable characters, not only digits, without leading "
                         "or trailing blanks")
    try:
        timeout = parse_duration(args.timeout)
    except ValueError as exc:
        raise UsageError(f"--timeout: {exc}") from None
    try:
        answer = request_checkpoint(cfg.state_dir, args.volume, args.label, timeout, args.group,
                                    args.move)
    except TimeoutError as exc:
        answer = {"ok": False, "error": f"{exc}; the label may still be applied later"}
    except CdpError as exc:
        answer = {"ok": False, "error": str(exc)}
    if args.json:
        print(json.dumps(answer, indent=1))
    elif answer.get("ok") and args.group is not None:
        print(f"group {args.group}: cut at {answer['time']:.3f} labelled {args.label!r}: "
              + ", ".join(f"{v} epoch {e}" for v, e in sorted(answer["epochs"].items())))
        for v, m in sorted((answer.get("moved_from") or {}).items()):
            print(_moved(args.label, v, m, answer["epochs"][v]))
    elif answer.get("ok"):
        print(f"volume {args.volume}: epoch {answer['epoch']} labelled {args.label!r}")
        if answer.get("moved_from"):
            print(_moved(args.label, args.volume, answer["moved_from"], answer["epoch"]))
    else:
        print(f"cdp checkpoint: {answer.get('error', 'failed')}")
    if answer.get("ok"):
        return 0
    return 2 if answer.get("code") == LabelTakenError.wire_code else 1


def _moved(label: str, volume: str, moved: dict[str, Any], epoch: int) -> str:
    return (f"{volume}: label {label!r} moved from point {moved['epoch']} "
            f"({fmt_time(moved['time'])}) to point {epoch}")
