"""Reading TOML tables and their values: the converters every loader shares, and why a
value is refused. Errors name the file, the key and what is accepted."""

from __future__ import annotations

import difflib
import grp
import os
import pwd
import stat
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cdp.config.keys import RECEIVER_FILE, SOURCE_FILE, TABLES, table_of
from cdp.errors import ConfigError, WrongConfigError
from cdp.limits import valid_block_size, valid_name
from cdp.units import parse_duration, parse_hostport, parse_size


class Table:
    """Reads one TOML table, remembering which keys were consumed.

    Only keys declared in cdp/config/keys.py can be read, and their defaults come
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
                                 "in cdp/config/keys.py")
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
    if not valid_block_size(n):
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



def _list(v: Any) -> list[Any]:
    if not isinstance(v, list) or not v:
        raise ValueError("expected a non-empty list")
    return v


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


def _choice(*options: str) -> Callable[[Any], str]:
    def conv(v: Any) -> str:
        if v not in options:
            raise ValueError(f"expected one of {', '.join(repr(o) for o in options)}")
        return str(v)
    return conv


# -- reloading a source config (SIGHUP) -----------------------------------------
