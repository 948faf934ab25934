"""Serve a Tree through libfuse (mfusepy) in the foreground until Ctrl-C, SIGTERM or SIGHUP.

libfuse installs its own handlers for those signals while its loop runs; on
any of them it leaves the loop and unmounts, and FUSE() returns. Mount
options: ro, nosuid, nodev (guest setuid bits and device nodes have no effect),
fsname "cdp:VOL", type fuse.cdp. No kernel_cache: the page cache is dropped at each
open, so a point that can no longer be read (EIO) is not served from memory.
Single-threaded: the point view and the parsers are not thread-safe, and one
reader at a time is what they are built for.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from cdp.errors import MountError
from cdp.mount.tree import Tree
from cdp.textsafe import printable

log = logging.getLogger(__name__)


def _fuse() -> Any:
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: load the fuse kernel module (modprobe fuse) or, in a "
                         "container, pass the device in (--device /dev/fuse)")
    try:
        import mfusepy
    except ImportError:
        raise MountError("cdp mount needs the Python package mfusepy: reinstall cdp from the checkout "
                         "(pip install .), which brings it") from None
    except OSError as exc:  # mfusepy loads libfuse at import
        raise MountError(f"cdp mount needs libfuse ({exc}): apt-get install fuse3") from None
    return mfusepy


def is_mounted(path: Path) -> bool:
    """Whether `path` is a mount point now (from /proc/self/mountinfo; os.path.ismount stats it,
    which would hang on a FUSE mount whose process is stuck)."""
    want = os.fsencode(os.path.realpath(path))
    try:
        with open("/proc/self/mountinfo", "rb") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return os.path.ismount(want)
    # the fifth field, with space, tab, newline and backslash written as \ooo
    unescape = re.compile(rb"\\([0-7]{3})")
    return any(unescape.sub(lambda m: bytes([int(m.group(1), 8)]), line.split()[4]) == want
               for line in lines if len(line.split()) > 4)


def check_mountpoint(path: Path) -> None:
    """Refuse early (exit 2), before a point is pinned or a snapshot fetched: no FUSE, or a
    mount point that is not an empty folder."""
    _fuse()
    if not path.is_dir():
        raise MountError(f"{printable(str(path))}: not a folder; create an empty folder to mount on")
    if is_mounted(path):
        raise MountError(f"{printable(str(path))}: something is mounted there already (fusermount3 -u "
                         "it first)")
    if any(path.iterdir()):
        raise MountError(f"{printable(str(path))}: not empty; mount on an empty folder")


def unmount(path: Path) -> bool:
    """Unmount a cdp mount that its process left behind (killed with SIGKILL); True if it went."""
    for tool in ("fusermount3", "fusermount"):
        try:
            r = subprocess.run([tool, "-u", "-z", str(path)], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return True
    return not is_mounted(path)


def serve(tree: Tree, mountpoint: Path, on_ready: Any = None) -> None:
    """Mount `tree` on `mountpoint` and serve it until a signal; unmounted when this returns."""
    mfusepy = _fuse()
    check_mountpoint(mountpoint)
    state = {"mounted": False}

    class Ops(mfusepy.Operations):  # type: ignore[name-defined]
        use_ns = True

        def init(self, path: str) -> None:
            state["mounted"] = True
            if on_ready is not None:
                on_ready()

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            return tree.getattr(path)

        def readdir(self, path: str, fh: int) -> list[str]:
            return tree.readdir(path)

        def readlink(self, path: str) -> str:
            return tree.readlink(path)

        def open(self, path: str, flags: int) -> int:
            return tree.open(path, flags)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return tree.read(path, size, offset, fh)

        def release(self, path: str, fh: int) -> int:
            tree.release(fh)
            return 0

        def statfs(self, path: str) -> dict[str, int]:
            size = tree.opened.image.size
            return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": (size + 4095) // 4096, "f_bfree": 0,
                    "f_bavail": 0, "f_files": 0, "f_ffree": 0, "f_namemax": 255}

    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in tree.opened.volume)
    t0 = time.monotonic()
    try:
        mfusepy.FUSE(Ops(), str(mountpoint), foreground=True, nothreads=True, ro=True, nosuid=True,
                     nodev=True, fsname=f"cdp:{name}", subtype="cdp")
    except RuntimeError as exc:
        # libfuse's fuse_main: nonzero after its loop when a signal stopped it (it has unmounted
        # by then); before init, the mount itself failed and libfuse said why on stderr
        if not state["mounted"]:
            raise MountError(f"{printable(str(mountpoint))}: the FUSE mount failed (libfuse code "
                             f"{exc}; its reason is printed above)") from None
    finally:
        tree.close()
    if is_mounted(mountpoint) and not unmount(mountpoint):
        raise MountError(f"{printable(str(mountpoint))}: still mounted after the end; run "
                         f"fusermount3 -u {printable(str(mountpoint))}")
    log.info("unmounted %s after %.0fs", printable(str(mountpoint)), time.monotonic() - t0)

