"""`cdp failover promote`: make the replica the live disk, at a chosen recovery point.

Steps, each safe to repeat (running promote again after a crash finishes it):

1. refuse if the source is still connected (the receiver's status file),
   unless forced; check the point is kept;
2. write ``promoted.json`` with state "promoting": from then on the
   receiver refuses the volume (Open and Begin answer the permanent error
   "promoted"), stops the source's stream of it, lets sealed epochs land and
   closes the replica;
3. take the replica's lock (waits until the receiver let go), recover it,
   record in ``promoted.json`` (durably, once) the epoch the replica held and
   the labels it had, roll the image back to the point with the journal
   (store.Replica.rollback), drop the journal (the image is about to become a
   live disk), start a new generation (state.json) and drop the labels: no
   point of the old history survives, and epochs after a failback reuse its
   numbers;
4. rewrite ``promoted.json`` with state "promoted": what was done, when.

<data_dir>/<volume>/image is then a normal writable raw disk image.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from cdp.durable import atomic_write_json, read_json
from cdp.errors import DrillError, PointError, UsageError
from cdp.replica.journal import Retention
from cdp.replica.points import (
    drop_labels,
    empty_point_message,
    list_points,
    live_pins,
    pins_locked,
    read_labels,
)
from cdp.replica.store import PROMOTED, Replica, ReplicaBusy

STATUS_FRESH = 5.0  # the receiver rewrites status.json every second


def connected_source(vol_dir: Path, now: float | None = None) -> str | None:
    """The client still streaming this volume per the receiver's status file, else None."""
    now = time.time() if now is None else now
    try:
        st = read_json(vol_dir / "status.json")
    except (OSError, ValueError):
        return None
    if st.get("connected") and now - float(st.get("updated", 0)) < STATUS_FRESH:
        return str(st.get("client") or "a source")
    return None


def promote(data_dir: Path, volume: str, point: int | None = None, *, force: bool = False,
            wait: float = 60.0) -> dict[str, Any]:
    vol_dir = data_dir / volume
    if not (vol_dir / "state.json").exists():
        raise UsageError(f"no replica of volume {volume!r} in {data_dir}")
    marker = vol_dir / PROMOTED
    record, point, resumed = _begin(vol_dir, volume, point, force)
    try:
        rep = _acquire(data_dir, volume, wait)
    except DrillError:
        if not resumed:
            with contextlib.suppress(OSError):
                os.unlink(marker)  # nothing was changed: the receiver may go on
        raise
    try:
        if "previous_epoch" not in record:
            # Durable before the image changes, so a promote cut short and run again still
            # records what the replica held, and which labels named points of that history.
            record = {**record, "previous_epoch": rep.state.epoch,
                      "generation": rep.state.generation + 1,
                      "labels_dropped": {str(e): t for e, t in read_labels(vol_dir).items()}}
            atomic_write_json(marker, record)
        before = int(record["previous_epoch"])
        target = before if point is None else point
        if target > rep.state.epoch:
            raise PointError(f"point {target} is newer than the replica (epoch {rep.state.epoch})")
        _roll_back(rep, vol_dir, target, wait)
        gen = int(record.get("generation", rep.state.generation + 1))
        if rep.state.generation != gen:  # epochs after this one are another history
            rep.state = replace(rep.state, generation=gen)
            atomic_write_json(vol_dir / "state.json", asdict(rep.state))
        drop_labels(vol_dir)  # recorded in promoted.json; no point of theirs is left
        state = rep.state
    finally:
        rep.close()
    image = vol_dir / "image"
    os.chmod(image, 0o644)
    done = {**record, "state": "promoted", "point": target, "epoch": state.epoch,
            "point_time": state.epoch_time, "previous_epoch": before,
            "rolled_back_epochs": before - state.epoch, "promoted_at": time.time(),
            "image": str(image), "size": state.size}
    atomic_write_json(marker, done)
    return done


def _begin(vol_dir: Path, volume: str, point: int | None,
           force: bool) -> tuple[dict[str, Any], int | None, bool]:
    """The promote's record: the unfinished one in promoted.json (resumed), or a new one,
    written once no source writes the volume and the point is kept. With its point, and
    whether it was resumed."""
    marker = vol_dir / PROMOTED
    record: dict[str, Any] = {}
    if marker.exists():
        with contextlib.suppress(OSError, ValueError):
            record = read_json(marker)
        if record.get("state") == "promoted":
            raise DrillError(f"volume {volume!r} was already promoted at epoch "
                             f"{record.get('epoch')} ({marker}); its image is live")
        if point is not None and record.get("point") not in (None, point):
            raise UsageError(f"a promote to point {record.get('point')} was started and not "
                             f"finished; run it again without --point {point} to finish it")
        return record, record.get("point", point), True
    client = connected_source(vol_dir)
    if client and not force:
        raise DrillError(f"{client} is still connected and replicating {volume!r}: stop its "
                         "source first (the production side may still be live), or pass "
                         "--force to cut it off")
    points = list_points(vol_dir)
    if (points[-1].epoch if point is None else point) == 0:
        raise PointError(empty_point_message(volume, points))
    if point is not None and point not in {p.epoch for p in points}:
        raise PointError(f"point {point} of {volume!r} is not kept; `cdp points` lists them")
    record = {"state": "promoting", "volume": volume, "point": point,
              "requested_at": time.time(), "forced": force}
    atomic_write_json(marker, record)
    return record, point, False


def _roll_back(rep: Replica, vol_dir: Path, target: int, wait: float) -> None:
    """Roll the replica back to `target` and drop its journal and pins, once no reader (an
    archive job, a drill) holds a point; DrillError if one still does after `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        with pins_locked(vol_dir):
            readers = live_pins(vol_dir)
            if not readers:
                rep.rollback(target)
                rep.journal.drop_all()
                shutil.rmtree(vol_dir / "pins", ignore_errors=True)
                return
        if time.monotonic() > deadline:
            raise DrillError(f"a reader of point(s) {sorted(set(readers))} (an archive job "
                             "or a drill) still has the replica open; retry when it ends")
        time.sleep(0.2)


def _acquire(data_dir: Path, volume: str, wait: float) -> Replica:
    """Open the replica for promote once the receiver has let go of it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return Replica.open(data_dir, volume, retention=Retention(None, None),
                                promoting=True)
        except ReplicaBusy:
            if time.monotonic() > deadline:
                raise DrillError(f"the receiver still holds replica {volume!r} after {wait:.0f}s; "
                                 "is it an older cdp that does not know about promote? Stop it "
                                 "and run promote again") from None
            time.sleep(0.2)
