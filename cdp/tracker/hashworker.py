"""A second process that hashes windows of a volume, so a rescan uses both cores.

xxhash holds the GIL for inputs of 64 KiB and less, so threads cannot hash 64 KiB blocks
in parallel: one process hashes at about one core's speed (~10 GB/s here from the page
cache). The scan hands every other window to this helper, which maps the same open file
(the scan's descriptor, passed once per scan over a Unix SOCK_SEQPACKET pair: the same
file, never a path that may have been replaced; passing it with every request cost more
than hashing the window) and answers with the windows' block hashes. The scan only uses
those hashes to find windows that did not change: a block they call changed is read and
hashed again in the scan's own process, so what is reported is always what it hashed
itself.

Messages: b"A" with one fd attaches that file (closing the one before); b"D" detaches
it; b"H" + 20 bytes (offset u64, length u64, block size u32, little-endian) asks for the
hashes of a window of the attached file, answered with length / block size hashes of 16
bytes (the last block may be short), or an empty message when the window could not be
mapped (the scan then hashes it itself). Only b"H" is answered.

The helper ends when its socket closes, so it never outlives the source, even one
killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator

import xxhash

from cdp.proccpu import cpu_seconds

log = logging.getLogger(__name__)
REQUEST = struct.Struct("<QQI")  # after b"H"
MAX_ANSWER = 1 << 20  # 64 Ki hashes: a 16 MiB window of 256-byte blocks


def map_window(fd: int, off: int, length: int) -> mmap.mmap:
    """[off, off+length) of fd, mapped read-only and shared, populated at once (the scan's
    windows and the helper's are mapped the same way)."""
    return mmap.mmap(fd, length, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), mmap.PROT_READ,
                     offset=off)


def hashes_of(fd: int, off: int, length: int, bs: int) -> bytes:
    """xxh3-128 (cdp.codec.block_hash; not imported, to keep this process light) of each block
    of [off, off+length) of fd, read through a shared mapping."""
    m = map_window(fd, off, length)
    try:
        with memoryview(m) as mv:
            h = xxhash.xxh3_128_digest
            return b"".join([h(mv[q:q + bs]) for q in range(0, length, bs)])
    finally:
        m.close()


def serve(sock: socket.socket) -> None:
    """Answer requests until the other end closes."""
    fd = -1
    try:
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(sock, 1 + REQUEST.size, 1)
            except OSError:
                return
            if not msg:
                return
            if msg[:1] in (b"A", b"D"):
                if fd >= 0:
                    os.close(fd)
                fd = fds.pop() if msg[:1] == b"A" and fds else -1
            for extra in fds:
                os.close(extra)
            if msg[:1] != b"H":
                continue
            try:
                off, length, bs = REQUEST.unpack(msg[1:])
                answer = hashes_of(fd, off, length, bs) if fd >= 0 and bs and length else b""
            except (OSError, ValueError, struct.error):
                answer = b""  # not mappable (or shrank): the scan hashes this window itself
            try:
                sock.send(answer)
            except OSError:
                return
    finally:
        if fd >= 0:
            os.close(fd)


class HashHelper:
    """The scan's side: one helper process, at most one window in flight."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "cdp.tracker.hashworker", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, close_fds=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.busy = False
        self.broken = False

    def attach(self, fd: int) -> None:
        """Hash windows of this file from now on (the scan's own descriptor)."""
        try:
            socket.send_fds(self.sock, [b"A"], [fd])
        except OSError as exc:
            self._fail(exc)

    def detach(self) -> None:
        """Let go of the file (the helper keeps nothing open between scans)."""
        if not self.broken:
            try:
                self.sock.send(b"D")
            except OSError as exc:
                self._fail(exc)

    def submit(self, off: int, length: int, bs: int) -> bool:
        """Ask for the hashes of one window; False if the helper cannot take it."""
        if self.broken or self.busy:
            return False
        try:
            self.sock.send(b"H" + REQUEST.pack(off, length, bs))
        except OSError as exc:
            self._fail(exc)
            return False
        self.busy = True
        return True

    def result(self) -> bytes | None:
        """The hashes of the window submitted last, or None (hash it yourself)."""
        assert self.busy
        self.busy = False
        try:
            answer = self.sock.recv(MAX_ANSWER)
        except OSError as exc:
            self._fail(exc)
            return None
        if not answer and self.proc.poll() is not None:
            self._fail(f"exited with status {self.proc.returncode}")
        return answer or None

    def cpu_seconds(self) -> float:
        """CPU time the helper has used so far (0 if it cannot be read)."""
        try:
            return cpu_seconds(self.proc.pid, children=False)
        except (OSError, ValueError):
            return 0.0

    def _fail(self, why: object) -> None:
        if not self.broken:
            log.warning("scan hash helper failed (%s); scans hash on one core", why)
        self.broken = True

    def close(self) -> None:
        self.sock.close()  # the helper reads EOF and ends
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class HashHelpers:
    """Helpers lent to scans, one per scan that runs at the same time, started on demand.

    At most `limit` exist (one less than the cores: the scan's own thread takes one).
    Thread-safe: scans run in worker threads.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = max(0, (os.cpu_count() or 1) - 1) if limit is None else limit
        self.idle: list[HashHelper] = []
        self.count = 0
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def lend(self) -> Iterator[HashHelper | None]:
        """A helper for the duration of one scan, or None if none is free."""
        helper = None
        with self.lock:
            if self.idle:
                helper = self.idle.pop()
            elif self.count < self.limit:
                self.count += 1
                try:
                    helper = HashHelper()
                except OSError as exc:
                    self.count -= 1
                    log.warning("cannot start the scan hash helper (%s); scans hash on one core", exc)
                    self.limit = 0
        try:
            yield helper
        finally:
            if helper is not None:
                if helper.busy:  # the scan stopped with a window in flight: take its answer
                    helper.result()
                helper.detach()
                with self.lock:
                    if helper.broken:
                        helper.close()
                        self.count -= 1
                    else:
                        self.idle.append(helper)

    def close(self) -> None:
        with self.lock:
            for h in self.idle:
                h.close()
            self.count -= len(self.idle)
            self.idle.clear()


if __name__ == "__main__":
    # Ctrl-C or a SIGTERM to the source's process group is the source's to handle: it
    # closes the socket when it stops, and that (or its death) ends this process.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    serve(socket.socket(fileno=int(sys.argv[1])))
