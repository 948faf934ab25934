"""Ways to scan a volume in a consistent state: quiesce hooks and reflink snapshots.

A scan of a file that is being written sees a torn state. A pre/post command
around the scan (e.g. a guest fsfreeze) or a reflink copy taken between them
gives the scan one instant to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
from pathlib import Path

from cdp.durable import make_private_dir
from cdp.errors import TrackerError

FICLONE = 0x40049409
HOOK_TIMEOUT = 300.0


async def run_hook(cmd: str | None, phase: str, volume: str, path: Path) -> None:
    """Run a pre_scan/post_scan shell command; TrackerError if it fails or hangs."""
    if not cmd:
        return
    env = {**os.environ, "CDP_VOLUME": volume, "CDP_PATH": str(path), "CDP_PHASE": phase}
    proc = await asyncio.create_subprocess_shell(cmd, env=env)
    try:
        async with asyncio.timeout(HOOK_TIMEOUT):
            rc = await proc.wait()
    except TimeoutError:
        proc.kill()
        raise TrackerError(f"{phase} command timed out after {HOOK_TIMEOUT:.0f}s: {cmd}") from None
    if rc != 0:
        raise TrackerError(f"{phase} command failed with exit status {rc}: {cmd}")


def reflink_snapshot(source: Path, snap: Path) -> Path:
    """A reflink copy of `source` at `snap`: scanned at leisure while the guest runs on."""
    make_private_dir(snap.parent)
    src = os.open(source, os.O_RDONLY)
    try:
        dst = os.open(snap, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            fcntl.ioctl(dst, FICLONE, src)
        finally:
            os.close(dst)
    except OSError as exc:
        with contextlib.suppress(OSError):
            snap.unlink()
        if exc.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
            raise TrackerError(
                f"snapshot = \"reflink\" needs a file system with reflinks (XFS, btrfs) and "
                f"state_dir on the same file system as {source}; use snapshot = \"none\" "
                "with pre_scan/post_scan to quiesce instead") from None
        raise TrackerError(f"reflink snapshot of {source} failed: {exc}") from None
    finally:
        os.close(src)
    return snap
