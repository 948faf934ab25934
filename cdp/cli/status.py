"""`cdp status`: what each volume's replica holds, how far behind it is, how fast it moves."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path
from typing import Any

from cdp.cli.tables import print_table
from cdp.config import config_kind as detect_kind
from cdp.config import load_receiver, load_source
from cdp.durable import read_json
from cdp.errors import ConfigError
from cdp.status import (
    LiveFacts,
    PointsFacts,
    ReplicaFacts,
    SourceStatus,
    VolumeStatus,
    volume_status,
)
from cdp.textsafe import printable


def config_kind(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    kind = detect_kind(data)
    if kind is None:
        raise ConfigError(f"{path}: neither a receiver config ([receiver], [[archive]]) nor a "
                          "source config ([source], [[volume]], [[fileset]])")
    return kind


def collect(path: Path) -> dict[str, Any]:
    now = time.time()
    if config_kind(path) == "receiver":
        cfg = load_receiver(path)
        from cdp.archive.scheduler import read_state

        return {"kind": "receiver", "data_dir": str(cfg.data_dir),
                "volumes": [v.to_dict() for v in receiver_volumes(cfg.data_dir, now)],
                "archives": read_state(cfg.data_dir)}
    cfg_s = load_source(path)
    try:
        snap = SourceStatus.from_dict(read_json(cfg_s.state_dir / "status.json"))
    except (OSError, ValueError, TypeError, AttributeError):
        snap = SourceStatus(source=cfg_s.name)
    running = snap.updated > now - 5
    connected = running and snap.connected
    failing = running and not connected and bool(snap.link_error)
    return {"kind": "source", "running": running, "connected": connected,
            "rate_limit": snap.rate_limit, "read_limit": snap.read_limit,
            "window": snap.window, "volumes": [v.at(now).to_dict() for v in snap.volumes],
            # why the source is not connected, since when, and when it tries again
            "link_error": snap.link_error if failing else "",
            "link_error_since": snap.link_error_since if failing else None,
            "next_connect": snap.next_connect if failing else None}


def receiver_volumes(data_dir: Path, now: float) -> list[VolumeStatus]:
    """Each replica in `data_dir` from its files: state.json, the receiver's status.json (live
    facts, trusted while fresh), the journal's points; what a running receiver's own snapshot
    says the same way."""
    out: list[VolumeStatus] = []
    if not data_dir.is_dir():
        return out
    for d in sorted(data_dir.iterdir()):
        if not d.is_dir() or d.name.startswith(".") or not (d / "state.json").exists():
            continue
        try:
            raw = read_json(d / "state.json")
        except (OSError, ValueError):
            continue
        try:
            live = read_json(d / "status.json")
        except (OSError, ValueError):
            live = {}
        fresh = live.get("updated", 0) > now - 5
        state = ReplicaFacts.from_dict(raw)
        out.append(volume_status(str(raw.get("volume", d.name)), state,
                                 LiveFacts.from_dict(live, fresh=fresh), _points(d, state),
                                 promoted=(d / "promoted.json").exists(), now=now))
    return out


def _points(vol_dir: Path, state: ReplicaFacts) -> PointsFacts:
    """The recovery window from the journal on disk: points, the oldest one, journal bytes."""
    from cdp.errors import CdpError
    from cdp.replica.points import list_points

    try:
        pts = list_points(vol_dir)
    except (CdpError, OSError, ValueError, KeyError):
        pts = []
    if not pts:
        return PointsFacts(0, None, None, 0)
    return PointsFacts(len(pts), pts[0].epoch, pts[0].time, sum(p.size for p in pts))


def _not_connected(report: dict[str, Any], now: float | None = None) -> str:
    """"not connected since 10:02:03 (2m 5s): <error>; next attempt in 1.5s"."""
    now = time.time() if now is None else now
    since, nxt = report.get("link_error_since"), report.get("next_connect")
    text = "not connected"
    if since:
        text += (f" since {time.strftime('%H:%M:%S', time.localtime(since))} "
                 f"({_ago(now - since)})")
    text += f": {report['link_error']}"
    if nxt:
        text += f"; next attempt in {nxt - now:.1f}s" if nxt > now else "; trying again now"
    return text


def _ago(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}h {s % 3600 // 60}m" if s >= 3600 else (
        f"{s // 60}m {s % 60}s" if s >= 60 else f"{s}s")


def _cap(rate: float | None) -> str:
    return f"{_b(rate)}/s" if rate else "unlimited"


def _b(n: float) -> str:
    from cdp.units import format_bytes
    return format_bytes(n)


def render(report: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"cdp {report['kind']} status")
    if report["kind"] == "receiver":
        _receiver_rows(t, report)
    else:
        _source_rows(t, report)
    arch = report.get("archives") or {}
    if arch.get("archives") or arch.get("queue") or arch.get("running"):
        runs = [f"{n} {time.strftime('%m-%d %H:%M', time.localtime(a['last_run']))} "
                f"{'ok' if a.get('ok') else 'FAILED'}" for n, a in sorted(arch["archives"].items())
                if a.get("last_run")]
        t.caption = (f"archives: running {', '.join(arch.get('running', [])) or '-'}; queued "
                     f"{', '.join(arch.get('queue', [])) or '-'}; last runs: "
                     f"{'; '.join(runs) or '-'}")
    print_table(t)  # off a terminal at the table's own width: no cell cut short


def _safe(text: str) -> str:
    """Errors carry what a peer said: no escapes, no rich markup."""
    from rich.markup import escape

    return escape(printable(text))


def _receiver_rows(t: Any, report: dict[str, Any]) -> None:
    for col in ("volume", "epoch", "applied", "lag (RPO)", "points (window)", "logical",
                "wire", "dedup", "zero", "compressed", "rate", "source"):
        t.add_column(col)
    for v in report["volumes"]:
        c = v["counters"]
        lag = f"{v['lag']:.1f}s" if v["lag"] is not None else "-"
        src = (v["client"] + (" (connected)" if v["connected"] else "")) or "-"
        if v["error"]:
            src += f" error: {_safe(v['error'])}"
        applied = time.strftime("%H:%M:%S", time.localtime(v["applied_at"])) if v[
            "applied_at"] else "-"
        if v.get("promoted"):
            src = "PROMOTED (no more epochs) " + src
        win = f"{v['points']} ({v['window'] / 3600:.1f}h)" if v.get("window") else str(
            v.get("points", 0))
        t.add_row(v["volume"], str(v["epoch"]), applied, lag, win, _b(c["logical"]),
                  _b(c["wire"]),
                  _b(c["dedup"]), _b(c["zero"]), _b(c["compressed"]),
                  f"{_b(v['rate'])}/s", src)


def _source_rows(t: Any, report: dict[str, Any]) -> None:
    caps = [f"send {_cap(report.get('rate_limit'))}", f"read {_cap(report.get('read_limit'))}"]
    if report.get("window"):
        caps.append(f"window {report['window']}")
    t.caption = "limits: " + ", ".join(caps)
    if report.get("link_error"):
        t.caption = f"{_safe(_not_connected(report))}\n{t.caption}"
    for col in ("volume", "phase", "acked epoch", "pending", "lag (RPO)", "progress", "sent",
                "rate", "cap", "error"):
        t.add_column(col)
    for v in report["volumes"]:
        lag = f"{v['lag']:.1f}s" if v.get("lag") is not None else "-"
        prog = (f"{100 * v['progress_done'] / v['progress_total']:.0f}%"
                if v.get("progress_total") else "-")
        t.add_row(v["volume"], _source_phase(v, report["running"]),
                  str(v["acked_epoch"]), str(v["pending_epochs"]), lag, prog,
                  _b(v["stats"]["wire"]), f"{_b(v['rate'])}/s", _cap(v.get("rate_limit")),
                  _safe(v["error"] or (f"not connected: {report['link_error']}"
                                       if report.get("link_error") else "")))


def _source_phase(v: dict[str, Any], running: bool) -> str:
    """A source volume's phase cell: paused since when, a resync asked for, nbd capture state."""
    phase = v["phase"] if running else "not running"
    if v.get("paused_since"):  # `cdp pause`: kept across restarts, so shown even then
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["paused_since"]))
        phase = (f"paused since {when}" if phase == "paused"
                 else f"{phase} (paused since {when})")
    if v.get("resync") and running and v["phase"] != "resync":
        phase += f", resync {v['resync']}"
    nbd = v.get("nbd")
    if nbd and running:
        # nbd volumes: capturing every write, or behind (spilling, tracking: pull-ahead)
        phase += f" / {nbd['mode']}"
        if nbd.get("spilled_bytes"):
            phase += f", {_b(nbd['spilled_bytes'])} spilled"
        if nbd.get("backlog_bytes"):
            phase += f", {_b(nbd['backlog_bytes'])} queued"
    return phase
