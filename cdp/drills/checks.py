"""Checks a failover drill runs on a clone: does it open as an image, do its file systems check?

- image: `qemu-img check` (qcow2) or `qemu-img info` (raw) must succeed.
- ext2/3/4 file systems, on the whole disk or in MBR / GPT partitions (the
  tables are parsed here; no root, no loop devices): `e2fsck -fn` on
  ``raw?offset=N`` (e2fsprogs' unix I/O manager reads at that offset), which
  reads only, so the base stays untouched.
- the user's commands (`--check CMD`), with the clone's path in CDP_CLONE
  and as the last argument (or where `{}` stands).
"""

from __future__ import annotations

import os
import shlex
import shutil
import struct
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cdp.drills.clone import Clone

EXT_MAGIC_AT = 1024 + 56
EXT_MAGIC = b"\x53\xef"
EXTENDED = (0x05, 0x0F, 0x85)
TAIL = 2000  # characters of output kept per check


@dataclass(frozen=True)
class CheckResult:
    name: str
    result: str  # "pass", "fail" or "skip"
    output: str  # the tail of what the check printed
    seconds: float

    @property
    def failed(self) -> bool:
        return self.result == "fail"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Partition:
    name: str  # "disk" for the whole image, else "p1", "p2", ...
    offset: int
    length: int


def _tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= TAIL else "..." + text[-TAIL:]


def _run(name: str, argv: list[str], timeout: float, env: dict[str, str] | None = None,
         ok: tuple[int, ...] = (0,), shell: bool = False) -> CheckResult:
    t0 = time.monotonic()
    try:
        r = subprocess.run(argv[0] if shell else argv, shell=shell, capture_output=True,
                           text=True, errors="replace", timeout=timeout, env=env,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (
            exc.stdout or "")
        return CheckResult(name, "fail", _tail(f"{out}\ntimed out after {timeout:.0f}s"),
                           time.monotonic() - t0)
    except OSError as exc:
        return CheckResult(name, "fail", f"cannot run {argv[0]}: {exc.strerror}",
                           time.monotonic() - t0)
    out = _tail((r.stdout or "") + (r.stderr or "") + f"\n(exit status {r.returncode})")
    return CheckResult(name, "pass" if r.returncode in ok else "fail", out, time.monotonic() - t0)


# -- partition tables --------------------------------------------------------------


def partitions(path: Path) -> list[Partition]:
    """Partitions from an MBR or GPT table (512-byte sectors); [] if there is none."""
    with open(path, "rb") as fh:
        head = fh.read(34 * 512)
        size = os.fstat(fh.fileno()).st_size
        if len(head) < 1024 or head[510:512] != b"\x55\xaa":
            return []
        entries = [struct.unpack_from("<B3xB3xII", head, 446 + 16 * i) for i in range(4)]
        if any(t == 0xEE for _, t, _, _ in entries):
            return _gpt(fh, head, size)
    out = []
    for i, (_, ptype, start, count) in enumerate(entries, 1):
        if ptype == 0 or ptype in EXTENDED or count == 0:
            continue  # logical partitions inside an extended one are not looked at
        off, length = start * 512, count * 512
        if off < size:
            out.append(Partition(f"p{i}", off, min(length, size - off)))
    return out


def _gpt(fh: Any, head: bytes, size: int) -> list[Partition]:
    if head[512:520] != b"EFI PART":
        return []
    entry_lba, count, esize = struct.unpack_from("<QII", head, 512 + 72)
    if esize < 128 or count > 1024:
        return []
    fh.seek(entry_lba * 512)
    table = fh.read(count * esize)
    out = []
    for i in range(len(table) // esize):
        e = table[i * esize:(i + 1) * esize]
        if e[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", e, 32)
        off = first * 512
        if off < size and last >= first:
            out.append(Partition(f"p{i + 1}", off, min((last - first + 1) * 512, size - off)))
    return out


def filesystems(path: Path) -> list[Partition]:
    """Where ext2/3/4 file systems start: the whole disk, or partitions."""
    candidates = [Partition("disk", 0, path.stat().st_size), *partitions(path)]
    found = []
    with open(path, "rb") as fh:
        for p in candidates:
            fh.seek(p.offset + EXT_MAGIC_AT)
            if fh.read(2) == EXT_MAGIC:
                found.append(p)
    return found


# -- the checks -------------------------------------------------------------------------


def image_check(clone: Clone, timeout: float) -> CheckResult:
    if shutil.which("qemu-img") is None:
        t0 = time.monotonic()
        ok = clone.path.exists() and clone.path.stat().st_size > 0
        return CheckResult("image", "pass" if ok else "fail",
                           "qemu-img not installed: checked only that the raw clone is there",
                           time.monotonic() - t0)
    if clone.format == "qcow2":
        return _run("image (qemu-img check)",
                    ["qemu-img", "check", "-f", "qcow2", str(clone.path)], timeout)
    return _run("image (qemu-img info)", ["qemu-img", "info", "-f", "raw", str(clone.path)],
                timeout)


def fsck_checks(clone: Clone, timeout: float) -> list[CheckResult]:
    try:
        found = filesystems(clone.raw)
    except OSError as exc:
        return [CheckResult("file systems", "fail", f"cannot read the clone: {exc}", 0.0)]
    if not found:
        return [CheckResult("file systems", "skip",
                            "no ext2/3/4 file system found on the disk or in MBR/GPT partitions",
                            0.0)]
    if shutil.which("e2fsck") is None:
        return [CheckResult("file systems", "skip", "e2fsck not installed (e2fsprogs)", 0.0)]
    out = []
    for p in found:
        target = str(clone.raw) if p.offset == 0 else f"{clone.raw}?offset={p.offset}"
        # 0: clean; 4: errors left (with -n nothing is fixed); 8+: could not check
        out.append(_run(f"e2fsck {p.name} (offset {p.offset})", ["e2fsck", "-fn", target],
                        timeout, env={**os.environ, "LC_ALL": "C"}))
    return out


def user_check(cmd: str, clone: Clone, env: dict[str, str], timeout: float) -> CheckResult:
    """The user's command through the shell, with the clone path as `{}` or last argument."""
    path = shlex.quote(str(clone.path))
    line = cmd.replace("{}", path) if "{}" in cmd else f"{cmd} {path}"
    return _run(f"check: {cmd}", [line], timeout, env={**os.environ, **env}, shell=True)


def run_checks(clone: Clone, commands: list[str], env: dict[str, str],
               timeout: float) -> list[CheckResult]:
    results = [image_check(clone, timeout)]
    results += fsck_checks(clone, timeout)
    results += [user_check(c, clone, env, timeout) for c in commands]
    return results
