"""Work folders of `cdp failback run` (``<data_dir>/.failback-VOL-XXXXXXXX``: a run's
source state) and the lock that keeps one run or finish of a volume at a time
(``<data_dir>/VOL/failback.lock``, flock'd).

A run killed before it ends leaves its folder behind. The next run or finish of that
volume removes it, and so does the receiver when it starts, for every volume no run
holds the lock of. A leaf module: the receiver imports it without the failback code.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from cdp.errors import DrillError

log = logging.getLogger(__name__)

WORK_PREFIX = ".failback-"


@contextlib.contextmanager
def exclusive(data_dir: Path, volume: str) -> Iterator[list[str]]:
    """Hold ``VOL/failback.lock`` (no other run or finish of `volume` meanwhile) and remove the
    work folders killed runs left; yields their names."""
    fd = os.open(data_dir / volume / "failback.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DrillError(f"a `cdp failback run` or `finish` of {volume!r} is still going: "
                             "wait for it to end") from None
        yield remove_work(data_dir, volume)
    finally:
        os.close(fd)


def remove_work(data_dir: Path, volume: str) -> list[str]:
    """Remove the work folders of `volume`'s failback runs (call with its lock held)."""
    prefix = f"{WORK_PREFIX}{volume}-"
    removed = sorted(d.name for d in data_dir.glob(f"{prefix}*")
                     if "-" not in d.name[len(prefix):] and d.is_dir())  # not VOL-x's
    for name in removed:
        shutil.rmtree(data_dir / name, ignore_errors=True)
    if removed:
        log.warning("removed %s, left by a failback run that was killed", ", ".join(removed))
    return removed


def remove_leftovers(data_dir: Path) -> list[str]:
    """At receiver start: remove the work folders killed failback runs left, of every volume
    no run or finish is working on now (its lock is free); returns their names."""
    volumes = set()
    for d in data_dir.glob(f"{WORK_PREFIX}*-*"):
        name = d.name[len(WORK_PREFIX):]
        vol, _, suffix = name.rpartition("-")  # mkdtemp's suffix holds no "-"
        if vol and suffix and d.is_dir():
            volumes.add(vol)
    removed: list[str] = []
    for vol in sorted(volumes):
        lock = data_dir / vol / "failback.lock"
        if not (data_dir / vol).is_dir():  # the volume is gone: nobody can be running it
            removed += remove_work(data_dir, vol)
            continue
        try:
            with exclusive(data_dir, vol) as gone:
                removed += gone
        except DrillError:
            log.info("failback work folders of %s kept: a failback run holds %s", vol, lock)
        except OSError as exc:
            log.warning("cannot check failback work folders of %s (%s): left alone", vol, exc)
    return removed
