"""Write throughput of NBD servers serving one raw file, driven by the same client (fio).

    python3 bench/nbd_server.py                    # every server, every workload, ~5 s each
    python3 bench/nbd_server.py --seconds 3 --servers cdp,qemu-nbd

Servers: `qemu-nbd` (the C baseline), `cdp` (cdp.nbd.server.NbdServer with a
no-op tracker, in its own process), `nbdkit-py` (nbdkit's python plugin with a
trivial pread/pwrite plugin) and `nbdkit-file` (nbdkit's C file plugin, for
scale). The client is fio's libnbd engine (`--ioengine=nbd`), one connection,
queue depth 16, on 127.0.0.1; the image lives in a temporary folder (page
cache, no flushes), so the figures measure the servers, not the disk.

Workloads: 4 KiB random writes, 64 KiB random writes, 1 MiB sequential writes.
Prints a table of MB/s (10^6 bytes/s) and IOPS. Needs fio, qemu-nbd, nbdkit
and nbdkit-plugin-python; a missing tool skips its rows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

IMAGE_SIZE = 256 * 1024 * 1024
WORKLOADS = {
    "4k-randwrite": ("randwrite", "4k"),
    "64k-randwrite": ("randwrite", "64k"),
    "1m-seqwrite": ("write", "1m"),
}
SERVERS = ("qemu-nbd", "cdp", "nbdkit-py", "nbdkit-file")

NBDKIT_PLUGIN = '''
import os
import nbdkit

API_VERSION = 2
path = None


def config(key, value):
    global path
    if key != "file":
        raise RuntimeError("unknown parameter " + key)
    path = value


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return os.open(path, os.O_RDWR)


def close(h):
    os.close(h)


def get_size(h):
    return os.fstat(h).st_size


def can_flush(h):
    return True


def pread(h, buf, offset, flags):
    buf[:] = os.pread(h, len(buf), offset)


def pwrite(h, buf, offset, flags):
    os.pwrite(h, buf, offset)


def flush(h, flags):
    os.fdatasync(h)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def serve_cdp(image: str, port: int, inline_max: int | None) -> None:
    """Child process: NbdServer with a no-op tracker until SIGTERM."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from cdp.nbd.server import INLINE_MAX, NbdServer

    class NoopTracker:
        async def before_change(self, offset: int, length: int) -> None:
            pass

        def changed(self, offset: int, length: int) -> None:
            pass

        async def flushed(self) -> None:
            pass

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with NbdServer(image, export="", host="127.0.0.1", port=port, tracker=NoopTracker(),
                             inline_max=INLINE_MAX if inline_max is None else inline_max):
            await stop.wait()

    asyncio.run(main())


def server_command(name: str, image: Path, port: int, tmp: Path,
                   inline_max: int | None = None) -> list[str] | None:
    if name == "qemu-nbd":
        if not shutil.which("qemu-nbd"):
            return None
        return ["qemu-nbd", "-f", "raw", "-t", "-b", "127.0.0.1", "-p", str(port), "--cache=writeback",
                "--aio=threads", str(image)]
    if name == "cdp":
        extra = [] if inline_max is None else ["--inline-max", str(inline_max)]
        return [sys.executable, __file__, "--serve-cdp", str(image), str(port), *extra]
    if name in ("nbdkit-py", "nbdkit-file"):
        if not shutil.which("nbdkit"):
            return None
        base = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port)]
        if name == "nbdkit-file":
            return [*base, "file", f"file={image}"]
        plugin = tmp / "fileplugin.py"
        plugin.write_text(NBDKIT_PLUGIN)
        return [*base, "python", str(plugin), f"file={image}"]
    raise ValueError(name)


@contextlib.contextmanager
def running(cmd: list[str], port: int, log: Path) -> Iterator[None]:
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fio_cmd(uri: str, rw: str, bs: str, seconds: float, depth: int) -> list[str]:
    return ["fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={depth}", f"--size={IMAGE_SIZE}", "--time_based", f"--runtime={seconds}",
            "--ramp_time=1", "--randrepeat=1", "--output-format=json"]


def run_fio(uri: str, rw: str, bs: str, seconds: float, depth: int) -> tuple[float, float]:
    """(MB/s, IOPS) of one fio run."""
    proc = subprocess.run(fio_cmd(uri, rw, bs, seconds, depth), capture_output=True, text=True,
                          timeout=seconds + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed: {proc.stderr.strip() or proc.stdout.strip()}")
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]["write"]
    return job["bw_bytes"] / 1e6, job["iops"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--seconds", type=float, default=5.0, help="fio runtime per cell (plus 1 s ramp)")
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--inline-max", type=int, default=None,
                    help="NbdServer(inline_max=...): largest read/write done on the loop thread")
    ap.add_argument("--serve-cdp", nargs=2, metavar=("IMAGE", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_cdp:
        serve_cdp(args.serve_cdp[0], int(args.serve_cdp[1]), args.inline_max)
        return 0
    if not shutil.which("fio"):
        print("fio is not installed (apt-get install fio)", file=sys.stderr)
        return 2
    rows: list[tuple[str, str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="nbd-bench-") as tmpdir:
        tmp = Path(tmpdir)
        image = tmp / "disk.raw"
        for server in args.servers.split(","):
            with open(image, "wb") as fh:
                fh.truncate(IMAGE_SIZE)
            port = free_port()
            cmd = server_command(server, image, port, tmp, args.inline_max)
            if cmd is None:
                print(f"# {server}: not installed, skipped", file=sys.stderr)
                continue
            with running(cmd, port, tmp / f"{server}.log"):
                for workload in args.workloads.split(","):
                    rw, bs = WORKLOADS[workload]
                    mbps, iops = run_fio(f"nbd://127.0.0.1:{port}/", rw, bs, args.seconds, args.depth)
                    rows.append((server, workload, mbps, iops))
                    print(f"# {server:12} {workload:14} {mbps:9.1f} MB/s {iops:10.0f} IOPS",
                          file=sys.stderr, flush=True)
            os.unlink(image)
    print(f"\n{'server':12} {'workload':14} {'MB/s':>9} {'IOPS':>10}")
    for server, workload, mbps, iops in rows:
        print(f"{server:12} {workload:14} {mbps:9.1f} {iops:10.0f}")
    print(f"\nfio --ioengine=nbd, 1 connection, iodepth={args.depth}, {args.seconds:g} s per cell "
          f"(+1 s ramp), {IMAGE_SIZE >> 20} MiB image, no flushes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
