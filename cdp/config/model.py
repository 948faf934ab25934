"""What a loaded config is: frozen dataclasses, and the limits the loaders check against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cdp.limits import (  # the config's limits are the domain's: re-exported as they were
    DEFAULT_BLOCK_SIZE as DEFAULT_BLOCK_SIZE,
)
from cdp.limits import (
    MAX_BLOCK_SIZE as MAX_BLOCK_SIZE,
)
from cdp.limits import (
    MAX_WINDOW as MAX_WINDOW,
)
from cdp.limits import (
    MIN_BLOCK_SIZE as MIN_BLOCK_SIZE,
)
from cdp.limits import (
    NAME_RE as NAME_RE,
)
from cdp.limits import (
    NBD_BLOCK_SIZE as NBD_BLOCK_SIZE,
)
from cdp.limits import (
    valid_name as valid_name,
)
from cdp.ratelimit import Window


@dataclass(frozen=True)
class TlsServer:
    cert: Path
    key: Path
    client_ca: Path | None = None  # when set, clients must present a certificate signed by it


@dataclass(frozen=True)
class TlsClient:
    ca: Path | None = None  # None: the system trust store
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None


@dataclass(frozen=True)
class KeepConfig:
    """Recovery-point retention: points younger than max_age, journal at most max_bytes.

    None means no bound; 0 for either turns the journal off (no points kept).
    """

    max_age: float | None = 24 * 3600.0
    max_bytes: int | None = 10 * 1024**3


@dataclass(frozen=True)
class ClientConfig:
    name: str
    token: bytes
    volumes: tuple[str, ...]
    keep: KeepConfig | None = None  # overrides [receiver] keep_points* for these volumes
    filesets: tuple[str, ...] = ()  # file sets it may write (<data_dir>/_files/<name>/)


@dataclass(frozen=True)
class KeepPolicy:
    """How many snapshots an archive keeps (see cdp/archive/retention.py); all zero keeps all."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0


@dataclass(frozen=True)
class ArchiveConfig:
    """One [[archive]] table: where snapshots of the replicas go, how often, how many are kept."""

    name: str
    repository: str  # an absolute directory path, or s3://bucket/prefix
    endpoint: str | None = None
    password_file: Path | None = None  # None: unencrypted (encrypt = false)
    schedule: str = "manual"  # see cdp/schedule.py
    keep: KeepPolicy = KeepPolicy()
    encrypt: bool = True
    chunk_size: int = 4 * 1024 * 1024
    pack_size: int = 32 * 1024 * 1024
    volumes: tuple[str, ...] = ()  # empty: every volume of every client
    compress_level: int = 3
    uploads: int = 4  # packs uploaded at once


@dataclass(frozen=True)
class ReceiverConfig:
    path: Path
    listen: tuple[str, int]
    data_dir: Path
    clients: tuple[ClientConfig, ...]
    tls: TlsServer | None = None
    max_frame: int = 32 * 1024 * 1024
    idle_timeout: float = 10.0  # a source silent this long is gone (sources Ping every keepalive, 2 s)
    archives: tuple[ArchiveConfig, ...] = ()
    keep: KeepConfig = KeepConfig()
    volume_keep: tuple[tuple[str, KeepConfig], ...] = ()  # [[receiver.volume]] overrides
    drill_format: str = "auto"  # failover test clones: "qcow2", "raw" or "auto" (qcow2 if qemu-img)
    drill_dir: Path | None = None  # where clones go; None: <data_dir>/.drills
    metrics_listen: tuple[str, int] | None = None  # Prometheus endpoint (cdp/metrics.py); None: off
    status_listen: tuple[str, int] | None = None  # HTML status page (cdp/statuspage.py); None: off
    max_connections: int = 64  # connections beyond this are refused
    auth_timeout: float = 10.0  # a connection not authenticated by then is closed
    max_unauthenticated_per_ip: int = 8  # more unauthenticated connections from one address: refused
    max_unauthenticated: int = 32  # in all; beyond it the busiest address loses its oldest one
    max_concurrent_archives: int = 1  # scheduled archive jobs run at once (the others queue)

    def client(self, name: str) -> ClientConfig | None:
        return next((c for c in self.clients if c.name == name), None)

    def keep_for(self, volume: str) -> KeepConfig:
        """Retention of one volume: its [[receiver.volume]] entry, else its client's, else the
        receiver's."""
        for name, keep in self.volume_keep:
            if name == volume:
                return keep
        for c in self.clients:
            if volume in c.volumes and c.keep is not None:
                return c.keep
        return self.keep

    def archive(self, name: str) -> ArchiveConfig | None:
        return next((a for a in self.archives if a.name == name), None)


@dataclass(frozen=True)
class VolumeConfig:
    name: str
    path: Path
    mode: str = "scan"
    block_size: int = DEFAULT_BLOCK_SIZE
    scan_interval: float = 10.0
    min_scan_interval: float = 0.1  # scans start at most this often (scanpace.py)
    pre_scan: str | None = None
    post_scan: str | None = None
    snapshot: str = "none"  # or "reflink"
    nbd_listen: str | None = None
    rate_limit: float | None = None  # bytes per second sent for this volume; None: no cap
    # nbd mode: where the export is served, parsed from nbd_listen ("host:port" and/or "unix:PATH")
    nbd_tcp: tuple[str, int] | None = None
    nbd_unix: Path | None = None
    epoch_interval: float = 1.0  # nbd mode: cut an epoch at least this often while writes come
    capture_memory: int = 256 * 1024 * 1024  # nbd mode: captured data held in memory ...
    capture_disk: int = 1024 * 1024 * 1024  # ... then spilled to state_dir, then pull-ahead
    dirty_region: int = 4 * 1024 * 1024  # nbd mode: granularity of the persistent dirty map
    group: str | None = None  # nbd mode: volumes of one group cut their epochs together
    nbd_tls: TlsServer | None = None  # nbd mode: clients must STARTTLS with this cert/key
    nbd_any_client: bool = False  # [volume.nbd_tls] allow_any_client: no client cert beyond loopback
    nbd_socket_owner: int | None = None  # nbd_listen "unix:": the socket's user id (None: cdp's own)
    nbd_socket_group: int | None = None  # ... its group id (None: cdp's own)
    nbd_socket_mode: int = 0o600  # ... and its mode: never any access for others
    qmp: Path | None = None  # qemu mode: QEMU's QMP monitor socket
    node: str | None = None  # qemu mode: the disk's block node name
    nbd_socket: Path | None = None  # qemu mode: an NBD server QEMU runs already (None: cdp starts one)


@dataclass(frozen=True)
class FilesetConfig:
    name: str
    paths: tuple[Path, ...]  # files or folders (folders: everything under them)
    max_file_size: int = 16 * 1024 * 1024  # larger files are refused (logged), the rest go on
    scan_interval: float = 10.0  # re-check this often, besides file-change events


@dataclass(frozen=True)
class SourceConfig:
    path: Path
    name: str
    receiver: tuple[str, int]
    token: bytes
    state_dir: Path
    volumes: tuple[VolumeConfig, ...]
    filesets: tuple[FilesetConfig, ...] = ()
    tls: TlsClient | None = None
    window: int = 2
    batch_bytes: int = 2 * 1024 * 1024
    max_epoch_bytes: int = 64 * 1024 * 1024
    compress_level: int = 1
    workers: int = 2
    reconnect_min: float = 0.5
    reconnect_max: float = 5.0  # reconnect delays double from reconnect_min up to this (jittered)
    retry_max: float = 10.0  # a volume the receiver refused for a while: retried at most this far apart
    keepalive: float = 2.0  # Ping after this long without traffic (well below the receiver's idle_timeout)
    dead_after: float = 6.0  # nothing received for this long, awaiting an answer: drop, reconnect
    dedup_index_entries: int = 4_000_000
    max_frame: int = 32 * 1024 * 1024
    rate_limit: float | None = None  # bytes per second sent, all volumes together; None: no cap
    read_limit: float | None = None  # bytes per second read by scans, all volumes together
    schedule: tuple[Window, ...] = ()  # time-of-day windows with other caps; the first match wins
    metrics_listen: tuple[str, int] | None = None  # Prometheus endpoint (cdp/metrics.py); None: off
    max_concurrent_scans: int = 2  # full scans and resyncs running at once; the others queue

    def volume(self, name: str) -> VolumeConfig | None:
        return next((v for v in self.volumes if v.name == name), None)
