"""`cdp files list|restore -c receiver.toml ...`: the versions of replicated file sets."""

from __future__ import annotations

import argparse
import json
from pathlib import Path, PurePosixPath
from typing import Any

from cdp.cli.points import fmt_time
from cdp.config import load_receiver
from cdp.errors import UsageError
from cdp.replica.files import FileSets, FilesetStore, Version, iter_latest
from cdp.safewrite import Target, safe_mode
from cdp.textsafe import printable
from cdp.units import format_bytes


def register(sub: Any) -> None:
    f = sub.add_parser("files", help="list and restore versions of replicated file sets")
    fsub = f.add_subparsers(dest="action", metavar="ACTION", required=True)

    s = fsub.add_parser(
        "list", help="file sets, their files, or every version of one file",
        description="Without FILESET: the file sets the receiver holds. With FILESET: its "
        "files (newest version of each; PATH narrows to a file or folder). With the PATH of "
        "a file: every version, oldest first. PATH is the file's path at the source, with or "
        "without the leading '/'.")
    s.add_argument("-c", "--config", type=Path, required=True, help="receiver.toml")
    s.add_argument("fileset", nargs="?")
    s.add_argument("path", nargs="?")
    s.add_argument("--all", action="store_true", help="also files deleted at the source")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=run_list)

    r = fsub.add_parser(
        "restore", help="write one version of a file, byte for byte, to DEST",
        description="Writes the chosen version (default: the newest that is not a deletion) "
        "to DEST with its mode (less setuid, setgid and sticky unless --preserve-special) and "
        "mtime, after checking its hash. Exit 2 for an unknown set, path or version; exit 1 when "
        "the file's own name cannot be written safely into DEST (write it to a file path instead).")
    r.add_argument("-c", "--config", type=Path, required=True, help="receiver.toml")
    r.add_argument("fileset")
    r.add_argument("path")
    which = r.add_mutually_exclusive_group()
    which.add_argument("--version", type=int, help="version number (see `cdp files list`)")
    which.add_argument("--at", help="the newest version read at or before TIME (Unix time, "
                       "ISO date-time, or an age such as 2h)")
    r.add_argument("--to", type=Path, required=True, help="where to write it (a file path, "
                   "or an existing folder to write it into under its own name)")
    r.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    r.add_argument("--preserve-special", action="store_true", help="keep setuid, setgid and sticky "
                   "bits (dropped by default: the file comes from a source you may not trust)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(run=run_restore)


def _sets(args: argparse.Namespace) -> FileSets:
    return FileSets(load_receiver(args.config).data_dir)


def _versions(store: FilesetStore, path: str) -> list[Version]:
    vs = store.versions(path.lstrip("/"))
    if not vs:
        raise UsageError(f"file set {printable(repr(store.name))} holds no file {printable(repr(path))}; "
                         f"`cdp files list -c CONFIG {printable(store.name)}` lists its files")
    return vs


def _row(v: Version) -> dict[str, Any]:
    return {"path": v.path, "version": v.version, "time": v.time, "stored": v.stored,
            "hash": v.hash, "size": v.size, "mtime": v.mtime, "mode": f"{v.mode:04o}",
            "deleted": v.deleted}


def run_list(args: argparse.Namespace) -> int:
    sets = _sets(args)
    if args.fileset is None:
        rows: list[dict[str, Any]] = []
        for name in sets.names():
            newest = list(sets.open(name).latest().values())
            rows.append({"fileset": name, "files": sum(not v.deleted for v in newest),
                         "deleted": sum(v.deleted for v in newest),
                         "versions": sum(v.version for v in newest)})
        if args.json:
            print(json.dumps(rows, indent=1))
        elif not rows:
            print("no file sets replicated yet")
        for r in [] if args.json else rows:
            print(f"{printable(r['fileset'])}: {r['files']} file(s), {r['deleted']} deleted, "
                  f"{r['versions']} version(s)")
        return 0
    store = sets.existing(args.fileset)
    if args.path is not None and store.versions(args.path.lstrip("/")):
        vs = _versions(store, args.path)
        if args.json:
            print(json.dumps([_row(v) for v in vs], indent=1))
            return 0
        for v in vs:
            what = "deleted" if v.deleted else (f"{format_bytes(v.size):>10}  mode {v.mode:04o}  "
                                                f"{v.hash[:16]}")
            print(f"v{v.version:<4} {fmt_time(v.time)}  {what}")
        return 0
    latest = [v for v in iter_latest(store, args.path or "") if args.all or not v.deleted]
    if args.path is not None and not latest:
        _versions(store, args.path)  # exit 2, naming the path
    if args.json:
        print(json.dumps([_row(v) for v in latest], indent=1))
        return 0
    for v in latest:
        state = "deleted" if v.deleted else format_bytes(v.size)
        print(f"/{printable(v.path)}  v{v.version}  {fmt_time(v.time)}  {state}")
    return 0


def _choose(vs: list[Version], args: argparse.Namespace) -> Version:
    if args.version is not None:
        v = next((v for v in vs if v.version == args.version), None)
        if v is None:
            raise UsageError(f"{printable(vs[0].path)} has no version {args.version} (versions 1 to "
                             f"{len(vs)}; `cdp files list` shows them)")
        return v
    if args.at is not None:
        from cdp.drills.drill import parse_at

        at = parse_at(args.at)
        older = [v for v in vs if v.time <= at]
        if not older:
            raise UsageError(f"{printable(vs[0].path)} has no version read at or before {fmt_time(at)}; "
                             f"the first is from {fmt_time(vs[0].time)}")
        return older[-1]
    live = [v for v in vs if not v.deleted]
    if not live:
        raise UsageError(f"every version of {printable(vs[0].path)} is a deletion")
    return live[-1]


def run_restore(args: argparse.Namespace) -> int:
    store = _sets(args).existing(args.fileset)
    vs = _versions(store, args.path)
    v = _choose(vs, args)
    data = store.content(v)  # UsageError for a deletion, FileVersionError if damaged
    # the stored path came from a source: inside a folder it is only ever its last name, checked
    to: Path = args.to
    folder, name = (to, PurePosixPath(v.path).name) if to.is_dir() else (to.parent, to.name)
    with Target.open(folder) as target:
        dest = target.child(name)
        if target.exists(name) and not args.force:  # UnsafeEntryError (exit 1) for "..", "", ...
            raise UsageError(f"{printable(dest)} exists; pass --force to overwrite it")
        target.write_file(name, [data], mode=safe_mode(v.mode, args.preserve_special), mtime=v.mtime,
                          sync=True)
    out = {**_row(v), "fileset": store.name, "to": dest}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"restored /{printable(v.path)} version {v.version} ({format_bytes(v.size)}, read "
              f"{fmt_time(v.time)}) to {printable(dest)}")
    return 0
