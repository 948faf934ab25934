"""`cdp checkpoint -c source.toml VOL --label TEXT`: a labelled recovery point (a baseline).

Asks the running source over its control channel (cdp/source/control.py) to
cut an epoch now and label its point on the receiver; waits until the
receiver recorded the label, then prints the epoch. Exit 1 if that does not
happen within --timeout (the source may still label it later), 2 on usage.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cdp.config import load_source
from cdp.errors import CdpError, UsageError
from cdp.messages import valid_label
from cdp.units import parse_duration


def register(sub: Any) -> None:
    s = sub.add_parser(
        "checkpoint", help="cut an epoch now and label its recovery point (a baseline)",
        description="The running source cuts an epoch at once (scan volumes: pre_scan hook, "
        "then a scan; nbd volumes: a cut of the write journal) and the receiver labels the "
        "resulting recovery point. Labelled points outlive retention until `cdp points "
        "--unlabel`; `--point LABEL` names them in `cdp failover`.")
    s.add_argument("-c", "--config", type=Path, required=True, help="source.toml")
    s.add_argument("volume")
    s.add_argument("--label", required=True, help="1-128 printable characters, not only digits")
    s.add_argument("--timeout", default="60s", help="how long to wait (default 60s)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from cdp.source.control import request_checkpoint

    cfg = load_source(args.config)
    if cfg.volume(args.volume) is None:
        raise UsageError(f"no volume {args.volume!r} in {cfg.path}")
    if not valid_label(args.label):
        raise UsageError("--label: 1-128 printable characters, not only digits, without leading "
                         "or trailing blanks")
    try:
        timeout = parse_duration(args.timeout)
    except ValueError as exc:
        raise UsageError(f"--timeout: {exc}") from None
    try:
        answer = request_checkpoint(cfg.state_dir, args.volume, args.label, timeout)
    except TimeoutError as exc:
        answer = {"ok": False, "error": f"{exc}; the label may still be applied later"}
    except CdpError as exc:
        answer = {"ok": False, "error": str(exc)}
    if args.json:
        print(json.dumps(answer, indent=1))
    elif answer.get("ok"):
        print(f"volume {args.volume}: epoch {answer['epoch']} labelled {args.label!r}")
    else:
        print(f"cdp checkpoint: {answer.get('error', 'failed')}")
    return 0 if answer.get("ok") else 1
