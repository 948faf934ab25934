"""An NBD write workload with realistic data, run as its own process: `cdp bench`'s nbd client.

`qemu-img bench` writes one repeated byte pattern: a replicator that
deduplicates or compresses then has next to nothing to do, and its figures
say nothing. This writer sends the data mix of the scan scenarios (half
log-like text, which compresses 3-4x, half random) from a 32 MiB pool of
generated blocks, and stamps a serial number into the first bytes of every
4 KiB it sends, so that no two blocks of any size from 4 KiB up are alike:
dedup finds nothing the workload did not mean to repeat, compression finds
what real data offers. The same writer drives plain qemu-nbd (the baseline)
and the cdp export, in a process of its own as a guest would be.

    python -m cdp.benchmark.nbdload SOCKET EXPORT --block 4096 --depth 16 \\
        --count 16384 --flush-every 4096 [--sequential] [--seed N]

prints {"seconds": ..., "ops": ..., "bytes": ...} (connect to the last FLUSH answered).
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import time

from cdp.benchmark.data import BS, text_block
from cdp.benchmark.nbdclient import NbdClient

POOL = 32 << 20
STAMP = 4096  # a serial every 4 KiB: unique blocks at any block size from 4 KiB up
_SERIAL = struct.Struct("<QQ")


def pool(seed: int) -> bytes:
    """POOL bytes of the mix: text and random 64 KiB blocks, alternating."""
    rng = random.Random(seed)
    return b"".join(text_block(rng) if i % 2 == 0 else rng.randbytes(BS)
                    for i in range(POOL // BS))


class Blocks:
    """Successive write buffers of `size` bytes taken from the pool, each 4 KiB stamped."""

    def __init__(self, seed: int, size: int) -> None:
        if size % STAMP or size > POOL:
            raise ValueError(f"block size {size}: a multiple of {STAMP} up to {POOL}")
        self.data = pool(seed)
        self.size = size
        self.at = 0
        self.serial = 0
        self.tag = seed << 32

    def next(self) -> bytearray:
        if self.at + self.size > POOL:
            self.at = 0
        buf = bytearray(self.data[self.at:self.at + self.size])
        self.at += self.size
        for off in range(0, self.size, STAMP):
            self.serial += 1
            _SERIAL.pack_into(buf, off, self.tag, self.serial)
        return buf


def run(address: str, export: str, *, block: int, depth: int, count: int, flush_every: int,
        sequential: bool, seed: int) -> dict[str, float]:
    """Write `count` blocks (random offsets, or one after the other) with a FLUSH every
    `flush_every` requests and at the end; the seconds from connecting to the last FLUSH."""
    blocks = Blocks(seed, block)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    client = NbdClient(address, export, depth=depth)
    slots = client.size // block
    if slots < 1:
        raise ValueError(f"the export ({client.size} bytes) is smaller than one {block}-byte write")
    for i in range(count):
        slot = i % slots if sequential else rng.randrange(slots)
        client.write(slot * block, blocks.next())
        if (i + 1) % flush_every == 0:
            client.flush()
    client.flush()
    seconds = time.perf_counter() - t0
    client.close()
    return {"seconds": seconds, "ops": count, "bytes": count * block}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cdp.benchmark.nbdload", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("socket", help="the export's Unix socket")
    p.add_argument("export")
    p.add_argument("--block", type=int, required=True)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--flush-every", type=int, default=256)
    p.add_argument("--sequential", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    out = run(a.socket, a.export, block=a.block, depth=a.depth, count=a.count,
              flush_every=a.flush_every, sequential=a.sequential, seed=a.seed)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
