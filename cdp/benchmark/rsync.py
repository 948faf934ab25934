"""rsync on the same data, side by side: a local rsync daemon on 127.0.0.1 and a client run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cdp.benchmark.procs import free_port, peak_rss, spawn, stop_all, wait_port
from cdp.errors import UsageError
from cdp.proccpu import cpu_seconds

# --ignore-times: rsync's quick check compares mtimes in whole seconds, so an image rewritten
# within the second of the previous run would be skipped (and found unequal); always delta.
RSYNC_ARGS = ["--inplace", "--no-whole-file", "-B", "65536", "--times", "--ignore-times", "--stats"]


@dataclass
class RsyncRun:
    seconds: float
    wire: int
    cpu_client: float
    cpu_daemon: float
    peak_client: int
    peak_daemon: int


class RsyncDaemon:
    """`rsync --daemon` serving one writable module on 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        if shutil.which("rsync") is None:
            raise UsageError("--compare rsync needs rsync (apt-get install rsync)")
        self.root = root
        self.dest = root / "dest"
        self.dest.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = root / "rsyncd.conf"
        conf.write_text(f"port = {self.port}\naddress = 127.0.0.1\nuse chroot = false\n"
                        f"pid file = {root / 'rsyncd.pid'}\n[bench]\npath = {self.dest}\n"
                        "read only = false\nuid = root\ngid = root\n")
        self.proc = spawn(["rsync", "--daemon", "--no-detach", f"--config={conf}"],
                          name="rsync daemon", stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)

    def run(self, image: Path) -> RsyncRun:
        """One client run pushing `image`; CPU of both sides, bytes on the wire."""
        daemon_cpu = cpu_seconds(self.proc.pid)
        url = f"rsync://127.0.0.1:{self.port}/bench/{image.name}"
        t0 = time.perf_counter()
        proc = spawn(["rsync", *RSYNC_ARGS, str(image), url], stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT)
        out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"rsync failed with status {proc.returncode}: {out[-500:]}")
        time.sleep(0.05)  # let the daemon reap its worker so its CPU is counted
        sent = _stat(out, "Total bytes sent")
        received = _stat(out, "Total bytes received")
        return RsyncRun(seconds, sent + received, usage.ru_utime + usage.ru_stime,
                        cpu_seconds(self.proc.pid) - daemon_cpu, usage.ru_maxrss * 1024,
                        peak_rss(self.proc.pid))

    def stop(self) -> None:
        stop_all([self.proc])


def _stat(out: str, label: str) -> int:
    m = re.search(label + r":\s*([\d,.]+)", out)
    return int(m.group(1).replace(",", "").replace(".", "")) if m else 0

