"""`cdp verify`: compare source volumes and their replicas block by block.

`cdp verify --replica` runs at the receiver instead: it rehashes each replica
image against the replica's own hash map (cdp/replica/check.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from cdp.blocks import Geometry
from cdp.cli.progress import byte_bars
from cdp.config import ReceiverConfig, SourceConfig, valid_name
from cdp.errors import UsageError
from cdp.replica.check import CheckResult, check_replica, replica_dirs
from cdp.source.inspect import replica_hashes
from cdp.tracker.scan import hash_volume, volume_size


def verify(cfg: SourceConfig, names: list[str] | None = None) -> list[dict[str, Any]]:
    """One report per volume: equal or not, and which blocks differ."""
    vols = [v for v in cfg.volumes if not names or v.name in names]
    qemu = [v.name for v in vols if v.mode == "qemu"]
    if qemu:  # its image is QEMU's (qcow2 as often as not): comparing its bytes would mislead
        raise UsageError(f"cdp verify cannot compare qemu volumes yet ({', '.join(qemu)}): their image "
                         "is read through QEMU; name the other volumes, or use `cdp verify --replica` "
                         "at the receiver")
    geos = {v.name: Geometry(volume_size(v.path), v.block_size) for v in vols}
    remote = asyncio.run(replica_hashes(cfg, geos, rehash=True))
    reports = []
    for v in vols:
        geo = geos[v.name]
        got = remote.get(v.name)
        rep: dict[str, Any] = {"volume": v.name, "blocks": geo.blocks, "size": geo.size}
        if isinstance(got, str) or got is None:
            rep.update(equal=False, error=got or "no answer", differing=[])
            reports.append(rep)
            continue
        epoch, theirs = got
        ours = hash_volume(v.path, geo)
        diff = [i for i in range(geo.blocks)
                if ours[i * 16:(i + 1) * 16] != theirs[i * 16:(i + 1) * 16]]
        rep.update(equal=not diff, replica_epoch=epoch, differing=diff, error="")
        reports.append(rep)
    return reports


def verify_replica(cfg: ReceiverConfig, names: list[str] | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> list[CheckResult]:
    """Rehash the named replicas (default: every one in data_dir) against their hash maps.

    Unknown names are a usage error before anything is read: a typo must not
    pass as "nothing to check".
    """
    if names:
        dirs = []
        for name in dict.fromkeys(names):
            if not valid_name(name) or not (cfg.data_dir / name / "state.json").is_file():
                raise UsageError(f"no replica of volume {name!r} in {cfg.data_dir} (check the "
                                 f"name and {cfg.path})")
            dirs.append(cfg.data_dir / name)
    else:
        dirs = replica_dirs(cfg.data_dir)
        if not dirs:
            raise UsageError(f"no replicas in {cfg.data_dir} (data_dir of {cfg.path})")
    return [check_replica(d, partial(progress, d.name) if progress else None) for d in dirs]


def replica_line(r: CheckResult, shown: int = 20) -> str:
    """One human line per volume (and the note, if any, on the next)."""
    def listed(blocks: tuple[int, ...]) -> str:
        more = f" and {len(blocks) - shown} more" if len(blocks) > shown else ""
        return ", ".join(map(str, blocks[:shown])) + more

    if r.skipped:
        return f"{r.volume}: not checked: {r.skipped}"
    if r.error:
        return f"{r.volume}: cannot check: {r.error}"
    epoch = f"epoch {r.epoch}" + (f" (now {r.epoch_end})" if r.epoch_end != r.epoch else "")
    line = f"{r.volume}: {epoch}, {r.blocks} blocks checked, "
    if r.differing:
        n = len(r.differing)
        line += f"{n} differing block{'s' if n != 1 else ''}: {listed(r.differing)}"
    else:
        line += "equal"
    if r.changing:
        line += (f"; {len(r.changing)} kept changing while re-read (being written, not "
                 f"compared): {listed(r.changing)}")
    return line + (f"\n  note: {r.note}" if r.note else "")


@contextlib.contextmanager
def replica_progress(enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """Byte bars on a terminal (see cdp.cli.progress)."""
    with byte_bars(enabled) as update:
        yield update
