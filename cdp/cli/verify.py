"""`cdp verify`: compare source volumes and their replicas block by block."""

from __future__ import annotations

import asyncio
from typing import Any

from cdp.blocks import Geometry
from cdp.config import SourceConfig
from cdp.source.inspect import replica_hashes
from cdp.tracker.scan import hash_volume, volume_size


def verify(cfg: SourceConfig, names: list[str] | None = None) -> list[dict[str, Any]]:
    """One report per volume: equal or not, and which blocks differ."""
    vols = [v for v in cfg.volumes if not names or v.name in names]
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
