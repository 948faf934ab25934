"""`cdp resync -c source.toml VOL... | --all [--wait]`: compare everything with the replica now.

For when the operator doubts the replica. The running source (over its
control channel) waits until nothing is in flight, has the receiver rehash
the replica's image, compares every block of the volume with those hashes
and sends only the blocks that differ. Without --wait the command returns
once the request is queued; `cdp status` shows it (resync queued, fetching
map, resync NN%). With --wait it returns when every named volume's resync has
finished (differing blocks sent and acknowledged): exit 0, printing how many
blocks differed; 1 if it cannot finish (source not running, volume paused or
failed, --timeout); 2 usage or an unknown volume.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cdp.cli.pause import add_volume_args, answer_or_exit, volumes_named
from cdp.config import load_source
from cdp.durable import read_json
from cdp.errors import CdpError, UsageError
from cdp.units import parse_duration


def register(sub: Any) -> None:
    s = sub.add_parser(
        "resync", help="compare a volume with its replica block by block now, send what differs",
        description=(__doc__ or "").split("\n\n", 1)[1].replace("\n", " "))
    add_volume_args(s)
    s.add_argument("--wait", action="store_true", help="return when finished, not when queued")
    s.add_argument("--timeout", default=None,
                   help="with --wait: give up waiting after this long (e.g. 2h; default: no "
                   "limit; the resync itself goes on)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from cdp.cli.progress import byte_bars
    from cdp.source.controlclient import ask

    cfg = load_source(args.config)
    names = volumes_named(cfg, args.volumes, args.all)
    try:
        timeout = parse_duration(args.timeout) if args.timeout is not None else None
    except ValueError as exc:
        raise UsageError(f"--timeout: {exc}") from None
    if timeout is not None and not args.wait:
        raise UsageError("--timeout goes with --wait")
    req = {"op": "resync", "volumes": names, "wait": args.wait}
    with concurrent.futures.ThreadPoolExecutor(1) as pool, byte_bars(
            args.wait and not args.json) as bars:
        fut = pool.submit(ask, cfg.state_dir, req, timeout if args.wait else 30)
        while True:  # on a terminal, the progress the source reports in its status file
            try:
                answer = answer_or_exit(fut.result(timeout=0.5))
                break
            except concurrent.futures.TimeoutError:
                if bars is not None:
                    _progress(cfg.state_dir / "status.json", names, bars)
            except TimeoutError as exc:
                answer = {"ok": False, "error": f"{exc}; the resync goes on in the source"}
                break
            except UsageError:
                raise
            except CdpError as exc:
                answer = {"ok": False, "error": str(exc)}
                break
    if args.json:
        print(json.dumps(answer, indent=1))
    elif not answer.get("ok"):
        print(f"cdp resync: {answer.get('error', 'failed')}")
    elif not args.wait:
        print(f"resync queued: {', '.join(names)} (see `cdp status -c {args.config}`)")
    else:
        for name, v in answer["volumes"].items():
            print(f"{name}: resync done: " + (
                f"{v['blocks']} block(s) differed and were sent (epoch {v['epoch']})"
                if v["blocks"] else "the replica held every block, nothing sent"))
    return 0 if answer.get("ok") else 1


def _progress(status: Path, names: list[str], update: Callable[[str, int, int], None]) -> None:
    """One bar per volume: the replica's rehash, then the comparison (the source's status)."""
    try:
        vols = read_json(status).get("volumes", [])
    except (OSError, ValueError, AttributeError):
        return
    for v in vols:
        if v.get("volume") in names and v.get("resync") == "running" and v.get("progress_total"):
            update(v["volume"], v["progress_done"], v["progress_total"])
