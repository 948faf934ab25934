"""Entry point: `cdp VERB ...`. Exit status 0 ok, 1 check failed, 2 usage or configuration."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from cdp import __version__
from cdp.benchmark.minimal import DEFAULT_TUNED
from cdp.cli import logs
from cdp.errors import CdpError, ConfigError, WrongConfigError

log = logging.getLogger("cdp")

# Verbs that live in their own module, cdp/cli/<name>.py, which exposes
# `register(sub)`: it adds its parser(s) and sets `run=` (a function taking the
# parsed args and returning the exit status) with `set_defaults`.
MODULE_VERBS: tuple[str, ...] = ("archive", "points", "failover", "files", "checkpoint", "failback", "plan",
                                 "mount", "pause", "resync")


_ENDING = ("However the run ends (done, failed, Ctrl-C, SIGTERM, SIGHUP) its daemons are stopped "
           "and what it made is removed, unless --keep; an interrupted run says what it stopped "
           "and removed and exits 128 + the signal (130 for SIGINT, 143 for SIGTERM).")


def _work_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--dir", type=Path, default=None,
                   help="work folder (default: a new temp folder); of a folder that exists, only "
                   "what the run makes in it is removed at the end")
    s.add_argument("--keep", action="store_true",
                   help="keep the work folder: images, replicas, configs and daemon logs")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cdp", description="Continuous data protection: replicate disk images block by "
        "block to an offline, crash-consistent DR replica.",
        epilog="Start with `cdp demo` (everything on loopback) or `cdp init DIR` (example configs).")
    p.add_argument("--version", action="version", version=f"cdp {__version__}")
    p.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                   help="log verbosity (default: info for daemons, warning otherwise)")
    p.add_argument("--log-format", default="logfmt", choices=["logfmt", "json"])
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    for add in (_add_basic_verbs, _add_verify, _add_bench, _add_demo):  # in `cdp --help` order
        add(sub)
    for name in MODULE_VERBS:
        importlib.import_module(f"cdp.cli.{name}").register(sub)
    return p


def _add_basic_verbs(sub: Any) -> None:
    """init, receiver, source, status."""
    s = sub.add_parser("init", help="write example source/receiver configs, a token and an image")
    s.add_argument("dir", type=Path)

    s = sub.add_parser("receiver", help="run the receiver daemon (DR site)")
    s.add_argument("-c", "--config", type=Path, required=True, help="receiver.toml")

    s = sub.add_parser("source", help="run the source daemon (production side)")
    s.add_argument("-c", "--config", type=Path, required=True, help="source.toml")

    s = sub.add_parser("status", help="volumes, lag (RPO), throughput")
    s.add_argument("-c", "--config", type=Path, required=True, help="source or receiver config")
    s.add_argument("--json", action="store_true")


def _add_verify(sub: Any) -> None:
    s = sub.add_parser(
        "verify", help="compare source volumes with their replicas block by block",
        description="At the source (-c source.toml): hash each volume and compare it with its "
        "replica, block by block. At the receiver (--replica -c receiver.toml): rehash each "
        "replica image and compare every block with the replica's block-hash map; read-only and "
        "lock-free, so it runs offline or beside a live receiver (a mismatch counts only if it "
        "holds still for about a second; blocks being written are re-read, not reported). "
        "Exit 0 all equal, 1 differing blocks (named) or an unreadable replica, 2 usage or "
        "configuration error (e.g. an unknown volume).")
    s.add_argument("-c", "--config", type=Path, required=True,
                   help="source.toml; receiver.toml with --replica")
    s.add_argument("--replica", action="store_true",
                   help="check the replicas in the receiver's data_dir against their hash maps")
    s.add_argument("volumes", nargs="*", metavar="VOL", help="only these volumes (default: all)")
    s.add_argument("--json", action="store_true")


def _add_bench(sub: Any) -> None:
    s = sub.add_parser(
        "bench", help="throughput benchmark with real processes on loopback, optionally vs rsync",
        description="Seed, incremental (1% and 10% of blocks rewritten) and steady-load "
        "scenarios with a real receiver and source on 127.0.0.1, both with the shipped "
        "defaults (configs name only hosts, addresses, paths and the token); every result is "
        "checked byte for byte, and the seed is set against the replica disk's measured rate "
        "of fdatasync'd writes. --compare rsync runs rsync --inplace --no-whole-file -B 65536 --ignore-times "
        "against a local rsync daemon on the same data in the same run. " + _ENDING)
    s.add_argument("--size", default="2GiB", help="generated image size (default 2GiB)")
    s.add_argument("--image", type=Path, help="benchmark a copy of this image instead")
    s.add_argument("--compare", choices=["rsync"], help="run rsync side by side")
    s.add_argument("--scenarios", default="seed,incremental,steady",
                   help="comma-separated: seed, incremental, steady, seed-tmpfs, nbd (default: "
                   "the first three; seed-tmpfs seeds once more onto /dev/shm to show the rate "
                   "when the disk is not the limit; nbd runs write workloads through the NBD "
                   "export beside qemu-nbd)")
    s.add_argument("--tuned", nargs="?", const=DEFAULT_TUNED, metavar="KEY=VALUE,...",
                   help="also run seed/incremental/steady with these knobs set ([source] or "
                   f"[[volume]] keys; default {DEFAULT_TUNED}): extra rows labelled with them. "
                   "Without it every row uses the shipped defaults")
    s.add_argument("--replica-dir", type=Path, metavar="DIR",
                   help="put the receivers' replicas in a new folder under DIR (e.g. a tmpfs or "
                   "another disk), removed at the end; the disk row measures DIR")
    s.add_argument("--steady-rate", default="32MiB", help="write rate of the steady load, per s")
    s.add_argument("--steady-seconds", type=float, default=15.0)
    s.add_argument("--rate-cap", default=None,
                   help="also seed under rate_limit = this (e.g. 50MiB) and report how well "
                   "every 5-second window holds it")
    s.add_argument("--rate-seconds", type=float, default=20.0,
                   help="how long to run the capped seed (default 20)")
    s.add_argument("--plot", type=Path, help="write a PNG chart here (needs matplotlib)")
    _work_options(s)
    s.add_argument("--json", action="store_true")


def _add_demo(sub: Any) -> None:
    s = sub.add_parser(
        "demo", help="source and receiver on loopback with generated data",
        description="Generates an image, replicates it to a receiver on 127.0.0.1, changes it, "
        "runs a failover drill and an archive job, and checks every step. " + _ENDING)
    s.add_argument("--size", default="256MiB", help="size of the generated image (default 256MiB)")
    _work_options(s)
    s.add_argument("--json", action="store_true")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    daemon = args.verb in ("receiver", "source")
    logs.setup(args.log_level or ("info" if daemon else "warning"), args.log_format)
    try:
        return _run(args)
    except WrongConfigError as exc:  # say which config this command needs, by its name
        print(f"cdp {args.verb}: {exc.path}: this is a {exc.found} config; `{_command(args)}` "
              f"needs the {exc.wanted}'s (e.g. {exc.wanted}.toml)", file=sys.stderr)
        return exc.exit_code
    except CdpError as exc:
        log.debug("error", exc_info=True)
        print(f"cdp {args.verb}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _command(args: argparse.Namespace) -> str:
    """The command as typed, without its arguments: "cdp failover test", "cdp verify --replica"."""
    words = ["cdp", args.verb]
    words += [w for k in ("action", "archive_verb") if isinstance(w := getattr(args, k, None), str)]
    if getattr(args, "replica", False) is True:
        words.append("--replica")
    return " ".join(words)


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "run", None) is not None:
        return int(args.run(args))
    if args.verb == "init":
        from cdp.cli.init import init
        files = init(args.dir)
        print("wrote:\n  " + "\n  ".join(str(f) for f in files))
        print(f"next: cdp receiver -c {args.dir}/receiver.toml   (one terminal)\n"
              f"      cdp source -c {args.dir}/source.toml       (another)\n"
              f"      cdp status -c {args.dir}/receiver.toml")
        return 0
    if args.verb == "receiver":
        from cdp.config import load_receiver
        from cdp.receiver import run_receiver
        return run_receiver(load_receiver(args.config))
    if args.verb == "source":
        from cdp.config import load_source
        from cdp.source.daemon import run_source
        return run_source(load_source(args.config))
    if args.verb == "status":
        from cdp.cli.status import collect, render
        report = collect(args.config)
        if args.json:
            print(json.dumps(report, indent=1))
        else:
            render(report)
        return 0
    if args.verb == "verify" and args.replica:
        return _verify_replica(args)
    if args.verb == "verify":
        from cdp.cli.verify import verify
        from cdp.config import load_source
        reports = verify(load_source(args.config), args.volumes)
        if args.json:
            print(json.dumps(reports, indent=1))
        else:
            for r in reports:
                if r["equal"]:
                    print(f"{r['volume']}: equal ({r['blocks']} blocks, replica epoch "
                          f"{r['replica_epoch']})")
                elif r["error"]:
                    print(f"{r['volume']}: cannot compare: {r['error']}")
                else:
                    d = r["differing"]
                    more = f" and {len(d) - 20} more" if len(d) > 20 else ""
                    print(f"{r['volume']}: {len(d)} of {r['blocks']} blocks differ (replica epoch "
                          f"{r['replica_epoch']}): {', '.join(map(str, d[:20]))}{more}")
        return 0 if all(r["equal"] for r in reports) else 1
    if args.verb in ("bench", "demo"):
        from cdp.benchmark.workspace import Interrupted
        try:
            return _bench(args) if args.verb == "bench" else _demo(args)
        except Interrupted as exc:  # children stopped, work folder removed (or kept): say so
            print(f"cdp {args.verb}: {exc}", file=sys.stderr)
            return exc.exit_code
    raise AssertionError(args.verb)  # pragma: no cover


def _verify_replica(args: argparse.Namespace) -> int:
    from cdp.cli.verify import replica_line, replica_progress, verify_replica
    from cdp.config import load_receiver

    cfg = load_receiver(args.config)
    with replica_progress(not args.json) as progress:
        results = verify_replica(cfg, args.volumes, progress)
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=1))
    else:
        for r in results:
            print(replica_line(r))
    return 1 if any(r.failed for r in results) else 0


def _demo(args: argparse.Namespace) -> int:
    from cdp.demo import run_demo
    from cdp.units import parse_size
    try:
        size = parse_size(args.size)
    except ValueError as exc:
        raise ConfigError(f"--size: {exc}") from None
    return run_demo(size, args.dir, keep=args.keep, as_json=args.json)


def _bench(args: argparse.Namespace) -> int:
    from cdp.benchmark import report
    from cdp.benchmark.minimal import parse_knobs
    from cdp.benchmark.runner import SCENARIOS, run_bench
    from cdp.units import parse_size

    scenarios = [x.strip() for x in args.scenarios.split(",") if x.strip()]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise ConfigError(f"--scenarios: unknown {', '.join(sorted(unknown))} "
                          f"(choose from {', '.join(SCENARIOS)})")
    tuned = parse_knobs(args.tuned) if args.tuned is not None else None
    try:
        size = parse_size(args.size)
        rate = parse_size(args.steady_rate.removesuffix("/s"))
        cap = parse_size(args.rate_cap.removesuffix("/s")) if args.rate_cap else 0
    except ValueError as exc:
        raise ConfigError(f"--size/--steady-rate/--rate-cap: {exc}") from None
    tty = sys.stderr.isatty() and not args.json

    def progress(text: str, *, live: bool = False) -> None:
        """A live line redrawn in place on a terminal; off one, phase lines only."""
        if args.json or (live and not tty):
            return
        if tty:
            print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)

    try:
        results = run_bench(size=size, image=args.image, compare=args.compare,
                            scenarios=scenarios, steady_rate=rate,
                            steady_seconds=args.steady_seconds, workdir=args.dir, keep=args.keep,
                            progress=progress, rate_cap=cap, rate_seconds=args.rate_seconds,
                            tuned=tuned, replica_dir=args.replica_dir)
    finally:
        if tty:
            print("\r\033[K", end="", file=sys.stderr)
    if args.plot:
        report.plot(results, args.plot)
    if args.json:
        print(json.dumps(report.to_json(results), indent=1))
    else:
        report.table(results)
    return 0 if all(r.equal for r in results) else 1


def _stdout_is_devnull() -> bool:
    try:
        st, null = os.fstat(sys.stdout.fileno()), os.stat(os.devnull)
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (null.st_dev, null.st_ino)


def entry() -> None:
    """The console script. A reader that closed the pipe (`cdp ... | head`) ends the command
    quietly with 141 (128 + SIGPIPE, as a shell reports `yes | head`), never a traceback."""
    devnull_before = _stdout_is_devnull()
    try:
        try:
            code: int | str | None = main()
        except SystemExit as exc:  # usage errors (argparse); rich on a closed pipe
            code = exc.code
            if code == 1 and not devnull_before and _stdout_is_devnull():
                code = 141  # rich's own broken-pipe handling: stdout to devnull, exit 1
        sys.stdout.flush()  # inside the try: what is still buffered may hit the closed pipe
    except BrokenPipeError:
        # the Python docs' recipe: stdout goes nowhere from now on, so the interpreter's own
        # flush at exit cannot fail (and print "Exception ignored ...") again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 141
    if "obstore" in sys.modules:
        _exit_before_finalizing(code)
    sys.exit(code)


def _exit_before_finalizing(code: int | str | None) -> None:
    """End the process without Py_Finalize once obstore (S3) was used.

    obstore's shared tokio runtime is never shut down: its worker threads
    keep running while the interpreter tears itself down, and one that wakes
    at that moment panics and aborts the process (SIGABRT, exit -6) after the
    command itself has finished and printed its result. So run the atexit
    handlers (logging's flush among them) while Python is whole, flush the
    standard streams, and leave with os._exit.
    """
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code or 0)
