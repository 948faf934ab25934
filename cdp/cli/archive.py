"""`cdp archive init|run|list|verify|prune|restore|ls|get|diff|files`: offsite snapshots of the replicas."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cdp.archive.backend import drop_traceback
from cdp.archive.backend import run_sync as _arun
from cdp.cli.progress import byte_bars
from cdp.config import ArchiveConfig, ReceiverConfig, load_receiver
from cdp.errors import ArchiveCorruptError, ConfigError
from cdp.safewrite import Target, safe_mode
from cdp.textsafe import printable
from cdp.units import format_bytes, parse_duration

PARTITION_HELP = ("partition number (default: the first with ext, else the first with FAT or NTFS, an "
                  "EFI system partition last)")
PRESERVE_HELP = ("keep setuid, setgid and sticky bits (dropped by default: the files come from a "
                 "system you may not trust)")


def register(sub: Any) -> None:
    p = sub.add_parser("archive", help="offsite snapshots of the replicas: init, run, list, verify, "
                       "prune, restore, ls, get, diff, files")
    verbs = p.add_subparsers(dest="archive_verb", metavar="SUBVERB", required=True)

    def verb(name: str, help_: str, fn: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        s = verbs.add_parser(name, help=help_)
        s.add_argument("-c", "--config", type=Path, required=True, help="receiver.toml")
        s.add_argument("--archive", help="which [[archive]] (needed when there are several)")
        s.add_argument("--json", action="store_true")
        s.set_defaults(run=fn)
        return s

    _add_repository_verbs(verb)
    _add_reading_verbs(verb)


Verb = Callable[[str, str, Callable[[argparse.Namespace], int]], argparse.ArgumentParser]


def _add_repository_verbs(verb: Verb) -> None:
    """init, run, list, verify, prune: the repository itself."""
    verb("init", "create the repository (and its key, wrapped with the password)", _init)
    s = verb("run", "archive the volumes now: one snapshot", _run)
    s.add_argument("--volume", action="append", help="only this volume (repeatable)")
    s.add_argument("--full-read", action="store_true",
                   help="read every chunk, even those the replica's hash map shows unchanged")
    verb("list", "snapshots, newest last", _list)
    s = verb("verify", "check the repository; exit 1 names damaged chunks and their snapshots", _verify)
    s.add_argument("--read-data", action="store_true", help="download, decrypt and rehash every chunk")
    s = verb("prune", "forget snapshots the keep policy drops, delete unreferenced packs", _prune)
    s.add_argument("--grace", default="1h", help="never delete packs younger than this (default 1h)")
    s.add_argument("--dry-run", action="store_true", help="report only")
    s.add_argument("--repack-below", type=float, default=0.5, metavar="FRACTION",
                   help="repack packs whose live chunks fill less than this (default 0.5; 0: never)")


def _add_reading_verbs(verb: Verb) -> None:
    """restore, ls, diff, get, files: what is in a snapshot, and getting it out."""
    s = verb("restore", "write a volume's whole image out of a snapshot (sparse)", _restore)
    s.add_argument("snapshot", help="snapshot id (a unique prefix) or 'latest'")
    s.add_argument("volume")
    s.add_argument("--to", type=Path, required=True, help="image file (or block device) to write")
    s.add_argument("--force", action="store_true", help="overwrite an existing file")
    s = verb("ls", "list files in an archived image (ext2/3/4, FAT12/16/32 or NTFS; bare or in an "
             "MBR/GPT partition)", _ls)
    s.add_argument("snapshot")
    s.add_argument("volume")
    s.add_argument("path", nargs="?", default="/")
    s.add_argument("--partition", type=int, help=PARTITION_HELP)
    s.add_argument("--human", action="store_true", help="sizes as 1.5 MiB (default: exact bytes)")
    s = verb("diff", "which files changed between two snapshots of a volume: + added, - removed, "
             "M modified (with what: type, size, content, mode, owner, mtime, target)", _diff)
    s.add_argument("snapshot_a", metavar="SNAP_A", help="the older snapshot (id prefix or 'latest')")
    s.add_argument("snapshot_b", metavar="SNAP_B", help="the newer snapshot")
    s.add_argument("volume")
    s.add_argument("path", nargs="?", default="/", help="only below this path (default: /)")
    s.add_argument("--partition", type=int, help=PARTITION_HELP)
    s = verb("get", "copy a file or directory out of an archived image (entries with unsafe names, or "
             "that would pass through a symlink, are skipped and named: exit 1)", _get)
    s.add_argument("snapshot")
    s.add_argument("volume")
    s.add_argument("path")
    s.add_argument("--to", type=Path, required=True, help="destination file or existing directory")
    s.add_argument("--partition", type=int, help="partition number (default: as for ls)")
    s.add_argument("--force", action="store_true", help="replace files and symlinks that exist at the "
                   "destination (default: refuse, exit 2, before writing anything)")
    s.add_argument("--preserve-special", action="store_true", help=PRESERVE_HELP)
    s = verb("files", "protected file-set files in a snapshot: list them, or restore one with --to",
             _files)
    s.add_argument("snapshot")
    s.add_argument("fileset", nargs="?", help="only this file set")
    s.add_argument("path", nargs="?", help="a file's path in the set (with --to: the one to restore)")
    s.add_argument("--to", type=Path, help="restore PATH of FILESET to this file (or into this "
                   "existing folder under its own name)")
    s.add_argument("--force", action="store_true", help="overwrite an existing file")
    s.add_argument("--preserve-special", action="store_true", help=PRESERVE_HELP)


def _load(args: argparse.Namespace) -> tuple[ReceiverConfig, ArchiveConfig]:
    from cdp.archive.job import pick_archive

    cfg = load_receiver(args.config)
    return cfg, pick_archive(cfg, args.archive)


def _out(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj, indent=1) if args.json else text)


def _when(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


@contextlib.contextmanager
def _progress(args: argparse.Namespace) -> Iterator[Any]:
    """Byte bars on a terminal (see cdp.cli.progress)."""
    with byte_bars(not args.json) as update:
        yield update


def _init(args: argparse.Namespace) -> int:
    from cdp.archive.job import init_repo

    _, a = _load(args)
    repo = _arun(init_repo(a))
    _out(args, {"archive": a.name, "repository": repo.url, "id": repo.id, "encrypted": repo.keys.encrypted},
         f"created {'encrypted' if repo.keys.encrypted else 'UNENCRYPTED'} repository {repo.url} "
         f"for archive {a.name}" + ("; keep a copy of the password: without it nothing can be "
                                    "restored" if repo.keys.encrypted else ""))
    return 0


def _run(args: argparse.Namespace) -> int:
    from cdp.archive.job import run_archive

    cfg, a = _load(args)
    with _progress(args) as progress:
        rep = run_archive(cfg, a.name, args.volume, progress, full_read=args.full_read)
    lines = [f"snapshot {rep.snapshot[:8]} in {rep.repository} ({rep.seconds:.1f}s)"]
    for v in rep.volumes:
        lines.append(f"  {v.volume}: {format_bytes(v.size)}, {v.chunks} chunks ({v.unread_chunks} unchanged "
                     f"by the hash map, not read), {v.new_chunks} new "
                     f"({format_bytes(v.new_bytes)} -> {format_bytes(v.stored_bytes)}), "
                     f"{v.zero_chunks} zero")
    lines.append(f"  uploaded {rep.packs_uploaded} packs, {format_bytes(rep.bytes_uploaded)}")
    _out(args, rep.to_json(), "\n".join(lines))
    return 0


def _list(args: argparse.Namespace) -> int:
    from cdp.archive.job import open_repo

    _, a = _load(args)

    async def main() -> list[dict[str, Any]]:
        repo = await open_repo(a)
        return [{"snapshot": s.id, "time": s.time, "hostname": s.hostname, "archive": s.archive,
                 "volumes": [{"volume": v.volume, "size": v.size, "epoch": v.epoch,
                              "point_time": v.point_time, "chunks": v.count} for v in s.volumes]}
                for s in await repo.snapshots()]

    snaps = _arun(main())
    rows = [f"{s['snapshot'][:8]:<8}  {_when(s['time']):<19}  {s['hostname']:<12}  " + ", ".join(
        f"{v['volume']} ({format_bytes(v['size'])}, epoch {v['epoch']})" for v in s["volumes"])
        for s in snaps]
    text = "\n".join([f"{'snapshot':<8}  {'time':<19}  {'receiver':<12}  volumes (size, epoch)", *rows]
                     ) if rows else "no snapshots"
    _out(args, snaps, text)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from cdp.archive.job import open_repo
    from cdp.archive.maint import verify

    _, a = _load(args)

    async def main(progress: Any) -> dict[str, Any]:
        return await verify(await open_repo(a), args.read_data, progress)

    with _progress(args) as progress:
        rep = _arun(main(progress))
    lines = [f"{rep['repository']}: {rep['snapshots']} snapshots, {rep['packs']} packs, "
             f"{rep['chunks']} chunks" + (f", {rep['chunks_read']} read and rehashed" if args.read_data
                                          else "")]
    for p in rep["problems"]:
        snaps = f" (needed by snapshot {', '.join(p['volumes'])})" if p.get("volumes") else ""
        lines.append(f"  {p['kind']}: {p['message']}{snaps}")
    lines.append("ok" if rep["ok"] else f"{len(rep['problems'])} problem(s)")
    _out(args, rep, "\n".join(lines))
    return 0 if rep["ok"] else 1


def _prune(args: argparse.Namespace) -> int:
    from cdp.archive.job import open_repo
    from cdp.archive.maint import prune

    _, a = _load(args)
    try:
        grace = parse_duration(args.grace)
    except ValueError as exc:
        raise ConfigError(f"--grace: {exc}") from None

    async def main() -> dict[str, Any]:
        return await prune(await open_repo(a), a.keep, grace=grace, dry_run=args.dry_run,
                           repack_below=args.repack_below, pack_size=a.pack_size)

    rep = _arun(main())
    verb = "would forget" if args.dry_run else "forgot"
    _out(args, rep, f"kept {len(rep['kept'])} snapshots, {verb} {len(rep['forgotten'])}; "
         f"{'would repack' if args.dry_run else 'repacked'} {len(rep['packs_repacked'])} and "
         f"{'would delete' if args.dry_run else 'deleted'} {len(rep['packs_deleted'])} packs "
         f"({format_bytes(rep['bytes_freed'])} freed)")
    return 0


def _restore(args: argparse.Namespace) -> int:
    from cdp.archive.job import open_repo
    from cdp.archive.restore import restore_image

    _, a = _load(args)

    async def main(progress: Any) -> dict[str, Any]:
        repo = await open_repo(a)
        snap = await repo.find_snapshot(args.snapshot)
        return await restore_image(repo, snap, args.volume, args.to, progress, force=args.force)

    with _progress(args) as progress:
        rep = _arun(main(progress))
    _out(args, rep, f"restored {rep['volume']} of snapshot {rep['snapshot'][:8]} to {rep['to']} "
         f"({format_bytes(rep['size'])}, {format_bytes(rep['zero_bytes'])} left as holes)")
    return 0


def _files(args: argparse.Namespace) -> int:
    import xxhash

    import cdp.archive.lock as locks
    from cdp.archive.job import open_repo

    _, a = _load(args)
    if args.to is not None and (args.fileset is None or args.path is None):
        raise ConfigError("--to restores one file: give FILESET and PATH too")
    if args.to is not None and not args.to.is_dir() and args.to.exists() and not args.force:
        raise ConfigError(f"--to: {printable(str(args.to))} exists; add --force to overwrite it")

    async def main() -> dict[str, Any]:
        repo = await open_repo(a)
        snap = await repo.find_snapshot(args.snapshot)
        entries = [f for f in snap.files if (args.fileset is None or f["set"] == args.fileset)
                   and (args.path is None or f["path"] == args.path.strip("/"))]
        out: dict[str, Any] = {"snapshot": snap.id, "files": [
            {k: v for k, v in f.items() if k != "chunks"} for f in entries]}
        if args.to is None:
            return out
        if not entries:
            raise ConfigError(f"snapshot {snap.short}: no file {printable(repr(args.path))} in file set "
                              f"{printable(repr(args.fileset))}; `cdp archive files` lists them")
        f = entries[0]
        folder, name = _restore_target(args.to, str(f["path"]), args.force)
        held = await locks.lock(repo, exclusive=False)  # prune must not delete under our feet
        try:
            await repo.load_index()
            parts = [await repo.read_chunk(cid, min(a.chunk_size, f["size"])) for cid in f["chunks"]]
        finally:
            await held.release()
        data = b"".join(parts)[:f["size"]]
        if xxhash.xxh3_128_hexdigest(data) != f["hash"]:
            raise ArchiveCorruptError(f"snapshot {snap.short}: {printable(f['set'])}/"
                                      f"{printable(f['path'])} does not match its hash; run "
                                      "`cdp archive verify --read-data`")
        with Target.open(folder) as target:
            target.write_file(name, [data], mode=safe_mode(int(f.get("mode", 0o644)), args.preserve_special),
                              mtime=f.get("mtime"), sync=True)
            out["restored"] = target.child(name)
        return out

    rep = _arun(main())
    if args.to is not None:
        f = rep["files"][0]
        _out(args, rep, f"restored {printable(f['set'])}/{printable(f['path'])} (version {f['version']}) "
             f"to {printable(rep['restored'])}")
    else:
        _out(args, rep, "\n".join(f"{printable(f['set']):<16} v{f['version']:<4} {f['size']:>10}  "
                                  f"{_when(f['time'])}  {printable(f['path'])}" for f in rep["files"])
             or "no file-set files in this snapshot")
    return 0


def _restore_target(to: Path, path: str, force: bool) -> tuple[Path, str]:
    """(folder, name) to write a file-set file to: `to`, or its own name inside the folder `to`."""
    folder, name = (to, PurePosixPath(path).name) if to.is_dir() else (to.parent, to.name)
    with Target.open(folder) as target:
        if target.exists(name) and not force:  # UnsafeEntryError for a name like ".."
            raise ConfigError(f"--to: {printable(target.child(name))} exists; add --force to overwrite it")
    return folder, name


@dataclass
class _Opened:
    """One snapshot's volume, opened: the image as a file and its file system."""

    snap: Any  # cdp.archive.repo.Manifest
    image: Any  # cdp.archive.restore.SnapshotImage
    fs: Any  # cdp.archive.files.FileSystem
    partition: int | None


def _with_images(args: argparse.Namespace, refs: list[str], fn: Callable[[list[_Opened]], Any]) -> Any:
    """Open the volume's image in each snapshot `refs` names, as a file and a file system; call fn."""
    from cdp.archive.files import open_fs
    from cdp.archive.job import open_repo
    from cdp.archive.restore import Portal, SnapshotImage, volume_of

    _, a = _load(args)
    try:
        with Portal() as portal:
            repo = portal.call(open_repo(a))
            snaps = [portal.call(repo.find_snapshot(ref)) for ref in refs]
            vols = [volume_of(snap, args.volume) for snap in snaps]
            portal.call(repo.load_index())
            opened = []
            for snap, v in zip(snaps, vols, strict=True):
                image = SnapshotImage(repo, v, portal)
                fs, part = open_fs(image, args.partition)  # type: ignore[arg-type]
                opened.append(_Opened(snap, image, fs, part))
            return fn(opened)
    except BaseException as exc:
        drop_traceback(exc)
        raise
    finally:
        gc.collect()  # see run_sync: S3 clients must go while Python is alive


def _with_fs(args: argparse.Namespace, fn: Callable[[Any, int | None], Any]) -> Any:
    """Open the snapshot's image as a file and its file system, call fn(fs, partition)."""
    return _with_images(args, [args.snapshot], lambda o: fn(o[0].fs, o[0].partition))


def _ls(args: argparse.Namespace) -> int:
    from cdp.archive.files import list_path

    entries, part = _with_fs(args, lambda fs, part: (list_path(fs, args.path), part))
    _out(args, {"path": args.path, "partition": part, "entries": entries},
         "\n".join(long_listing(entries, human=args.human)))
    return 0


_TYPE_BITS = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "chardev": stat.S_IFCHR,
              "blockdev": stat.S_IFBLK, "fifo": stat.S_IFIFO, "socket": stat.S_IFSOCK}


def mode_string(kind: str, mode: int) -> str:
    """`ls -l`'s mode column: "-rw-r--r--", "drwxrwxrwt", "-rwsr-xr-x", "?" for unknown types."""
    text = stat.filemode(_TYPE_BITS.get(kind, 0) | (mode & 0o7777))
    return text if kind in _TYPE_BITS else "?" + text[1:]


def _minute(t: float) -> str:
    try:
        return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")
    except (OverflowError, OSError, ValueError):  # a hostile image's time
        return "?"


def long_listing(entries: list[dict[str, Any]], human: bool = False) -> list[str]:
    """Lines like `ls -l`: mode, owner and group ids, size, mtime, name (-> target); names escaped."""
    rows = []
    for e in entries:
        owner = ["-" if e.get(k) is None else str(e[k]) for k in ("uid", "gid")]
        size = format_bytes(e["size"]) if human else str(e["size"])
        # names and targets come from the guest: escaped for the terminal (JSON escapes them itself)
        name = printable(e["name"]) + (f" -> {printable(str(e['target']))}" if e.get("target") is not None
                                       else "")
        rows.append((mode_string(e["type"], int(e["mode"], 8)), *owner, size, _minute(e["mtime"]), name))
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(4)]
    return [f"{r[0]:<{widths[0]}} {r[1]:>{widths[1]}} {r[2]:>{widths[2]}} {r[3]:>{widths[3]}} {r[4]} {r[5]}"
            for r in rows]


def _get(args: argparse.Namespace) -> int:
    from cdp.archive.extract import get_path

    if not args.to.parent.is_dir():
        raise ConfigError(f"--to: folder {printable(str(args.to.parent))} does not exist")
    done = _with_fs(args, lambda fs, part: get_path(fs, args.path, args.to, force=args.force,
                                                    preserve_special=args.preserve_special))
    for path, why in done.skipped:
        print(f"cdp archive get: skipped {printable(path)}: {why}", file=sys.stderr)
    _out(args, {"path": args.path, **done.to_json()},
         f"wrote {len(done.written)} item(s) to {printable(str(args.to))}"
         + (f"; skipped {len(done.skipped)} (named above)" if done.skipped else ""))
    return 1 if done.skipped else 0


def _diff(args: argparse.Namespace) -> int:
    from cdp.archive.diff import Side, diff

    def run(opened: list[_Opened]) -> dict[str, Any]:
        a, b = (Side(o.fs, o.image, o.image.ids, o.image.v.chunk_size) for o in opened)
        changes, stats = diff(a, b, args.path)
        return {"a": opened[0].snap.id, "b": opened[1].snap.id, "volume": args.volume, "path": args.path,
                "partition": opened[1].partition, "changes": [c.to_json() for c in changes],
                **stats.to_json()}

    rep = _with_images(args, [args.snapshot_a, args.snapshot_b], run)
    for p in rep["incomplete"]:
        print(f"cdp archive diff: {printable(p['path'])}: {p['reason']}", file=sys.stderr)
    counts = {k: sum(c["kind"] == k for c in rep["changes"]) for k in "+-M"}
    lines = [f"{c['kind']}  {printable(c['path'])}" + ("/" if c["type"] == "dir" else "")
             + (f"  ({', '.join(c['changes'])})" if c["changes"] else "") for c in rep["changes"]]
    lines.append(f"{rep['a'][:8]} -> {rep['b'][:8]}: {counts['+']} added, {counts['-']} removed, "
                 f"{counts['M']} modified")
    _out(args, rep, "\n".join(lines))
    return 1 if rep["incomplete"] else 0
