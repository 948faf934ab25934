"""Sans-I/O protocol sessions: what both ends of a replication connection share.

The protocol's states and limits, authentication proofs, and the Session base
class that buffers bytes and hands out validated messages. Each end's rules are
in cdp.wire.source_session and cdp.wire.receiver_session.

No sockets, no files; the shape of cdp.nbd.protocol and websockets:
receive_data(bytes) buffers what arrived, events_received() hands out the
messages validated since the last call (next_event(): one at a time, for a
caller whose decisions govern how the next is judged), send(msg) checks and
buffers a message, refusing anything the protocol does not allow in the
current state, and data_to_send() drains the bytes to write. The asyncio
transport only pumps bytes; tests drive two sessions against each other directly.

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

Versions (protocol 4): Hello offers [min_version, version]; the receiver's Challenge
carries the highest version both speak (cdp.wire.messages.negotiate), or it refuses naming the
side to upgrade. A source before protocol 4 offers only its own version (three fields) and is
answered in it; a receiver before protocol 4 refuses our four fields in words the source turns
into PeerTooOldError (upgrade the receiver: receivers first). Both sessions then keep `version`;
what it lacks (cdp.wire.messages.FEATURES) the source refuses to send with PeerTooOldError,
before any byte leaves, and the receiver refuses to take or answer.

Authentication: HMAC-SHA256 over both nonces and the client name, each side
proving the token to the other; the token never crosses the wire and a fresh
receiver nonce makes a replayed handshake useless.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from cdp.errors import AuthError, LocalProtocolError, RemoteProtocolError, VolumeError
from cdp.limits import MAX_WINDOW
from cdp.wire.frames import FrameDecoder, encode
from cdp.wire.messages import (
    FEATURES,
    Bye,
    Data,
    Error,
    FileAck,
    FileDelete,
    FileError,
    FilePut,
    Label,
    Labelled,
    LabelTaken,
    Message,
    Ref,
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
LABEL_MOVE_VERSION = FEATURES["label-move"][0]  # Label.move, Labelled.moved_from, LabelTaken


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
class VolumeState:
    """Where one open volume stands in its epochs, as one side of the connection sees it."""

    expected: int = 0  # the epoch number the next Begin must carry
    in_epoch: bool = False
    committed: list[int] = field(default_factory=list)  # committed, not yet answered
    discarding: bool = False  # after Need: drop frames until Begin(expected)
    readonly: bool = False  # opened to inspect: hashes only


class Session:
    """What both ends share: frame buffering both ways, lazy validation, and the state checks on
    send.

    Subclasses say what may arrive and what may be sent, in which state, as tables of
    message type -> handler (an isinstance chain, flattened: no message class subclasses
    another, so type(msg) finds its row)."""

    _ROLE: ClassVar[str] = "peer"  # this end, as error messages name it
    _PEER: ClassVar[str] = "peer"  # the other end
    # received: handshake type -> the one state it may arrive in (the rest: READY only)
    _RECEIVE_STATES: ClassVar[dict[type[Message], State]] = {}
    _ON_RECEIVE: ClassVar[dict[type[Message], Callable[[Any, Any], bool]]] = {}  # True: hand it out
    # sent: types whose handlers check the state themselves (the rest: READY only)
    _SEND_ANY_STATE: ClassVar[frozenset[type[Message]]] = frozenset()
    _ON_SEND: ClassVar[dict[type[Message], Callable[[Any, Any], object]]] = {}

    def __init__(self, max_frame: int) -> None:
        self.state = State.START
        self.max_frame = max_frame
        self._decoder = FrameDecoder(max_frame)
        self.volumes: dict[str, VolumeState] = {}
        self._deferred: list[VolumeError] = []  # refused volumes events_received() raises next
        self._out: list[bytes] = []  # frames sent, not yet taken by data_to_send()

    def receive_data(self, data: bytes) -> None:
        """Buffer received bytes; take the messages with events_received() or next_event().

        Only a frame's length is judged on arrival (one announcing more than max_frame raises
        RemoteProtocolError at once, before its body is buffered); its content is decoded and
        checked when it is taken, in the state the session is in by then.
        """
        if self.state is not State.CLOSED:
            try:
                self._decoder.push(data)
            except RemoteProtocolError:
                self.state = State.CLOSED
                raise

    def receive_buffer(self, sizehint: int = -1) -> memoryview:
        """Room to read received bytes straight into (then received_into): asyncio's
        BufferedProtocol.get_buffer, without a copy through an intermediate buffer."""
        return self._decoder.get_buffer(sizehint)

    def received_into(self, nbytes: int) -> None:
        """`nbytes` were read into receive_buffer(); as receive_data() for those bytes."""
        try:
            self._decoder.buffer_updated(nbytes)
        except RemoteProtocolError:
            self.state = State.CLOSED
            raise

    @property
    def pending(self) -> int:
        """Bytes received and not yet taken."""
        return self._decoder.pending

    def frame_ready(self) -> bool:
        """A whole frame waits to be taken: a reader may stop reading until it is."""
        try:
            return self._decoder.has_frame()
        except RemoteProtocolError:
            return True  # taking it raises: let the reader get there

    def next_event(self) -> tuple[Message | VolumeError, int] | None:
        """The next message and its frame size, validated only now; None until more bytes arrive.

        One at a time on purpose: what the caller does with one message (reject an
        epoch, fail a volume) governs how the next is judged (the receiver needs this).
        A refused volume comes out as a VolumeError instance; the stream goes on.
        Anything that breaks the connection raises ProtocolError/AuthError and closes.
        """
        while self.state is not State.CLOSED:
            try:
                item = self._decoder.pop()
                if item is None:
                    return None
                msg, size = item
                try:
                    ok = self._accept(msg)
                except VolumeError as exc:
                    return exc, size
            except (RemoteProtocolError, AuthError):
                self.state = State.CLOSED
                raise
            if ok:
                return msg, size
        return None

    def events_received(self) -> list[Message]:
        """Every message received since the last call, validated in order; raises
        ProtocolError/AuthError on any violation.

        A refused volume (VolumeError) is raised without losing its neighbours: messages
        taken with it are returned, and the error is raised by the next call.
        """
        if self.state is State.CLOSED:
            return []
        if self._deferred:
            raise self._deferred.pop(0)
        events: list[Message] = []
        while (item := self.next_event()) is not None:
            ev = item[0]
            if isinstance(ev, VolumeError):
                self._deferred.append(ev)
            else:
                events.append(ev)
        if not events and self._deferred:
            raise self._deferred.pop(0)
        return events

    def send(self, msg: Message) -> None:
        """Check `msg` against the state and buffer its frame for data_to_send(); raises
        LocalProtocolError (nothing buffered, no state changed) if it may not be sent now."""
        if self.state is State.CLOSED and not isinstance(msg, Error | Bye):
            raise LocalProtocolError(f"cannot send {type(msg).__name__}: connection closed")
        frame = encode(msg, self.max_frame)  # before _sent: a frame too large changes nothing
        self._sent(msg)
        self._out.append(frame)

    def data_to_send(self) -> bytes:
        """Bytes to write to the peer, in order; empties the outgoing buffer.

        One frame is returned as it was encoded, not copied (the transport drains after
        each send, so a Data frame is never joined with others)."""
        out = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        return out

    def close(self) -> None:
        self.state = State.CLOSED

    def _vol(self, name: str, remote: bool) -> VolumeState:
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

    def _accept(self, msg: Message) -> bool:
        """Whether to hand out a received message; raises if the protocol does not allow it."""
        if self._closing(msg):
            return True
        name = type(msg).__name__
        state = self._RECEIVE_STATES.get(type(msg), State.READY)
        if self.state is not state:
            raise RemoteProtocolError(
                f"unexpected {name} before authentication" if state is State.READY
                else f"unexpected {name}")
        if state is State.READY and self._drops(msg):
            return False
        on = self._ON_RECEIVE.get(type(msg))
        if on is None:
            raise RemoteProtocolError(f"a {self._PEER} does not send {name}")
        return on(self, msg)

    def _sent(self, msg: Message) -> None:
        if type(msg) not in self._SEND_ANY_STATE and self.state is not State.READY:
            raise LocalProtocolError(f"cannot send {type(msg).__name__} before authentication")
        on = self._ON_SEND.get(type(msg))
        if on is None:
            raise LocalProtocolError(f"a {self._ROLE} does not send {type(msg).__name__}")
        on(self, msg)

    def _drops(self, msg: Message) -> bool:  # pragma: no cover - overridden
        """Frames still in flight for a volume this end stopped are dropped, not refused."""
        raise NotImplementedError


def check_label(vs: VolumeState, msg: Label, err: type[Exception]) -> None:
    """A Label names an acknowledged epoch of a volume opened for writing, in a valid label."""
    if vs.readonly:
        raise err(f"{msg.volume}: opened read-only, cannot label")
    if not valid_label(msg.label):
        raise err(f"{msg.volume}: a label must be 1-128 printable characters, not only digits, "
                  "without leading or trailing blanks")
    if not 0 < msg.epoch < vs.expected or msg.epoch in vs.committed:
        raise err(f"{msg.volume}: Label({msg.epoch}) names no acknowledged epoch")


def check_label_answer(msg: Labelled | LabelTaken, move: bool, err: type[Exception]) -> None:
    """Only a moving Label is answered with moved_from; only a Label that may not move a
    label is refused, and for another point than its own."""
    if isinstance(msg, Labelled):
        if msg.moved_from and (not move or msg.moved_from == msg.epoch):
            raise err(f"{msg.volume}: Labelled({msg.epoch}) moved from point {msg.moved_from}, "
                      "which its Label did not ask for")
    elif move or not 0 < msg.other != msg.epoch:
        raise err(f"{msg.volume}: LabelTaken({msg.epoch}, other={msg.other}) for a Label that "
                  "could not be refused so")
