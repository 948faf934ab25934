"""`cdp pause|resume -c source.toml VOL... | --all`: hold a volume's replication, then go on.

Asks the running source over its control channel (cdp/source/control.py).
Paused, a volume ships nothing (the lag grows) while its changes are still
tracked; an nbd export keeps serving the guest. The pause is recorded in the
source's state_dir and survives a restart until `cdp resume`. Exit 0 done (also
when already in that state), 1 the source is not running or refused, 2 usage
(an unknown volume: the known ones are named).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from cdp.config import SourceConfig, load_source
from cdp.errors import CdpError, UsageError

HELP = {
    "pause": ("stop shipping a volume's changes (kept across restarts; tracking goes on)",
              "Stop shipping changes of the named volumes to the receiver until `cdp resume`. "
              "Changes are still tracked, so nothing is forgotten: a scan volume is compared "
              "again on resume; an nbd volume's export keeps serving the guest (writes go on "
              "and its dirty regions are kept on disk) and they are resynced on resume. A scan "
              "stops at once (what it found so far is committed); an nbd epoch or resync under "
              "way finishes first. The lag (RPO) keeps growing while paused. The pause is kept "
              "in the source's state_dir: a restart stays paused. `cdp status` shows it."),
    "resume": ("ship a paused volume's changes again",
               "Resume the named paused volumes: what changed while paused goes out first."),
}


def register(sub: Any) -> None:
    for verb, (short, text) in HELP.items():
        s = sub.add_parser(verb, help=short, description=text + " Exit 0 done (also when it "
                           "already was), 1 the source is not running or refused, 2 usage or an "
                           "unknown volume.")
        add_volume_args(s)
        s.add_argument("--json", action="store_true")
        s.set_defaults(run=run)


def add_volume_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("-c", "--config", type=Path, required=True, help="source.toml")
    s.add_argument("volumes", nargs="*", metavar="VOL", help="volumes of this source")
    s.add_argument("--all", action="store_true", help="every volume of this source")


def volumes_named(cfg: SourceConfig, names: list[str], every: bool) -> list[str]:
    """The volumes asked for; UsageError (exit 2) naming the known ones otherwise."""
    known = [v.name for v in cfg.volumes]
    if every == bool(names):
        raise UsageError("name one or more volumes, or --all (not both)")
    if every:
        return known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"no volume {', '.join(map(repr, unknown))} in {cfg.path}; its volumes: "
                         f"{', '.join(known) or '(none)'}")
    return list(dict.fromkeys(names))


def answer_or_exit(answer: dict[str, Any]) -> dict[str, Any]:
    """An unknown volume said by the source (its config changed since it started): exit 2."""
    if answer.get("unknown"):
        raise UsageError(str(answer.get("error")))
    return answer


def run(args: argparse.Namespace) -> int:
    from cdp.source.controlclient import ask

    cfg = load_source(args.config)
    names = volumes_named(cfg, args.volumes, args.all)
    try:
        answer = answer_or_exit(ask(cfg.state_dir, {"op": args.verb, "volumes": names}, 30))
    except TimeoutError as exc:
        answer = {"ok": False, "error": str(exc)}
    except UsageError:
        raise
    except CdpError as exc:
        answer = {"ok": False, "error": str(exc)}
    if args.json:
        print(json.dumps(answer, indent=1))
    elif not answer.get("ok"):
        print(f"cdp {args.verb}: {answer.get('error', 'failed')}")
    else:
        for name, v in answer["volumes"].items():
            since = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["paused_since"]))
                     if v.get("paused_since") else "")
            if args.verb == "pause":
                print(f"{name}: {'paused' if v['changed'] else 'already paused'} since {since}")
            else:
                print(f"{name}: {'resumed' if v['changed'] else 'was not paused'}")
    return 0 if answer.get("ok") else 1
