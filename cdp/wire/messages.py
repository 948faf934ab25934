"""Wire messages: one frozen dataclass each, encoded as a msgpack array.

A message on the wire is ``[type, field1, field2, ...]`` in the dataclass's
field order. Decoding checks the type code, the field count and every field's
type, so the rest of cdp only ever sees well-formed messages. Index lists
travel as packed little-endian u64 arrays (see blocks.pack_u64) and hashes as
concatenated 16-byte digests: compact, and cheap to check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from cdp.errors import RemoteProtocolError

# 4: Hello.min_version: the receiver answers in the highest version both sides speak
# 3: Label.move, Labelled.moved_from/moved_time, LabelTaken (a label never moves unasked)
# 2: Cut (consistency groups). A receiver still takes version 1 and 2 sources.
PROTOCOL_VERSION = 4
MIN_PROTOCOL_VERSION = 1

# What each version added, by name: a session that settled on an older version lacks it, and
# says so in words (`lacks`) instead of failing on an unknown message type.
FEATURES: dict[str, tuple[int, str]] = {
    "ping": (2, "Ping/Pong, the dead-link check"),  # every receiver of protocol 2 answers Ping
    "cut": (2, "consistency group cuts (Cut)"),
    "label-move": (3, "moving a checkpoint label (Label.move, LabelTaken)"),
    "negotiation": (4, "version negotiation (Hello.min_version)"),
}


def has(version: int, feature: str) -> bool:
    """Whether a session of protocol `version` may use `feature` (a key of FEATURES)."""
    return version >= FEATURES[feature][0]


def lacks(version: int, feature: str, peer: str) -> str:
    """Why `feature` cannot be used with a `peer` ("receiver"/"source") of protocol `version`."""
    need, what = FEATURES[feature]
    return (f"the {peer} speaks protocol {version}, which lacks {what} (protocol {need}); "
            f"upgrade the {peer} to a cdp of protocol {need} or later")


def negotiate(offered: int, offered_min: int) -> int:
    """The receiver's choice for a source offering versions [offered_min, offered] (offered_min
    0: exactly `offered`, a source before protocol 4): the highest version both speak.
    ValueError says which side to upgrade."""
    low = offered_min or offered
    if offered < MIN_PROTOCOL_VERSION:
        raise ValueError(f"the source speaks protocol {offered}, this receiver needs "
                         f"{MIN_PROTOCOL_VERSION} or later: upgrade the source")
    if low > PROTOCOL_VERSION:
        raise ValueError(f"the source needs protocol {low} or later, this receiver speaks up to "
                         f"{PROTOCOL_VERSION}: upgrade the receiver (receivers first)")
    return min(offered, PROTOCOL_VERSION)


class Message:
    TYPE: ClassVar[int]


@dataclass(frozen=True)
class Hello(Message):
    """Source -> receiver: who I am, and a nonce for the receiver to prove itself with."""

    TYPE = 1
    version: int  # the highest the source speaks
    name: str
    nonce: bytes
    min_version: int = 0  # the lowest it speaks (protocol 4; 0: only `version`)


@dataclass(frozen=True)
class Challenge(Message):
    """Receiver -> source: a fresh nonce to answer with HMAC(token, ...)."""

    TYPE = 2
    version: int
    nonce: bytes


@dataclass(frozen=True)
class Auth(Message):
    """Source -> receiver: proof of the token; the token itself never crosses the wire."""

    TYPE = 3
    mac: bytes


@dataclass(frozen=True)
class Welcome(Message):
    """Receiver -> source: authenticated; the receiver's own proof and what may be written."""

    TYPE = 4
    proof: bytes
    volumes: list[str]
    max_frame: int


@dataclass(frozen=True)
class Open(Message):
    """Source -> receiver: start replicating a volume of this geometry."""

    TYPE = 5
    volume: str
    size: int
    block_size: int
    readonly: bool = False  # inspect only (verify): no ownership, no writes


@dataclass(frozen=True)
class Opened(Message):
    """Receiver -> source: the replica's identity and the last epoch it applied."""

    TYPE = 6
    volume: str
    replica_id: str
    epoch: int
    epoch_time: float


@dataclass(frozen=True)
class GetHashes(Message):
    """Source -> receiver: send the block hashes of [start, start+count); rehash reads the image."""

    TYPE = 7
    volume: str
    start: int
    count: int
    rehash: bool


@dataclass(frozen=True)
class Hashes(Message):
    """Receiver -> source: concatenated 16-byte hashes of consecutive blocks from start."""

    TYPE = 8
    volume: str
    start: int
    hashes: bytes


@dataclass(frozen=True)
class Begin(Message):
    """Source -> receiver: an epoch starts; `time` is when the source state was captured."""

    TYPE = 9
    volume: str
    epoch: int
    time: float


@dataclass(frozen=True)
class Data(Message):
    """Source -> receiver: whole blocks, concatenated and compressed as one zstd frame."""

    TYPE = 10
    volume: str
    epoch: int
    indices: bytes
    hashes: bytes
    raw_len: int
    zdata: bytes


@dataclass(frozen=True)
class Zero(Message):
    """Source -> receiver: runs of blocks that are now all zero, as packed (start, count) pairs."""

    TYPE = 11
    volume: str
    epoch: int
    runs: bytes


@dataclass(frozen=True)
class Ref(Message):
    """Source -> receiver: blocks whose content the receiver should already hold.

    Block indices[i] gets the content of from_indices[i] of from_volume, which
    must hash to hashes[i]; the receiver checks and asks again (Need) if not.
    """

    TYPE = 12
    volume: str
    epoch: int
    from_volume: str
    indices: bytes
    hashes: bytes
    from_indices: bytes


@dataclass(frozen=True)
class Commit(Message):
    """Source -> receiver: the epoch is complete; apply it atomically.

    `until`: no write that finished after it (source clock) is in the epoch. Begin's time
    is when its state was captured; a scan without a snapshot or quiesce hook reads over a
    period and ends at `until`. 0 (an older source, which sends three fields): Begin's time.
    """

    TYPE = 13
    volume: str
    epoch: int
    blocks: int
    until: float = 0.0


@dataclass(frozen=True)
class Need(Message):
    """Receiver -> source: references it could not resolve; send these blocks as data, then Commit again."""

    TYPE = 14
    volume: str
    epoch: int
    indices: bytes


@dataclass(frozen=True)
class Ack(Message):
    """Receiver -> source: the epoch is applied and durable."""

    TYPE = 15
    volume: str
    epoch: int
    applied_at: float


@dataclass(frozen=True)
class Current(Message):
    """Source -> receiver: at `time` the volume still equalled `epoch` (keeps the RPO honest when idle)."""

    TYPE = 16
    volume: str
    epoch: int
    time: float


@dataclass(frozen=True)
class Error(Message):
    """Either way: what went wrong; volume '' means the whole connection."""

    TYPE = 17
    code: str
    message: str
    volume: str


@dataclass(frozen=True)
class Bye(Message):
    """Either way: a clean goodbye; nothing in flight is lost."""

    TYPE = 18
    reason: str


# -- file sets (type codes 40-49) ------------------------------------------------
# Small files replicated whole on change, every version kept (cdp/replica/files.py).
# `path` is relative to the set root: the source's absolute path without its
# leading "/"; the receiver refuses "..", absolute paths, NUL and empty parts.


@dataclass(frozen=True)
class FileOpen(Message):
    """Source -> receiver: start replicating file set `fileset`."""

    TYPE = 40
    fileset: str


@dataclass(frozen=True)
class FileOpened(Message):
    """Receiver -> source: what the receiver holds, the latest version of each live file.

    hashes: 16 bytes per path; modes: packed u64, one per path.
    """

    TYPE = 41
    fileset: str
    paths: list[str]
    hashes: bytes
    modes: bytes


@dataclass(frozen=True)
class FilePut(Message):
    """Source -> receiver: a whole new version of one file, one zstd frame."""

    TYPE = 42
    fileset: str
    path: str
    hash: bytes
    size: int
    mtime: float
    mode: int
    time: float  # when the source read it
    zdata: bytes


@dataclass(frozen=True)
class FileDelete(Message):
    """Source -> receiver: the file is gone (noticed at `time`)."""

    TYPE = 43
    fileset: str
    path: str
    time: float


@dataclass(frozen=True)
class FileAck(Message):
    """Receiver -> source: that version is stored durably as number `version`."""

    TYPE = 44
    fileset: str
    path: str
    version: int


@dataclass(frozen=True)
class FileError(Message):
    """Receiver -> source: one file refused (path set), or the whole set (path '')."""

    TYPE = 45
    fileset: str
    path: str
    code: str
    message: str


# -- labelled recovery points (type codes 50-59) ----------------------------------


@dataclass(frozen=True)
class Label(Message):
    """Source -> receiver: name the recovery point of acknowledged epoch `epoch` (a baseline)."""

    TYPE = 50
    volume: str
    epoch: int
    label: str
    move: bool = False  # protocol 3: take the label off the point it names now. Absent
    # (a source before protocol 3) or False: a label on another point is refused (LabelTaken)


@dataclass(frozen=True)
class Labelled(Message):
    """Receiver -> source: the label of `epoch` is recorded durably.

    moved_from (protocol 3): the point the label was taken off (Label.move), captured at
    moved_time; 0 if it named no other point. Left off the wire when 0.
    """

    TYPE = 51
    volume: str
    epoch: int
    label: str
    moved_from: int = 0
    moved_time: float = 0.0


@dataclass(frozen=True)
class LabelTaken(Message):
    """Receiver -> source (protocol 3): refused, nothing changed; the label already names
    point `other` (captured at `other_time`). Label(move=True) moves it."""

    TYPE = 52
    volume: str
    epoch: int
    label: str
    other: int
    other_time: float


# -- cuts of an nbd volume, consistency groups (type codes 55-59, protocol 2) -------------


@dataclass(frozen=True)
class Cut(Message):
    """Source -> receiver, inside an epoch before its Commit: the epoch ends at a cut.

    The volume held exactly this state at `time` (it becomes the epoch's capture time), and
    its previous epoch's state through the cut at `since` (0: not known). `group` names the
    consistency group (one cut instant for all `members`), "" and [] for none.
    """

    TYPE = 55
    volume: str
    epoch: int
    time: float
    since: float
    group: str
    members: list[str]


# -- link liveness (type codes 60-69) ---------------------------------------------


@dataclass(frozen=True)
class Ping(Message):
    """Source -> receiver: answer with Pong(nonce), so I know the link is alive (dead_after)."""

    TYPE = 60
    nonce: int


@dataclass(frozen=True)
class Pong(Message):
    """Receiver -> source: the answer to Ping(nonce), in the order the Pings came."""

    TYPE = 61
    nonce: int


MAX_LABEL = 128


def valid_label(label: str) -> bool:
    """A label names a point in `cdp points` and on command lines: 1-128 printable characters,
    not all digits (an epoch number), no leading/trailing blanks."""
    return (0 < len(label) <= MAX_LABEL and label.isprintable() and label == label.strip()
            and not label.isdigit())


ALL: tuple[type[Message], ...] = (
    Hello, Challenge, Auth, Welcome, Open, Opened, GetHashes, Hashes, Begin, Data, Zero,
    Ref, Commit, Need, Ack, Current, Error, Bye,
    Label, Labelled, LabelTaken, Cut, Ping, Pong,
    FileOpen, FileOpened, FilePut, FileDelete, FileAck, FileError,
)
BY_TYPE: dict[int, type[Message]] = {cls.TYPE: cls for cls in ALL}
_FIELDS: dict[type[Message], tuple[tuple[str, str], ...]] = {
    cls: tuple((f.name, str(f.type)) for f in fields(cls)) for cls in ALL  # type: ignore[arg-type]
}
# Fields added later, which an older peer leaves off the end: the message takes their default.
# They are sent only when they differ from it, so an older peer can read what it knows.
_OPTIONAL: dict[type[Message], int] = {Commit: 1, Label: 1, Labelled: 2, Hello: 1}
_DEFAULTS: dict[type[Message], tuple[Any, ...]] = {
    cls: tuple(f.default for f in fields(cls)[len(fields(cls)) - n:])  # type: ignore[arg-type]
    for cls, n in _OPTIONAL.items()
}
MAX_STR = 4096
MAX_FLOAT = 1e13  # seconds: year ~318000


def to_wire(msg: Message) -> list[Any]:
    """The msgpack-ready array for a message; optional fields at their default are left off
    the end."""
    out = [msg.TYPE, *(getattr(msg, name) for name, _ in _FIELDS[type(msg)])]
    for default in reversed(_DEFAULTS.get(type(msg), ())):
        if type(out[-1]) is not type(default) or out[-1] != default:
            break
        out.pop()
    return out


def _check(cls: type[Message], name: str, kind: str, value: Any) -> Any:
    ok: bool
    if kind == "int":
        ok = type(value) is int and 0 <= value < 1 << 63
    elif kind == "float":
        if type(value) is int:
            value = float(value)
        # finite and within a few hundred millennia: times become sort keys, ages, RPOs
        ok = type(value) is float and math.isfinite(value) and abs(value) < MAX_FLOAT
    elif kind == "str":
        ok = type(value) is str and len(value) <= MAX_STR
    elif kind == "bytes":
        ok = type(value) is bytes
    elif kind == "bool":
        ok = type(value) is bool
    elif kind == "list[str]":
        ok = type(value) is list and len(value) <= 65536 and all(
            type(v) is str and len(v) <= MAX_STR for v in value)
    else:  # pragma: no cover - a new field type without a check
        raise AssertionError(f"no check for field type {kind}")
    if not ok:
        raise RemoteProtocolError(f"{cls.__name__}.{name}: bad value of type {type(value).__name__}")
    return value


def from_wire(obj: Any) -> Message:
    """A validated message from a decoded msgpack object; RemoteProtocolError otherwise."""
    if type(obj) is not list or not obj or type(obj[0]) is not int:
        raise RemoteProtocolError("a message must be an array starting with its type code")
    cls = BY_TYPE.get(obj[0])
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {obj[0]}")
    spec = _FIELDS[cls]
    if not len(spec) - _OPTIONAL.get(cls, 0) <= len(obj) - 1 <= len(spec):
        raise RemoteProtocolError(
            f"{cls.__name__}: expected {len(spec)} fields, got {len(obj) - 1}")
    spec = spec[:len(obj) - 1]
    values = [_check(cls, name, kind, v) for (name, kind), v in zip(spec, obj[1:], strict=True)]
    return cls(*values)
