"""`cdp plan -c source.toml`: watch the volumes for a while; size link, seeding and archive window.

Sends nothing and writes nothing: see cdp/planner.py for what is measured
and how the figures are computed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cdp.config import load_source
from cdp.errors import UsageError
from cdp.units import format_bytes, parse_duration


def register(sub: Any) -> None:
    s = sub.add_parser(
        "plan", help="measure change rates; size link, seeding time and archive window",
        description="Rescans the configured volumes every few seconds for --duration, comparing "
        "block hashes with the previous pass (nothing is sent), and reports per volume and in "
        "total: change rate (mean, p95 over 1-minute windows, shorter on short runs), "
        "compressibility (zstd) and dedup (xxh3) of the changed blocks, CPU seconds per GiB "
        "read on this host, and from these the link needed to hold --rpo, the seeding time "
        "over --link and the archive window (one incremental archive run's upload over --link).")
    s.add_argument("-c", "--config", type=Path, required=True, help="source.toml")
    s.add_argument("volumes", nargs="*", help="only these volumes (default: all)")
    s.add_argument("--duration", default="10m", help="how long to watch (default 10m)")
    s.add_argument("--rpo", default="30s", help="the RPO to hold (default 30s)")
    s.add_argument("--link", default=None, help="link capacity, e.g. 100Mbit or 20MiB/s")
    s.add_argument("--archive-every", default="24h",
                   help="how often archive jobs run (default 24h): sizes the archive window")
    s.add_argument("--interval", default=None,
                   help="seconds between passes (default: 5s, shorter for short runs)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--plot", type=Path, help="write a PNG of change rate over time (matplotlib)")
    s.set_defaults(run=run)


def _dur(opt: str, text: str) -> float:
    try:
        v = parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"{opt}: {exc}") from None
    if v <= 0:
        raise UsageError(f"{opt}: must be longer than zero")
    return v


def run(args: argparse.Namespace) -> int:
    from cdp.planner import VolumeProbe, interval_for, measure, plan, windows_for
    from cdp.ratelimit import parse_rate

    cfg = load_source(args.config)
    duration = _dur("--duration", args.duration)
    rpo = _dur("--rpo", args.rpo)
    every = _dur("--archive-every", args.archive_every)
    interval = _dur("--interval", args.interval) if args.interval else interval_for(duration)
    link = None
    if args.link:
        try:
            link = parse_rate(args.link)
        except ValueError as exc:
            raise UsageError(f"--link: {exc}") from None
    vols = [v for v in cfg.volumes if not args.volumes or v.name in args.volumes]
    unknown = set(args.volumes) - {v.name for v in cfg.volumes}
    if unknown or not vols:
        raise UsageError(f"no volume {sorted(unknown)[0] if unknown else ''!r} in {cfg.path}")
    window, note = windows_for(duration)
    notes = [note] if note else []
    if any(v.mode == "nbd" for v in vols):
        notes.append("nbd volumes are measured by scanning their image files (whether or not "
                     "the source serves them)")
    probes = [VolumeProbe(v.name, v.path, v.block_size, cfg.dedup_index_entries) for v in vols]
    tty = sys.stderr.isatty() and not args.json

    def progress(frac: float) -> None:
        if tty:
            print(f"\rwatching: {100 * frac:3.0f}%", end="", file=sys.stderr, flush=True)

    start, end = measure(probes, duration, interval, progress)
    if tty:
        print("\r\033[K", end="", file=sys.stderr)
    figures = plan(probes, start, end, window=window, rpo=rpo, link=link, archive_every=every)
    report = {"duration": end - start, "interval": interval, "window": window, "rpo": rpo,
              "link": link, "archive_every": every, "notes": notes,
              "volumes": [f.to_json() for f in figures[:-1]], "total": figures[-1].to_json()}
    if args.plot:
        _plot(report, args.plot)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _table(report)
    return 0


def _rate(v: float) -> str:
    return f"{format_bytes(v)}/s"


def _bits(v: float) -> str:
    return f"{v * 8 / 1e6:.1f} Mbit/s"


def _secs(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 10:
        return f"{v:.1f}s"
    if v < 120:
        return f"{v:.0f}s"
    if v < 7200:
        return f"{v / 60:.1f}m"
    return f"{v / 3600:.1f}h"


def _table(report: dict[str, Any]) -> None:
    from rich.table import Table

    from cdp.cli.tables import print_table

    t = Table(title=f"cdp plan: {report['duration']:.0f}s watched, RPO {report['rpo']:.0f}s, "
              f"link {_bits(report['link']) if report['link'] else 'not given'}")
    for col in ("volume", "data", "rate mean", "rate p95", "zstd", "dedup", "CPU s/GiB",
                "link for RPO", "seeding", "archive window"):
        t.add_column(col)
    for f in [*report["volumes"], report["total"]]:
        t.add_row(f["name"], format_bytes(f["data_bytes"]), _rate(f["rate_mean"]),
                  _rate(f["rate_p95"]), f"{f['compression']:.2f}x", f"{f['dedup']:.2f}x",
                  f"{f['cpu_s_per_gib']:.2f}", _bits(f["link_needed"]),
                  _secs(f["seed_seconds"]), _secs(f["archive_seconds"]))
    t.caption = "; ".join([f"p95 over {report['window']:.1f}s windows", *report["notes"]])
    print_table(t)


def _plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install matplotlib (in cdp's environment)") from None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    w = report["window"]
    for f in [*report["volumes"], report["total"]]:
        xs = [w * (k + 0.5) for k in range(len(f["rates"]))]
        ax.plot(xs, [r / 1e6 for r in f["rates"]], label=f["name"],
                linewidth=2.5 if f["name"] == "total" else 1.2)
    if report["link"]:
        ratio = report["total"]["wire_ratio"] or 1.0
        ax.axhline(report["link"] / ratio / 1e6, color="red", linestyle="--",
                   label="link capacity (changes it carries after zstd and dedup)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("change rate (MB/s)")
    ax.set_title("cdp plan: change rate per window")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
