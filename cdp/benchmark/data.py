"""Generated disk-like data: images with holes, text, random and repeated blocks; rewrites."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

BS = 64 * 1024
WORDS = (b"alpha beta gamma delta epsilon lorem ipsum kernel block epoch replica volume "
         b"journal commit fsync cluster node disk sector inode extent ").split()


_LINES: list[bytes] = []


def text_block(rng: random.Random) -> bytes:
    """64 KiB of log-like text: compresses about 3-4x, like real file-system contents."""
    if not _LINES:
        r = random.Random(0)
        _LINES.extend(b"%06d " % i + b" ".join(r.choice(WORDS) for _ in range(10)) + b"\n"
                      for i in range(4096))
    out = b"".join(rng.choices(_LINES, k=BS // 60 + 1))
    return out[:BS]


def generate(path: Path, size: int, seed: int = 7) -> None:
    """A disk-like image: 1/4 holes, 1/4 text, 1/4 random, 1/4 a few blocks repeated."""
    rng = random.Random(seed)
    blocks = size // BS
    repeated = [rng.randbytes(BS) for _ in range(8)]
    with open(path, "wb") as fh:
        fh.truncate(size)
        for i in range(blocks):
            kind = (i * 4 // blocks) if blocks >= 4 else 1
            if kind == 0:
                continue  # a hole
            fh.seek(i * BS)
            if kind == 1:
                fh.write(text_block(rng))
            elif kind == 2:
                fh.write(rng.randbytes(BS))
            else:
                fh.write(repeated[i % len(repeated)])


def rewrite(path: Path, fraction: float, seed: int) -> int:
    """Overwrite a random `fraction` of the blocks in place; returns bytes written."""
    return rewrite_timed(path, fraction, seed)[0]


def rewrite_timed(path: Path, fraction: float, seed: int) -> tuple[int, float]:
    """rewrite(), also returning when the last write returned (before the fsync that makes
    them durable): a scan that starts after that reads every new block."""
    rng = random.Random(seed)
    size = path.stat().st_size
    blocks = size // BS
    n = max(1, int(blocks * fraction))
    with open(path, "r+b") as fh:
        for i in rng.sample(range(blocks), n):
            fh.seek(i * BS)
            fh.write(text_block(rng) if rng.random() < 0.5 else rng.randbytes(BS))
        fh.flush()
        written = time.time()
        os.fsync(fh.fileno())
    return n * BS, written


