"""The configs `cdp bench` runs its daemons with: what a config must say, and nothing else.

A benchmark is only worth quoting if it measures what users get, so the
daemons run with every tuning knob at its shipped default (cdp/config/keys.py):
the files name the host, the volume, the addresses, the paths and the token,
as a minimal config written by hand or after `cdp init` would. `--tuned`
knobs (`key=value`, any [source] or [[volume]] key with a default) are
written on top for extra rows that say so in their name and in `--json`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from cdp.config.keys import TABLES, toml_value
from cdp.errors import UsageError

DEFAULT_TUNED = "min_scan_interval=0.02s"
# keys a bench config writes besides the required ones: where things are, not how they run
PLACES = {"receiver": {"listen", "data_dir"}, "volume": {"mode", "nbd_listen"}}


def _q(text: str | Path) -> str:
    return toml_value(str(text))


def receiver_config(port: int, volume: str, data_dir: Path | None) -> str:
    """A receiver on 127.0.0.1:port accepting the source "bench" for `volume`."""
    where = f"data_dir = {_q(data_dir)}\n" if data_dir is not None else ""
    return (f'[receiver]\nlisten = "127.0.0.1:{port}"\n{where}'
            f'[[receiver.client]]\nname = "bench"\ntoken_file = "bench.token"\n'
            f"volumes = [{_q(volume)}]\n")


def source_config(port: int, volume: str, image: Path, mode: str, nbd_listen: str | None,
                  knobs: dict[str, str]) -> str:
    """The source "bench" with one volume; `knobs` (key -> TOML value) go where they belong."""
    src = {k: v for k, v in knobs.items() if k not in TABLES["volume"]}
    vol = {k: v for k, v in knobs.items() if k in TABLES["volume"]}
    lines = ["[source]", 'name = "bench"', f'receiver = "127.0.0.1:{port}"',
             'token_file = "bench.token"', *(f"{k} = {v}" for k, v in src.items()),
             "", "[[volume]]", f"name = {_q(volume)}", f"path = {_q(image)}"]
    if mode != "scan":  # scan is the default mode
        lines.append(f"mode = {_q(mode)}")
    if nbd_listen:
        lines.append(f"nbd_listen = {_q(nbd_listen)}")
    lines += [f"{k} = {v}" for k, v in vol.items()]
    return "\n".join(lines) + "\n"


def _toml(value: str) -> str:
    """A knob's value as written after `=` in a TOML file: numbers and booleans bare."""
    if value in ("true", "false"):
        return value
    for conv in (int, float):
        try:
            conv(value)
            return value
        except ValueError:
            pass
    return _q(value)


def parse_knobs(text: str) -> dict[str, str]:
    """"min_scan_interval=0.02s,window=4" -> {key: TOML value}; UsageError names a bad one."""
    out: dict[str, str] = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not value:
            raise UsageError(f"--tuned {item!r}: write KEY=VALUE, e.g. {DEFAULT_TUNED}")
        spec = TABLES["volume"].get(key) or TABLES["source"].get(key)
        if spec is None or spec.required or spec.table or key in PLACES["volume"]:
            raise UsageError(f"--tuned {key}: not a tuning knob of [source] or [[volume]] "
                             "(see the example files `cdp init` writes)")
        out[key] = _toml(value)
    if not out:
        raise UsageError(f"--tuned: no knob given (e.g. {DEFAULT_TUNED})")
    _check(out)
    return out


def _check(knobs: dict[str, str]) -> None:
    """Load a source config with `knobs` as the daemon would: a bad value is refused now, not
    after the default rows have run."""
    from cdp.config import load_source  # the loader, only when there is something to check
    from cdp.errors import ConfigError

    with tempfile.TemporaryDirectory(prefix="cdp-bench-knobs-") as tmp:
        (Path(tmp) / "bench.token").write_text("0" * 64 + "\n")
        (Path(tmp) / "bench.token").chmod(0o600)
        for mode in ("scan", "nbd"):
            if mode == "nbd" and not any(TABLES["volume"].get(k) and TABLES["volume"][k].only
                                         == "nbd" for k in knobs):
                continue
            conf = Path(tmp) / "source.toml"
            conf.write_text(source_config(7400, "bench", Path(tmp) / "image", mode,
                                          "unix:nbd.sock" if mode == "nbd" else None, knobs))
            try:
                load_source(conf)
            except ConfigError as exc:
                raise UsageError(f"--tuned: {str(exc).removeprefix(f'{conf}: ')}") from None


def describe(knobs: dict[str, str]) -> str:
    """"defaults", or "tuned: min_scan_interval=0.02s" (values as given, unquoted)."""
    if not knobs:
        return "defaults"
    return "tuned: " + ", ".join(f"{k}={v.strip(chr(34))}" for k, v in knobs.items())
