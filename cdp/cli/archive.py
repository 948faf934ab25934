"""`cdp archive init|run|list|verify|prune|restore|ls|get`: offsite snapshots of the replicas."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import sys
from collections.abc import Callable, Iterator
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

PRESERVE_HELP = ("keep setuid, setgid and sticky bits (dropped by default: the files come from a "
                 "system you may not trust)")


def register(sub: Any) -> None:
    p = sub.add_parser("archive", help="offsite snapshots of the replicas: init, run, list, verify, "
                       "prune, restore, ls, get, files")
    verbs = p.add_subparsers(dest="archive_verb", metavar="SUBVERB", required=True)

    def verb(name: str, help_: str, fn: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        s = verbs.add_parser(name, help=help_)
        s.add_argument("-c", "--config", type=Path, required=True, help="receiver.toml")
        s.add_argument("--archive", help="which [[archive]] (needed when there are several)")
        s.add_argument("--json", action="store_true")
        s.set_defaults(run=fn)
        return s

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
    s.add_argument("--partition", type=int, help="partition number (default: the first with ext, else "
                   "the first with FAT or NTFS, an EFI system partition last)")
    s = verb("get", "copy a file or directory out of an archived image (entries with unsafe names, or "
             "that would pass through a symlink, are skipped and named: exit 1)", _get)
    s.add_argument("snapshot")
    s.add_argument("volume")
    s.add_argument("path")
    s.add_argument("--to", type=Path, required=True, help="destination file or existing directory")
    s.add_argument("--partition", type=int, help="partition number (default: as for ls)")
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
    text = "\n".join(f"{s['snapshot'][:8]}  {_when(s['time'])}  {s['hostname']}  " + ", ".join(
        f"{v['volume']} ({format_bytes(v['size'])}, epoch {v['epoch']})" for v in s["volumes"])
        for s in snaps) or "no snapshots"
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


def _with_fs(args: argparse.Namespace, fn: Callable[[Any, int | None], Any]) -> Any:
    """Open the snapshot's image as a file and its file system, call fn(fs, partition)."""
    from cdp.archive.files import open_fs
    from cdp.archive.job import open_repo
    from cdp.archive.restore import Portal, SnapshotImage, volume_of

    _, a = _load(args)
    try:
        with Portal() as portal:
            repo = portal.call(open_repo(a))
            snap = portal.call(repo.find_snapshot(args.snapshot))
            v = volume_of(snap, args.volume)
            portal.call(repo.load_index())
            image = SnapshotImage(repo, v, portal)
            fs, part = open_fs(image, args.partition)  # type: ignore[arg-type]
            return fn(fs, part)
    except BaseException as exc:
        drop_traceback(exc)
        raise
    finally:
        gc.collect()  # see run_sync: S3 clients must go while Python is alive


def _ls(args: argparse.Namespace) -> int:
    from cdp.archive.files import list_path

    entries, part = _with_fs(args, lambda fs, part: (list_path(fs, args.path), part))
    # names come from the guest: escaped for the terminal (JSON escapes them itself)
    text = "\n".join(f"{e['type'][:4]:4} {e['mode']:>6} {e['size']:>12}  {_when(e['mtime'])}  "
                     f"{printable(e['name'])}"
                     + (f" -> {printable(str(e['target']))}" if "target" in e else "") for e in entries)
    _out(args, {"path": args.path, "partition": part, "entries": entries}, text)
    return 0


def _get(args: argparse.Namespace) -> int:
    from cdp.archive.extract import get_path

    if not args.to.parent.is_dir():
        raise ConfigError(f"--to: folder {printable(str(args.to.parent))} does not exist")
    done = _with_fs(args, lambda fs, part: get_path(fs, args.path, args.to,
                                                    preserve_special=args.preserve_special))
    for path, why in done.skipped:
        print(f"cdp archive get: skipped {printable(path)}: {why}", file=sys.stderr)
    _out(args, {"path": args.path, **done.to_json()},
         f"wrote {len(done.written)} item(s) to {printable(str(args.to))}"
         + (f"; skipped {len(done.skipped)} (named above)" if done.skipped else ""))
    return 1 if done.skipped else 0
