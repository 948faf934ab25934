"""The receiver's built-in status page: one HTML page and a JSON endpoint.

Opt-in: ``status_listen = "127.0.0.1:9741"`` in ``[receiver]``. Every
SAMPLE_INTERVAL the page samples each volume's RPO (lag) and throughput into
a ring buffer holding the last hour; the page draws them as inline SVG made
here, on the server: no JavaScript, no CDN, nothing fetched from elsewhere
(DR sites are often cut off from the internet). The page refreshes itself.

    GET /              the page
    GET /status.json   the same figures as JSON (add ?history=0 to leave out the samples)
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from cdp.metrics import HttpEndpoint, Response
from cdp.status import ReceiverView, VolumeStatus
from cdp.units import format_bytes

SAMPLE_INTERVAL = 1.0
SPAN = 3600.0  # what the charts show and the ring buffer keeps
KEEP = int(SPAN / SAMPLE_INTERVAL) + 1
GAP = 5 * SAMPLE_INTERVAL  # a longer pause between samples breaks the line
Sample = tuple[float, float | None, float, float]  # time, lag, logical rate, wire rate


class StatusPage:
    """Samples a running receiver's status snapshot (cdp.receiver.daemon.Receiver.status) and serves
    the page."""

    def __init__(self, rx: ReceiverView) -> None:
        self.rx = rx
        self.samples: dict[str, deque[Sample]] = {}
        self.started = time.time()
        self.http: HttpEndpoint | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, listen: tuple[str, int] | None) -> None:
        if listen is None:
            return
        self.http = HttpEndpoint("status page", {"/": self.page, "/index.html": self.page,
                                                 "/status.json": self.json})
        await self.http.start(*listen)
        self._task = asyncio.create_task(self._sample_loop())

    async def move(self, listen: tuple[str, int] | None) -> None:
        """Serve on `listen` instead (None: stop serving); the old endpoint stays if the new
        one cannot be served (CdpError). The samples are kept."""
        old = self.http
        if listen is not None:
            self.http = HttpEndpoint("status page", {"/": self.page, "/index.html": self.page,
                                                     "/status.json": self.json})
            try:
                await self.http.start(*listen)
            except BaseException:
                self.http = old
                raise
            if self._task is None:
                self._task = asyncio.create_task(self._sample_loop())
        else:
            self.http = None
            if self._task is not None:
                self._task.cancel()
                self._task = None
        if old is not None:
            await old.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.http is not None:
            await self.http.close()

    async def _sample_loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_INTERVAL)

    def sample(self, now: float | None = None) -> tuple[VolumeStatus, ...]:
        now = time.time() if now is None else now
        vols = self.rx.status(now).volumes
        for v in vols:
            ring = self.samples.setdefault(v.volume, deque(maxlen=KEEP))
            ring.append((now, v.lag, v.rate, v.wire_rate))
        return vols

    # -- JSON ------------------------------------------------------------------------

    def report(self, history: bool = True) -> dict[str, Any]:
        """The receiver's snapshot as JSON, with when this page started and, per volume, the
        samples of the last hour."""
        snap = self.rx.status().to_dict()
        rep = {"generated": snap.pop("generated"), "started": self.started, **snap}
        if history:
            for v in rep["volumes"]:
                ring = list(self.samples.get(v["volume"], ()))
                v["history"] = {"time": [s[0] for s in ring], "lag": [s[1] for s in ring],
                                "rate": [s[2] for s in ring], "wire_rate": [s[3] for s in ring]}
        return rep

    def json(self, query: str = "") -> Response:
        body = json.dumps(self.report(history="history=0" not in query.split("&")))
        return 200, "application/json", body.encode()

    # -- HTML ------------------------------------------------------------------------

    def page(self, query: str = "") -> Response:
        rep = self.report()
        now = rep["generated"]
        cards = "\n".join(_card(v, now) for v in rep["volumes"]) or (
            '<p class="empty">No volume has been replicated to this receiver since it started.</p>')
        body = PAGE.format(
            listen=html.escape(rep["listen"]), data_dir=html.escape(rep["data_dir"]),
            connections=rep["connections"], nvol=len(rep["volumes"]),
            when=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)), cards=cards)
        return 200, "text/html; charset=utf-8", body.encode()


def _lag(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 10:
        return f"{v:.2f} s"
    if v < 120:
        return f"{v:.1f} s"
    if v < 7200:
        return f"{v / 60:.1f} min"
    return f"{v / 3600:.1f} h"


def _card(v: dict[str, Any], now: float) -> str:
    e = html.escape
    c = v["counters"]
    h = v.get("history", {})
    t = h.get("time", [])
    state = "promoted" if v["promoted"] else ("error" if v["error"] else (
        "connected" if v["connected"] else "idle"))
    lag_chart = svg_chart(t, [("RPO", h.get("lag", []), "#c0392b")], now, unit=_lag,
                          title=f"RPO of {v['volume']} over the last hour")
    rate_chart = svg_chart(t, [("logical", h.get("rate", []), "#2471a3"),
                               ("wire", h.get("wire_rate", []), "#27ae60")], now,
                           unit=lambda x: f"{format_bytes(x)}/s",
                           title=f"throughput of {v['volume']} over the last hour")
    window = f"{v['points']} points, {_lag(v['window'])}" if v["window"] else f"{v['points']}"
    rows = [("epoch", str(v["epoch"])), ("RPO (lag)", _lag(v["lag"])),
            ("source", (v["client"] or "-") + (" (connected)" if v["connected"] else "")),
            ("recovery window", window),
            ("journal", format_bytes(v["journal_bytes"])),
            ("pending epochs", str(v["pending_epochs"])),
            ("rate", f"{format_bytes(v['rate'])}/s logical, {format_bytes(v['wire_rate'])}/s wire"),
            ("logical / wire", f"{format_bytes(c.get('logical', 0))} / "
                               f"{format_bytes(c.get('wire', 0))}"),
            ("dedup / zero / compressed", f"{format_bytes(c.get('dedup', 0))} / "
                                          f"{format_bytes(c.get('zero', 0))} / "
                                          f"{format_bytes(c.get('compressed', 0))}"),
            ("size", format_bytes(v["size"]))]
    if v["error"]:
        rows.append(("error", v["error"]))
    table = "".join(f"<tr><th>{e(k)}</th><td>{e(val)}</td></tr>" for k, val in rows)
    return (f'<section class="vol {state}"><h2>{e(v["volume"])} <span class="badge">{state}'
            f'</span></h2><table>{table}</table><div class="charts">'
            f"<figure><figcaption>RPO (s)</figcaption>{lag_chart}</figure>"
            f"<figure><figcaption>throughput</figcaption>{rate_chart}</figure></div></section>")


def svg_chart(times: Sequence[float], series: Sequence[tuple[str, Sequence[float | None], str]],
              now: float, *, unit: Any = str, title: str = "", span: float = SPAN,
              width: int = 520, height: int = 150) -> str:
    """Lines over the last `span` seconds as an inline SVG; None values and long gaps break
    a line."""
    left, right, top, bottom = 64, 8, 8, 22
    pw, ph = width - left - right, height - top - bottom
    start = now - span
    vals = [y for _, ys, _ in series for t, y in zip(times, ys, strict=False)
            if y is not None and t >= start]
    ymax = max(vals, default=0.0)
    ymax = ymax * 1.1 if ymax > 0 else 1.0

    def x(t: float) -> float:
        return left + (t - start) / span * pw

    def y(v: float) -> float:
        return top + ph - min(v, ymax) / ymax * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img"><title>{html.escape(title)}</title>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fbfbfb" '
           'stroke="#bbb"/>']
    for k in range(5):  # horizontal grid with labels
        v = ymax * k / 4
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                   'stroke="#e3e3e3"/>')
        out.append(f'<text x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="10" '
                   f'fill="#555">{html.escape(unit(v))}</text>')
    for m in range(0, 61, 15):  # minutes ago
        xx = x(now - m * 60)
        anchor = "end" if m == 0 else "middle"
        out.append(f'<text x="{xx:.1f}" y="{height - 6}" text-anchor="{anchor}" font-size="10" '
                   f'fill="#555">{"now" if m == 0 else f"-{m} min"}</text>')
    for i, (label, ys, color) in enumerate(series):
        for run in _columns(times, ys, start, x):
            pts = [f"{px:.1f},{y(v):.1f}" for px, lo, hi in run
                   for v in ((lo, hi) if lo != hi else (lo,))]
            if len(pts) == 1:
                cx, cy = pts[0].split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="1.5" fill="{color}"/>')
            else:
                out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" '
                           f'points="{" ".join(pts)}"/>')
        out.append(f'<text x="{left + 6 + 70 * i}" y="{top + 12}" font-size="11" '
                   f'fill="{color}">{html.escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def _columns(times: Sequence[float], ys: Sequence[float | None], start: float,
             x: Callable[[float], float]) -> list[list[list[float]]]:
    """One series' unbroken runs (None values and gaps over GAP break them) from `start` on,
    each a list of [x, lowest, highest]: one column per pixel, so an hour of samples stays
    small."""
    lines: list[list[list[float]]] = []
    prev: float | None = None
    col = -1
    for t, val in zip(times, ys, strict=False):
        if t < start or val is None:
            prev = None
            continue
        if prev is None or t - prev > GAP:
            lines.append([])
            col = -1
        px = int(x(t))
        if px == col:
            last = lines[-1][-1]
            last[1], last[2] = min(last[1], val), max(last[2], val)
        else:
            lines[-1].append([x(t), val, val])
            col = px
        prev = t
    return lines


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>cdp receiver status</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }}
h1 {{ font-size: 1.4em; margin: 0 0 .2em; }}
.meta {{ color: #666; margin-bottom: 1em; }}
section.vol {{ border: 1px solid #ccc; border-left: 6px solid #888; border-radius: 4px;
  padding: .6em 1em; margin: 0 0 1em; }}
section.connected {{ border-left-color: #27ae60; }}
section.error, section.promoted {{ border-left-color: #c0392b; }}
h2 {{ font-size: 1.15em; margin: .2em 0 .5em; }}
.badge {{ font-size: .75em; font-weight: normal; color: #fff; background: #888;
  padding: .1em .5em; border-radius: 3px; vertical-align: middle; }}
.connected .badge {{ background: #27ae60; }} .error .badge, .promoted .badge {{ background: #c0392b; }}
table {{ border-collapse: collapse; margin-bottom: .5em; }}
th {{ text-align: left; font-weight: 600; padding: 1px 1.2em 1px 0; color: #444; }}
td {{ padding: 1px 0; font-variant-numeric: tabular-nums; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; }} figcaption {{ font-size: .85em; color: #555; }}
.empty {{ color: #666; }}
</style></head>
<body>
<h1>cdp receiver</h1>
<div class="meta">listening on {listen} &middot; data in {data_dir} &middot; {connections}
connection(s) &middot; {nvol} volume(s) &middot; as of {when} &middot;
<a href="/status.json">JSON</a></div>
{cards}
</body></html>
"""
