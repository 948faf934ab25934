"""Typed status snapshots of both daemons: what metrics, the status page, status.json and
`cdp status` read.

Each daemon builds one frozen snapshot in one method (`Receiver.status()`,
`Source.status()`) from its own objects; readers get the snapshot and never
reach into the daemon. `cdp status` builds the receiver's per-volume view from
the files with the same pure builder (`volume_status`), so a running receiver's
status page and a stopped receiver's `cdp status` say the same thing the same way.

This module imports no daemon: the daemons import it (data flows one way).

JSON, one mapping each (`to_dict` / `from_dict`); the keys are what users' scripts read:

    VolumeStatus (receiver, one replica): volume, epoch, epoch_time, applied_at, size,
      block_size, counters{}, current_as_of, lag|null, connected, client, error, rate,
      wire_rate, points, oldest_point_epoch|null, oldest_point_time|null, window|null,
      journal_bytes, promoted, and from a running receiver only: pending_epochs, receiving
    ReceiverStatus: generated, data_dir, listen, connections, volumes[]
    LiveFacts (<data_dir>/<volume>/status.json, with updated and pid): client, connected,
      current_as_of, rate, wire_rate, error
    SourceVolumeStatus: volume, path, phase, acked_epoch, pending_epochs, replica_id, seeded,
      progress_done, progress_total, current_as_of, confirmed_at, lag|null, last_ack, rate,
      error, stats{}, size, block_size, rate_limit|null, mode, paused, paused_since|null,
      resync, resync_blocks, and nbd{} for nbd volumes
      (phase: a `Phase` value, defined here for the source, the metrics and `cdp status`)
    SourceStatus (<state_dir>/status.json): source, connected, pid, link_error,
      link_error_since, next_connect, updated, rate_limit, read_limit, window, volumes[],
      filesets[]
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

# -- receiver ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaFacts:
    """The replica's durable state (state.json, or the open replica's in-memory copy)."""

    epoch: int = 0
    epoch_time: float = 0.0
    applied_at: float = 0.0
    size: int = 0
    block_size: int = 0
    counters: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ReplicaFacts:
        """From state.json; missing keys count as 0."""
        return cls(int(raw.get("epoch", 0)), float(raw.get("epoch_time", 0.0)),
                   float(raw.get("applied_at", 0.0)), int(raw.get("size", 0)),
                   int(raw.get("block_size", 0)), dict(raw.get("counters", {})))


@dataclass(frozen=True)
class PointsFacts:
    """The recovery window: points kept (the current state included) and their journal bytes.

    `oldest_epoch`/`oldest_time` name the oldest point; with no undo file kept that is the
    current state itself (as `cdp points` lists it)."""

    count: int = 1
    oldest_epoch: int | None = None
    oldest_time: float | None = None
    journal_bytes: int = 0


@dataclass(frozen=True)
class LiveFacts:
    """What a running receiver knows of a volume beyond its replica state: who writes it,
    how current the source said it is, how fast it moves. Written once a second to
    <data_dir>/<volume>/status.json (with `updated` and `pid`) for `cdp status` and promote."""

    client: str = ""
    connected: bool = False
    current_as_of: float = 0.0
    rate: float = 0.0
    wire_rate: float = 0.0
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, fresh: bool = True) -> LiveFacts:
        """From a status.json; a stale file (`fresh` False: the receiver is not running) keeps
        its client, error and last known currency, but nothing is connected or moving."""
        return cls(client=str(raw.get("client", "")),
                   connected=bool(fresh and raw.get("connected")),
                   current_as_of=float(raw.get("current_as_of", 0.0)),
                   rate=float(raw.get("rate", 0.0)) if fresh else 0.0,
                   wire_rate=float(raw.get("wire_rate", 0.0)) if fresh else 0.0,
                   error=str(raw.get("error", "")))


@dataclass(frozen=True)
class VolumeStatus:
    """One replica as the receiver sees it at one moment (see volume_status)."""

    volume: str
    epoch: int
    epoch_time: float
    applied_at: float
    size: int
    block_size: int
    counters: Mapping[str, int]
    current_as_of: float  # source time of the newest state the replica is known to hold
    lag: float | None  # RPO: now - current_as_of; None before anything was captured
    connected: bool
    client: str
    error: str
    rate: float  # logical bytes/s over the last 10 s
    wire_rate: float
    points: int
    oldest_point_epoch: int | None
    oldest_point_time: float | None
    window: float | None  # age of the oldest point; None when it has no capture time
    journal_bytes: int
    promoted: bool
    pending_epochs: int | None = None  # sealed, not applied yet: known to a running receiver
    receiving: bool | None = None  # an epoch is arriving: known to a running receiver

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; facts only a running receiver knows are left out when unknown."""
        out = dataclasses.asdict(self)
        for key in ("pending_epochs", "receiving"):
            if out[key] is None:
                del out[key]
        return out


def volume_status(volume: str, state: ReplicaFacts, live: LiveFacts, points: PointsFacts, *,
                  promoted: bool, now: float, pending_epochs: int | None = None,
                  receiving: bool | None = None) -> VolumeStatus:
    """The one builder of a VolumeStatus, for the running receiver and for `cdp status`."""
    as_of = max(state.epoch_time, live.current_as_of)
    oldest = points.oldest_time or None
    return VolumeStatus(
        volume=volume, epoch=state.epoch, epoch_time=state.epoch_time,
        applied_at=state.applied_at, size=state.size, block_size=state.block_size,
        counters=dict(state.counters), current_as_of=as_of,
        lag=(now - as_of) if as_of else None, connected=live.connected, client=live.client,
        error=live.error, rate=live.rate, wire_rate=live.wire_rate, points=points.count,
        oldest_point_epoch=points.oldest_epoch, oldest_point_time=oldest,
        window=(now - oldest) if oldest else None, journal_bytes=points.journal_bytes,
        promoted=promoted, pending_epochs=pending_epochs, receiving=receiving)


@dataclass(frozen=True)
class ReceiverStatus:
    """A running receiver at one moment: its listener, connections and volumes."""

    generated: float
    data_dir: str
    listen: str
    connections: int  # connections open now, authenticated or not
    volumes: tuple[VolumeStatus, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"generated": self.generated, "data_dir": self.data_dir, "listen": self.listen,
                "connections": self.connections, "volumes": [v.to_dict() for v in self.volumes]}


class ReceiverView(Protocol):
    """What readers of a running receiver need: its snapshot."""

    def status(self, now: float | None = None) -> ReceiverStatus: ...


# -- source --------------------------------------------------------------------------------


class Phase(enum.StrEnum):
    """What a source volume is doing: shown by `cdp status`, status.json and the metrics. Its
    life cycle (which changes are legal) is the source's: cdp/source/phase.py."""

    STARTING = "starting"
    OPENING = "opening"
    FETCHING_MAP = "fetching map"
    SEEDING = "seeding"
    SCANNING = "scanning"
    RESYNC = "resync"
    SENDING = "sending"
    IDLE = "idle"
    QUEUED = "queued"  # waiting for a scan slot (max_concurrent_scans)
    PAUSED = "paused"
    DISCONNECTED = "disconnected"
    FAILED = "failed"


@dataclass(frozen=True)
class SourceVolumeStatus:
    """One volume as the source sees it at one moment. Defaults fill what an older
    status.json lacks."""

    volume: str
    path: str = ""
    phase: str = "starting"
    acked_epoch: int = 0
    pending_epochs: int = 0
    replica_id: str = ""
    seeded: bool = False
    progress_done: int = 0
    progress_total: int = 0
    current_as_of: float = 0.0
    confirmed_at: float = 0.0  # when current_as_of became known (ack, or an empty scan)
    lag: float | None = None
    last_ack: float = 0.0
    rate: float = 0.0  # logical bytes/s sent over the last 10 s
    error: str = ""
    stats: Mapping[str, float] = field(default_factory=dict)
    size: int = 0
    block_size: int = 0
    rate_limit: float | None = None
    mode: str = "scan"
    paused: bool = False
    paused_since: float | None = None
    resync: str = ""  # "", "queued", "running"
    resync_blocks: int = 0
    nbd: Mapping[str, Any] | None = None  # nbd volumes: capture / pull-ahead state

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.nbd is None:
            del out["nbd"]
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SourceVolumeStatus:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def at(self, now: float) -> SourceVolumeStatus:
        """The same figures with the lag as of `now` (a status file is read later)."""
        lag = (now - self.current_as_of) if self.current_as_of else None
        return dataclasses.replace(self, lag=lag)


@dataclass(frozen=True)
class SourceStatus:
    """A running source at one moment; written to <state_dir>/status.json once a second."""

    source: str
    connected: bool = False
    pid: int = 0
    link_error: str = ""  # why the last connection failed or ended ("" while connected)
    link_error_since: float = 0.0  # when the current run of failed connections began
    next_connect: float = 0.0  # when the next attempt is due (0 while connected)
    updated: float = 0.0
    rate_limit: float | None = None
    read_limit: float | None = None
    window: str | None = None  # the schedule window in force ("08:00-18:00"), if any
    volumes: tuple[SourceVolumeStatus, ...] = ()
    filesets: tuple[Mapping[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["volumes"] = [v.to_dict() for v in self.volumes]
        out["filesets"] = [dict(f) for f in self.filesets]
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SourceStatus:
        known = {f.name for f in dataclasses.fields(cls)} - {"volumes", "filesets"}
        return cls(**{"source": "", **{k: v for k, v in raw.items() if k in known}},
                   volumes=tuple(SourceVolumeStatus.from_dict(v) for v in raw.get("volumes", [])),
                   filesets=tuple(raw.get("filesets", [])))


class SourceView(Protocol):
    """What readers of a running source need: its snapshot."""

    def status(self) -> SourceStatus: ...
