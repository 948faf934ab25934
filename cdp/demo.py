"""`cdp demo`: a source and a receiver on loopback, on generated data, end to end.

Makes an ext4 image (mkfs.ext4) holding text-like, random and repeated files
written with debugfs (no mount, no root), free space left as zeros; without
e2fsprogs, raw generated data with the same mix (then the drill has no file
system to check, and the demo says so). Seeds it to a receiver in a separate
process, replaces some files (or rewrites some blocks) while the daemons run,
waits for the replica to converge, and checks it hash for hash. Then, with
replication still running, a failover drill clones the newest recovery point
and checks it: e2fsck on its file system, and the newest file the demo wrote
read back from the clone and compared with a kept copy (RPO and RTO
reported). An archive job writes an encrypted, deduplicated snapshot of the
replica to a local repository, which is verified. Each step runs the real
`cdp` command. However the demo ends (done, failed, interrupted), its daemons
stop and its work folder goes unless --keep (cdp/benchmark/workspace.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cdp.benchmark import procs
from cdp.benchmark.data import BS, generate, rewrite, text_block
from cdp.benchmark.pair import daemon_env
from cdp.benchmark.procs import free_port, stop_all, wait_port
from cdp.benchmark.workspace import Workspace, session
from cdp.blocks import Geometry
from cdp.cli.init import init
from cdp.durable import read_json
from cdp.errors import CdpError
from cdp.tracker.scan import hash_volume
from cdp.units import format_bytes


class _Progress:
    """Live lines on a terminal (stderr); off one, each step's first line and its result."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last_key: str | None = None

    def line(self, text: str, key: str | None = None, plain: str | None = None) -> None:
        """A step under way; off a terminal printed once per `key` (default: the text), as
        `plain` if given (a figure of the moment says little in a log)."""
        if self.quiet:
            return
        if self.tty:
            sys.stderr.write("\r\033[K" + text)
        elif (key or text) != self.last_key:
            self.last_key = key or text
            sys.stderr.write((plain or text) + "\n")
        sys.stderr.flush()

    def done(self, text: str) -> None:
        if self.quiet:
            return
        if self.tty:
            sys.stderr.write("\r\033[K")
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


class DemoDisk:
    """The demo's image: ext4 with files (where mkfs.ext4 and debugfs exist), else raw data."""

    TOOLS = ("mkfs.ext4", "debugfs")

    def __init__(self, image: Path, size: int, work: Path) -> None:
        self.image, self.size, self.work = image, size, work
        missing = [t for t in self.TOOLS if shutil.which(t) is None]
        self.filesystem = None if missing else "ext4"
        self.note = (f"{' and '.join(missing)} not found: the image is raw generated data, so the "
                     "drill has no file system to check (install e2fsprogs for an ext4 image)"
                     if missing else None)
        self.file_size = min(4 << 20, max(BS, size // 64 // BS * BS))
        self.files: list[str] = []  # in the order written
        self.newest: Path | None = None  # a kept copy of the newest file written
        self._repeated = [random.Random(i).randbytes(BS) for i in range(8)]

    def build(self, seed: int = 7) -> None:
        """A quarter each of text, random and repeated data; the rest stays zero."""
        if self.filesystem is None:
            generate(self.image, self.size, seed)
            return
        with open(self.image, "wb") as fh:
            fh.truncate(self.size)
        self._tool(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "cdp-demo", str(self.image)])
        rng = random.Random(seed)
        n = max(3, min(int(self.size * 0.66), int(self._free() * 0.8)) // self.file_size)
        self._write(["mkdir /demo"], [(f"file{i:03d}.{('log', 'bin', 'rep')[i % 3]}",
                                       self.file_size, i % 3) for i in range(n)], rng)

    def change(self, fraction: float, seed: int) -> int:
        """Replace old files with new ones (about `fraction` of the image); bytes written."""
        if self.filesystem is None:
            return rewrite(self.image, fraction, seed)
        rng = random.Random(seed)
        total = max(BS, int(self.size * fraction) // BS * BS)
        n = -(-total // self.file_size)
        gone, self.files = self.files[:n], self.files[n:]
        new = [(f"change{seed}-{k}.{('log', 'bin')[k % 2]}", total // n // BS * BS or BS, k % 2)
               for k in range(n)]
        self._write([f"rm /demo/{name}" for name in gone], new, rng)
        return sum(size for _, size, _ in new)

    def _write(self, before: list[str], files: list[tuple[str, int, int]],
               rng: random.Random) -> None:
        """Run `before`, then write `files` (name, size, kind: 0 text, 1 random, 2 repeated)
        into /demo with debugfs, in batches of about 64 MiB of source files."""
        src = self.work / "files"
        src.mkdir(exist_ok=True)
        batch, cmds, held = 0, list(before), []
        for k, (name, size, kind) in enumerate(files):
            path = src / name
            with open(path, "wb") as fh:
                for i in range(0, size, BS):
                    if kind == 0:
                        fh.write(text_block(rng))
                    elif kind == 1:
                        fh.write(rng.randbytes(BS))
                    else:
                        fh.write(self._repeated[i // BS % len(self._repeated)])
            cmds.append(f"write {path} /demo/{name}")
            held.append(path)
            self.files.append(name)
            batch += size
            if batch >= 64 << 20 or k == len(files) - 1:
                (self.work / "debugfs.cmds").write_text("\n".join(cmds) + "\n")
                self._tool(["debugfs", "-w", "-f", str(self.work / "debugfs.cmds"),
                            str(self.image)])
                self.newest = self.work / "newest-file"
                os.replace(held[-1], self.newest)  # kept: the drill reads it back from the clone
                for p in held[:-1]:
                    p.unlink()
                batch, cmds, held = 0, [], []

    def check_script(self) -> Path | None:
        """A drill check: the newest file, read from the clone with debugfs, equals the copy."""
        if self.filesystem is None or self.newest is None or not self.files:
            return None
        script = self.work / "check-newest-file.sh"
        script.write_text(
            "#!/bin/sh\n# the newest file the demo wrote is in the clone, byte for byte\n"
            "set -e\nout=$(mktemp)\ntrap 'rm -f \"$out\"' EXIT\n"
            f'debugfs -R "dump /demo/{self.files[-1]} $out" "$CDP_CLONE_RAW" 2>/dev/null\n'
            f'cmp "$out" "{self.newest}"\n')
        return script

    def _free(self) -> int:
        """Bytes free in the new file system (a small one is mostly journal and tables)."""
        out = self._tool(["debugfs", "-R", "stats", str(self.image)])
        field = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        try:
            return int(field["Free blocks"]) * int(field["Block size"])
        except (KeyError, ValueError):
            raise CdpError(f"debugfs -R stats {self.image}: no free block count in its "
                           "output; is e2fsprogs complete?") from None

    @staticmethod
    def _tool(argv: list[str]) -> str:
        r = procs.run(argv, timeout=300)
        errors = r.stderr.strip()
        if argv[0] == "debugfs":  # exits 0 whatever fails; stderr: its banner, then the errors
            errors = "\n".join(r.stderr.strip().splitlines()[1:])
        if r.returncode != 0 or errors:
            raise CdpError(f"{argv[0]} failed while making the demo image: "
                           f"{(errors or r.stdout).strip()[-500:]}")
        return r.stdout


def _source_volume(state_dir: Path) -> dict[str, Any] | None:
    try:
        return read_json(state_dir / "status.json")["volumes"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return None


def _wait_current(state_dir: Path, since: float, procs: list[subprocess.Popen[bytes]],
                  progress: _Progress, label: str, timeout: float = 120) -> dict[str, Any]:
    """Until the source says the replica is current as of a scan started after `since`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a daemon exited early with status {p.returncode}")
        v = _source_volume(state_dir)
        if v:
            done, total = v.get("progress_done", 0), v.get("progress_total", 0) or 1
            progress.line(f"{label}: {v['phase']:<10} {100 * done / total:5.1f}%  "
                          f"epoch {v['acked_epoch']}  sent {format_bytes(v['stats']['wire'])}  "
                          f"{format_bytes(v.get('rate', 0))}/s", key=label,
                          plain=f"{label}: replicating ...")
            if v.get("current_as_of", 0) >= since and not v.get("pending_epochs"):
                return v
        time.sleep(0.05)
    raise RuntimeError(f"{label}: replica did not converge within {timeout:.0f}s")


def _cdp_json(cmd: list[str], env: dict[str, str], *args: str | Path) -> dict[str, Any]:
    """Run one `cdp ... --json` command; its JSON, or RuntimeError with its message."""
    r = procs.run([*cmd, *map(str, args), "--json"], env=env, timeout=600,
                  name=f"cdp {' '.join(map(str, args[:2]))}")
    try:
        out: dict[str, Any] = json.loads(r.stdout)
    except ValueError:
        out = {}
    if r.returncode not in (0, 1) or not out:
        raise RuntimeError(f"cdp {' '.join(map(str, args[:2]))}: {r.stderr.strip() or r.stdout}")
    return out


def _archive(cmd: list[str], env: dict[str, str], root: Path) -> dict[str, Any]:
    """Add a local encrypted repository to the receiver's config; init, run and verify it."""
    password = root / "archive.pass"
    fd = os.open(password, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(os.urandom(24).hex() + "\n")
    rx = root / "receiver.toml"
    rx.write_text(rx.read_text() + '\n[[archive]]\nname = "offsite"\nrepository = "archive"\n'
                  'password_file = "archive.pass"\nkeep = { last = 7, daily = 7 }\n')
    _cdp_json(cmd, env, "archive", "init", "-c", rx)
    run = _cdp_json(cmd, env, "archive", "run", "-c", rx)
    verify = procs.run([*cmd, "archive", "verify", "-c", str(rx), "--read-data"], env=env,
                       timeout=600, name="cdp archive verify")
    return {"snapshot": run["snapshot"], "seconds": run["seconds"],
            "stored": sum(v["stored_bytes"] for v in run["volumes"]),
            "uploaded": run["bytes_uploaded"], "verified": verify.returncode == 0}


def run_demo(size: int, workdir: Path | None, keep: bool = False, as_json: bool = False) -> int:
    """The demo in a work folder that goes when it ends, however it ends (unless `keep`);
    raises workspace.Interrupted on SIGINT/SIGTERM/SIGHUP, after the cleanup."""
    progress = _Progress(as_json)
    with session("demo", workdir, keep) as ws:
        for path in ws.swept:
            progress.done(f"removed {path}, left by an earlier demo or bench that was killed")
        try:
            summary = _demo(ws.root, size, progress)
        except Exception as exc:  # the demo reports, it does not trace back
            tails = "" if keep else ws.log_tails()
            progress.done(f"demo failed: {exc}" + (f"\n{tails}" if tails else "") +
                          _where(ws, failed=True))
            return 1
        if as_json:
            print(json.dumps(summary, indent=1))
        else:
            _print_summary(summary)
            if keep:
                progress.done(_where(ws, failed=False).strip())
        ok = (summary["replica_equal"] and summary["daemon_exit_codes"] == [0, 0]
              and summary["drill"]["ok"] and summary["archive"]["verified"])
        return 0 if ok else 1
    raise AssertionError("unreachable")  # pragma: no cover (session re-raises or returns)


def _where(ws: Workspace, failed: bool) -> str:
    """A line on where the work folder went: kept (and where), or how to keep it next time."""
    if ws.keep:
        return f"\nkept {ws.root} (configs, images, replicas, daemon logs)"
    return "\n(--keep keeps the work folder, with the daemon logs)" if failed else ""


def _demo(root: Path, size: int, progress: _Progress) -> dict[str, Any]:
    """Every step of the demo in `root`; its summary. Raises on the first step that fails."""
    daemons: list[subprocess.Popen[bytes]] = []
    try:
        disk = _make_disk(root, size, progress)
        image = disk.image
        env = dict(daemon_env(root / "pycache"))  # byte-compiled, as an installed package
        cmd = [sys.executable, "-P", "-m", "cdp"]  # -P: a folder named cdp in the cwd must not shadow us
        t0 = _start_daemons(root, cmd, env, daemons)
        state_dir = root / "state"
        _wait_current(state_dir, t0, daemons, progress, "seed")
        rx_state = root / "replicas" / "vm1-disk0" / "state.json"
        seed_s = read_json(rx_state)["applied_at"] - t0  # the receiver's clock, not our polling
        progress.done(f"seed: {format_bytes(size)} in {seed_s:.2f}s "
                      f"({size / seed_s / 1e6:.0f} MB/s logical, daemon start included)")
        after_seed = read_json(rx_state)["counters"]
        rounds = _incremental(disk, state_dir, rx_state, daemons, progress)
        drill = _drill(cmd, env, root, disk, progress)
        progress.line("archive: init, run, verify ...")
        archive = _archive(cmd, env, root)
        progress.done(f"archive: {format_bytes(archive['stored'])} stored for "
                      f"{format_bytes(size)} in {archive['seconds']:.2f}s, verify "
                      f"{'ok' if archive['verified'] else 'FAILED'}")
        geo = Geometry(size, BS)
        equal = hash_volume(image, geo) == hash_volume(root / "replicas" / "vm1-disk0" / "image",
                                                       geo)
        final = read_json(rx_state)
    finally:
        codes = stop_all(daemons)
    c = final["counters"]
    return {
        "size": size, "seed_seconds": seed_s, "seed_MBps": size / seed_s / 1e6,
        "seed_wire_bytes": after_seed["wire"], "incremental": rounds,
        "epochs": final["epoch"], "logical": c["logical"], "wire": c["wire"],
        "data": c["data"], "compressed": c["compressed"], "dedup": c["dedup"],
        "zero": c["zero"],
        "compression_ratio": c["data"] / c["compressed"] if c["compressed"] else None,
        "dedup_ratio": (c["data"] + c["dedup"]) / c["data"] if c["data"] else None,
        "rpo_seconds": rounds[-1]["rpo"], "replica_equal": equal, "workdir": str(root),
        "filesystem": disk.filesystem, "files": len(disk.files), "note": disk.note,
        "drill": drill, "archive": archive, "daemon_exit_codes": codes,
    }


def _make_disk(root: Path, size: int, progress: _Progress) -> DemoDisk:
    """`cdp init` in `root`, then its example image replaced by a generated one of `size`."""
    init(root, image_size=BS)
    image = root / "images" / "vm1-disk0.raw"
    image.unlink()
    disk = DemoDisk(image, size, root)
    progress.line(f"generating a {format_bytes(size)} {disk.filesystem or 'raw'} image in "
                  f"{root} ...")
    disk.build()
    if disk.note:
        progress.done(f"note: {disk.note}")
    else:
        progress.done(f"image: {format_bytes(size)} ext4 with {len(disk.files)} files "
                      "(text, random, repeated; free space zero), written with debugfs")
    return disk


def _start_daemons(root: Path, cmd: list[str], env: dict[str, str],
                   daemons: list[subprocess.Popen[bytes]]) -> float:
    """Point both configs at a free port with quick scans, start the receiver, then the
    source (appended to `daemons`); when the source was started."""
    port = free_port()
    for name in ("receiver.toml", "source.toml"):
        p = root / name
        p.write_text(p.read_text().replace("127.0.0.1:7400", f"127.0.0.1:{port}")
                     .replace('mode = "scan"', 'mode = "scan"\nscan_interval = "2s"\n'
                              'min_scan_interval = "0.2s"'))
    for name in ("receiver", "source"):
        with open(root / f"{name}.log", "wb") as log:
            t0 = time.time()
            daemons.append(procs.spawn([*cmd, name, "-c", str(root / f"{name}.toml")],
                                       name=name, stdout=log, stderr=subprocess.STDOUT,
                                       env=env))
        if name == "receiver":
            wait_port(port, daemons[0])
    return t0


def _incremental(disk: DemoDisk, state_dir: Path, rx_state: Path,
                 daemons: list[subprocess.Popen[bytes]], progress: _Progress) -> list[dict[str, Any]]:
    """Two rounds of changes (1%, 5%): how long each took to reach the replica."""
    rounds = []
    for r, frac in enumerate((0.01, 0.05)):
        t1 = time.time()
        written = disk.change(frac, seed=100 + r)
        # converged once a scan that began after the last write finds nothing new
        v = _wait_current(state_dir, time.time(), daemons, progress, f"incremental {frac:.0%}")
        # the receiver's own clock of when the last epoch landed, not our polling delay
        landed = read_json(rx_state)["applied_at"] - t1
        rounds.append({"fraction": frac, "bytes": written, "seconds": landed,
                       "rpo": time.time() - v["current_as_of"]})
        what = "of the image in new files" if disk.filesystem else "of blocks rewritten"
        progress.done(f"incremental: {frac:.0%} {what}, replica current "
                      f"{landed:.2f}s after the write began")
    return rounds


def _drill(cmd: list[str], env: dict[str, str], root: Path, disk: DemoDisk,
           progress: _Progress) -> dict[str, Any]:
    """`cdp failover test` of the newest point, with the disk's check script if it has one."""
    progress.line("failover drill: cloning the newest recovery point and checking it ...")
    script = disk.check_script()
    check = ["--check", f"sh {script}"] if script else []
    drill = _cdp_json(cmd, env, "failover", "test", "-c", root / "receiver.toml", "vm1-disk0",
                      *check)
    progress.done(f"failover drill: point {drill['point']['epoch']}, clone ready in "
                  f"{drill['rto']:.2f}s (RTO), point age {drill['rpo']:.2f}s (RPO), checks "
                  + ", ".join(f"{c['name']} {c['result']}" for c in drill["checks"]))
    return drill


def _print_summary(s: dict[str, Any]) -> None:
    from rich.table import Table

    from cdp.cli.tables import print_table

    t = Table(title="cdp demo summary", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("image", format_bytes(s["size"]) + (f", ext4 with {s['files']} files"
                                                   if s["filesystem"] else f" raw ({s['note']})"))
    t.add_row("seed", f"{s['seed_seconds']:.2f}s, {s['seed_MBps']:.0f} MB/s logical, "
              f"{format_bytes(s['seed_wire_bytes'])} on the wire")
    for r in s["incremental"]:
        t.add_row(f"incremental {r['fraction']:.0%}",
                  f"{format_bytes(r['bytes'])} {'in new files' if s['filesystem'] else 'rewritten'}"
                  f", applied on the replica {r['seconds']:.2f}s after the write began")
    t.add_row("epochs applied", str(s["epochs"]))
    t.add_row("bytes logical / wire", f"{format_bytes(s['logical'])} / {format_bytes(s['wire'])}")
    if s["compression_ratio"]:
        t.add_row("compression", f"{s['compression_ratio']:.2f}x "
                  f"({format_bytes(s['data'])} -> {format_bytes(s['compressed'])})")
    if s["dedup_ratio"]:
        t.add_row("dedup", f"{s['dedup_ratio']:.2f}x ({format_bytes(s['dedup'])} sent as references)")
    t.add_row("zero blocks", format_bytes(s["zero"]))
    t.add_row("RPO at the end", f"{s['rpo_seconds']:.2f}s")
    d = s["drill"]
    t.add_row("failover drill", f"point {d['point']['epoch']}: clone ready in {d['rto']:.2f}s "
              f"(RTO), point {d['rpo']:.2f}s old (RPO); "
              + ", ".join(f"{c['name']}: {c['result']}" for c in d["checks"]))
    a = s["archive"]
    t.add_row("archive", f"snapshot {a['snapshot'][:12]}, {format_bytes(a['stored'])} stored "
              f"(encrypted, compressed) in {a['seconds']:.2f}s, verify --read-data "
              f"{'ok' if a['verified'] else 'FAILED'}")
    t.add_row("replica equals source", "yes" if s["replica_equal"] else "NO")
    t.add_row("daemons stopped cleanly", "yes" if s["daemon_exit_codes"] == [0, 0] else
              f"no: {s['daemon_exit_codes']}")
    print_table(t)
