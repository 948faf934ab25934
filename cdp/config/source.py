"""Loading a source config: [source], [[volume]] (scan, nbd and qemu), [[fileset]]."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from cdp.config.keys import SOURCE_FILE
from cdp.config.model import (
    DEFAULT_BLOCK_SIZE,
    MAX_WINDOW,
    NBD_BLOCK_SIZE,
    FilesetConfig,
    SourceConfig,
    TlsClient,
    TlsServer,
    VolumeConfig,
)
from cdp.config.values import (
    Table,
    _block_size,
    _bool,
    _choice,
    _group_id,
    _http_listen,
    _int,
    _list,
    _load,
    _loopback,
    _name,
    _path,
    _positive_duration,
    _range_size,
    _socket_mode,
    _str,
    _top,
    _user_id,
    read_token,
)
from cdp.errors import ConfigError
from cdp.ratelimit import ALL_DAYS, INHERIT, Window, parse_days, parse_hours, parse_rate
from cdp.units import parse_duration, parse_hostport


def load_source(path: str | Path) -> SourceConfig:
    """Load and validate a source config."""
    file = Path(path).resolve()
    base = file.parent
    data = _load(file)
    _top(file, data, set(SOURCE_FILE))
    t = Table(file, "source", data.get("source", {}))
    name = t.get("name", _name)
    receiver = t.get("receiver", lambda v: parse_hostport(_str(v)))
    token = read_token(t.get("token_file", _path(base)), file, "source.token_file")
    state_dir = t.get("state_dir", _path(base))
    tls = _tls(file, base, t)
    opts = _tuning(file, t)
    raw_vols = data.get("volume", [])
    if not isinstance(raw_vols, list):
        raise ConfigError(f"{file}: volume: must be an array of tables: [[volume]]")
    volumes = [_volume(file, base, i, rv) for i, rv in enumerate(raw_vols)]
    filesets = _filesets(file, base, data.get("fileset", []))
    all_names = [v.name for v in volumes] + [f.name for f in filesets]
    dup = {n for n in all_names if all_names.count(n) > 1}
    if dup:
        raise ConfigError(f"{file}: volume: name {sorted(dup)[0]!r} is used twice")
    if not volumes and not filesets:
        raise ConfigError(f"{file}: volume: nothing to protect; add a [[volume]] table")
    return SourceConfig(file, name, receiver, token, state_dir, tuple(volumes),
                        tuple(filesets), tls, **opts)


def _tls(file: Path, base: Path, t: Table) -> TlsClient | None:
    """[source.tls], if set."""
    if "tls" not in t.data:
        return None
    tt = Table(file, "source.tls", t.get("tls", lambda v: v))
    tls = TlsClient(
        ca=tt.get("ca", _path(base)),
        cert=tt.get("cert", _path(base)),
        key=tt.get("key", _path(base)),
        server_name=tt.get("server_name", _str),
    )
    if (tls.cert is None) != (tls.key is None):
        raise tt.err("cert", "cert and key go together: set both or neither")
    tt.done()
    return tls


def _tuning(file: Path, t: Table) -> dict[str, Any]:
    """The rest of [source] (window, sizes, timers, limits), checked against each other;
    `t` is done after this."""
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
    return opts


def _filesets(file: Path, base: Path, raw_sets: Any) -> list[FilesetConfig]:
    """The [[fileset]] tables."""
    if not isinstance(raw_sets, list):
        raise ConfigError(f"{file}: fileset: must be an array of tables: [[fileset]]")
    filesets = []
    for i, rs in enumerate(raw_sets):
        ft = Table(file, f"fileset[{i}]", rs)
        fname = ft.get("name", _name)
        paths = ft.get("paths", lambda v: tuple(_path(base)(x) for x in _list(v)))
        fmax = ft.get("max_file_size", lambda v: _range_size(v, 1, 1 << 30))
        fscan = ft.get("scan_interval", _positive_duration)
        ft.done()
        filesets.append(FilesetConfig(fname, paths, fmax, fscan))
    return filesets


def _volume(file: Path, base: Path, i: int, rv: Any) -> VolumeConfig:
    vt = Table(file, f"volume[{i}]", rv)
    mode = vt.get("mode", _choice("scan", "nbd", "qemu"))
    vol = VolumeConfig(
        name=vt.get("name", _name),
        path=vt.get("path", _path(base)),
        mode=mode,
        # nbd: small random writes dirty whole blocks; 16 KiB measured 5x the IOPS of 64 KiB
        # (qemu: 64 KiB, the granularity of QEMU's bitmaps on qcow2 images)
        block_size=vt.get("block_size", _block_size,
                          default=NBD_BLOCK_SIZE if mode == "nbd" else DEFAULT_BLOCK_SIZE),
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
        qmp=vt.get("qmp", _path(base)),
        node=vt.get("node", _node_name),
        nbd_socket=vt.get("nbd_socket", _path(base)),
    )
    if "nbd_tls" in vt.data:
        nt = Table(file, f"volume[{i}].nbd_tls", vt.get("nbd_tls", lambda v: v))
        vol = replace(vol, nbd_tls=TlsServer(
            cert=nt.get("cert", _path(base)),
            key=nt.get("key", _path(base)),
            client_ca=nt.get("client_ca", _path(base))),
            nbd_any_client=nt.get("allow_any_client", _bool))
        nt.done()
    vt.done()
    if vol.mode == "nbd":
        vol = _nbd_keys(file, base, i, vt, vol)
    socket_keys = sorted({"nbd_socket_owner", "nbd_socket_group", "nbd_socket_mode"} & set(vt.data))
    if socket_keys and vol.nbd_unix is None:
        raise vt.err(socket_keys[0], "only applies to an nbd volume served on a Unix socket "
                     "(mode = \"nbd\", nbd_listen = \"unix:PATH\")")
    _qemu_keys(vt, vol)
    if vol.group is not None and vol.mode != "nbd":
        raise vt.err("group", "consistency groups need mode = \"nbd\" (a scan has no common instant)")
    return vol


def _nbd_keys(file: Path, base: Path, i: int, vt: Table, vol: VolumeConfig) -> VolumeConfig:
    """An nbd volume's address and the checks that need several of its keys."""
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
    return replace(vol, nbd_tcp=tcp, nbd_unix=unix)


def _qemu_keys(vt: Table, vol: VolumeConfig) -> None:
    """qmp and node are needed in qemu mode and mean nothing in the others."""
    if vol.mode != "qemu":
        given = sorted({"qmp", "node", "nbd_socket"} & set(vt.data))
        if given:
            raise vt.err(given[0], "only applies to a qemu volume (mode = \"qemu\")")
        return
    if vol.qmp is None:
        raise vt.err("qmp", "qemu mode needs the QMP monitor socket of the QEMU that runs the disk, e.g. "
                     "qmp = \"/run/vm1.qmp\" (libvirt: /var/lib/libvirt/qemu/domain-N-NAME/monitor.sock)")
    if vol.node is None:
        raise vt.err("node", "qemu mode needs the disk's block node name, e.g. node = \"drive0\" "
                     "(`query-named-block-nodes` over QMP lists them)")
    if vol.epoch_interval <= 0:
        raise vt.err("epoch_interval", "must be positive, e.g. \"1s\"")


def _node_name(v: object) -> str:
    """A QEMU node name: a letter, then letters, digits, '-', '_' or '.'; at most 31 bytes."""
    text = _str(v)
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,30}", text):
        raise ValueError(f"{text!r} is not a QEMU node name: a letter, then letters, digits, '-', '_' "
                         "or '.', at most 31 characters")
    return text


def _nbd_listen(vt: Table, base: Path, text: str,
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


def _schedule(file: Path, t: Table) -> tuple[Window, ...]:
    """[[source.schedule]] tables: days, hours and the caps in force then."""
    raw = t.get("schedule", lambda v: v, default=[])
    if not isinstance(raw, list):
        raise t.err("schedule", "must be an array of tables: [[source.schedule]]")
    windows = []
    for i, rw in enumerate(raw):
        wt = Table(file, f"source.schedule[{i}]", rw)
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
