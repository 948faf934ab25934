"""Keeping a repository honest: verify (structure, or every byte) and prune (retention + GC).

Prune order, each step safe to interrupt: take the exclusive lock; delete
the manifests the policy forgets; write one index naming every pack that
stays; delete the old index files; only then delete packs that no kept
snapshot references and that are older than the grace window (so a pack
an interrupted or concurrent run just wrote is never lost). Packs holding
few live chunks are repacked: those chunks are copied into new packs first.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import time
from collections import defaultdict
from typing import Any

import cdp.archive.lock as locks
import cdp.archive.pack as pack
import cdp.archive.retention as retention
from cdp.archive.backend import LocalBackend, ObjectMissing, ObjectTooLarge
from cdp.archive.job import Progress
from cdp.archive.pack import PackWriter
from cdp.archive.repo import Manifest, Repository, gather_limited
from cdp.config import KeepPolicy
from cdp.errors import ArchiveCorruptError, ArchiveError

log = logging.getLogger(__name__)

PACK_MAX = (1 << 30) + (256 << 20)  # pack_size's cap + one chunk + trailer: never read more


def _users(snaps: list[Manifest]) -> dict[bytes, list[str]]:
    """chunk id -> ["<snapshot short id>/<volume>", ...]."""
    out: dict[bytes, list[str]] = defaultdict(list)
    for s in snaps:
        for what, cid in s.chunk_users():
            out[cid].append(f"{s.short}/{what}")
    return out


async def verify(repo: Repository, read_data: bool = False, progress: Progress | None = None
                 ) -> dict[str, Any]:
    """Problems found, each naming the chunk, its pack and the snapshots that need it."""
    held = await locks.lock(repo, exclusive=False)  # prune must not delete under our feet
    try:
        return await _verify(repo, read_data, progress)
    finally:
        await held.release()


async def _verify(repo: Repository, read_data: bool, progress: Progress | None) -> dict[str, Any]:
    await repo.load_index()
    snaps = await repo.snapshots()
    users = _users(snaps)
    problems: list[dict[str, Any]] = []

    def problem(kind: str, message: str, cid: bytes | None = None, pack_: str | None = None) -> None:
        p: dict[str, Any] = {"kind": kind, "message": message}
        if cid is not None:
            p["chunk"] = cid.hex()
            p["snapshots"] = sorted({u.split("/")[0] for u in users.get(cid, [])})
            p["volumes"] = users.get(cid, [])
        if pack_ is not None:
            p["pack"] = pack_
        problems.append(p)

    for cid in users:
        if cid not in repo.index:
            problem("missing", f"chunk {cid.hex()} is not in any pack", cid)
    for name, entries in repo.pack_entries.items():
        size = repo.pack_sizes.get(name)
        if size is None:
            problem("missing-pack", f"pack {name} is named by the index but absent", pack_=name)
            for cid, _ in entries:
                if cid in users and repo.index.get(cid) is not None and repo.index[cid].pack == name:
                    problem("missing", f"chunk {cid.hex()} is in missing pack {name[:8]}", cid, name)
        elif entries and max(e.offset + e.length for _, e in entries) + pack.TAIL > size:
            problem("truncated-pack", f"pack {name} is shorter than its index says", pack_=name)
    checked = 0
    if read_data:
        total = sum(repo.pack_sizes.get(p, 0) for p in repo.pack_entries)
        done = 0
        names = [p for p in repo.pack_entries if p in repo.pack_sizes]
        results = await gather_limited((_check_pack(repo, p) for p in names), limit=2)
        for p, (hash_ok, bad) in zip(names, results, strict=True):
            done += repo.pack_sizes[p]
            checked += len(repo.pack_entries[p])
            if not hash_ok:
                problem("pack-hash", f"pack {p} does not hash to its name: it was damaged", pack_=p)
            for cid, why in bad:
                problem("damaged", f"chunk {cid.hex()} in pack {p[:8]}: {why}", cid, p)
            if progress is not None:
                progress("verify", done, total)
    return {"repository": repo.url, "ok": not problems, "snapshots": len(snaps),
            "packs": len(repo.pack_entries), "chunks": len(repo.index), "chunks_read": checked,
            "orphan_packs": len(repo.orphans), "problems": problems}


async def _check_pack(repo: Repository, name: str) -> tuple[bool, list[tuple[bytes, str]]]:
    try:
        data = await repo.backend.get(pack.pack_name(name), limit=PACK_MAX)
    except ObjectMissing:
        return False, [(cid, "pack is missing") for cid, _ in repo.pack_entries[name]]
    except ObjectTooLarge:
        return False, [(cid, "pack is larger than cdp writes") for cid, _ in repo.pack_entries[name]]

    def check() -> tuple[bool, list[tuple[bytes, str]]]:
        ok = hashlib.sha256(data).hexdigest() == name
        bad = []
        for cid, e in repo.pack_entries[name]:
            try:
                pack.decode_blob(repo.keys, cid, data[e.offset:e.offset + e.length], e.raw_length)
            except ArchiveCorruptError as exc:
                bad.append((cid, str(exc)))
        return ok, bad

    return await asyncio.to_thread(check)


async def prune(repo: Repository, policy: KeepPolicy, *, grace: float = 3600.0, now: float | None = None,
                dry_run: bool = False, tz: dt.tzinfo | None = None, lock_wait: float = 0.0,
                repack_below: float = 0.5, pack_size: int = 32 << 20) -> dict[str, Any]:
    """Forget snapshots the policy does not keep, repack mostly-dead packs, delete unreferenced ones.

    A live pack whose live chunks take less than `repack_below` of it has those
    chunks copied (sealed blobs as they are, each checked first) into new packs,
    and goes with the unreferenced ones. Pack ages are judged on the backend's
    clock (our lock's modification time), the clock that stamped the packs.
    """
    held = await locks.lock(repo, exclusive=True, wait=lock_wait)
    try:
        if now is None:
            now = held.backend_now if held.backend_now is not None else time.time()
        snaps = await repo.snapshots()
        keep = retention.select([s.time for s in snaps], policy, tz)
        kept = [s for i, s in enumerate(snaps) if i in keep]
        forgotten = [s for i, s in enumerate(snaps) if i not in keep]
        report: dict[str, Any] = {
            "repository": repo.url, "dry_run": dry_run,
            "kept": [{"snapshot": s.id, "time": s.time, "reasons": keep[i]}
                     for i, s in enumerate(snaps) if i in keep],
            "forgotten": [s.id for s in forgotten], "packs_deleted": [], "bytes_freed": 0}
        await repo.load_index()
        need = _live_packs(repo, kept)
        if not dry_run:
            for s in forgotten:
                await repo.delete_snapshot(s.id)
        unused = [p for p in repo.pack_sizes
                  if p not in need and now - repo.pack_mtimes.get(p, now) >= grace]
        repack = sorted(p for p, cids in need.items() if sum(
            e.length for c, e in repo.pack_entries[p] if c in cids) < repack_below * repo.pack_sizes[p])
        report["packs_repacked"] = repack
        written = 0
        if repack and not dry_run:
            written = await _repack(repo, repack, need, pack_size)
        doomed = unused + repack
        report["packs_deleted"] = sorted(doomed)
        report["bytes_freed"] = sum(repo.pack_sizes[p] for p in doomed) - written
        report["packs_kept"] = len(repo.pack_sizes) - len(doomed)
        if dry_run or (not doomed and not repo.orphans and len(repo.index_files) <= 1):
            return report
        old_index = list(repo.index_files)
        stay = [p for p in repo.pack_entries if p not in doomed and p in repo.pack_sizes]
        new = await repo.write_index(stay)
        for n in old_index:
            if n != new:
                await repo.backend.delete(f"index/{n}")
        for p in doomed:
            await repo.backend.delete(pack.pack_name(p))
        if isinstance(repo.backend, LocalBackend):
            repo.backend.clean_temp(now - grace)
        log.info("prune forgot=%d repacked=%d deleted=%d packs (%d bytes freed)", len(forgotten),
                 len(repack), len(doomed), report["bytes_freed"])
        return report
    finally:
        await held.release()


async def _repack(repo: Repository, packs: list[str], need: dict[str, set[bytes]], pack_size: int) -> int:
    """Copy the needed chunks of `packs` into new packs; returns the bytes written."""
    writer = PackWriter(repo.keys)
    written = 0

    async def flush() -> None:
        nonlocal writer, written
        if len(writer):
            name, data, entries = writer.seal()
            await repo.put_pack(name, data, entries)
            written += len(data)
            writer = PackWriter(repo.keys)

    for p in packs:
        data = await repo.backend.get(pack.pack_name(p), limit=PACK_MAX)
        for cid, e in repo.pack_entries[p]:
            if cid not in need[p]:
                continue
            blob = data[e.offset:e.offset + e.length]
            # never copy damage: a chunk that does not check out stops prune before any deletion
            await asyncio.to_thread(pack.decode_blob, repo.keys, cid, blob, e.raw_length)
            writer.add(cid, blob, e.raw_length)
            if writer.size >= pack_size:
                await flush()
    await flush()
    return written


def _live_packs(repo: Repository, kept: list[Manifest]) -> dict[str, set[bytes]]:
    """The packs the kept snapshots need, each with the chunk ids it provides (one holder per chunk)."""
    holders: dict[bytes, list[str]] = defaultdict(list)
    for p, entries in repo.pack_entries.items():
        if p in repo.pack_sizes:
            for cid, _ in entries:
                holders[cid].append(p)
    need: dict[str, set[bytes]] = {}
    for s in kept:
        for _what, cid in s.chunk_users():
            hs = holders.get(cid)
            if not hs:
                raise ArchiveError(f"snapshot {s.short} needs chunk {cid.hex()} which no pack "
                                   "holds; prune stopped without deleting anything: run "
                                   "`cdp archive verify`")
            chosen = next((h for h in hs if h in need), hs[0])
            need.setdefault(chosen, set()).add(cid)
    return need
