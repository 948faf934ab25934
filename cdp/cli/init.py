"""`cdp init DIR`: a working pair of example configs, a token and a small example image.

The configs are written from the key declarations in cdp/config/keys.py, so
every key the loader accepts is in them, with its default (or an example and
what leaving it out means) and a one-line explanation. A file is a list of
blocks, one per table; the keys an example needs are set, the others are
commented out. A block that is off is commented out as a whole.
"""

from __future__ import annotations

import os
import secrets
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdp.config.keys import TABLES, Key, toml_value
from cdp.errors import UsageError

COLUMN = 34  # where the explanations start
WIDTH = 100  # explanations wrap before this


@dataclass(frozen=True)
class Block:
    """One table of an example file."""

    table: str  # its TOML path, a key of cdp.config.keys.TABLES
    on: bool  # False: the whole block is commented out
    set: dict[str, Any] = field(default_factory=dict)  # what the example needs, in this order
    array: bool = False  # [[table]] rather than [table]
    note: str = ""  # beside the header
    shown: dict[str, Any] = field(default_factory=dict)  # derived defaults as they are here
    mode: str = ""  # a volume's mode: keys only for the other mode are left out
    parent: int | None = None  # the block (index) this sub-table belongs to


@dataclass(frozen=True)
class Line:
    """One line of an example file and what it is (the tests uncomment lines by role)."""

    text: str
    role: str  # "prose", "header", "set", "default" (shown at its default), "example"
    block: int | None = None
    key: str = ""


PREAMBLE = """\
Written by `cdp init`: every key {what} accepts is below. A line "# key = value"
shows a key at its default (where it has none: an example, and what leaving it out means);
remove the "# " to set it. Relative paths are relative to this file's folder.
Sizes: 64KiB, 1GiB. Durations: 500ms, 30s, 24h, 7d. Rates: 50MiB/s, 1Gbit/s, "unlimited".
Unknown keys are errors, so a typo never falls back to a default."""

RECEIVER_INTRO = "cdp receiver: runs at the DR site and keeps the offline replicas."
RECEIVER_BLOCKS = (
    Block("receiver", True, {"listen": "127.0.0.1:7400", "data_dir": "replicas"}),
    Block("receiver.tls", False, {"cert": "receiver.crt", "key": "receiver.key"},
          note="required on any address but loopback"),
    Block("receiver.client", True,
          {"name": "host1", "token_file": "host1.token", "volumes": ["vm1-disk0"]}, array=True,
          note="who may connect, and what each may write (one per source host)"),
    Block("receiver.volume", False, {"name": "vm1-disk0", "keep_points": "72h"}, array=True,
          note="retention of one volume"),
    Block("archive", False, {"name": "offsite", "repository": "archive",
                             "password_file": "archive.pass", "schedule": "daily 02:00"},
          array=True, note="offsite snapshots of the replicas (`cdp archive init` first)"),
    Block("archive.keep", False, {"daily": 7, "weekly": 4, "monthly": 12}, parent=4,
          note="snapshots kept (or inline: keep = { daily = 7, weekly = 4 })"),
)
RECEIVER_END = ("S3 credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment "
                "(or a profile),\nnever in the repository URL.")

SOURCE_INTRO = "cdp source: runs beside production and streams changed blocks to the receiver."
SOURCE_BLOCKS = (
    Block("source", True, {"name": "host1", "receiver": "127.0.0.1:7400",
                           "token_file": "host1.token", "state_dir": "state"},
          shown={"dead_after": "6s"}),
    Block("source.tls", False, {"ca": "ca.crt"}, note="TLS to the receiver"),
    Block("source.schedule", False, {"days": "mon-fri", "hours": "08:00-18:00",
                                     "rate_limit": "50MiB/s"}, array=True,
          note="other caps at certain times; the first match wins"),
    Block("volume", True, {"name": "vm1-disk0", "path": "images/vm1-disk0.raw", "mode": "scan"},
          array=True, mode="scan", shown={"block_size": "64KiB"},
          note="scan mode: hash compare, woken by file events and a timer"),
    Block("volume", False, {"name": "vm1-disk1", "path": "images/vm1-disk1.raw", "mode": "nbd",
                            "nbd_listen": "unix:vm1-disk1.sock"},
          array=True, mode="nbd", shown={"block_size": "16KiB"},
          note="nbd mode: the VM opens its disk through cdp; every write, in order"),
    Block("volume.nbd_tls", False, {"cert": "nbd.crt", "key": "nbd.key", "client_ca": "ca.crt"},
          parent=4, note="for an nbd_listen beyond loopback"),
    Block("volume", False, {"name": "vm1-disk2", "path": "images/vm1-disk2.qcow2", "mode": "qemu",
                            "qmp": "/run/vm1.qmp", "node": "drive2", "epoch_interval": "1s"},
          array=True, mode="qemu", shown={"block_size": "64KiB"},
          note="qemu mode (experimental): QEMU tracks the changes in a dirty bitmap; cdp reads them "
               "over NBD, outside the VM's write path"),
    Block("fileset", False, {"name": "vm1-config", "paths": ["/etc/libvirt/qemu/vm1.xml"]},
          array=True, note="small files kept whole, with versions (list it in the client's filesets)"),
)


def _commented(head: str, doc: str) -> list[str]:
    """`head` with `doc` beside it from COLUMN on, wrapped onto comment lines below it."""
    head = head.ljust(COLUMN - 1)
    first, *more = textwrap.wrap(doc, WIDTH - len(head) - 3) or [""]
    more = textwrap.wrap(" ".join(more), WIDTH - COLUMN - 2)
    return [f"{head} # {first}".rstrip(), *(f"{'':{COLUMN - 1}} # {part}" for part in more)]


def _key_lines(key: Key, value: Any, doc: str, commented: bool, role: str, block: int) -> list[Line]:
    """A key's line (its role, for the tests that uncomment it) and its explanation's tail."""
    first, *more = _commented(("# " if commented else "") + f"{key.name} = {toml_value(value)}", doc)
    return [Line(first, role, block, key.name), *(Line(text, "prose", block) for text in more)]


def _block_lines(i: int, b: Block) -> list[Line]:
    keys = TABLES[b.table]
    off = "" if b.on else "# "
    header = off + (f"[[{b.table}]]" if b.array else f"[{b.table}]")
    head, *more = _commented(header, b.note) if b.note else [header]
    lines = [Line("", "prose"), Line(head, "header", i), *(Line(t, "prose", i) for t in more)]
    for name, value in b.set.items():
        key = keys[name]
        differs = not key.required and not (key.default is not None and value == key.default)
        doc = key.doc + (f" ({key.why_absent()})" if differs else "")
        lines += _key_lines(key, value, doc, not b.on, "set", i)
    rest = [k for k in keys.values() if k.name not in b.set and not k.table
            and not (b.mode and k.only and k.only != b.mode)]
    for key in rest:
        value = b.shown.get(key.name, key.default if key.default is not None else key.example)
        doc = key.doc + ("" if key.default is not None else f" ({key.why_absent()})")
        role = "default" if key.has_default else "example"
        lines += _key_lines(key, value, doc, True, role, i)
    if b.mode:
        others: dict[str, list[str]] = {}
        for k in keys.values():
            if k.only and k.only != b.mode:
                others.setdefault(k.only, []).append(k.name)
        text = "(" + "; ".join(f"keys for {mode} volumes only: {', '.join(names)}"
                               for mode, names in others.items()) + ")"
        lines += [Line(f"# {t}", "prose", i) for t in textwrap.wrap(text, WIDTH - 2)]
    return lines


def example_lines(intro: str, what: str, blocks: tuple[Block, ...], end: str = "") -> list[Line]:
    """Every line of one example file, with its role."""
    lines = [Line(f"# {text}".rstrip(), "prose") for text in [intro, *PREAMBLE.format(what=what)
                                                              .splitlines()]]
    for i, b in enumerate(blocks):
        lines += _block_lines(i, b)
    if end:
        lines += [Line("", "prose"), *(Line(f"# {t}", "prose") for t in end.splitlines())]
    return lines


def receiver_lines() -> list[Line]:
    return example_lines(RECEIVER_INTRO, "a receiver config", RECEIVER_BLOCKS, RECEIVER_END)


def source_lines() -> list[Line]:
    return example_lines(SOURCE_INTRO, "a source config", SOURCE_BLOCKS)


def text_of(lines: list[Line]) -> str:
    return "\n".join(line.text for line in lines) + "\n"


def init(target: Path, image_size: int = 64 << 20) -> list[Path]:
    """Write the example configs into `target`; refuses to overwrite anything."""
    target.mkdir(parents=True, exist_ok=True)
    files = {target / "receiver.toml": text_of(receiver_lines()),
             target / "source.toml": text_of(source_lines())}
    token = target / "host1.token"
    image = target / "images" / "vm1-disk0.raw"
    existing = [p for p in [*files, token] if p.exists()]
    if existing:
        raise UsageError(f"{existing[0]} already exists; choose an empty folder")
    for path, text in files.items():
        path.write_text(text)
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    image.parent.mkdir(exist_ok=True)
    if not image.exists():
        with open(image, "wb") as fh:
            fh.truncate(image_size)
            fh.write(b"cdp example volume\n" * 1000)
    return [*files, token, image]
