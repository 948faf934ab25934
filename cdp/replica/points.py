"""The recovery points of a replica folder, as any process reads them.

Point P is the image as of epoch P, read through the undo files of the
journal (journal.py, undo.py). Listing them, the labels that name them, the
pins of their readers and how long a group cut is known to have held live
here: the receiver, `cdp points`, drills, mounts and promote all use them.

Readers in other processes (pointview.py) pin the point they read: a pin is
a file ``pins/<P>.<pid>.<nonce>`` they hold a shared flock on; retention
never drops an undo file a live pin needs. ``pins.lock`` (flock'd briefly)
orders pin creation against pruning.

Labels (``cdp checkpoint``): ``labels.json`` beside ``journal/`` maps epoch
numbers to labels, ``{"<epoch>": {"label": TEXT, "time": T, "generation": G}}``
(plus ``"moved_from": [EPOCH, CAPTURE_TIME]`` when ``--move`` took it off another
point); rewritten atomically under ``pins.lock``. A label names one point: set_label
refuses a label that names another kept point unless told to move it. (The undo files'
own ``label`` meta field stays unset: undo files are immutable and a label can be removed.) A labelled point
holds retention back like a pin: its undo files and every newer one are
kept until ``cdp points --unlabel``. Keeping point L therefore costs every
undo file after L, i.e. the old content of every block rewritten since L,
once per epoch that rewrote it; see docs/recovery.md.

Generations: promote rolls the image back, drops the journal and starts a new
generation (state.json ``generation``, 1 if absent); replication after failback
then reuses epoch numbers for another history. Undo files (meta ``generation``)
and labels belong to the generation they were made in: points of another one are
not listed and labels of another one name nothing (promote drops them; records
without the field are generation 1). A label whose point is no longer kept holds
nothing back and is dropped at the next prune.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdp.durable import atomic_write_json, read_json
from cdp.errors import LabelTakenError, PointError, ReplicaError
from cdp.replica.undo import JournalCorrupt, read_meta, undo_epochs, undo_name

log = logging.getLogger(__name__)

LABELS = "labels.json"


@dataclass(frozen=True)
class Point:
    """A recovery point: the replica as of `epoch`."""

    epoch: int
    time: float  # the epoch's capture time at the source: what finished before is in
    size: int  # journal bytes that only this point needs (dropping it frees them)
    keep_bytes: int  # journal bytes needed to read this point
    label: str | None = None
    current: bool = False
    until: float = 0.0  # no write that finished after it at the source is in (0: `time`)
    group: str | None = None  # a cut of this consistency group (cdp.replica.groups)
    held: float = 0.0  # a group cut: the volume is known to have held it through this time


# -- pins: readers keep the undo files they need ------------------------------------


@contextlib.contextmanager
def pins_locked(vol_dir: Path) -> Iterator[None]:
    """Briefly serialize pin creation against pruning (an flock on pins.lock)."""
    fd = os.open(vol_dir / "pins.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def live_pins(vol_dir: Path) -> list[int]:
    """Points pinned by live readers; pins of dead processes are removed (call under the lock)."""
    d = vol_dir / "pins"
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        p = d / name
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                with contextlib.suppress(ValueError):
                    out.append(int(name.split(".")[0]))
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)  # its reader is gone
        finally:
            os.close(fd)
    return out


def min_pin(vol_dir: Path) -> int | None:
    return min(live_pins(vol_dir), default=None)


# -- labels: named points that outlive retention ------------------------------------------


def generation(vol_dir: Path) -> int:
    """The replica's generation (state.json; 1 before promote ever ran, or if unreadable)."""
    try:
        return int(read_json(vol_dir / "state.json").get("generation", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return 1


def _label_records(vol_dir: Path, strict: bool = False) -> dict[int, dict[str, Any]]:
    """Every record of labels.json, any generation; unreadable: {} (logged) or, if strict,
    ReplicaError (a rewrite must not lose the labels it cannot read)."""
    try:
        raw = read_json(vol_dir / LABELS)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        if strict:
            raise ReplicaError(f"{vol_dir / LABELS} is unreadable ({exc}): fix or remove it, "
                               "then label again") from None
        log.error("%s is unreadable (%s): labels are ignored until it is fixed",
                  vol_dir / LABELS, exc)
        return {}
    out: dict[int, dict[str, Any]] = {}
    if isinstance(raw, dict):
        for k, v in raw.items():
            with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
                out[int(k)] = {**v, "label": str(v["label"]),
                               "generation": int(v.get("generation", 1))}
    return out


def read_labels(vol_dir: Path) -> dict[int, str]:
    """epoch -> label of the replica's points ({} if none; an unreadable file counts as none).

    Only labels of the current generation count: an epoch number of an earlier one (before
    a promote) names another history, whatever number the replica has reached since.
    """
    gen = generation(vol_dir)
    return {e: r["label"] for e, r in _label_records(vol_dir).items() if r["generation"] == gen}


def _write_labels(vol_dir: Path, labels: dict[int, dict[str, Any]]) -> None:
    atomic_write_json(vol_dir / LABELS, {str(e): v for e, v in sorted(labels.items())})


def _current_records(vol_dir: Path) -> dict[int, dict[str, Any]]:
    gen = generation(vol_dir)
    return {e: r for e, r in _label_records(vol_dir, strict=True).items()
            if r["generation"] == gen}


def set_label(vol_dir: Path, epoch: int, label: str, now: float | None = None, *,
              move: bool = False) -> tuple[int, float] | None:
    """Label point `epoch` durably. A label names one point: if it names another point that
    is still kept, LabelTakenError unless `move` (then it moves). Returns (point, capture
    time) it moved from, None if it moved from nowhere. Checked and written under
    pins.lock, so of two racing checkpoints with one label only one takes it."""
    with pins_locked(vol_dir):
        recs = _current_records(vol_dir)
        mine = recs.get(epoch)
        if mine is not None and mine["label"] == label:  # again (a resend after a reconnect)
            frm = mine.get("moved_from")
            return (int(frm[0]), float(frm[1])) if isinstance(frm, list) and len(frm) == 2 else None
        other = next((e for e, r in recs.items() if r["label"] == label), None)
        moved: tuple[int, float] | None = None
        if other is not None:
            when = {p.epoch: p.time for p in list_points(vol_dir)}.get(other)
            if when is None:  # its point is gone: the label names nothing (prune drops it)
                log.info("label %r named point %d of %s, no longer kept: it names point %d now",
                         label, other, vol_dir.name, epoch)
            elif not move:
                raise LabelTakenError(vol_dir.name, label, other, when)
            else:
                moved = (other, when)
            del recs[other]
        recs[epoch] = {"label": label, "time": time.time() if now is None else now,
                       "generation": generation(vol_dir)}
        if moved is not None:
            recs[epoch]["moved_from"] = list(moved)
        _write_labels(vol_dir, recs)  # labels of earlier generations go
    return moved


def remove_label(vol_dir: Path, epoch: int) -> str | None:
    """Unlabel point `epoch`; returns the label it had (None: it had none)."""
    with pins_locked(vol_dir):
        recs = _current_records(vol_dir)
        gone = recs.pop(epoch, None)
        if gone is not None:
            _write_labels(vol_dir, recs)
    return None if gone is None else str(gone["label"])


def drop_labels(vol_dir: Path) -> dict[int, str]:
    """Remove every label (promote: no point of the old history survives); returns them."""
    with pins_locked(vol_dir):
        recs = _label_records(vol_dir)
        if recs or (vol_dir / LABELS).exists():
            _write_labels(vol_dir, {})
    return {e: r["label"] for e, r in recs.items()}


def label_floor(vol_dir: Path, oldest: int | None) -> int | None:
    """The oldest labelled point retention must keep (call under pins_locked).

    `oldest` is the oldest point still kept (None: only the current one). Labels of
    points already gone (journaling was switched off, a damaged undo file) hold nothing
    back: they are dropped here, with a warning.
    """
    gen = generation(vol_dir)
    recs = _label_records(vol_dir)
    mine = {e: r for e, r in recs.items() if r["generation"] == gen}
    gone = [e for e in mine if oldest is not None and e < oldest]
    if gone:
        log.warning("labels %s name points that are no longer kept: dropped",
                    ", ".join(f"{mine[e]['label']!r} (epoch {e})" for e in gone))
        with contextlib.suppress(OSError):
            _write_labels(vol_dir, {e: r for e, r in mine.items() if e not in gone})
    return min((e for e in mine if e not in gone), default=None)


def resolve_point(vol_dir: Path, text: str) -> int:
    """--point: an epoch number, or the label of a point; PointError if no point has it."""
    if text.isdigit():
        return int(text)
    for epoch, label in read_labels(vol_dir).items():
        if label == text:
            return epoch
    gen = generation(vol_dir)
    for epoch, rec in _label_records(vol_dir).items():
        if rec["label"] == text and rec["generation"] != gen:
            raise PointError(f"label {text!r} named point {epoch} of {vol_dir.name} before it "
                             "was promoted: that point is gone (`cdp points` lists the points "
                             "and labels kept now)")
    for path in sorted(vol_dir.glob("promoted*.json")):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            dropped = read_json(path).get("labels_dropped") or {}
            for epoch, label in dropped.items():
                if label == text:
                    raise PointError(
                        f"label {text!r} named point {epoch} of {vol_dir.name}, dropped when "
                        f"the volume was promoted ({path.name}): the replica no longer holds "
                        "that point (`cdp points` lists the points and labels kept now)")
    raise PointError(f"no point of {vol_dir.name} is labelled {text!r} (`cdp points` lists "
                     "the labels)")


# -- listing points (any process) -----------------------------------------------------


def list_points(vol_dir: Path) -> list[Point]:
    """The recovery points kept for a replica folder, oldest first; the last is the current."""
    try:
        st = read_json(vol_dir / "state.json")
    except (OSError, ValueError) as exc:
        raise ReplicaError(f"{vol_dir}: no readable replica state ({exc})") from None
    n = int(st["epoch"])
    gen = int(st.get("generation", 1))
    journal = vol_dir / "journal"
    eps = set(undo_epochs(journal))
    chain: list[tuple[int, dict[str, Any], int]] = []
    e = n
    while e in eps:
        try:
            meta, size = read_meta(journal / undo_name(e))
        except (JournalCorrupt, FileNotFoundError):
            break  # dropped meanwhile, or damaged: older points are not readable
        if int(meta.get("generation", 1)) != gen:
            break  # made before a promote: another history under the same epoch numbers
        chain.append((e, meta, size))
        e -= 1
    labels = read_labels(vol_dir)
    t = float(st.get("epoch_time", 0.0))
    group = _group_of(st.get("cut"))
    points = [Point(n, t, 0, 0, labels.get(n), True, max(t, float(st.get("epoch_until", 0.0))),
                    group, max(t, read_held(vol_dir, n)) if group else 0.0)]
    keep = 0
    for e, meta, size in chain:
        keep += size
        t = float(meta.get("base_time", 0.0))
        group = _group_of(meta.get("base_cut"))
        points.append(Point(e - 1, t, size, keep, labels.get(e - 1), False,
                            max(t, float(meta.get("base_until", 0.0))), group,
                            keep_time(meta) if group else 0.0))
    points.reverse()
    return points


# -- cuts of consistency groups (groups.py): how long a point is known to have held -----------

HELD = "held.json"


def _group_of(cut: Any) -> str | None:
    return (cut.get("group") or None) if isinstance(cut, dict) else None


def keep_time(meta: dict[str, Any]) -> float:
    """Until when point E-1 of undo file E's meta is needed, for retention by age: its capture
    time, or for a group cut the last instant it is known to have held (so a group's cuts
    age out together, whichever member captured its state earlier)."""
    t = float(meta.get("base_time", 0.0))
    if _group_of(meta.get("base_cut")) is None:
        return t
    cut = meta.get("cut")
    since = float(cut.get("since", 0.0)) if isinstance(cut, dict) else 0.0
    return max(t, since, float(meta.get("base_held", 0.0)))


def read_held(vol_dir: Path, epoch: int) -> float:
    """When the source last said the replica still equalled `epoch` (0: never, or not that epoch)."""
    try:
        raw = read_json(vol_dir / HELD)
        return float(raw["time"]) if int(raw["epoch"]) == epoch else 0.0
    except (OSError, ValueError, TypeError, KeyError):
        return 0.0


def note_held(vol_dir: Path, epoch: int, when: float) -> None:
    """Record that the source held epoch `epoch` through `when` (message Current). Not fsync'd:
    losing it only makes the group's newest common cut older until the next note."""
    if read_held(vol_dir, epoch) < when:
        try:
            atomic_write_json(vol_dir / HELD, {"epoch": epoch, "time": when}, sync=False)
        except OSError as exc:
            log.warning("%s: cannot record that epoch %d held (%s)", vol_dir / HELD, epoch, exc)


def find_point(points: list[Point], at: float) -> Point | None:
    """The newest point captured at or before `at`: none of its writes finished after `at`.

    A point read over a period (a scan without snapshot or quiesce hook) qualifies once its
    reads ended (`until`), not at its start. Point 0 is the empty replica before the first
    epoch: nothing was captured, so it is never the answer (`--at` before the first epoch
    finds no point).
    """
    best = None
    for p in points:
        if p.epoch > 0 and max(p.time, p.until) <= at:
            best = p
    return best


def empty_point_message(volume: str, points: list[Point]) -> str:
    """Why point 0 cannot be drilled or promoted: it is the replica before the first epoch,
    nothing was replicated into it."""
    first = next((p for p in points if p.epoch > 0), None)
    then = ("nothing is replicated yet: wait for the first seed to finish (`cdp status`)"
            if first is None else f"the first restorable point is {first.epoch}, captured "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(first.time))}")
    return (f"point 0 of {volume} is the empty replica before the first epoch: nothing was "
            f"replicated into it; {then}")
