"""Tables, JSON and a PNG chart of benchmark results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cdp.benchmark.runner import Result
from cdp.errors import UsageError

PEERS = ("qemu-nbd", "fdatasync", "scan")  # rows measured without cdp's counters


def ratios(results: list[Result]) -> dict[str, float]:
    """rsync time / cdp time per scenario run by both (how many times faster cdp is)."""
    by = {(r.scenario, r.tool): r for r in results}
    return {s: by[(s, "rsync")].seconds / by[(s, "cdp")].seconds
            for (s, t) in by if t == "cdp" and (s, "rsync") in by and by[(s, "cdp")].seconds > 0}


def versus(ratio: float) -> str:
    """How cdp compares, from rsync's time / cdp's time: "2.3x faster", "1.7x slower"."""
    if ratio <= 0:
        return ""
    factor = ratio if ratio >= 1 else 1 / ratio
    if f"{factor:.1f}" == "1.0":
        return "as fast (within 5%)"
    return f"{factor:.1f}x {'faster' if ratio >= 1 else 'slower'}"


def to_json(results: list[Result]) -> dict[str, Any]:
    out = []
    for r in results:
        d = r.as_dict()
        d["extra"] = {k: v for k, v in d["extra"].items() if k not in ("series", "per_second")}
        out.append(d)
    return {"results": out, "speedup_vs_rsync": ratios(results),
            "all_equal": all(r.equal for r in results)}


def table(results: list[Result]) -> None:
    from rich.table import Table

    from cdp.cli.tables import print_table
    from cdp.units import format_bytes

    sp = ratios(results)
    t = Table(title="cdp bench: shipped defaults unless a row names its knobs (MB/s = 10^6 "
              "bytes/s of the scenario's data; CPU per GiB of volume)")
    for col in ("scenario", "tool", "time", "MB/s", "wire", "compr.", "dedup", "CPU s/GiB src/rcv",
                "peak MiB src/rcv", "equal", "vs rsync"):
        t.add_column(col, no_wrap=True)
    for r in results:
        cs, cr = r.cpu_per_gib()
        d = r.as_dict()
        note = versus(sp[r.scenario]) if r.tool == "cdp" and r.scenario in sp else ""
        if r.scenario == "rate cap" and r.extra.get("windows"):
            note = (f"cap {format_bytes(r.extra['cap'])}/s: 5-s windows at "
                    f"{r.extra['min_ratio']:.0%}-{r.extra['max_ratio']:.0%} of it "
                    f"({r.extra['windows']} windows)")
        if r.scenario.startswith("nbd ") and "iops" in r.extra:
            note = f"{r.extra['iops']:.0f} IOPS"
            if r.tool == "cdp":
                if r.extra.get("of_baseline"):
                    note += f", {r.extra['of_baseline']:.0%} of qemu-nbd"
                note += (f", RPO p50 {r.extra['rpo_p50']:.2f}s p99 {r.extra['rpo_p99']:.2f}s, "
                         f"caught up {r.extra['catch_up']:.2f}s after")
        if r.scenario == "incremental 1% (nbd)" and r.tool == "cdp" and r.scenario in sp:
            note = f"{versus(sp[r.scenario])} (writes took {r.extra['write_seconds']:.2f}s)"
        if r.scenario.startswith(("steady", "nbd steady")) and "rpo_p50" in r.extra:
            note = (f"RPO p50 {r.extra['rpo_p50']:.2f}s p99 {r.extra['rpo_p99']:.2f}s at "
                    f"{format_bytes(r.extra['rate'])}/s, from {r.extra['sampled_from']:g}s in")
            if "cpu_share_source" in r.extra:
                note += (f"; CPU {r.extra['cpu_share_source']:.0%} src, "
                         f"{r.extra['cpu_share_receiver']:.0%} rcv")
        if r.tool == "fdatasync":
            note = "this folder's durable sequential writes: the ceiling for a seed"
        if r.tool == "scan" and "gbps" in r.extra:
            note = (f"{r.extra['gbps']:.1f} GB/s of data read and hashed "
                    f"({r.extra['one_core_gbps']:.1f} GB/s on one core)")
        if r.scenario.startswith("seed") and "of_device" in r.extra:
            seed_note = (f"{r.extra['of_device']:.0%} of the disk's "
                         f"{r.extra['device_mbps']:.0f} MB/s")
            note = f"{note}; {seed_note}" if note else seed_note
        if len(r.extra.get("runs", ())) > 1:  # a median: show the spread beside it
            runs = r.extra["runs"]
            spread = f"median of {len(runs)}: {min(runs):.2f}-{max(runs):.2f}s"
            note = f"{note}; {spread}" if note else spread
        peers = r.tool in PEERS
        t.add_row(r.scenario, r.tool, f"{r.seconds:.2f}s", f"{r.mbps:.0f}",
                  "-" if peers else format_bytes(r.wire),
                  f"{d['compression_ratio']:.2f}x" if d["compression_ratio"] else "-",
                  f"{d['dedup_ratio']:.2f}x" if d["dedup_ratio"] else "-",
                  "-" if peers else f"{cs:.2f} / {cr:.2f}",
                  "-" if peers else f"{r.peak_source / 2**20:.0f} / {r.peak_receiver / 2**20:.0f}",
                  "-" if peers else ("yes" if r.equal else "NO"), note)
    print_table(t)


def plot(results: list[Result], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install matplotlib (in cdp's environment)") from None
    scen = [r.scenario for r in results if r.tool == "cdp" and r.scenario != "rate cap"
            and not r.scenario.startswith(("steady", "nbd"))]
    steady = next((r for r in results if r.scenario == "steady"), None)
    fig, axes = plt.subplots(1, 2 if steady else 1, figsize=(12 if steady else 7, 4.5))
    ax = axes[0] if steady else axes
    by = {(r.scenario, r.tool): r for r in results}
    xs = range(len(scen))
    for k, tool in enumerate(("cdp", "rsync")):
        vals = [by[(s, tool)].seconds if (s, tool) in by else 0 for s in scen]
        if any(vals):
            ax.bar([x + k * 0.4 for x in xs], vals, 0.4, label=tool)
    ax.set_xticks([x + 0.2 for x in xs], scen)
    ax.set_ylabel("seconds (lower is better)")
    ax.set_title("time to replicate")
    ax.legend()
    if steady:
        series = steady.extra["series"]
        axes[1].plot([s[0] for s in series], [s[1] for s in series])
        axes[1].set_xlabel("seconds into the load")
        axes[1].set_ylabel("RPO (s)")
        axes[1].set_title(f"steady load: RPO over time (p99 {steady.extra['rpo_p99']:.2f}s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
