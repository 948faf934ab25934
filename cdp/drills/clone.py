"""Writable clones of a recovery point, made without pausing replication.

The point is copied out of a PointView into a sparse raw file (all-zero
chunks stay holes). With qemu-img the clone is a qcow2 overlay over that
copy (`point.raw` stays read-only, writes go to `clone.qcow2`), which is
what a test VM would boot; without it the raw copy is the clone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cdp.durable import DIR_MODE, make_private_dir
from cdp.errors import ConfigError, DrillError
from cdp.replica.pointview import PointView

CHUNK = 4 * 1024 * 1024
_ZERO = bytes(CHUNK)


@dataclass(frozen=True)
class Clone:
    dir: Path
    path: Path  # what to boot: the qcow2 overlay, or the raw copy
    raw: Path  # the point's content as a raw image (the overlay's backing file)
    format: str  # "qcow2" or "raw"

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def resolve_format(fmt: str) -> str:
    """"auto" -> qcow2 where qemu-img is installed, else raw."""
    have = shutil.which("qemu-img") is not None
    if fmt == "auto":
        return "qcow2" if have else "raw"
    if fmt == "qcow2" and not have:
        raise ConfigError("qcow2 clones need qemu-img (install qemu-utils) or use --format raw")
    if fmt not in ("qcow2", "raw"):
        raise ConfigError(f"clone format {fmt!r}: expected auto, qcow2 or raw")
    return fmt


def copy_point(view: PointView, dest: Path) -> int:
    """Write the point into a new sparse raw file; returns the bytes of data written."""
    written = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, view.size)
        off = 0
        while off < view.size:
            data = view.read(off, CHUNK)
            if data != _ZERO[:len(data)]:
                os.pwrite(fd, data, off)
                written += len(data)
            off += len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def make_clone(view: PointView, dest_dir: Path, fmt: str) -> Clone:
    """A writable clone of the view's point in a new folder `dest_dir`."""
    fmt = resolve_format(fmt)
    try:
        make_private_dir(dest_dir.parent)
        os.mkdir(dest_dir, DIR_MODE)  # a copy of the disk: cdp's user only, whatever the umask
    except OSError as exc:
        raise DrillError(f"cannot create the clone folder {dest_dir}: {exc.strerror}") from None
    raw = dest_dir / ("point.raw" if fmt == "qcow2" else "clone.raw")
    try:
        copy_point(view, raw)
        if fmt == "raw":
            return Clone(dest_dir, raw, raw, "raw")
        os.chmod(raw, 0o444)  # the overlay's backing file: nothing writes it
        overlay = dest_dir / "clone.qcow2"
        r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                            str(raw), str(overlay)], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=120)
        if r.returncode != 0:
            raise DrillError(f"qemu-img create failed: {(r.stderr or r.stdout).strip()}")
        return Clone(dest_dir, overlay, raw, "qcow2")
    except OSError as exc:
        shutil.rmtree(dest_dir, ignore_errors=True)
        raise DrillError(f"cannot write the clone in {dest_dir}: {exc}") from None
    except BaseException:
        shutil.rmtree(dest_dir, ignore_errors=True)
        raise
