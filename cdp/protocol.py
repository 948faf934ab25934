"""Sans-I/O protocol sessions for both ends of a replication connection.

No sockets, no files: a session takes received bytes and returns validated
messages (events), and turns messages to send into bytes, refusing anything
the protocol does not allow in the current state. The asyncio transport only
pumps bytes; tests drive two sessions against each other directly.

Connection states (both sides)::

    source:   START --Hello--> HELLO_SENT --Challenge/Auth--> AUTH_SENT --Welcome--> READY
    receiver: START --Hello/Challenge--> CHALLENGED --Auth/Welcome--> READY
    any state --Error (connection) / Bye / protocol violation--> CLOSED

Per volume, once READY (the receiver's view; the source mirrors it)::

    Open -> Opened -> idle --Begin(e)--> in epoch e --Data/Zero/Ref*--> --Commit(e)--> idle
    after Commit(e) the receiver answers Ack(e), or Need(e): epoch e is discarded,
    frames of later epochs are dropped until Begin(e) starts it again. The
    source may begin epoch e+1 before e is answered (pipelining); answers come
    in epoch order.

File sets (types 40-49), once READY; one request at a time per set::

    FileOpen(set) -> FileOpened(set, manifest) | FileError(set, '')
    open set: FilePut/FileDelete(path) -> FileAck(path) | FileError(path)
    FileError(set, '') closes the set; FileOpen starts it again. The receiver
    refuses sets not listed for the client (guarantee 4) and paths that are
    absolute, hold '..', '.', empty parts or NUL (guarantee 3).

Cuts (type 55, protocol 2): inside epoch e of an nbd volume, before Commit(e), the
source may send Cut(e, time, since, group, members): the epoch is the state the volume
had at `time`, a cut of its consistency group (see cdp.replica.groups). A group names
only volumes the client may write. The receiver takes protocol 1 sources too (they
send no Cut) and answers the Challenge in the source's version.

Labels (types 50-59, `cdp checkpoint`): once epoch e of an open volume is
acknowledged, the source may send Label(e, text, move); the receiver records it
durably and answers Labelled(e, text, moved_from, moved_time). Labels are 1-128
printable characters, not only digits; anything else, or a Label for an
unacknowledged epoch, is a protocol violation. A label names one point: if it
names another point and `move` is false, nothing changes and the receiver answers
LabelTaken(e, text, other, other_time) (protocol 3). `move` and LabelTaken are
protocol 3: a source of protocol 1 or 2 never sends `move`, so a label it reuses is
refused too; it knows no LabelTaken, so that Label gets no answer (the receiver logs
why, and the source's checkpoint times out).

Liveness (types 60-69): once READY, the source may send Ping(n) at any time; the
receiver answers Pong(n), in order. At most MAX_UNANSWERED Pings await an answer;
an unasked-for Pong is a protocol violation.

Authentication: HMAC-SHA256 over both nonces and the client name, each side
proving the token to the other; the token never crosses the wire and a fresh
receiver nonce makes a replayed handshake useless.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum

from cdp.config import MAX_WINDOW, valid_name
from cdp.errors import AuthError, LocalProtocolError, RemoteProtocolError, VolumeError
from cdp.frames import DEFAULT_MAX_FRAME, FrameDecoder, encode
from cdp.messages import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Ack,
    Auth,
    Begin,
    Bye,
    Challenge,
    Commit,
    Current,
    Cut,
    Data,
    Error,
    FileAck,
    FileDelete,
    FileError,
    FileOpen,
    FileOpened,
    FilePut,
    GetHashes,
    Hashes,
    Hello,
    Label,
    Labelled,
    LabelTaken,
    Message,
    Need,
    Open,
    Opened,
    Ping,
    Pong,
    Ref,
    Welcome,
    Zero,
    valid_label,
)

NONCE_LEN = 32
PREAUTH_MAX_FRAME = 4096  # receiver side, until authenticated
MAX_ZERO_RUNS = 65536  # (start, count) pairs in one Zero frame: the receiver's work per frame is bounded
MAX_UNANSWERED = MAX_WINDOW  # committed epochs per volume awaiting Ack/Need
EPOCH_MESSAGES = (Data, Zero, Ref)
FILE_REQUESTS = (FilePut, FileDelete)
FILE_ANSWERS = (FileAck, FileError)
MAX_FILE_SIZE = 1 << 30  # no file version is larger, whatever the config says
MAX_PATH = 4096
MAX_MEMBERS = 64  # volumes in one consistency group
LABEL_MOVE_VERSION = 3  # Label.move, Labelled.moved_from, LabelTaken


def valid_file_path(path: str) -> bool:
    """A path relative to a file set's root: no '/' at the start, no '..', '.', empty parts,
    NUL or backslash; at most MAX_PATH characters."""
    if not path or len(path) > MAX_PATH or "\0" in path or "\\" in path:
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


class FilesetError(VolumeError):
    """A file set (path '') or one file of it refused; the connection and the rest go on."""

    def __init__(self, message: str, *, code: str, fileset: str, path: str = "") -> None:
        super().__init__(message, code=code, volume="")
        self.fileset, self.path = fileset, path


def source_mac(token: bytes, name: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """What the source sends to prove it holds the token."""
    msg = b"cdp-auth-v1|source|" + name.encode() + b"|" + client_nonce + server_nonce
    return hmac.new(token, msg, hashlib.sha256).digest()


def receiver_proof(token: bytes, name: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """What the receiver sends to prove it holds the same token (mutual auth)."""
    msg = b"cdp-auth-v1|receiver|" + name.encode() + b"|" + client_nonce + server_nonce
    return hmac.new(token, msg, hashlib.sha256).digest()


class State(Enum):
    START = "start"
    HELLO_SENT = "hello-sent"
    CHALLENGED = "challenged"
    AUTH_SENT = "auth-sent"
    READY = "ready"
    CLOSED = "closed"


@dataclass
class _VolumeState:
    expected: int = 0  # the epoch number the next Begin must carry
    in_epoch: bool = False
    committed: list[int] = field(default_factory=list)  # committed, not yet answered
    discarding: bool = False  # after Need: drop frames until Begin(expected)
    readonly: bool = False  # opened to inspect: hashes only


class _Session:
    def __init__(self, max_frame: int) -> None:
        self.state = State.START
        self.max_frame = max_frame
        self._decoder = FrameDecoder(max_frame)
        self.volumes: dict[str, _VolumeState] = {}
        self._deferred: list[VolumeError] = []

    def feed(self, data: bytes) -> None:
        """Buffer received bytes; take validated messages out with events()."""
        if self.state is not State.CLOSED:
            try:
                self._decoder.push(data)
            except RemoteProtocolError:
                self.state = State.CLOSED
                raise

    def events(self) -> Iterator[tuple[Message | VolumeError, int]]:
        """(message, frame size) one at a time, validated only when taken.

        Lazy on purpose: what the caller does with one message (reject an
        epoch, fail a volume) governs how the next is judged. A refused volume
        comes out as a VolumeError instance; the stream goes on. Anything that
        breaks the connection raises ProtocolError/AuthError.
        """
        while self.state is not State.CLOSED:
            try:
                item = self._decoder.pop()
                if item is None:
                    return
                msg, size = item
                try:
                    ok = self._accept(msg)
                except VolumeError as exc:
                    yield exc, size
                    continue
            except (RemoteProtocolError, AuthError):
                self.state = State.CLOSED
                raise
            if ok:
                yield msg, size

    def receive_data(self, data: bytes) -> list[Message]:
        """Every validated message in received bytes; raises ProtocolError on any violation.

        A refused volume (VolumeError) is raised without losing its
        neighbours: messages decoded with it are returned, and the error is
        raised by the next call.
        """
        if self.state is State.CLOSED:
            return []
        self.feed(data)
        if self._deferred:
            raise self._deferred.pop(0)
        events: list[Message] = []
        for ev, _ in self.events():
            if isinstance(ev, VolumeError):
                self._deferred.append(ev)
            else:
                events.append(ev)
        if not events and self._deferred:
            raise self._deferred.pop(0)
        return events

    def send(self, msg: Message) -> bytes:
        """The frame for `msg`; raises LocalProtocolError if it may not be sent now."""
        if self.state is State.CLOSED and not isinstance(msg, Error | Bye):
            raise LocalProtocolError(f"cannot send {type(msg).__name__}: connection closed")
        self._sent(msg)
        return encode(msg, self.max_frame)

    def close(self) -> None:
        self.state = State.CLOSED

    def _vol(self, name: str, remote: bool) -> _VolumeState:
        vs = self.volumes.get(name)
        if vs is None:
            err = RemoteProtocolError if remote else LocalProtocolError
            raise err(f"volume {name!r} is not open on this connection")
        return vs

    def _closing(self, msg: Message) -> bool:
        if isinstance(msg, Bye) or (isinstance(msg, Error) and not msg.volume):
            self.state = State.CLOSED
            return True
        return False

    def _accept(self, msg: Message) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def _sent(self, msg: Message) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class SourceSession(_Session):
    """The source's end: authenticates with a token, then streams epochs."""

    def __init__(self, name: str, token: bytes, max_frame: int = DEFAULT_MAX_FRAME,
                 nonce: bytes | None = None) -> None:
        super().__init__(max_frame)
        self.name, self.token = name, token
        self.nonce = nonce or os.urandom(NONCE_LEN)
        self._server_nonce = b""
        self.allowed: list[str] = []
        self._pending_open: set[str] = set()
        self._pending_hashes: dict[str, int] = {}
        self._readonly: set[str] = set()
        self._dropped: set[str] = set()  # volumes we sent an Error for: late answers are dropped
        # Label sent, Labelled/LabelTaken not yet received -> its `move`
        self._labels: dict[tuple[str, int, str], bool] = {}
        self.filesets: dict[str, str | None] = {}  # open file sets -> the path awaiting an answer
        self._pending_fileset: set[str] = set()
        self.pings: list[int] = []  # Ping sent, Pong not yet received, oldest first

    def start(self) -> bytes:
        """The Hello frame that opens the conversation."""
        return self.send(Hello(PROTOCOL_VERSION, self.name, self.nonce))

    def _sent(self, msg: Message) -> None:
        st = self.state
        if isinstance(msg, Hello):
            if st is not State.START:
                raise LocalProtocolError("Hello only at the start")
            self.state = State.HELLO_SENT
        elif isinstance(msg, Auth):
            if st is not State.HELLO_SENT or not self._server_nonce:
                raise LocalProtocolError("Auth only after a Challenge")
            self.state = State.AUTH_SENT
        elif isinstance(msg, Error) and msg.volume:
            if st is not State.READY:
                raise LocalProtocolError("a volume-level Error only after authentication")
            self.volumes.pop(msg.volume, None)  # we give up on it; Open starts it again
            self._pending_open.discard(msg.volume)
            self._dropped.add(msg.volume)
        elif isinstance(msg, Error | Bye):
            self._closing(msg)
        elif st is not State.READY:
            raise LocalProtocolError(f"cannot send {type(msg).__name__} before authentication")
        elif isinstance(msg, Open):
            if msg.volume in self.volumes or msg.volume in self._pending_open:
                raise LocalProtocolError(f"volume {msg.volume!r} is already open")
            self._pending_open.add(msg.volume)
            self._dropped.discard(msg.volume)
            if msg.readonly:
                self._readonly.add(msg.volume)
            else:
                self._readonly.discard(msg.volume)
        elif isinstance(msg, GetHashes):
            self._vol(msg.volume, False)
            self._pending_hashes[msg.volume] = self._pending_hashes.get(msg.volume, 0) + 1
        elif isinstance(msg, Begin):
            vs = self._vol(msg.volume, False)
            if vs.readonly:
                raise LocalProtocolError(f"{msg.volume}: opened read-only, cannot write")
            if vs.in_epoch or msg.epoch != vs.expected:
                raise LocalProtocolError(
                    f"{msg.volume}: Begin({msg.epoch}) but epoch {vs.expected} is next")
            vs.in_epoch = True
        elif isinstance(msg, (*EPOCH_MESSAGES, Cut, Commit)):
            vs = self._vol(msg.volume, False)
            if not vs.in_epoch or msg.epoch != vs.expected:
                raise LocalProtocolError(
                    f"{msg.volume}: {type(msg).__name__}({msg.epoch}) outside its epoch")
            if isinstance(msg, Commit):
                vs.in_epoch = False
                vs.committed.append(msg.epoch)
                vs.expected += 1
        elif isinstance(msg, Current):
            if self._vol(msg.volume, False).readonly:  # the receiver refuses it
                raise LocalProtocolError(f"{msg.volume}: opened read-only, no Current to report")
        elif isinstance(msg, Ping):
            if len(self.pings) >= MAX_UNANSWERED:
                raise LocalProtocolError(f"more than {MAX_UNANSWERED} Pings awaiting an answer")
            self.pings.append(msg.nonce)
        elif isinstance(msg, Label):
            _check_label(self._vol(msg.volume, False), msg, LocalProtocolError)
            self._labels[(msg.volume, msg.epoch, msg.label)] = msg.move
        elif isinstance(msg, FileOpen):
            if msg.fileset in self.filesets or msg.fileset in self._pending_fileset:
                raise LocalProtocolError(f"file set {msg.fileset!r} is already open")
            self._pending_fileset.add(msg.fileset)
        elif isinstance(msg, FILE_REQUESTS):
            if msg.fileset not in self.filesets:
                raise LocalProtocolError(f"file set {msg.fileset!r} is not open")
            if self.filesets[msg.fileset] is not None:
                raise LocalProtocolError(f"file set {msg.fileset!r}: one file at a time")
            self.filesets[msg.fileset] = msg.path
        else:
            raise LocalProtocolError(f"a source does not send {type(msg).__name__}")

    def _accept(self, msg: Message) -> bool:
        st = self.state
        if self._closing(msg):
            return True
        if isinstance(msg, Challenge):
            if st is not State.HELLO_SENT or self._server_nonce:
                raise RemoteProtocolError("unexpected Challenge")
            if msg.version != PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    f"receiver speaks protocol {msg.version}, we speak {PROTOCOL_VERSION}; "
                    "run the same cdp version on both sides")
            if len(msg.nonce) != NONCE_LEN:
                raise RemoteProtocolError("Challenge nonce has the wrong length")
            self._server_nonce = msg.nonce
            return True
        if isinstance(msg, Welcome):
            if st is not State.AUTH_SENT:
                raise RemoteProtocolError("unexpected Welcome")
            want = receiver_proof(self.token, self.name, self.nonce, self._server_nonce)
            if not hmac.compare_digest(want, msg.proof):
                raise AuthError(
                    "the receiver could not prove it holds our token: wrong receiver address, "
                    "or the token files differ")
            self.allowed = list(msg.volumes)
            self.state = State.READY
            return True
        if st is not State.READY:
            raise RemoteProtocolError(f"unexpected {type(msg).__name__} before authentication")
        if isinstance(msg, Pong):
            if not self.pings or self.pings[0] != msg.nonce:
                raise RemoteProtocolError(f"Pong({msg.nonce}) that we did not ask for")
            self.pings.pop(0)
            return True
        if getattr(msg, "volume", None) in self._dropped:
            return False
        if isinstance(msg, FileOpened):
            if msg.fileset not in self._pending_fileset:
                raise RemoteProtocolError(f"FileOpened for {msg.fileset!r}, which we did not open")
            if len(msg.hashes) != 16 * len(msg.paths) or len(msg.modes) != 8 * len(msg.paths):
                raise RemoteProtocolError("FileOpened: hashes or modes do not match the paths")
            if not all(valid_file_path(p) for p in msg.paths):
                raise RemoteProtocolError("FileOpened: a path is not relative to the set")
            self._pending_fileset.discard(msg.fileset)
            self.filesets[msg.fileset] = None
            return True
        if isinstance(msg, FILE_ANSWERS):
            if isinstance(msg, FileError) and not msg.path:
                if msg.fileset not in self._pending_fileset and msg.fileset not in self.filesets:
                    raise RemoteProtocolError(f"FileError for {msg.fileset!r}, which is not open")
                self._pending_fileset.discard(msg.fileset)
                self.filesets.pop(msg.fileset, None)
                return True
            if msg.fileset not in self.filesets or self.filesets[msg.fileset] != msg.path:
                raise RemoteProtocolError(
                    f"{type(msg).__name__} for {msg.fileset}/{msg.path}, which is not awaiting one")
            self.filesets[msg.fileset] = None
            return True
        if isinstance(msg, Error):
            self.volumes.pop(msg.volume, None)
            self._pending_open.discard(msg.volume)
            return True
        if isinstance(msg, Opened):
            if msg.volume not in self._pending_open:
                raise RemoteProtocolError(f"Opened for {msg.volume!r}, which we did not open")
            self._pending_open.discard(msg.volume)
            self.volumes[msg.volume] = _VolumeState(expected=msg.epoch + 1,
                                                    readonly=msg.volume in self._readonly)
            return True
        if isinstance(msg, Hashes):
            self._vol(msg.volume, True)
            if not self._pending_hashes.get(msg.volume):
                raise RemoteProtocolError(f"Hashes for {msg.volume!r} that we did not ask for")
            if len(msg.hashes) % 16:
                raise RemoteProtocolError("Hashes: length is not a multiple of 16")
            return True
        if isinstance(msg, Ack | Need):
            vs = self._vol(msg.volume, True)
            if not vs.committed or vs.committed[0] != msg.epoch:
                raise RemoteProtocolError(
                    f"{msg.volume}: {type(msg).__name__}({msg.epoch}) for an epoch not awaiting one")
            if isinstance(msg, Ack):
                vs.committed.pop(0)
            else:  # the receiver dropped this epoch and every later one
                vs.committed.clear()
                vs.in_epoch = False
                vs.expected = msg.epoch
            return True
        if isinstance(msg, Labelled | LabelTaken):
            key = (msg.volume, msg.epoch, msg.label)
            name = type(msg).__name__
            if key not in self._labels:
                raise RemoteProtocolError(f"{msg.volume}: {name}({msg.epoch}) that we did not ask for")
            _check_label_answer(msg, self._labels.pop(key), RemoteProtocolError)
            return True
        raise RemoteProtocolError(f"a receiver does not send {type(msg).__name__}")

    def auth(self) -> bytes:
        """The Auth frame answering the Challenge received."""
        return self.send(Auth(source_mac(self.token, self.name, self.nonce, self._server_nonce)))

    def hashes_done(self, volume: str) -> None:
        """The caller got all the Hashes it asked for with one GetHashes."""
        n = self._pending_hashes.get(volume, 0)
        if n:
            self._pending_hashes[volume] = n - 1


Lookup = Callable[[str], "tuple[bytes, tuple[str, ...]] | None"]


class ReceiverSession(_Session):
    """The receiver's end: challenges, authenticates, and polices every volume message."""

    def __init__(self, lookup: Lookup, max_frame: int = DEFAULT_MAX_FRAME,
                 nonce: bytes | None = None,
                 filesets: Callable[[str], tuple[str, ...]] | None = None) -> None:
        super().__init__(max_frame)
        # Before authentication only Hello and Auth arrive, each a few dozen bytes: a stranger
        # may not make us hold a max_frame buffer per connection. Raised once Welcome is sent.
        self._decoder.max_frame = min(max_frame, PREAUTH_MAX_FRAME)
        self._lookup = lookup
        self._filesets_of = filesets or (lambda client: ())
        self.filesets: dict[str, str | None] = {}  # open file sets -> the path awaiting an answer
        self.nonce = nonce or os.urandom(NONCE_LEN)
        self.client = ""
        self._client_nonce = b""
        self.allowed: tuple[str, ...] = ()
        self._token = b""
        self._opening: set[str] = set()
        self.failed: set[str] = set()  # volumes stopped with an Error: their frames are dropped
        self._readonly: set[str] = set()
        # Label received, Labelled/LabelTaken not yet sent -> its `move`
        self._labels: dict[tuple[str, int, str], bool] = {}
        self._pings: list[int] = []  # Ping received, Pong not yet sent, oldest first
        self.version = PROTOCOL_VERSION  # the source's, once its Hello is in

    def _accept(self, msg: Message) -> bool:
        st = self.state
        if self._closing(msg):
            return True
        if isinstance(msg, Hello):
            if st is not State.START or self._client_nonce:
                raise RemoteProtocolError("unexpected Hello")
            if not MIN_PROTOCOL_VERSION <= msg.version <= PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    f"source speaks protocol {msg.version}, we speak {PROTOCOL_VERSION}; "
                    "run the same cdp version on both sides")
            self.version = msg.version  # answered in the source's version
            if len(msg.nonce) != NONCE_LEN:
                raise RemoteProtocolError("Hello nonce has the wrong length")
            if not valid_name(msg.name):  # it reaches logs and status before authentication
                raise RemoteProtocolError(f"invalid client name {msg.name[:64]!r}")
            self.client, self._client_nonce = msg.name, msg.nonce
            return True
        if isinstance(msg, Auth):
            if st is not State.CHALLENGED:
                raise RemoteProtocolError("unexpected Auth")
            entry = self._lookup(self.client)
            token = entry[0] if entry else os.urandom(32)
            want = source_mac(token, self.client, self._client_nonce, self.nonce)
            if not hmac.compare_digest(want, msg.mac) or entry is None:
                raise AuthError(
                    f"authentication failed for client {self.client!r}: unknown client or wrong "
                    "token (check [[receiver.client]] and the token files on both sides)")
            self._token, self.allowed = entry
            return True
        if st is not State.READY:
            raise RemoteProtocolError(f"unexpected {type(msg).__name__} before authentication")
        if isinstance(msg, Ping):
            if len(self._pings) >= MAX_UNANSWERED:
                raise RemoteProtocolError(f"more than {MAX_UNANSWERED} Pings awaiting an answer")
            self._pings.append(msg.nonce)
            return True
        if getattr(msg, "volume", None) in self.failed and not isinstance(msg, Open):
            return False  # frames already in flight for a volume we stopped
        if isinstance(msg, FileOpen | FilePut | FileDelete):
            return self._accept_file(msg)
        if isinstance(msg, Error):  # the source gives up on a volume (e.g. cannot read it)
            self.volumes.pop(msg.volume, None)
            self._opening.discard(msg.volume)
            self.failed.add(msg.volume)
            return True
        if isinstance(msg, Open):
            self.failed.discard(msg.volume)
            if not valid_name(msg.volume):
                raise VolumeError(f"invalid volume name {msg.volume!r}", code="name",
                                  volume=msg.volume)
            if msg.volume not in self.allowed:
                raise VolumeError(
                    f"client {self.client!r} may not write volume {msg.volume!r} "
                    "(add it to the client's volumes in the receiver config)",
                    code="unauthorized", volume=msg.volume)
            if msg.volume in self.volumes or msg.volume in self._opening:
                raise RemoteProtocolError(f"volume {msg.volume!r} opened twice")
            self._opening.add(msg.volume)
            if msg.readonly:
                self._readonly.add(msg.volume)
            else:
                self._readonly.discard(msg.volume)
            return True
        if isinstance(msg, GetHashes | Current):
            vs = self._vol(msg.volume, True)
            if isinstance(msg, Current) and vs.readonly:
                raise RemoteProtocolError(f"{msg.volume}: Current on a volume opened read-only")
            return not (isinstance(msg, Current) and vs.discarding)
        if isinstance(msg, Begin):
            vs = self._vol(msg.volume, True)
            if vs.readonly:
                raise RemoteProtocolError(f"{msg.volume}: opened read-only, cannot write")
            if vs.discarding and msg.epoch > vs.expected:
                return False
            if vs.in_epoch or msg.epoch != vs.expected:
                raise RemoteProtocolError(
                    f"{msg.volume}: Begin({msg.epoch}) but epoch {vs.expected} is next")
            if len(vs.committed) >= MAX_UNANSWERED:
                raise RemoteProtocolError(
                    f"{msg.volume}: more than {MAX_UNANSWERED} epochs in flight; wait for acks")
            vs.in_epoch, vs.discarding = True, False
            return True
        if isinstance(msg, Label):
            _check_label(self._vol(msg.volume, True), msg, RemoteProtocolError)
            if msg.move and self.version < LABEL_MOVE_VERSION:
                raise RemoteProtocolError(f"{msg.volume}: Label.move needs protocol "
                                          f"{LABEL_MOVE_VERSION}; the source said {self.version}")
            if len(self._labels) >= MAX_UNANSWERED:
                raise RemoteProtocolError(f"more than {MAX_UNANSWERED} labels awaiting an answer")
            self._labels[(msg.volume, msg.epoch, msg.label)] = msg.move
            return True
        if isinstance(msg, (*EPOCH_MESSAGES, Cut, Commit)):
            vs = self._vol(msg.volume, True)
            if vs.discarding and msg.epoch >= vs.expected:
                return False
            if not vs.in_epoch or msg.epoch != vs.expected:
                raise RemoteProtocolError(
                    f"{msg.volume}: {type(msg).__name__}({msg.epoch}) outside its epoch")
            if isinstance(msg, Cut):
                self._check_cut(msg)
            if isinstance(msg, Zero) and len(msg.runs) > 16 * MAX_ZERO_RUNS:
                raise RemoteProtocolError(f"{msg.volume}: Zero with {len(msg.runs) // 16} runs; at "
                                          f"most {MAX_ZERO_RUNS} per frame")
            if isinstance(msg, Commit):
                vs.in_epoch = False
                vs.committed.append(msg.epoch)
                vs.expected = msg.epoch + 1
            return True
        raise RemoteProtocolError(f"a source does not send {type(msg).__name__}")

    def _check_cut(self, msg: Cut) -> None:
        """A cut names a sane group of volumes this client may write, itself among them."""
        if msg.since > msg.time or (not msg.group) != (not msg.members):
            raise RemoteProtocolError(f"{msg.volume}: Cut({msg.epoch}) is inconsistent")
        if not msg.group:
            return
        if (not valid_name(msg.group) or len(msg.members) > MAX_MEMBERS
                or msg.volume not in msg.members or len(set(msg.members)) != len(msg.members)):
            raise RemoteProtocolError(f"{msg.volume}: Cut({msg.epoch}) names a bad group")
        other = next((m for m in msg.members if m not in self.allowed), None)
        if other is not None:
            raise VolumeError(
                f"client {self.client!r} puts volume {other[:64]!r} in consistency group "
                f"{msg.group!r} but may not write it: list every member of the group in the "
                "client's volumes (receiver config), or fix `group` in source.toml",
                code="group", volume=msg.volume)

    def _accept_file(self, msg: FileOpen | FilePut | FileDelete) -> bool:
        name = msg.fileset
        if isinstance(msg, FileOpen):
            if not valid_name(name):
                raise FilesetError(f"invalid file set name {name!r}", code="name", fileset=name)
            if name not in self._filesets_of(self.client):
                raise FilesetError(
                    f"client {self.client!r} may not write file set {name!r} (add it to the "
                    "client's filesets in the receiver config)", code="unauthorized",
                    fileset=name)
            if name in self.filesets:
                raise RemoteProtocolError(f"file set {name!r} opened twice")
            self.filesets[name] = None  # open once FileOpened is sent; requests wait for it
            return True
        if name not in self.filesets:
            raise RemoteProtocolError(f"file set {name!r} is not open on this connection")
        if self.filesets[name] is not None:
            raise RemoteProtocolError(f"file set {name!r}: a second request before the answer")
        if not msg.path:  # a FileError with path '' would close the whole set
            raise RemoteProtocolError(f"file set {name!r}: {type(msg).__name__} without a path")
        self.filesets[name] = msg.path
        if not valid_file_path(msg.path):
            raise FilesetError(f"file set {name!r}: refused path {msg.path!r} (absolute, '..', "
                               "empty parts or NUL)", code="path", fileset=name, path=msg.path)
        if isinstance(msg, FilePut):
            if len(msg.hash) != 16:
                raise FilesetError(f"{name}/{msg.path}: hash must be 16 bytes", code="protocol",
                                   fileset=name, path=msg.path)
            if msg.size > MAX_FILE_SIZE or msg.mode > 0o7777:
                raise FilesetError(f"{name}/{msg.path}: size or mode out of range",
                                   code="protocol", fileset=name, path=msg.path)
        return True

    def reject(self, volume: str, epoch: int) -> None:
        """Epoch `epoch` will be answered with Need: drop its frames and later ones from now on.

        Called when the decision is made (answers may be sent later, in order).
        """
        vs = self._vol(volume, False)
        vs.expected, vs.discarding, vs.in_epoch = epoch, True, False
        vs.committed = [c for c in vs.committed if c <= epoch]  # later ones go with it

    def _sent(self, msg: Message) -> None:
        st = self.state
        if isinstance(msg, Challenge):
            if st is not State.START or not self._client_nonce:
                raise LocalProtocolError("Challenge only after Hello")
            self.state = State.CHALLENGED
        elif isinstance(msg, Welcome):
            if st is not State.CHALLENGED or not self._token:
                raise LocalProtocolError("Welcome only after a good Auth")
            self.state = State.READY
            self._decoder.max_frame = self.max_frame
        elif isinstance(msg, Error):
            if msg.volume:
                if st is not State.READY:
                    raise LocalProtocolError("a volume-level Error only after authentication")
                self.volumes.pop(msg.volume, None)
                self._opening.discard(msg.volume)
                self.failed.add(msg.volume)
                self._labels = {k: m for k, m in self._labels.items()
                                if k[0] != msg.volume}  # never answered
            else:
                self.state = State.CLOSED
        elif isinstance(msg, Bye):
            self.state = State.CLOSED
        elif st is not State.READY:
            raise LocalProtocolError(f"cannot send {type(msg).__name__} before authentication")
        elif isinstance(msg, Opened):
            if msg.volume not in self._opening:
                raise LocalProtocolError(f"Opened for {msg.volume!r} without an Open")
            self._opening.discard(msg.volume)
            self.volumes[msg.volume] = _VolumeState(expected=msg.epoch + 1,
                                                    readonly=msg.volume in self._readonly)
        elif isinstance(msg, Hashes):
            self._vol(msg.volume, False)
        elif isinstance(msg, Pong):
            if not self._pings or self._pings[0] != msg.nonce:
                raise LocalProtocolError(f"Pong({msg.nonce}) without its Ping")
            self._pings.pop(0)
        elif isinstance(msg, Labelled | LabelTaken):
            key = (msg.volume, msg.epoch, msg.label)
            if key not in self._labels:
                raise LocalProtocolError(f"{type(msg).__name__}({msg.epoch}) without its Label")
            if isinstance(msg, LabelTaken) and self.version < LABEL_MOVE_VERSION:
                raise LocalProtocolError(f"a protocol {self.version} source knows no LabelTaken "
                                         "(unanswered() forgets its Label instead)")
            _check_label_answer(msg, self._labels[key], LocalProtocolError)
            del self._labels[key]
        elif isinstance(msg, FileOpened):
            if self.filesets.get(msg.fileset, "") is not None:
                raise LocalProtocolError(f"FileOpened for {msg.fileset!r} without a FileOpen")
        elif isinstance(msg, FILE_ANSWERS):
            if isinstance(msg, FileError) and not msg.path:
                self.filesets.pop(msg.fileset, None)
            elif self.filesets.get(msg.fileset) != msg.path:
                raise LocalProtocolError(f"{type(msg).__name__} for {msg.fileset}/{msg.path} "
                                         "without its request")
            else:
                self.filesets[msg.fileset] = None
        elif isinstance(msg, Ack | Need):
            vs = self._vol(msg.volume, False)
            if not vs.committed or vs.committed[0] != msg.epoch:
                raise LocalProtocolError(f"{type(msg).__name__}({msg.epoch}) without its Commit")
            vs.committed.pop(0)
            if isinstance(msg, Need) and not (vs.discarding and vs.expected == msg.epoch):
                vs.expected, vs.discarding, vs.in_epoch = msg.epoch, True, False
                vs.committed.clear()
        else:
            raise LocalProtocolError(f"a receiver does not send {type(msg).__name__}")

    def unanswered(self, volume: str, epoch: int, label: str) -> None:
        """A Label that gets no answer: refused, but its source (protocol 1 or 2) knows no
        LabelTaken to be told with."""
        if self._labels.pop((volume, epoch, label), None) is None:
            raise LocalProtocolError(f"Label({epoch}) of {volume} is not awaiting an answer")

    def challenge(self) -> bytes:
        return self.send(Challenge(self.version, self.nonce))

    def welcome(self) -> bytes:
        proof = receiver_proof(self._token, self.client, self._client_nonce, self.nonce)
        return self.send(Welcome(proof, list(self.allowed), self.max_frame))



def _check_label(vs: _VolumeState, msg: Label, err: type[Exception]) -> None:
    """A Label names an acknowledged epoch of a volume opened for writing, in a valid label."""
    if vs.readonly:
        raise err(f"{msg.volume}: opened read-only, cannot label")
    if not valid_label(msg.label):
        raise err(f"{msg.volume}: a label must be 1-128 printable characters, not only digits, "
                  "without leading or trailing blanks")
    if not 0 < msg.epoch < vs.expected or msg.epoch in vs.committed:
        raise err(f"{msg.volume}: Label({msg.epoch}) names no acknowledged epoch")


def _check_label_answer(msg: Labelled | LabelTaken, move: bool, err: type[Exception]) -> None:
    """Only a moving Label is answered with moved_from; only a Label that may not move a
    label is refused, and for another point than its own."""
    if isinstance(msg, Labelled):
        if msg.moved_from and (not move or msg.moved_from == msg.epoch):
            raise err(f"{msg.volume}: Labelled({msg.epoch}) moved from point {msg.moved_from}, "
                      "which its Label did not ask for")
    elif move or not 0 < msg.other != msg.epoch:
        raise err(f"{msg.volume}: LabelTaken({msg.epoch}, other={msg.other}) for a Label that "
                  "could not be refused so")
