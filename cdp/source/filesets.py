"""The source side of file sets: watch small files, send each changed one whole.

A file set names files and folders (everything under a folder belongs to it).
On every connection each set is opened (FileOpen); the receiver answers with
the latest version it holds of each live file (hash and mode). The source then
checks the set (on watchdog events and every `scan_interval`): a file whose
content or mode differs from the receiver's goes as FilePut (zstd, xxh3-128,
mtime, mode), a file the receiver holds that is gone goes as FileDelete. One
request at a time per set; the receiver acknowledges each once it is durable.

Names on the wire: a file's absolute path at the source without the leading
"/" (e.g. "etc/libvirt/qemu/vm1.xml"), so names never collide and a restore
shows where a file came from.

Refused, with an error logged once naming the file and the reason (the rest
of the set goes on, and the receiver keeps what it already holds):
- files larger than the set's max_file_size (default 16 MiB);
- devices, sockets, FIFOs: only regular files are replicated (a FIFO is never
  opened, so a check can never hang on one);
- symlinks found inside a folder that point outside the set or at anything
  but a regular file; a symlink that points at a regular file inside the set is
  sent with that file's content under the link's own name. A path listed
  in `paths` itself is always followed (e.g. a config that is a symlink).

Symlinks are resolved once, by the walk, and never again: a file is read by
opening each component below the listed path it lies in with O_NOFOLLOW
(the last one also O_NONBLOCK, so a FIFO swapped in cannot hang the read),
then checked with fstat to be a regular file. A folder or file replaced by a
symlink between the walk and the read is refused for that check, not
followed: whoever can write inside a set cannot make cdp read outside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

import xxhash
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from cdp.blocks import unpack_u64
from cdp.codec import compress
from cdp.config import FilesetConfig
from cdp.errors import CdpError, ProtocolError
from cdp.ratelimit import TokenBucket, take
from cdp.tracker.watch import WRITE_EVENTS
from cdp.units import format_bytes
from cdp.wire.messages import FileAck, FileDelete, FileError, FileOpen, FileOpened, FilePut, Message
from cdp.wire.session import valid_file_path
from cdp.wire.transport import Link

log = logging.getLogger(__name__)
REPLIES = (FileOpened, FileAck, FileError)
SETTLE = 0.1  # after an event, let the writer finish before reading
FRAME_SLACK = 64 * 1024  # frame bytes beyond the compressed content (names, fields)


@dataclass(frozen=True)
class Found:
    """A regular file of the set: its name on the wire and where to read it."""

    name: str
    real: str
    key: tuple[int, ...]  # (dev, ino, size, mtime_ns, ctime_ns, mode): unchanged -> same hash
    size: int
    mtime: float
    mode: int
    root: str = ""  # the resolved listed path `real` lies in: read from there, never following links


def wire_name(path: str) -> str:
    return os.path.abspath(path).lstrip("/")


def _inside(real: str, roots: list[str]) -> bool:
    return any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots)


def walk(fs: FilesetConfig) -> tuple[dict[str, Found], dict[str, str]]:
    """The regular files of a set now, and the refused paths with the reason for each."""
    found: dict[str, Found] = {}
    refused: dict[str, str] = {}
    roots = [os.path.realpath(p) for p in fs.paths]

    def consider(path: str, follow: bool) -> None:
        name = wire_name(path)
        got = _look(path, name, follow, roots, fs.max_file_size)
        if isinstance(got, Found):
            found[name] = got
        elif got is not None:
            refused[name] = got

    for entry in fs.paths:
        top = os.path.abspath(entry)
        if os.path.isdir(top):
            for d, dirs, files in os.walk(top, followlinks=False):
                for fname in sorted(files) + sorted(x for x in dirs
                                                    if os.path.islink(os.path.join(d, x))):
                    consider(os.path.join(d, fname), False)
        elif os.path.lexists(top):
            consider(top, True)
    return found, refused


def _look(path: str, name: str, follow: bool, roots: list[str],
          max_file_size: int) -> Found | str | None:
    """`path` as a file of the set (found under `name`), or why it is refused, or None if it is
    gone. A symlink is followed if `follow` (a listed path) or if it stays inside `roots`."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8"
    if not valid_file_path(name):
        return "its name cannot be stored (empty parts or backslashes)"
    try:
        st = os.lstat(path)
        real = path
        if stat.S_ISLNK(st.st_mode):
            real = os.path.realpath(path)
            if not follow and not _inside(real, roots):
                return (f"symlink pointing outside the file set (to {real}); "
                        "add its target to the set's paths instead")
            st = os.stat(real)
    except FileNotFoundError:
        return None  # gone meanwhile (or a dangling symlink): not part of the set now
    except OSError as exc:
        return f"cannot read it: {exc.strerror}"
    root = next((r for r in roots if _inside(real, [r])), None)
    if root is None:  # a listed path (trusted), or something moved under the walk
        real = os.path.realpath(real)
        root = next((r for r in roots if _inside(real, [r])), None)
        if root is None:
            return "it moved outside the file set while being looked at"
    kind = _kind(st.st_mode)
    if kind:
        return f"it is {kind}, not a regular file: only regular files are replicated"
    if st.st_size > max_file_size:
        return (f"it is {format_bytes(st.st_size)}, over the set's max_file_size "
                f"of {format_bytes(max_file_size)} (raise max_file_size to include it)")
    return Found(name, real, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                              st.st_mode),
                 st.st_size, st.st_mtime, stat.S_IMODE(st.st_mode), root)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return ""
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder reached through a symlink"
    return "a special file"


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_below(root: str, real: str) -> int:
    """Open real, which lies in root, one component at a time: a symlink on the way raises ELOOP.

    root is a resolved path from the configuration, trusted as it stands.
    """
    rel = os.path.relpath(real, root) if real != root else ""
    if not rel:
        return os.open(root, _FILE_FLAGS)
    parts = rel.split(os.sep)
    if ".." in parts:
        raise OSError(errno.EXDEV, "outside the file set")
    dfd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, _DIR_FLAGS, dir_fd=dfd)
            os.close(dfd)
            dfd = nfd
        return os.open(parts[-1], _FILE_FLAGS, dir_fd=dfd)
    finally:
        os.close(dfd)


def read_file(f: Found, limit: int) -> tuple[bytes, bytes, int] | str:
    """(content, hash, mode) of a regular file, or why it cannot be sent now."""
    try:
        fd = _open_below(f.root or f.real, f.real)
    except FileNotFoundError:
        return "gone"
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
            return ("it, or a folder on its way, was replaced by a symlink (or moved) since the "
                    "set was walked; symlinks are never followed out of the set")
        return f"cannot read it: {exc.strerror}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced by something else since the walk
            return f"it is {_kind(st.st_mode)}, not a regular file"
        chunks = []
        total = 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > limit:
                return f"it grew over the set's max_file_size of {format_bytes(limit)}"
            chunks.append(chunk)
        data = b"".join(chunks)
    except OSError as exc:
        return f"cannot read it: {exc.strerror}"
    finally:
        os.close(fd)
    return data, xxhash.xxh3_128_digest(data), stat.S_IMODE(st.st_mode)


class _SetState:
    def __init__(self, cfg: FilesetConfig) -> None:
        self.cfg = cfg
        self.wake = asyncio.Event()
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.remote: dict[str, tuple[bytes, int]] = {}  # name -> (hash, mode) the receiver holds
        self.hashed: dict[str, tuple[tuple[int, ...], bytes]] = {}  # name -> (stat key, hash)
        self.refused: dict[str, str] = {}  # logged refusals, so each is logged once
        self.rejected: dict[str, bytes] = {}  # name -> content the receiver refused: not resent
        self.stats = {"sent": 0, "deleted": 0, "refusals": 0, "bytes": 0}


class FilesetSync:
    """Every file set of a source; one task per set per connection."""

    def __init__(self, filesets: tuple[FilesetConfig, ...]) -> None:
        self.sets = {fs.name: _SetState(fs) for fs in filesets}
        self._observer: BaseObserver | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch the sets' files and folders; a change wakes its set's check."""
        if not self.sets:
            return
        obs = Observer()
        for st in self.sets.values():
            wake = st.wake

            def poke(wake: asyncio.Event = wake) -> None:
                loop.call_soon_threadsafe(wake.set)

            for p in st.cfg.paths:
                top = os.path.abspath(p)
                target, recursive = (top, True) if os.path.isdir(top) else (
                    os.path.dirname(top), False)
                if os.path.isdir(target):
                    obs.schedule(_Handler(poke), target, recursive=recursive)
        try:
            obs.start()
            self._observer = obs
        except OSError as exc:
            log.warning("file watching unavailable for file sets (%s); they are checked every "
                        "scan_interval only", exc)

    def stop(self) -> None:
        if self._observer is not None and self._observer.is_alive():
            self._observer.stop()
            self._observer.join(5)

    def status(self) -> list[dict[str, object]]:
        """Per set, for the source's status.json: files the receiver holds, refusals, counts."""
        return [{"fileset": name, "files": len(st.remote), "refused": dict(st.refused),
                 **st.stats} for name, st in self.sets.items()]

    def deliver(self, msg: Message) -> None:
        """An answer from the receiver (the source's reader task hands them over)."""
        st = self.sets.get(getattr(msg, "fileset", ""))
        if st is not None:
            st.inbox.put_nowait(msg)

    async def run(self, link: Link, bucket: TokenBucket) -> None:
        """Replicate every set over this connection until it ends."""
        if not self.sets:
            return
        async with asyncio.TaskGroup() as tg:
            for st in self.sets.values():
                tg.create_task(self._session(link, bucket, st))

    async def _answer(self, st: _SetState, kind: type[Message]) -> Message:
        msg = await st.inbox.get()
        if not isinstance(msg, kind | FileError):
            raise ProtocolError(f"file set {st.cfg.name}: expected {kind.__name__}, got "
                                f"{type(msg).__name__}")
        return msg

    async def _session(self, link: Link, bucket: TokenBucket, st: _SetState) -> None:
        name = st.cfg.name
        while not st.inbox.empty():
            st.inbox.get_nowait()  # answers from an earlier connection
        await link.send(FileOpen(name))
        opened = await self._answer(st, FileOpened)
        if isinstance(opened, FileError):
            log.error("file set %s refused by the receiver (%s): %s; the other sets and volumes "
                      "go on", name, opened.code, opened.message)
            return
        assert isinstance(opened, FileOpened)
        modes = unpack_u64(opened.modes, "modes")
        st.remote = {p: (opened.hashes[i * 16:(i + 1) * 16], modes[i])
                     for i, p in enumerate(opened.paths)}
        log.info("file set %s opened: the receiver holds %d file(s)", name, len(st.remote))
        limit = min(st.cfg.max_file_size, link.session.max_frame - FRAME_SLACK)
        while True:
            st.wake.clear()
            try:
                await self._check(link, bucket, st, limit)
            except _SetStopped as exc:
                log.error("%s; the other sets and volumes go on", exc)
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(st.cfg.scan_interval):
                    await st.wake.wait()
            await asyncio.sleep(SETTLE)

    async def _check(self, link: Link, bucket: TokenBucket, st: _SetState, limit: int) -> None:
        name = st.cfg.name
        found, refused = await asyncio.to_thread(walk, st.cfg)
        for path, reason in refused.items():
            if st.refused.get(path) != reason:
                st.refused[path] = reason
                st.stats["refusals"] += 1
                log.error("file set %s: refusing %s: %s; the rest of the set goes on", name,
                          "/" + path, reason)
        for path in list(st.refused):
            if path not in refused and path not in found:
                del st.refused[path]
        for path, f in found.items():
            cached = st.hashed.get(path)
            have = st.remote.get(path)
            if cached and cached[0] == f.key and have == (cached[1], f.mode):
                continue  # unchanged since we last read it, and the receiver holds it
            capture = time.time()
            got = await asyncio.to_thread(read_file, f, limit)
            if isinstance(got, str):
                if got != "gone" and st.refused.get(path) != got:
                    st.refused[path] = got
                    log.error("file set %s: refusing %s: %s; the rest of the set goes on",
                              name, "/" + path, got)
                continue
            data, digest, mode = got
            st.hashed[path] = (f.key, digest)
            if have == (digest, mode) or st.rejected.get(path) == digest:
                continue
            zdata = await asyncio.to_thread(compress, data, 3)
            if len(zdata) + len(path) + FRAME_SLACK > link.session.max_frame:
                reason = "it does not fit in one frame even compressed (raise max_frame)"
                if st.refused.get(path) != reason:
                    st.refused[path] = reason
                    log.error("file set %s: refusing %s: %s", name, "/" + path, reason)
                continue
            msg = FilePut(name, path, digest, len(data), f.mtime, mode, capture, zdata)
            if await self._request(link, bucket, st, msg, len(zdata)):
                st.rejected.pop(path, None)
                st.remote[path] = (digest, mode)
                st.stats["sent"] += 1
                st.stats["bytes"] += len(data)
        for path in sorted(set(st.remote) - set(found) - set(refused)):
            if await self._request(link, bucket, st, FileDelete(name, path, time.time()), 0):
                del st.remote[path]
                st.hashed.pop(path, None)
                st.stats["deleted"] += 1

    async def _request(self, link: Link, bucket: TokenBucket, st: _SetState,
                       msg: FilePut | FileDelete, nbytes: int) -> bool:
        await take(bucket, nbytes + 64 + len(msg.path))
        await link.send(msg)
        ans = await self._answer(st, FileAck)
        if isinstance(ans, FileError):
            if not ans.path:
                raise _SetStopped(f"file set {st.cfg.name} stopped by the receiver: "
                                  f"{ans.message}")
            log.error("file set %s: the receiver refused %s (%s): %s", st.cfg.name,
                      "/" + msg.path, ans.code, ans.message)
            if isinstance(msg, FilePut) and ans.code not in ("disk_full", "replica"):
                st.rejected[msg.path] = msg.hash  # the same content would be refused again
            return False
        assert isinstance(ans, FileAck)
        log.info("file set %s: %s %s (version %d)", st.cfg.name,
                 "sent" if isinstance(msg, FilePut) else "deleted", "/" + msg.path, ans.version)
        return True


class _SetStopped(CdpError):
    """The receiver closed a file set (FileError without a path)."""


class _Handler(FileSystemEventHandler):
    def __init__(self, poke: Callable[[], None]) -> None:
        self.poke = poke

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in WRITE_EVENTS:
            self.poke()
