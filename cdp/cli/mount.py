"""`cdp mount -c receiver.toml VOL MOUNTPOINT`: a recovery point or an archived snapshot, read-only.

Runs in the foreground until Ctrl-C or SIGTERM, then unmounts. Exit 0 after a
clean unmount, 2 when it cannot mount (usage, no such point or snapshot, no
FUSE, a mount point that is not an empty folder), 1 on other failures.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from cdp.config import load_receiver
from cdp.errors import UsageError
from cdp.textsafe import printable

log = logging.getLogger("cdp.mount")


def register(sub: Any) -> None:
    s = sub.add_parser(
        "mount", help="a recovery point or an archived snapshot as a read-only FUSE file system",
        description="Mounts VOL as it was at a recovery point of the replica (default: the latest) "
        "or, with --snapshot, as an archived snapshot holds it: MOUNTPOINT/VOL.img is the image, "
        "MOUNTPOINT/files/ its files (ext2/3/4, FAT or NTFS, bare or in an MBR/GPT partition; "
        "absent, with a log line saying why, when no file system is found). Read-only, nosuid, "
        "nodev; symlinks stay symlinks and modes show as stored. A replica point is pinned while "
        "mounted (retention keeps it; the receiver keeps applying epochs and the mount keeps "
        "showing the same point). A snapshot is read under the repository's shared lock, so "
        "`cdp archive prune` is refused (locked) until the mount ends. Runs in the foreground "
        "until Ctrl-C or SIGTERM, then unmounts. Exit 0 after a clean unmount, 2 if it cannot "
        "mount.")
    s.add_argument("-c", "--config", type=Path, required=True, help="receiver.toml")
    s.add_argument("first", metavar="[POINT|SNAPSHOT]",
                   help="optional: an epoch or label of VOL's replica, else an archived snapshot's "
                   "id (prefix or 'latest'); the same as --point or --snapshot")
    s.add_argument("second", metavar="VOL", help="the volume")
    s.add_argument("third", nargs="?", metavar="MOUNTPOINT", help="an empty folder")
    which = s.add_mutually_exclusive_group()
    which.add_argument("--point", metavar="EPOCH|LABEL",
                       help="epoch or label of the replica's point (default: the latest)")
    which.add_argument("--label", metavar="LABEL",
                       help="the replica's point with this label (cdp checkpoint)")
    which.add_argument("--at", metavar="TIME", help="the newest point captured at or before TIME (Unix "
                       "time, ISO date-time, or an age such as 2h)")
    which.add_argument("--snapshot", metavar="ID", help="an archived snapshot instead (an id prefix or "
                       "'latest', as `cdp archive list` shows)")
    s.add_argument("--archive", metavar="NAME", help="which [[archive]] --snapshot is in (needed when "
                   "there are several; alone it means --snapshot latest)")
    s.add_argument("--partition", type=int, metavar="N", help="files/ from this partition (default: "
                   "the first with ext, else the first with FAT or NTFS, an EFI system partition last)")
    s.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from cdp.mount.serve import check_mountpoint, serve
    from cdp.mount.sources import open_point, open_snapshot
    from cdp.mount.tree import Tree

    cfg = load_receiver(args.config)
    _positionals(args, cfg)
    check_mountpoint(args.mountpoint)  # before a snapshot is fetched or a point pinned
    where = printable(str(args.mountpoint))
    if args.archive is not None and args.snapshot is None:
        if args.point or args.label or args.at:
            raise UsageError("--archive mounts a snapshot: give --snapshot ID, not a replica point")
        args.snapshot = "latest"
    if args.snapshot is not None:
        opened = open_snapshot(cfg, args.archive, args.snapshot, args.volume, partition=args.partition)
    else:
        from cdp.cli.points import volume_dir
        from cdp.drills.drill import parse_at

        volume_dir(cfg.data_dir, args.volume)  # exit 2 naming the folder when there is no replica
        at = parse_at(args.at) if args.at else None
        opened = open_point(cfg, args.volume, point=args.point, at=at, label=args.label,
                            partition=args.partition)
    try:
        tree = Tree(opened)
        if opened.no_fs:
            log.warning("%s: no files/ folder: %s", opened.what, opened.no_fs)
        captured = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(opened.time)) if opened.time else "-"

        def ready() -> None:
            part = f" (partition {opened.partition})" if opened.partition is not None else ""
            files = f" and {where}/files/{part}" if not opened.no_fs else ""
            print(f"mounted {opened.what}, captured {captured}: {where}/{tree.image_name}{files}; "
                  "Ctrl-C to unmount", file=sys.stderr, flush=True)
            log.info("mounted %s on %s", opened.what, where)

        serve(tree, args.mountpoint, ready)
    finally:
        opened.close()
    print(f"unmounted {where}", file=sys.stderr)
    return 0


def _positionals(args: argparse.Namespace, cfg: Any) -> None:
    """`VOL MOUNTPOINT`, or `POINT|SNAPSHOT VOL MOUNTPOINT` (the form DESIGN.md documents).

    POINT|SNAPSHOT is a point when it is an epoch number or a label of VOL's replica, and
    otherwise an archived snapshot (an id prefix or 'latest'); --point/--snapshot say it
    explicitly.
    """
    if args.third is None:
        args.volume, args.mountpoint = args.first, Path(args.second)
        return
    which, args.volume, args.mountpoint = args.first, args.second, Path(args.third)
    if args.point or args.label or args.at or args.snapshot:
        raise UsageError(f"{which!r} names the point or snapshot already: drop --point, --label, "
                         "--at and --snapshot, or the positional")
    from cdp.replica.points import read_labels

    vol_dir = cfg.data_dir / args.volume
    is_label = args.volume not in ("", ".", "..") and "/" not in args.volume and (
        which in read_labels(vol_dir).values() if vol_dir.is_dir() else False)
    if which.isdigit() or is_label or not cfg.archives:
        args.point = which
    else:
        args.snapshot = which
