"""SIGHUP: what changed between two configs, what a running daemon applies live and what
needs a restart, and how the change is logged."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from cdp.config.model import (
    ArchiveConfig,
    KeepConfig,
    KeepPolicy,
    ReceiverConfig,
    SourceConfig,
    TlsClient,
    TlsServer,
    VolumeConfig,
)
from cdp.ratelimit import INHERIT, format_rate
from cdp.units import format_bytes

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
    client_lines, dropped = _client_changes(old, new)
    applied += client_lines
    applied += _archive_changes(old, new)
    cfg = replace(new, path=old.path, **keep)
    return ReceiverReload(cfg, tuple(applied), tuple(restart), tuple(dropped))


def _client_changes(old: ReceiverConfig, new: ReceiverConfig) -> tuple[list[str], list[str]]:
    """What changed in [[receiver.client]] (all applied at once), and the clients whose
    connections are closed: removed, or their token changed."""
    applied: list[str] = []
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
    return applied, dropped


def _archive_changes(old: ReceiverConfig, new: ReceiverConfig) -> list[str]:
    """What changed in [[archive]]: a job picks it up from its next run."""
    applied: list[str] = []
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
    return applied


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
