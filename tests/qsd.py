"""A real qemu-storage-daemon for the qemu-mode tests: a qcow2 image, a QMP monitor and (optionally)
an NBD server with a writable export that qemu-io writes through, as a guest would.

Tests that use it skip when qemu-storage-daemon, qemu-io or qemu-img are not installed
(Debian: qemu-system-common, qemu-utils).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import scaled, wait_for

NODE = "disk0"

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None or shutil.which("qemu-io") is None
    or shutil.which("qemu-img") is None,
    reason="qemu-storage-daemon/qemu-io/qemu-img not on PATH (apt-get install qemu-system-common qemu-utils)",
)


@dataclass
class Qsd:
    image: Path
    qmp: Path
    nbd: Path
    log: Path
    serve_nbd: bool = True  # an NBD server with the writable export `NODE` on `nbd`
    proc: subprocess.Popen[bytes] | None = None

    def write(self, *commands: str, timeout: float = 30) -> None:
        """qemu-io commands through the writable export, like a guest's writes."""
        args = ["qemu-io", "-f", "raw", f"nbd+unix:///{NODE}?socket={self.nbd}"]
        for c in commands:
            args += ["-c", c]
        r = subprocess.run(args, capture_output=True, text=True, timeout=scaled(timeout))
        assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr

    def start(self) -> None:
        for s in (self.qmp, self.nbd):
            s.unlink(missing_ok=True)
        args = ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=file0,filename={self.image}",
                "--blockdev", f"driver=qcow2,node-name={NODE},file=file0",
                "--chardev", f"socket,path={self.qmp},server=on,wait=off,id=qmp0",
                "--monitor", "chardev=qmp0"]
        if self.serve_nbd:
            args += ["--nbd-server", f"addr.type=unix,addr.path={self.nbd}",
                     "--export", f"type=nbd,id=exp0,node-name={NODE},name={NODE},writable=on"]
        self.proc = proc = subprocess.Popen(args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        wait_for(lambda: (self.qmp.exists() and (self.nbd.exists() or not self.serve_nbd))
                 or proc.poll() is not None, timeout=scaled(15), what="qemu-storage-daemon's sockets")
        assert proc.poll() is None, self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM (qemu-storage-daemon then closes its images cleanly, storing persistent bitmaps);
        SIGKILL if it does not go (or at once with sig=SIGKILL)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=scaled(10))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=scaled(10))


@contextmanager
def running_qsd(tmp_path: Path, size: int, *, serve_nbd: bool = True) -> Iterator[Qsd]:
    """A fresh qcow2 image of `size` bytes served by a started qemu-storage-daemon."""
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)], check=True,
                   timeout=scaled(30))
    sock_dir = Path(tempfile.mkdtemp(prefix="cdpqsd", dir="/tmp"))  # short: Unix socket paths are
    q = Qsd(image, sock_dir / "qmp.sock", sock_dir / "nbd.sock", tmp_path / "qsd.log",  # at most 107 bytes
            serve_nbd=serve_nbd)
    try:
        q.start()
        yield q
    finally:
        q.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
