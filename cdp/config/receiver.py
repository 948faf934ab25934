"""Loading a receiver config: [receiver], [[receiver.client]], [[receiver.volume]], [[archive]]."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cdp.config.keys import RECEIVER_FILE
from cdp.config.model import ArchiveConfig, ClientConfig, KeepConfig, KeepPolicy, ReceiverConfig, TlsServer
from cdp.config.values import (
    Table,
    _bool,
    _choice,
    _chunk_size,
    _http_listen,
    _int,
    _load,
    _loopback,
    _name,
    _name_list,
    _path,
    _positive_duration,
    _range_size,
    _repository,
    _str,
    _top,
    read_token,
)
from cdp.errors import ConfigError
from cdp.schedule import parse_schedule
from cdp.units import parse_duration, parse_hostport, parse_size


def load_receiver(path: str | Path) -> ReceiverConfig:
    """Load and validate a receiver config."""
    file = Path(path).resolve()
    base = file.parent
    data = _load(file)
    _top(file, data, set(RECEIVER_FILE))
    t = Table(file, "receiver", data.get("receiver", {}))
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
    volume_keep = _volume_keep(file, t, keep)
    tls = _tls(file, base, t)
    clients = _clients(file, base, t, keep)
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


def _volume_keep(file: Path, t: Table, keep: KeepConfig) -> list[tuple[str, KeepConfig]]:
    """[[receiver.volume]]: per-volume retention, inheriting [receiver]'s."""
    raw_vols = t.get("volume", lambda v: v, default=[])
    if not isinstance(raw_vols, list):
        raise t.err("volume", "must be an array of tables: [[receiver.volume]]")
    volume_keep = []
    for i, rv in enumerate(raw_vols):
        vt = Table(file, f"receiver.volume[{i}]", rv)
        volume_keep.append((vt.get("name", _name), _keep(vt, keep)))
        vt.done()
    return volume_keep


def _tls(file: Path, base: Path, t: Table) -> TlsServer | None:
    """[receiver.tls], if set."""
    if "tls" not in t.data:
        return None
    tt = Table(file, "receiver.tls", t.get("tls", lambda v: v))
    tls = TlsServer(
        cert=tt.get("cert", _path(base)),
        key=tt.get("key", _path(base)),
        client_ca=tt.get("client_ca", _path(base)),
    )
    tt.done()
    return tls


def _clients(file: Path, base: Path, t: Table, keep: KeepConfig) -> list[ClientConfig]:
    """[[receiver.client]]: who may connect (token) and what each may write."""
    raw_clients = t.get("client", lambda v: v, default=[])
    if not isinstance(raw_clients, list):
        raise t.err("client", "must be an array of tables: [[receiver.client]]")
    clients = []
    for i, rc in enumerate(raw_clients):
        ct = Table(file, f"receiver.client[{i}]", rc)
        name = ct.get("name", _name)
        tf = ct.get("token_file", _path(base))
        vols = ct.get("volumes", _name_list)
        csets = ct.get("filesets", _name_list)
        ckeep = _keep(ct, keep) if {"keep_points", "keep_points_size"} & set(ct.data) else None
        ct.done()
        clients.append(ClientConfig(name, read_token(tf, file, f"{ct.where}.token_file"), vols,
                                    ckeep, csets))
    return clients


def _keep(t: Table, inherit: KeepConfig | None = None) -> KeepConfig:
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
    if not isinstance(raw, list):
        raise ConfigError(f"{file}: archive: must be an array of tables: [[archive]]")
    out: list[ArchiveConfig] = []
    for i, ra in enumerate(raw):
        at = Table(file, f"archive[{i}]", ra)
        name = at.get("name", _name)
        repo = at.get("repository", lambda v: _repository(base, _str(v)))
        encrypt = at.get("encrypt", _bool)
        pw = at.get("password_file", _str)
        keep_raw = at.get("keep", lambda v: v, default={})
        kt = Table(file, f"archive[{i}].keep", keep_raw)
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
