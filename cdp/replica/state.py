"""What a replica's files say at rest, as the store (store.py) and the epoch writer
(writer.py) both read them: the record in state.json, and what an all-zero block looks
like in the hash map (see the layout in store.py)."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

from cdp.blocks import Geometry
from cdp.codec import HASH_LEN, zero_hash

NO_HASH = bytes(HASH_LEN)
COUNTERS = ("epochs", "blocks", "logical", "data", "compressed", "dedup", "zero", "wire")


@dataclass
class ReplicaState:
    volume: str
    size: int
    block_size: int
    replica_id: str
    created: float
    epoch: int = 0
    epoch_time: float = 0.0
    epoch_until: float = 0.0  # no write that finished later at the source is in (0: epoch_time)
    applied_at: float = 0.0
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    format: int = 1
    generation: int = 1  # bumped by promote: epoch numbers restart from the promoted image
    cut: dict[str, Any] | None = None  # the epoch's Cut marker (nbd): groups.py
    group: dict[str, Any] | None = None  # {"name", "members"}: the last group a Cut named
    # never yet whole (the first seed): data may be placed in the image at receipt (see
    # EpochWriter._placeable); cleared for good by the first Current (Replica.seeded)
    seeding: bool = False

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.size, self.block_size)


def is_enospc(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def zero_entry(h: bytes, length: int) -> bool:
    """A hash-map entry saying the block is all zeros (never written, or written zero)."""
    return h == NO_HASH or h == zero_hash(length)
