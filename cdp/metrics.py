"""Prometheus metrics for both daemons, and the small HTTP endpoint that serves them.

Opt-in: ``metrics_listen = "127.0.0.1:9740"`` in ``[receiver]`` or ``[source]``.
Each daemon owns one registry. Per-volume figures (lag, epochs, bytes, recovery
window, queue depth, nbd pull-ahead state) come from the daemon's status
snapshot (cdp.status), taken at scrape time by a custom collector: the scrape
runs on the daemon's event loop (the endpoint is an asyncio handler), so it
sees one consistent moment and costs nothing between scrapes. Event metrics
(apply latency, errors by kind, connections) are ordinary counters and
histograms bumped where the event happens.

The daemons are passed in as anything with a `status()` method (cdp.status's
ReceiverView / SourceView): this module sits beside them, not under them, so
it imports neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from cdp.status import Phase, ReceiverView, SourceStatus, SourceView, SourceVolumeStatus

if TYPE_CHECKING:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
# prometheus_client itself is imported when a daemon starts, not by every `cdp` command

log = logging.getLogger(__name__)

Response = tuple[int, str, bytes]  # status, content type, body
Route = Callable[[str], Response | Awaitable[Response]]  # called with the query string

RECEIVER_BYTES = ("logical", "data", "compressed", "dedup", "zero", "wire")
SOURCE_BYTES = ("scanned", "skipped", "logical", "data", "compressed", "zero", "dedup", "wire")
NBD_GAUGES = ("open_bytes", "backlog_bytes", "backlog_epochs", "dirty_regions", "hot_regions",
              "touched_blocks")
NBD_COUNTERS = ("cuts", "merged", "fallbacks", "resyncs", "writes", "map_syncs")
PHASES = tuple(p.value for p in Phase)  # every one is exported, 0 or 1
APPLY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


# -- a minimal HTTP/1.1 endpoint on the daemon's event loop ------------------------------

MAX_REQUEST = 8192
REQUEST_TIMEOUT = 10.0
MAX_CLIENTS = 16


class HttpEndpoint:
    """GET-only HTTP server for a few fixed paths; one request per connection.

    Small on purpose: a bounded request head, a timeout, a cap on concurrent
    clients; anything else gets 400/404/405 and the connection closes.
    """

    def __init__(self, name: str, routes: dict[str, Route]) -> None:
        self.name = name
        self.routes = routes
        self.port = 0
        self._server: asyncio.Server | None = None
        self._busy = 0

    async def start(self, host: str, port: int) -> int:
        from cdp.errors import ListenError

        try:
            self._server = await asyncio.start_server(self._client, host, port,
                                                      limit=MAX_REQUEST)
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)  # not asyncio's wrapping
            raise ListenError(f"cannot serve {self.name} on {host}:{port}: {why}; stop what holds "
                              "the port or choose another one in the config") from None
        self.port = self._server.sockets[0].getsockname()[1]
        if not _loopback(host):
            log.warning("%s served on %s:%d, beyond loopback: it has no authentication; "
                        "restrict access with a firewall", self.name, host, self.port)
        log.info("%s listening addr=http://%s:%d/", self.name, host, self.port)
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()
            self._server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._busy += 1
        try:
            if self._busy > MAX_CLIENTS:
                return
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                    ConnectionError):
                return
            status, ctype, body, head_only = await self._respond(head)
            reason = {200: "OK", 400: "Bad Request", 404: "Not Found",
                      405: "Method Not Allowed", 500: "Internal Server Error"}.get(status, "")
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                         "Connection: close\r\n\r\n".encode())
            if not head_only:
                writer.write(body)
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    await writer.drain()
        finally:
            self._busy -= 1
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await writer.wait_closed()

    async def _respond(self, head: bytes) -> tuple[int, str, bytes, bool]:
        text = "text/plain; charset=utf-8"
        if len(head) > MAX_REQUEST:
            return 400, text, b"request too large\n", False
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, text, b"bad request\n", False
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return 405, text, b"only GET\n", False
        path, _, query = target.partition("?")
        route = self.routes.get(path)
        if route is None:
            return 404, text, b"not found\n", method == "HEAD"
        try:
            out = route(query)
            if isinstance(out, Awaitable):
                out = await out
        except Exception:
            log.exception("%s: internal error serving %s", self.name, path)
            return 500, text, b"internal error; see the daemon's log\n", False
        status, ctype, body = out
        return status, ctype, body, method == "HEAD"


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- collectors ---------------------------------------------------------------------------


class _Families:
    """A collector that yields whatever `build` returns at scrape time."""

    def __init__(self, build: Callable[[], Iterable[Metric]]) -> None:
        self.build = build

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self.build()
        except Exception:  # a scrape must never take the daemon down
            log.exception("metrics: collecting failed")

    def describe(self) -> list[Metric]:
        return []


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, doc, labels=labels)


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    from prometheus_client.core import CounterMetricFamily

    return CounterMetricFamily(name, doc, labels=labels)


class _Base:
    def __init__(self, prefix: str) -> None:
        from prometheus_client import CollectorRegistry, Counter
        from prometheus_client.process_collector import ProcessCollector

        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        self.errors = Counter(f"{prefix}_errors", "Errors by kind (wire error code, 'protocol', "
                              "'auth', 'transport', 'internal', 'refused')", ["kind"],
                              registry=self.registry)
        self.connections = Counter(f"{prefix}_connections", "Connections established and "
                                   "authenticated",
                                   registry=self.registry)
        self.registry.register(_Families(self.families))
        self.http: HttpEndpoint | None = None

    def families(self) -> Iterable[Metric]:
        return []

    def error(self, kind: str) -> None:
        self.errors.labels(kind or "internal").inc()

    def render(self, query: str = "") -> Response:
        from prometheus_client import generate_latest
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)

    async def start(self, listen: tuple[str, int] | None) -> None:
        if listen is None:
            return
        self.http = HttpEndpoint("metrics", {"/metrics": self.render, "/": self.render})
        await self.http.start(*listen)

    async def move(self, listen: tuple[str, int] | None) -> None:
        """Serve on `listen` instead (None: stop serving); the old endpoint stays if the new
        one cannot be served (CdpError)."""
        old = self.http
        self.http = None
        try:
            await self.start(listen)
        except BaseException:
            self.http = old
            raise
        if old is not None:
            await old.close()

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()


class ReceiverMetrics(_Base):
    """cdp_receiver_* metrics of a running receiver (cdp.receiver.daemon.Receiver)."""

    def __init__(self, rx: ReceiverView) -> None:
        from prometheus_client import Counter, Histogram

        super().__init__("cdp_receiver")
        self.rx = rx
        self.apply_seconds = Histogram("cdp_receiver_apply_seconds", "Time to apply one sealed "
                                       "epoch to the replica (fsync'd)", ["volume"],
                                       buckets=APPLY_BUCKETS, registry=self.registry)
        self.takeovers = Counter("cdp_receiver_takeovers", "Connections superseded by a new "
                                 "connection of the same client (a reconnect after a link fault)",
                                 registry=self.registry)

    def applied(self, volume: str, seconds: float) -> None:
        self.apply_seconds.labels(volume).observe(seconds)

    def families(self) -> Iterable[Metric]:
        snap = self.rx.status()
        conns = _gauge("cdp_receiver_open_connections", "Connections open now", [])
        conns.add_metric([], snap.connections)
        f = _receiver_families()
        for v in snap.volumes:
            n = v.volume
            c = v.counters
            f["epoch"].add_metric([n], v.epoch)
            f["epochs"].add_metric([n], c.get("epochs", 0))
            f["blocks"].add_metric([n], c.get("blocks", 0))
            for kind in RECEIVER_BYTES:
                f["bytes"].add_metric([n, kind], c.get(kind, 0))
            if v.lag is not None:
                f["lag"].add_metric([n], max(0.0, v.lag))
                f["as_of"].add_metric([n], v.current_as_of)
            f["applied_at"].add_metric([n], v.applied_at)
            f["rate"].add_metric([n, "logical"], v.rate)
            f["rate"].add_metric([n, "wire"], v.wire_rate)
            f["points"].add_metric([n], v.points)
            f["window"].add_metric([n], v.window or 0.0)
            f["jbytes"].add_metric([n], v.journal_bytes)
            f["pending"].add_metric([n], v.pending_epochs or 0)
            f["connected"].add_metric([n], 1 if v.connected else 0)
            f["failed"].add_metric([n], 1 if v.error else 0)
            f["promoted"].add_metric([n], 1 if v.promoted else 0)
            f["size"].add_metric([n], v.size)
        return [conns, *f.values()]


class SourceMetrics(_Base):
    """cdp_source_* metrics of a running source (cdp.source.daemon.Source)."""

    def __init__(self, src: SourceView) -> None:
        super().__init__("cdp_source")
        self.src = src

    def disconnected(self, err: BaseException) -> None:
        """Count why a connection ended (see Source._log_disconnect)."""
        from cdp.errors import CdpError, RemoteError, TransportError

        if isinstance(err, RemoteError):
            kind = f"remote_{err.code}"
        elif isinstance(err, TransportError | OSError | TimeoutError):
            kind = "transport"
        elif isinstance(err, CdpError):
            kind = err.wire_code
        else:
            kind = "internal"
        self.error(kind)

    def families(self) -> Iterable[Metric]:
        snap = self.src.status()
        now = time.time()
        link = _source_link(snap)
        f = _source_families()
        nbd_g: dict[str, Any] = {
            k: _gauge(f"cdp_source_nbd_{k}", f"nbd mode: {k.replace('_', ' ')}", ["volume"])
            for k in NBD_GAUGES}
        nbd_c: dict[str, Any] = {
            k: _counter(f"cdp_source_nbd_{k}", f"nbd mode: {k.replace('_', ' ')}", ["volume"])
            for k in NBD_COUNTERS}
        for st in snap.volumes:
            _add_source_volume(f, st, now)
            nbd = st.nbd
            if nbd:
                n = st.volume
                for mode in ("capture", "tracking"):
                    f["nbd_mode"].add_metric([n, mode], 1 if nbd.get("mode") == mode else 0)
                for k in NBD_GAUGES:
                    nbd_g[k].add_metric([n], nbd.get(k, 0))
                for k in NBD_COUNTERS:
                    nbd_c[k].add_metric([n], nbd.get(k, 0))
        return [*link, *f.values(), *nbd_g.values(), *nbd_c.values()]


def _receiver_families() -> dict[str, Any]:
    """The receiver's per-volume families, empty, by short name."""
    return {
        "epoch": _gauge("cdp_receiver_epoch", "Last epoch applied to the replica",
                        ["volume"]),
        "epochs": _counter("cdp_receiver_epochs_applied", "Epochs applied", ["volume"]),
        "blocks": _counter("cdp_receiver_blocks_applied", "Blocks applied", ["volume"]),
        "bytes": _counter("cdp_receiver_bytes", "Bytes received, by kind: logical (blocks "
                          "changed), data (sent as data), compressed (their zstd size), "
                          "dedup (resolved by reference), zero, wire (frames)",
                          ["volume", "kind"]),
        "lag": _gauge("cdp_receiver_lag_seconds", "RPO: age of the newest source state the "
                      "replica is known to hold", ["volume"]),
        "as_of": _gauge("cdp_receiver_current_as_of_timestamp_seconds", "Source time of the "
                        "newest state the replica is known to hold", ["volume"]),
        "applied_at": _gauge("cdp_receiver_last_apply_timestamp_seconds",
                             "When the last epoch was applied", ["volume"]),
        "rate": _gauge("cdp_receiver_throughput_bytes_per_second", "Throughput over the "
                       "last 10 s, logical or wire", ["volume", "kind"]),
        "points": _gauge("cdp_receiver_recovery_points", "Recovery points kept (including "
                         "the current state)", ["volume"]),
        "window": _gauge("cdp_receiver_recovery_window_seconds", "Age of the oldest "
                         "recovery point", ["volume"]),
        "jbytes": _gauge("cdp_receiver_journal_bytes", "Bytes of undo files kept",
                         ["volume"]),
        "pending": _gauge("cdp_receiver_pending_epochs", "Sealed epochs waiting to be "
                          "applied and acknowledged", ["volume"]),
        "connected": _gauge("cdp_receiver_volume_connected", "1 while a source writes the "
                            "volume", ["volume"]),
        "failed": _gauge("cdp_receiver_volume_error", "1 if the volume's last session "
                         "ended in an error", ["volume"]),
        "promoted": _gauge("cdp_receiver_volume_promoted", "1 once the replica was "
                           "promoted (no more epochs)", ["volume"]),
        "size": _gauge("cdp_receiver_volume_size_bytes", "Volume size", ["volume"]),
    }


def _source_link(snap: SourceStatus) -> list[Any]:
    """The source's connection to the receiver: up, failing since, next try."""
    link = [_gauge("cdp_source_connected", "1 while connected to the receiver", []),
            _gauge("cdp_source_connection_failing_since_timestamp_seconds", "When the current "
                   "run of failed or lost connections to the receiver began; 0 while "
                   "connected", []),
            _gauge("cdp_source_next_connect_timestamp_seconds", "When the next connection "
                   "attempt is due; 0 while connected", [])]
    link[0].add_metric([], 1 if snap.connected else 0)
    link[1].add_metric([], 0 if snap.connected else snap.link_error_since)
    link[2].add_metric([], 0 if snap.connected else snap.next_connect)
    return link


def _source_families() -> dict[str, Any]:
    """The source's per-volume families, empty, by short name (nbd ones aside)."""
    return {
        "acked": _gauge("cdp_source_acked_epoch", "Last epoch the receiver acknowledged",
                        ["volume"]),
        "epochs": _counter("cdp_source_epochs_acked", "Epochs acknowledged this run",
                           ["volume"]),
        "pending": _gauge("cdp_source_pending_epochs", "Epochs sent or being built, not yet "
                          "acknowledged", ["volume"]),
        "lag": _gauge("cdp_source_lag_seconds", "RPO: age of the newest state the replica "
                      "is known to hold", ["volume"]),
        "bytes": _counter("cdp_source_bytes", "Bytes this run, by kind: scanned (read to "
                          "find changes), skipped (holes, known zero without reading), "
                          "logical (of the blocks that changed), data (sent as data), "
                          "compressed (their zstd size), zero, dedup (sent as references), "
                          "wire (frames sent for the volume)", ["volume", "kind"]),
        "changed": _counter("cdp_source_blocks_changed", "Blocks found changed and sent "
                            "this run (data, zero or reference)", ["volume"]),
        "scans": _counter("cdp_source_scans", "Scans (or resyncs) started", ["volume"]),
        "needs": _counter("cdp_source_needs", "Epochs re-sent because a reference could not "
                          "be resolved", ["volume"]),
        "rate": _gauge("cdp_source_throughput_bytes_per_second", "Logical bytes sent per "
                       "second over the last 10 s", ["volume"]),
        "progress": _gauge("cdp_source_progress_bytes", "Current scan or resync: bytes done",
                           ["volume"]),
        "total": _gauge("cdp_source_progress_total_bytes", "Current scan or resync: bytes "
                        "to do", ["volume"]),
        "phase": _gauge("cdp_source_volume_phase", "1 for the volume's current phase",
                        ["volume", "phase"]),
        "failed": _gauge("cdp_source_volume_error", "1 while the volume is stopped by an "
                         "error", ["volume"]),
        "paused": _gauge("cdp_source_volume_paused", "1 while `cdp pause` holds the volume "
                         "(nothing shipped; the lag grows)", ["volume"]),
        "nbd_mode": _gauge("cdp_source_nbd_mode", "nbd mode: 1 for the current mode "
                           "(capture: every write kept; tracking: pull-ahead, only dirty "
                           "regions kept)", ["volume", "mode"]),
    }


def _add_source_volume(f: dict[str, Any], st: SourceVolumeStatus, now: float) -> None:
    n = st.volume
    f["acked"].add_metric([n], st.acked_epoch)
    f["epochs"].add_metric([n], st.stats.get("epochs", 0))
    f["pending"].add_metric([n], st.pending_epochs)
    if st.current_as_of:
        f["lag"].add_metric([n], max(0.0, now - st.current_as_of))
    for kind in SOURCE_BYTES:
        f["bytes"].add_metric([n, kind], st.stats.get(kind, 0))
    f["changed"].add_metric([n], st.stats.get("changed", 0))
    f["scans"].add_metric([n], st.stats.get("scans", 0))
    f["needs"].add_metric([n], st.stats.get("needs", 0))
    f["rate"].add_metric([n], st.rate)
    f["progress"].add_metric([n], st.progress_done)
    f["total"].add_metric([n], st.progress_total)
    for ph in sorted(set(PHASES) | {st.phase}):
        f["phase"].add_metric([n, ph], 1 if ph == st.phase else 0)
    f["failed"].add_metric([n], 1 if st.error else 0)
    f["paused"].add_metric([n], 1 if st.paused else 0)
