"""TOML configuration -> frozen, validated dataclasses.

Every error names the file, the key and the reason, and says what to do.
Relative paths are relative to the folder of the config file. Unknown keys
are errors: a typo must never silently fall back to a default. Which keys each
table accepts, and their defaults, are declared once in cdp/configkeys.py.
"""

from __future__ import annotations

import difflib
import grp
import os
import pwd
import re
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from cdp.configkeys import RECEIVER_FILE, SOURCE_FILE, TABLES, table_of
from cdp.errors import ConfigError, WrongConfigError
from cdp.ratelimit import ALL_DAYS, INHERIT, Window, format_rate, parse_days, parse_hours, parse_rate
from cdp.units import format_bytes, parse_duration, parse_hostport, parse_size

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEFAULT_BLOCK_SIZE = 64 * 1024
NBD_BLOCK_SIZE = 16 * 1024  # default for nbd volumes: 16 B of source RAM per block (1 GiB/TiB)
MIN_BLOCK_SIZE = 4 * 1024
MAX_BLOCK_SIZE = 4 * 1024 * 1024
MAX_WINDOW = 16  # the receiver answers at most this many committed epochs per volume


def valid_name(name: str) -> bool:
    """Volume and client names become folder names: no separators, no '..', no hidden files."""
    return bool(NAME_RE.fullmatch(name)) and ".." not in name


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
    schedule: str = "manual"  # see cdp/archive/schedule.py
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
    min_scan_interval: float = 0.25  # scans start at most this often (scanpace.py)
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


class _Table:
    """Reads one TOML table, remembering which keys were consumed.

    Only keys declared in cdp/configkeys.py can be read, and their defaults come
    from there (parsed like a value from a file); a loader passes `default` only
    for a key declared without one (inherited or computed, or a sub-table).
    """

    def __init__(self, file: Path, where: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: [{where}] must be a table")
        self.file, self.where, self.data = file, where, data
        self.keys = TABLES[table_of(where)]
        self.used: set[str] = set()

    def err(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.file}: {self.where}.{key}: {reason}")

    def get(self, key: str, conv: Callable[[Any], Any], default: Any = ...) -> Any:
        spec = self.keys.get(key)
        if spec is None or (default is not ... and (spec.default is not None or spec.required)):
            raise AssertionError(f"{table_of(self.where)}.{key}: declare it, and its default, once "
                                 "in cdp/configkeys.py")
        self.used.add(key)
        if key not in self.data:
            if spec.required:
                raise self.err(key, "is required")
            if spec.default is None:
                return None if default is ... else default
        try:
            return conv(self.data.get(key, spec.default))
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise self.err(key, str(exc)) from None

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            near = difflib.get_close_matches(unknown[0], list(self.keys), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise self.err(unknown[0], f"unknown key; {hint}[{table_of(self.where)}] accepts "
                           f"{', '.join(sorted(self.keys))} (`cdp init DIR` writes every one of them, "
                           "explained)")


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError("expected a non-empty string")
    return v


def _int(lo: int, hi: int) -> Callable[[Any], int]:
    def conv(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"expected a whole number from {lo} to {hi}")
        return v
    return conv


def _name(v: Any) -> str:
    v = _str(v)
    if not valid_name(v):
        raise ValueError(
            f"{v!r} is not a valid name: use letters, digits, '.', '_' and '-', "
            "start with a letter or digit, no '..', at most 128 characters"
        )
    return v


def _path(base: Path) -> Callable[[Any], Path]:
    def conv(v: Any) -> Path:
        p = Path(os.path.expanduser(_str(v)))
        return p if p.is_absolute() else (base / p)
    return conv


def _block_size(v: Any) -> int:
    n = parse_size(v)
    if n < MIN_BLOCK_SIZE or n > MAX_BLOCK_SIZE or n & (n - 1):
        raise ValueError("block size must be a power of two from 4KiB to 4MiB")
    return n


def read_token(path: Path, file: Path, key: str) -> bytes:
    """The secret from a token file; refuses files others can read (they would leak it)."""
    try:
        st = path.stat()
        data = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(
            f"{file}: {key}: cannot read token file {path}: {exc.strerror} "
            "(create one with `cdp init` or `head -c32 /dev/urandom | xxd -p -c64 > FILE`)"
        ) from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{file}: {key}: token file {path} is readable by others; run `chmod 600 {path}`"
        )
    if len(data) < 16:
        raise ConfigError(f"{file}: {key}: token in {path} is too short (need 16+ characters)")
    return data


def _load(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (create examples with `cdp init DIR`)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


SOURCE_TABLES = frozenset(SOURCE_FILE)
RECEIVER_TABLES = frozenset(RECEIVER_FILE)


def config_kind(data: dict[str, Any]) -> str | None:
    """"source" or "receiver" from a config's top-level tables; None if they do not tell."""
    keys = set(data)
    if keys & RECEIVER_TABLES and not keys & SOURCE_TABLES:
        return "receiver"
    if keys & SOURCE_TABLES and not keys & RECEIVER_TABLES:
        return "source"
    return None


def _top(path: Path, data: dict[str, Any], allowed: set[str]) -> None:
    wanted = "receiver" if "receiver" in allowed else "source"
    found = config_kind(data)
    if found is not None and found != wanted:  # before the tables: "unknown table" misleads
        raise WrongConfigError(path, found, wanted)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{path}: [{unknown[0]}]: unknown table (expected {', '.join(sorted(allowed))})")


def load_receiver(path: str | Path) -> ReceiverConfig:
    """Load and validate a receiver config."""
    file = Path(path).resolve()
    base = file.parent
    data = _load(file)
    _top(file, data, set(RECEIVER_FILE))
    t = _Table(file, "receiver", data.get("receiver", {}))
    listen = t.get("listen", lambda v: parse_hostport(_str(v)))
    data_dir = t.get("data_dir", _path(base))
    max_frame = t.get("max_frame", lambda v: _range_size(v, 1 << 20, 1 << 30))
    idle = t.get("idle_timeout", _positive_duration)
    plaintext = t.get("allow_plaintext", _bool)
    keep = _keep(t)
    drill_format = t.get("drill_format", _choice("auto", "qcow2", "raw"))
    drill_dir = t.get("drill_dir", _path(base))
    metrics_listen = t.get("metrics_listen", _http_listen)
    status_listen = t.get("status_listen", _http_listen)
    max_connections = t.get("max_connections", _int(1, 65536))
    auth_timeout = t.get("auth_timeout", _positive_duration)
    max_unauth = t.get("max_unauthenticated_per_ip", _int(1, 65536))
    max_unauth_all = t.get("max_unauthenticated", _int(1, 65536))
    max_archives = t.get("max_concurrent_archives", _int(1, 64))
    raw_vols = t.get("volume", lambda v: v, default=[])
    if not isinstance(raw_vols, list):
        raise t.err("volume", "must be an array of tables: [[receiver.volume]]")
    volume_keep = []
    for i, rv in enumerate(raw_vols):
        vt = _Table(file, f"receiver.volume[{i}]", rv)
        volume_keep.append((vt.get("name", _name), _keep(vt, keep)))
        vt.done()
    tls = None
    if "tls" in t.data:
        tt = _Table(file, "receiver.tls", t.get("tls", lambda v: v))
        tls = TlsServer(
            cert=tt.get("cert", _path(base)),
            key=tt.get("key", _path(base)),
            client_ca=tt.get("client_ca", _path(base)),
        )
        tt.done()
    raw_clients = t.get("client", lambda v: v, default=[])
    if not isinstance(raw_clients, list):
        raise t.err("client", "must be an array of tables: [[receiver.client]]")
    clients = []
    for i, rc in enumerate(raw_clients):
        ct = _Table(file, f"receiver.client[{i}]", rc)
        name = ct.get("name", _name)
        tf = ct.get("token_file", _path(base))
        vols = ct.get("volumes", _name_list)
        csets = ct.get("filesets", _name_list)
        ckeep = _keep(ct, keep) if {"keep_points", "keep_points_size"} & set(ct.data) else None
        ct.done()
        clients.append(ClientConfig(name, read_token(tf, file, f"{ct.where}.token_file"), vols,
                                    ckeep, csets))
    names = [c.name for c in clients]
    if len(set(names)) != len(names):
        raise t.err("client", "two clients have the same name")
    t.done()
    if tls is None and not plaintext and not _loopback(listen[0]):
        raise t.err("listen", f"{listen[0]} is not a loopback address and [receiver.tls] is not "
                    "set: block data and names would cross the network in clear. Add "
                    "[receiver.tls], or set allow_plaintext = true if the link is already "
                    "protected (VPN, IPsec)")
    archives = _archives(file, base, data.get("archive", []))
    return ReceiverConfig(file, listen, data_dir, tuple(clients), tls, max_frame, idle,
                          archives=archives, keep=keep, volume_keep=tuple(volume_keep),
                          drill_format=drill_format, drill_dir=drill_dir,
                          metrics_listen=metrics_listen, status_listen=status_listen,
                          max_connections=max_connections,
                          max_concurrent_archives=max_archives, auth_timeout=auth_timeout,
                          max_unauthenticated_per_ip=max_unauth,
                          max_unauthenticated=max_unauth_all)


def _keep(t: _Table, inherit: KeepConfig | None = None) -> KeepConfig:
    """keep_points (a duration or "forever") and keep_points_size (a size or "unlimited").

    [receiver] has defaults; a client or volume entry inherits what it leaves out.
    """
    def age(v: Any) -> float | None:
        return None if v in ("forever", "unlimited") else parse_duration(v)

    def size(v: Any) -> int | None:
        return None if v == "unlimited" else parse_size(v)

    if inherit is None:
        return KeepConfig(t.get("keep_points", age), t.get("keep_points_size", size))
    return KeepConfig(t.get("keep_points", age, default=inherit.max_age),
                      t.get("keep_points_size", size, default=inherit.max_bytes))


def _archives(file: Path, base: Path, raw: Any) -> tuple[ArchiveConfig, ...]:
    """[[archive]] tables: repository, credentials, schedule, retention, chunk and pack sizes."""
    from cdp.archive.schedule import parse_schedule

    if not isinstance(raw, list):
        raise ConfigError(f"{file}: archive: must be an array of tables: [[archive]]")
    out: list[ArchiveConfig] = []
    for i, ra in enumerate(raw):
        at = _Table(file, f"archive[{i}]", ra)
        name = at.get("name", _name)
        repo = at.get("repository", lambda v: _repository(base, _str(v)))
        encrypt = at.get("encrypt", _bool)
        pw = at.get("password_file", _str)
        keep_raw = at.get("keep", lambda v: v, default={})
        kt = _Table(file, f"archive[{i}].keep", keep_raw)
        keep = KeepPolicy(**{k: kt.get(k, _int(0, 1_000_000))
                             for k in ("last", "hourly", "daily", "weekly", "monthly")})
        kt.done()
        a = ArchiveConfig(
            name=name, repository=repo,
            endpoint=at.get("endpoint", _str),
            password_file=None if pw in (None, "none") else _path(base)(pw),
            schedule=at.get("schedule", lambda v: (parse_schedule(_str(v)), v)[1]),
            keep=keep, encrypt=encrypt,
            chunk_size=at.get("chunk_size", _chunk_size),
            pack_size=at.get("pack_size", lambda v: _range_size(v, 1 << 20, 1 << 30)),
            volumes=at.get("volumes", _name_list),
            compress_level=at.get("compress_level", _int(-7, 19)),
            uploads=at.get("uploads", _int(1, 32)),
        )
        at.done()
        if encrypt and a.password_file is None:
            raise at.err("password_file", "is required while encrypt = true (a file holding the "
                         "repository password; chmod 600)")
        if not encrypt and pw not in (None, "none"):
            raise at.err("password_file", 'must be "none" (or absent) when encrypt = false')
        if not encrypt and repo.startswith("s3://"):
            raise at.err("encrypt", "an S3 repository must be encrypted; encrypt = false is only "
                         "allowed for a local directory")
        if a.endpoint is not None and not repo.startswith("s3://"):
            raise at.err("endpoint", "only applies to an s3:// repository")
        if a.pack_size < a.chunk_size:
            raise at.err("pack_size", "must be at least chunk_size")
        if any(o.name == name for o in out):
            raise at.err("name", f"archive {name!r} is defined twice")
        out.append(a)
    return tuple(out)


def _repository(base: Path, v: str) -> str:
    if v.startswith("s3://"):
        if not v[5:].split("/", 1)[0]:
            raise ValueError("expected s3://bucket/prefix")
        return v.rstrip("/")
    if v.startswith("file://"):
        v = v[7:]
        if not v.startswith("/"):
            raise ValueError("a file:// URL needs an absolute path: file:///path")
    elif "://" in v:
        raise ValueError("expected a directory path, file:///path or s3://bucket/prefix")
    return str(_path(base)(v))


def _chunk_size(v: Any) -> int:
    n = parse_size(v)
    if n < 64 * 1024 or n > 64 * 1024 * 1024 or n & (n - 1):
        raise ValueError("chunk size must be a power of two from 64KiB to 64MiB")
    return n


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("expected true or false")
    return v


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def _http_listen(v: Any) -> tuple[str, int]:
    """host:port of an HTTP endpoint (metrics, status page); port 0 picks a free one."""
    text = _str(v)
    if text.endswith(":0"):
        return parse_hostport(text[:-1] + "1")[0], 0
    return parse_hostport(text)


def _positive_duration(v: Any) -> float:
    d = parse_duration(v)
    if d <= 0:
        raise ValueError("must be longer than zero")
    return d


def _range_size(v: Any, lo: int, hi: int) -> int:
    n = parse_size(v)
    if not lo <= n <= hi:
        raise ValueError(f"expected a size from {lo} to {hi} bytes")
    return n


def _name_list(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise ValueError("expected a list of names")
    return tuple(_name(x) for x in v)


def load_source(path: str | Path) -> SourceConfig:
    """Load and validate a source config."""
    file = Path(path).resolve()
    base = file.parent
    data = _load(file)
    _top(file, data, set(SOURCE_FILE))
    t = _Table(file, "source", data.get("source", {}))
    name = t.get("name", _name)
    receiver = t.get("receiver", lambda v: parse_hostport(_str(v)))
    token = read_token(t.get("token_file", _path(base)), file, "source.token_file")
    state_dir = t.get("state_dir", _path(base))
    tls = None
    if "tls" in t.data:
        tt = _Table(file, "source.tls", t.get("tls", lambda v: v))
        tls = TlsClient(
            ca=tt.get("ca", _path(base)),
            cert=tt.get("cert", _path(base)),
            key=tt.get("key", _path(base)),
            server_name=tt.get("server_name", _str),
        )
        if (tls.cert is None) != (tls.key is None):
            raise tt.err("cert", "cert and key go together: set both or neither")
        tt.done()
    if isinstance(t.data.get("window"), list):
        raise t.err("window", "is the number of epochs in flight; time-of-day rate limits go in "
                    "[[source.schedule]] tables")
    opts = dict(
        window=t.get("window", _int(1, MAX_WINDOW)),
        batch_bytes=t.get("batch_bytes", lambda v: _range_size(v, 64 << 10, 16 << 20)),
        max_epoch_bytes=t.get("max_epoch_bytes", lambda v: _range_size(v, 1 << 20, 1 << 40)),
        compress_level=t.get("compress_level", _int(-7, 19)),
        workers=t.get("workers", _int(1, 64)),
        reconnect_min=t.get("reconnect_min", parse_duration),
        reconnect_max=t.get("reconnect_max", _positive_duration),
        retry_max=t.get("retry_max", _positive_duration),
        keepalive=t.get("keepalive", _positive_duration),
        dead_after=t.get("dead_after", _positive_duration),
        dedup_index_entries=t.get("dedup_index_entries", _int(0, 1 << 32)),
        max_frame=t.get("max_frame", lambda v: _range_size(v, 1 << 20, 1 << 30)),
        rate_limit=t.get("rate_limit", parse_rate),
        read_limit=t.get("read_limit", parse_rate),
        schedule=_schedule(file, t),
        metrics_listen=t.get("metrics_listen", _http_listen),
        max_concurrent_scans=t.get("max_concurrent_scans", _int(1, 1024)),
    )
    t.done()
    if opts["batch_bytes"] * 2 > opts["max_frame"]:
        raise ConfigError(f"{file}: source.batch_bytes: must be at most half of max_frame")
    if opts["reconnect_max"] < opts["reconnect_min"]:
        raise t.err("reconnect_max", f"must be at least reconnect_min ({opts['reconnect_min']:g}s)")
    if opts["dead_after"] is None:
        opts["dead_after"] = 3 * opts["keepalive"]
    elif opts["dead_after"] <= opts["keepalive"]:
        raise t.err("dead_after", f"must be longer than keepalive ({opts['keepalive']:g}s): the "
                    "receiver is asked for an answer after keepalive of silence, e.g. "
                    "dead_after = 3 x keepalive")

    raw_vols = data.get("volume", [])
    if not isinstance(raw_vols, list):
        raise ConfigError(f"{file}: volume: must be an array of tables: [[volume]]")
    volumes = [_volume(file, base, i, rv) for i, rv in enumerate(raw_vols)]
    raw_sets = data.get("fileset", [])
    if not isinstance(raw_sets, list):
        raise ConfigError(f"{file}: fileset: must be an array of tables: [[fileset]]")
    filesets = []
    for i, rs in enumerate(raw_sets):
        ft = _Table(file, f"fileset[{i}]", rs)
        fname = ft.get("name", _name)
        paths = ft.get("paths", lambda v: tuple(_path(base)(x) for x in _list(v)))
        fmax = ft.get("max_file_size", lambda v: _range_size(v, 1, 1 << 30))
        fscan = ft.get("scan_interval", _positive_duration)
        ft.done()
        filesets.append(FilesetConfig(fname, paths, fmax, fscan))
    all_names = [v.name for v in volumes] + [f.name for f in filesets]
    dup = {n for n in all_names if all_names.count(n) > 1}
    if dup:
        raise ConfigError(f"{file}: volume: name {sorted(dup)[0]!r} is used twice")
    if not volumes and not filesets:
        raise ConfigError(f"{file}: volume: nothing to protect; add a [[volume]] table")
    return SourceConfig(file, name, receiver, token, state_dir, tuple(volumes),
                        tuple(filesets), tls, **opts)


def _list(v: Any) -> list[Any]:
    if not isinstance(v, list) or not v:
        raise ValueError("expected a non-empty list")
    return v


def _volume(file: Path, base: Path, i: int, rv: Any) -> VolumeConfig:
    vt = _Table(file, f"volume[{i}]", rv)
    mode = vt.get("mode", _choice("scan", "nbd"))
    vol = VolumeConfig(
        name=vt.get("name", _name),
        path=vt.get("path", _path(base)),
        mode=mode,
        # nbd: small random writes dirty whole blocks; 16 KiB measured 5x the IOPS of 64 KiB
        block_size=vt.get("block_size", _block_size,
                          default=DEFAULT_BLOCK_SIZE if mode == "scan" else NBD_BLOCK_SIZE),
        scan_interval=vt.get("scan_interval", parse_duration),
        min_scan_interval=vt.get("min_scan_interval", parse_duration),
        pre_scan=vt.get("pre_scan", _str),
        post_scan=vt.get("post_scan", _str),
        snapshot=vt.get("snapshot", _choice("none", "reflink")),
        nbd_listen=vt.get("nbd_listen", _str),
        rate_limit=vt.get("rate_limit", parse_rate),
        epoch_interval=vt.get("epoch_interval", parse_duration),
        capture_memory=vt.get("capture_memory", lambda v: _range_size(v, 1 << 20, 1 << 40)),
        dirty_region=vt.get("dirty_region", lambda v: _range_size(v, 64 << 10, 1 << 30)),
        capture_disk=vt.get("capture_disk", lambda v: _range_size(v, 0, 1 << 50)),
        group=vt.get("group", _name),
        nbd_socket_owner=vt.get("nbd_socket_owner", _user_id),
        nbd_socket_group=vt.get("nbd_socket_group", _group_id),
        nbd_socket_mode=vt.get("nbd_socket_mode", _socket_mode),
    )
    if "nbd_tls" in vt.data:
        nt = _Table(file, f"volume[{i}].nbd_tls", vt.get("nbd_tls", lambda v: v))
        vol = replace(vol, nbd_tls=TlsServer(
            cert=nt.get("cert", _path(base)),
            key=nt.get("key", _path(base)),
            client_ca=nt.get("client_ca", _path(base))),
            nbd_any_client=nt.get("allow_any_client", _bool))
        nt.done()
    vt.done()
    if vol.mode == "nbd":
        if vol.nbd_listen is None:
            raise vt.err("nbd_listen", "nbd mode needs an address to serve the volume on, e.g. "
                         "nbd_listen = \"127.0.0.1:10809\" or \"unix:vm1-disk0.sock\"")
        tcp, unix = _nbd_listen(vt, base, vol.nbd_listen, tls=vol.nbd_tls is not None)
        if (tcp is not None and not _loopback(tcp[0]) and vol.nbd_tls is not None
                and vol.nbd_tls.client_ca is None and not vol.nbd_any_client):
            raise ConfigError(
                f"{file}: volume[{i}].nbd_tls.client_ca: is required because nbd_listen {tcp[0]} is "
                "not a loopback address: without it any host that reaches the port can complete "
                "TLS and read and write the disk; set client_ca to the CA that signs the "
                "hypervisors' client certificates (or allow_any_client = true to accept that)")
        if vol.dirty_region % vol.block_size:
            raise vt.err("dirty_region", f"must be a multiple of block_size ({vol.block_size})")
        if vol.epoch_interval <= 0:
            raise vt.err("epoch_interval", "must be positive, e.g. \"1s\"")
        vol = replace(vol, nbd_tcp=tcp, nbd_unix=unix)
    socket_keys = sorted({"nbd_socket_owner", "nbd_socket_group", "nbd_socket_mode"} & set(vt.data))
    if socket_keys and vol.nbd_unix is None:
        raise vt.err(socket_keys[0], "only applies to an nbd volume served on a Unix socket "
                     "(mode = \"nbd\", nbd_listen = \"unix:PATH\")")
    if vol.group is not None and vol.mode != "nbd":
        raise vt.err("group", "consistency groups need mode = \"nbd\" (a scan has no common instant)")
    return vol


def _nbd_listen(vt: _Table, base: Path, text: str,
                tls: bool = False) -> tuple[tuple[str, int] | None, Path | None]:
    """"host:port", "unix:PATH" or both separated by a comma."""
    tcp: tuple[str, int] | None = None
    unix: Path | None = None
    for part in (p.strip() for p in text.split(",")):
        if part.startswith("unix:"):
            if unix is not None or not part[5:]:
                raise vt.err("nbd_listen", "give one non-empty unix:PATH")
            unix = Path(part[5:]) if Path(part[5:]).is_absolute() else base / part[5:]
        else:
            if tcp is not None:
                raise vt.err("nbd_listen", "give one host:port")
            try:
                tcp = parse_hostport(part)
            except ValueError as exc:
                raise vt.err("nbd_listen", str(exc)) from None
            if not _loopback(tcp[0]) and not tls:
                raise vt.err("nbd_listen", f"{tcp[0]} is not a loopback address: the export would "
                             "carry the VM's disk unencrypted; serve it on 127.0.0.1 or a unix: "
                             "socket, or add [volume.nbd_tls] (cert, key, client_ca)")
    return tcp, unix


def _account_id(v: Any, kind: str, lookup: Callable[[str], Any]) -> int:
    """A user or group name of this host, or a numeric id (which needs no entry)."""
    if (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v.isascii()
                                                            and v.isdigit()):
        n = int(v)
        if not 0 <= n < 2**32 - 1:
            raise ValueError(f"{n} is not a valid {kind} id")
        return n
    name = _str(v)
    try:
        return int(lookup(name)[2])
    except KeyError:
        db = "passwd" if kind == "user" else "group"
        raise ValueError(f"no {kind} {name!r} on this host (see `getent {db}`); give one that "
                         "exists or a numeric id") from None


def _user_id(v: Any) -> int:
    return _account_id(v, "user", pwd.getpwnam)


def _group_id(v: Any) -> int:
    return _account_id(v, "group", grp.getgrnam)


def _socket_mode(v: Any) -> int:
    """An octal mode string such as "0660": the owner may connect, others never."""
    text = v.removeprefix("0o") if isinstance(v, str) else ""
    if not 3 <= len(text) <= 4 or any(c not in "01234567" for c in text):
        raise ValueError('expected an octal mode in quotes, e.g. "0660" (owner and group) or "0600"')
    mode = int(text, 8)
    if mode & ~0o770:
        raise ValueError(f"{v} lets every user on this host read and write the disk (or sets "
                         "special bits); give the hypervisor's group access instead: "
                         'nbd_socket_group = "kvm" with nbd_socket_mode = "0660"')
    if not mode & 0o200:
        raise ValueError(f"{v} leaves the owner unable to connect; the owner needs write "
                         'permission, e.g. "0600" or "0660"')
    return mode


def _schedule(file: Path, t: _Table) -> tuple[Window, ...]:
    """[[source.schedule]] tables: days, hours and the caps in force then."""
    raw = t.get("schedule", lambda v: v, default=[])
    if not isinstance(raw, list):
        raise t.err("schedule", "must be an array of tables: [[source.schedule]]")
    windows = []
    for i, rw in enumerate(raw):
        wt = _Table(file, f"source.schedule[{i}]", rw)
        days = wt.get("days", parse_days)
        start, end = wt.get("hours", parse_hours)
        rate = wt.get("rate_limit", parse_rate, default=INHERIT)
        read = wt.get("read_limit", parse_rate, default=INHERIT)
        wt.done()
        if rate is INHERIT and read is INHERIT:
            raise wt.err("rate_limit", "a window must set rate_limit, read_limit or both")
        raw_days = "every day" if days == ALL_DAYS else wt.data["days"]  # absent, "all", "mon-sun"
        label = "{} {:02d}:{:02d}-{:02d}:{:02d}".format(
            raw_days if isinstance(raw_days, str) else ",".join(raw_days),
            start // 60, start % 60, end // 60, end % 60)
        windows.append(Window(days, start, end, rate, read, label.lower()))
    return tuple(windows)


def _choice(*options: str) -> Callable[[Any], str]:
    def conv(v: Any) -> str:
        if v not in options:
            raise ValueError(f"expected one of {', '.join(repr(o) for o in options)}")
        return str(v)
    return conv


# -- reloading a source config (SIGHUP) -----------------------------------------

# What a running source applies on SIGHUP; every other change needs a restart.
SOURCE_LIVE = frozenset({"rate_limit", "read_limit", "schedule", "window", "batch_bytes", "keepalive",
                         "dead_after", "max_epoch_bytes", "compress_level",
                         "token"})  # the token: from the next connection on (a rotation)
VOLUME_LIVE = frozenset({"rate_limit", "scan_interval", "min_scan_interval", "pre_scan",
                         "post_scan", "snapshot"})


@dataclass(frozen=True)
class Reload:
    """The config to run with after a reload, and what changed."""

    cfg: SourceConfig
    applied: tuple[str, ...]  # "source.rate_limit: 4.0 MiB/s -> unlimited"
    restart: tuple[str, ...]  # changes kept out until the next restart


def reload_source(old: SourceConfig, new: SourceConfig) -> Reload:
    """Merge a freshly loaded config into a running one.

    Keys in SOURCE_LIVE / VOLUME_LIVE take their new values; every other
    change (receiver, token, TLS, workers, the volumes list, a volume's path
    or block size...) keeps the running value and is listed in `restart`.
    """
    applied: list[str] = []
    restart: list[str] = []
    keep: dict[str, Any] = {}
    for f in fields(SourceConfig):
        if f.name in ("path", "volumes"):
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b:
            continue
        line = f"source.{f.name}: {_show(f.name, a)} -> {_show(f.name, b)}"
        if f.name == "token":
            line = "source.token_file: the token changed"
        if f.name in SOURCE_LIVE:
            applied.append(line)
        else:
            restart.append(line)
            keep[f.name] = a
    if new.batch_bytes * 2 > keep.get("max_frame", new.max_frame):
        keep["batch_bytes"] = old.batch_bytes  # must fit the frame size of the running sessions
        line = (f"source.batch_bytes: {_show('batch_bytes', old.batch_bytes)} -> "
                f"{_show('batch_bytes', new.batch_bytes)}")
        if line in applied:
            applied.remove(line)
            restart.append(line + " (with the new max_frame)")
    vols = []
    for ov in old.volumes:
        nv = new.volume(ov.name)
        if nv is None:
            restart.append(f"volume {ov.name!r} removed")
            vols.append(ov)
            continue
        vkeep: dict[str, Any] = {}
        for f in fields(VolumeConfig):
            a, b = getattr(ov, f.name), getattr(nv, f.name)
            if a == b:
                continue
            line = f"volume[{ov.name}].{f.name}: {_show(f.name, a)} -> {_show(f.name, b)}"
            if f.name in VOLUME_LIVE:
                applied.append(line)
            else:
                restart.append(line)
                vkeep[f.name] = a
        vols.append(replace(nv, **vkeep))
    restart += [f"volume {v.name!r} added" for v in new.volumes if old.volume(v.name) is None]
    cfg = replace(new, path=old.path, volumes=tuple(vols), **keep)
    return Reload(cfg, tuple(applied), tuple(restart))


# -- reloading a receiver config (SIGHUP) ---------------------------------------

# What a running receiver applies on SIGHUP; listen, data_dir, tls and max_frame need a restart.
RECEIVER_LIVE = frozenset({"clients", "keep", "volume_keep", "archives", "idle_timeout",
                           "drill_format", "drill_dir", "metrics_listen", "status_listen",
                           "max_connections", "auth_timeout", "max_unauthenticated_per_ip",
                           "max_unauthenticated", "max_concurrent_archives"})


@dataclass(frozen=True)
class ReceiverReload:
    """The receiver config to run with after a reload, what changed, and whom it cuts off."""

    cfg: ReceiverConfig
    applied: tuple[str, ...]  # "client host1: volumes vol1, vol2 -> vol1"
    restart: tuple[str, ...]  # changes kept out until the next restart
    dropped: tuple[str, ...]  # clients removed or with a new token: their connections end


def reload_receiver(old: ReceiverConfig, new: ReceiverConfig) -> ReceiverReload:
    """Merge a freshly loaded receiver config into a running one.

    Keys in RECEIVER_LIVE take their new values (the receiver applies them:
    see Receiver.reload); listen, data_dir, tls and max_frame keep the running
    value and are listed in `restart`. Clients that are gone or whose token
    changed are listed in `dropped`: their open connections are closed (a
    rotated token is no longer trusted); they reconnect with the new token.
    """
    applied: list[str] = []
    restart: list[str] = []
    keep: dict[str, Any] = {}
    for f in fields(ReceiverConfig):
        if f.name in ("path", "clients", "archives", "keep", "volume_keep"):
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b:
            continue
        line = f"receiver.{f.name}: {_show(f.name, a)} -> {_show(f.name, b)}"
        if f.name in RECEIVER_LIVE:
            applied.append(line)
        else:
            restart.append(line)
            keep[f.name] = a
    applied += _keep_changes("receiver", old.keep, new.keep)
    old_vk, new_vk = dict(old.volume_keep), dict(new.volume_keep)
    for name in sorted(old_vk.keys() | new_vk.keys()):
        applied += _keep_changes(f"receiver.volume[{name}]", old_vk.get(name, old.keep),
                                 new_vk.get(name, new.keep))
    dropped: list[str] = []
    for c in new.clients:
        was = old.client(c.name)
        if was is None:
            applied.append(f"client {c.name} added: volumes {_show('volumes', c.volumes)}")
            continue
        if was.token != c.token:
            applied.append(f"client {c.name}: the token changed: its connections are closed; it "
                           "reconnects with the new token")
            dropped.append(c.name)
        for key in ("volumes", "filesets"):
            a, b = getattr(was, key), getattr(c, key)
            if a != b:
                gone = [v for v in a if v not in b]
                stop = f" (its writes to {', '.join(gone)} stop now)" if gone else ""
                applied.append(f"client {c.name}: {key} {_show(key, a)} -> {_show(key, b)}{stop}")
        if was.keep != c.keep:  # its own keep_points*; otherwise it follows [receiver]'s
            applied += _keep_changes(f"client {c.name}", was.keep or old.keep, c.keep or new.keep)
    for c in old.clients:
        if new.client(c.name) is None:
            applied.append(f"client {c.name} removed: its connections are closed")
            dropped.append(c.name)
    for a in new.archives:
        was_a = old.archive(a.name)
        if was_a is None:
            applied.append(f"archive {a.name} added: schedule {a.schedule}")
            continue
        for f in fields(ArchiveConfig):
            x, y = getattr(was_a, f.name), getattr(a, f.name)
            if x != y:
                applied.append(f"archive {a.name}: {f.name} {_show(f.name, x)} -> "
                               f"{_show(f.name, y)} (from its next run)")
    applied += [f"archive {a.name} removed (a run in progress finishes)" for a in old.archives
                if new.archive(a.name) is None]
    cfg = replace(new, path=old.path, **keep)
    return ReceiverReload(cfg, tuple(applied), tuple(restart), tuple(dropped))


def _keep_changes(where: str, a: KeepConfig, b: KeepConfig) -> list[str]:
    out = []
    if a.max_age != b.max_age:
        out.append(f"{where}.keep_points: {_age(a.max_age)} -> {_age(b.max_age)}")
    if a.max_bytes != b.max_bytes:
        out.append(f"{where}.keep_points_size: {_size(a.max_bytes)} -> {_size(b.max_bytes)}")
    return out


# Keys shown as durations and sizes in reload lines (values are seconds and bytes).
_DURATIONS = frozenset({"keepalive", "dead_after", "reconnect_min", "reconnect_max", "retry_max",
                        "scan_interval", "min_scan_interval", "epoch_interval", "idle_timeout",
                        "auth_timeout"})
_SIZES = frozenset({"batch_bytes", "max_epoch_bytes", "max_frame", "block_size", "capture_memory",
                    "capture_disk", "dirty_region", "max_file_size", "chunk_size",
                    "pack_size"})


def _show(key: str, value: Any) -> str:
    """A config value as a reload line shows it: as it would be written in the file."""
    if key in ("rate_limit", "read_limit"):
        return format_rate(value)
    if key == "schedule" and isinstance(value, tuple):
        return "; ".join(f"{w.label} rate_limit={_cap(w.rate_limit)} read_limit={_cap(w.read_limit)}"
                         for w in value) or "none"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if key in _DURATIONS and isinstance(value, int | float):
        return _duration(value)
    if key in _SIZES and isinstance(value, int):
        return format_bytes(value)
    if key.endswith("_mode") and isinstance(value, int):  # file modes
        return f"{value:04o}"
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) \
            and isinstance(value[1], int):  # host, port
        return f"[{value[0]}]:{value[1]}" if ":" in value[0] else f"{value[0]}:{value[1]}"
    if isinstance(value, tuple):
        return ", ".join(_show(key, v) for v in value) or "none"
    if isinstance(value, TlsServer | TlsClient | KeepPolicy):
        return " ".join(f"{f.name}={_show(f.name, getattr(value, f.name))}" for f in fields(value))
    return str(value)


def _duration(v: float) -> str:
    """"24h", "90s", "1.5s": the largest whole unit."""
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if v >= n and v % n == 0:
            return f"{v / n:g}{unit}"
    return f"{v:g}s"


def _age(v: float | None) -> str:
    return "forever" if v is None else _duration(v)


def _size(v: int | None) -> str:
    return "unlimited" if v is None else format_bytes(v)


def _cap(v: Any) -> str:
    return "base" if v is INHERIT else format_rate(v)


def log_reload(log: Any, applied: tuple[str, ...], restart: tuple[str, ...]) -> None:
    """What a SIGHUP reload applied and what waits for a restart, the same for both daemons."""
    for line in applied:
        log.info("config reload: %s", line)
    for line in restart:
        log.warning("config reload: %s: needs a restart; the running value stays", line)
    if not applied and not restart:
        log.info("config reload: nothing changed")
