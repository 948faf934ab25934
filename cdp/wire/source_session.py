"""The source's end of a replication connection (sans-I/O; see cdp.wire.session).

It sends Hello and Auth, checks the receiver's proof, and then streams epochs,
file set requests, Labels and Pings, refusing to send what the protocol does not
allow now or the receiver's negotiated version lacks (PeerTooOldError).
"""

from __future__ import annotations

import hmac
import os

from cdp.errors import AuthError, LocalProtocolError, PeerTooOldError, RemoteProtocolError
from cdp.wire.frames import DEFAULT_MAX_FRAME
from cdp.wire.messages import (
    FEATURES,
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
    has,
    lacks,
)
from cdp.wire.session import (
    MAX_UNANSWERED,
    NONCE_LEN,
    Session,
    State,
    VolumeState,
    check_label,
    check_label_answer,
    receiver_proof,
    source_mac,
    valid_file_path,
)

# How every receiver before protocol 4 refuses the Hello that offers a range of versions: it
# knows Hello with three fields only. Its exact words are the one sign such a receiver gives.
OLD_RECEIVER_REFUSAL = "Hello: expected 3 fields, got 4"


class SourceSession(Session):
    """The source's end: authenticates with a token, then streams epochs."""

    def __init__(self, name: str, token: bytes, max_frame: int = DEFAULT_MAX_FRAME,
                 nonce: bytes | None = None) -> None:
        super().__init__(max_frame)
        self.name, self.token = name, token
        self.nonce = nonce or os.urandom(NONCE_LEN)
        self._server_nonce = b""
        self.version = PROTOCOL_VERSION  # the receiver's choice, once its Challenge is in
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

    def start(self) -> None:
        """Send the Hello that opens the conversation."""
        self.send(Hello(PROTOCOL_VERSION, self.name, self.nonce, MIN_PROTOCOL_VERSION))

    _ROLE, _PEER = "source", "receiver"

    def _needs(self, feature: str) -> None:
        if not has(self.version, feature):
            raise PeerTooOldError(lacks(self.version, feature, "receiver"))

    def _sending_hello(self, msg: Hello) -> None:
        if self.state is not State.START:
            raise LocalProtocolError("Hello only at the start")
        self.state = State.HELLO_SENT

    def _sending_auth(self, msg: Auth) -> None:
        if self.state is not State.HELLO_SENT or not self._server_nonce:
            raise LocalProtocolError("Auth only after a Challenge")
        self.state = State.AUTH_SENT

    def _sending_error(self, msg: Error) -> None:
        if not msg.volume:
            self._closing(msg)
            return
        if self.state is not State.READY:
            raise LocalProtocolError("a volume-level Error only after authentication")
        self.volumes.pop(msg.volume, None)  # we give up on it; Open starts it again
        self._pending_open.discard(msg.volume)
        self._dropped.add(msg.volume)

    def _sending_bye(self, msg: Bye) -> None:
        self._closing(msg)

    def _sending_open(self, msg: Open) -> None:
        if msg.volume in self.volumes or msg.volume in self._pending_open:
            raise LocalProtocolError(f"volume {msg.volume!r} is already open")
        self._pending_open.add(msg.volume)
        self._dropped.discard(msg.volume)
        if msg.readonly:
            self._readonly.add(msg.volume)
        else:
            self._readonly.discard(msg.volume)

    def _sending_get_hashes(self, msg: GetHashes) -> None:
        self._vol(msg.volume, False)
        self._pending_hashes[msg.volume] = self._pending_hashes.get(msg.volume, 0) + 1

    def _sending_begin(self, msg: Begin) -> None:
        vs = self._vol(msg.volume, False)
        if vs.readonly:
            raise LocalProtocolError(f"{msg.volume}: opened read-only, cannot write")
        if vs.in_epoch or msg.epoch != vs.expected:
            raise LocalProtocolError(
                f"{msg.volume}: Begin({msg.epoch}) but epoch {vs.expected} is next")
        vs.in_epoch = True

    def _sending_epoch_frame(self, msg: Data | Zero | Ref | Cut | Commit) -> VolumeState:
        vs = self._vol(msg.volume, False)
        if not vs.in_epoch or msg.epoch != vs.expected:
            raise LocalProtocolError(
                f"{msg.volume}: {type(msg).__name__}({msg.epoch}) outside its epoch")
        return vs

    def _sending_cut(self, msg: Cut) -> None:
        self._needs("cut")
        self._sending_epoch_frame(msg)

    def _sending_commit(self, msg: Commit) -> None:
        vs = self._sending_epoch_frame(msg)
        vs.in_epoch = False
        vs.committed.append(msg.epoch)
        vs.expected += 1

    def _sending_current(self, msg: Current) -> None:
        if self._vol(msg.volume, False).readonly:  # the receiver refuses it
            raise LocalProtocolError(f"{msg.volume}: opened read-only, no Current to report")

    def _sending_ping(self, msg: Ping) -> None:
        self._needs("ping")
        if len(self.pings) >= MAX_UNANSWERED:
            raise LocalProtocolError(f"more than {MAX_UNANSWERED} Pings awaiting an answer")
        self.pings.append(msg.nonce)

    def _sending_label(self, msg: Label) -> None:
        if msg.move:
            self._needs("label-move")
        check_label(self._vol(msg.volume, False), msg, LocalProtocolError)
        self._labels[(msg.volume, msg.epoch, msg.label)] = msg.move

    def _sending_file_open(self, msg: FileOpen) -> None:
        if msg.fileset in self.filesets or msg.fileset in self._pending_fileset:
            raise LocalProtocolError(f"file set {msg.fileset!r} is already open")
        self._pending_fileset.add(msg.fileset)

    def _sending_file_request(self, msg: FilePut | FileDelete) -> None:
        if msg.fileset not in self.filesets:
            raise LocalProtocolError(f"file set {msg.fileset!r} is not open")
        if self.filesets[msg.fileset] is not None:
            raise LocalProtocolError(f"file set {msg.fileset!r}: one file at a time")
        self.filesets[msg.fileset] = msg.path

    _SEND_ANY_STATE = frozenset({Hello, Auth, Error, Bye})
    _ON_SEND = {
        Hello: _sending_hello, Auth: _sending_auth, Error: _sending_error, Bye: _sending_bye,
        Open: _sending_open, GetHashes: _sending_get_hashes, Begin: _sending_begin,
        Data: _sending_epoch_frame, Zero: _sending_epoch_frame, Ref: _sending_epoch_frame,
        Cut: _sending_cut, Commit: _sending_commit, Current: _sending_current,
        Ping: _sending_ping, Label: _sending_label, FileOpen: _sending_file_open,
        FilePut: _sending_file_request, FileDelete: _sending_file_request,
    }

    def _accept(self, msg: Message) -> bool:
        """A receiver too old to negotiate says so in its own words: say whom to upgrade."""
        if (isinstance(msg, Error) and not msg.volume and self.state is State.HELLO_SENT
                and msg.message == OLD_RECEIVER_REFUSAL):
            self.state = State.CLOSED
            need, what = FEATURES["negotiation"]
            raise PeerTooOldError(
                f"the receiver speaks a protocol before {need}, which lacks {what} (it refused "
                f"our Hello: {msg.message!r}); upgrade the receiver to a cdp of protocol {need} "
                "or later (receivers first)")
        return super()._accept(msg)

    def _on_challenge(self, msg: Challenge) -> bool:
        if self._server_nonce:
            raise RemoteProtocolError("unexpected Challenge")
        if not MIN_PROTOCOL_VERSION <= msg.version <= PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"the receiver chose protocol {msg.version}; this source speaks "
                f"{MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION} and offered them all")
        self.version = msg.version
        if len(msg.nonce) != NONCE_LEN:
            raise RemoteProtocolError("Challenge nonce has the wrong length")
        self._server_nonce = msg.nonce
        return True

    def _on_welcome(self, msg: Welcome) -> bool:
        want = receiver_proof(self.token, self.name, self.nonce, self._server_nonce)
        if not hmac.compare_digest(want, msg.proof):
            raise AuthError(
                "the receiver could not prove it holds our token: wrong receiver address, "
                "or the token files differ")
        self.allowed = list(msg.volumes)
        self.state = State.READY
        return True

    def _on_pong(self, msg: Pong) -> bool:
        if not self.pings or self.pings[0] != msg.nonce:
            raise RemoteProtocolError(f"Pong({msg.nonce}) that we did not ask for")
        self.pings.pop(0)
        return True

    def _drops(self, msg: Message) -> bool:
        """Late answers for a volume we sent an Error for."""
        return getattr(msg, "volume", None) in self._dropped

    def _on_file_opened(self, msg: FileOpened) -> bool:
        if msg.fileset not in self._pending_fileset:
            raise RemoteProtocolError(f"FileOpened for {msg.fileset!r}, which we did not open")
        if len(msg.hashes) != 16 * len(msg.paths) or len(msg.modes) != 8 * len(msg.paths):
            raise RemoteProtocolError("FileOpened: hashes or modes do not match the paths")
        if not all(valid_file_path(p) for p in msg.paths):
            raise RemoteProtocolError("FileOpened: a path is not relative to the set")
        self._pending_fileset.discard(msg.fileset)
        self.filesets[msg.fileset] = None
        return True

    def _on_file_ack(self, msg: FileAck | FileError) -> bool:
        if msg.fileset not in self.filesets or self.filesets[msg.fileset] != msg.path:
            raise RemoteProtocolError(
                f"{type(msg).__name__} for {msg.fileset}/{msg.path}, which is not awaiting one")
        self.filesets[msg.fileset] = None
        return True

    def _on_file_error(self, msg: FileError) -> bool:
        if msg.path:
            return self._on_file_ack(msg)
        if msg.fileset not in self._pending_fileset and msg.fileset not in self.filesets:
            raise RemoteProtocolError(f"FileError for {msg.fileset!r}, which is not open")
        self._pending_fileset.discard(msg.fileset)
        self.filesets.pop(msg.fileset, None)
        return True

    def _on_error(self, msg: Error) -> bool:
        self.volumes.pop(msg.volume, None)
        self._pending_open.discard(msg.volume)
        return True

    def _on_opened(self, msg: Opened) -> bool:
        if msg.volume not in self._pending_open:
            raise RemoteProtocolError(f"Opened for {msg.volume!r}, which we did not open")
        self._pending_open.discard(msg.volume)
        self.volumes[msg.volume] = VolumeState(expected=msg.epoch + 1,
                                                readonly=msg.volume in self._readonly)
        return True

    def _on_hashes(self, msg: Hashes) -> bool:
        self._vol(msg.volume, True)
        if not self._pending_hashes.get(msg.volume):
            raise RemoteProtocolError(f"Hashes for {msg.volume!r} that we did not ask for")
        if len(msg.hashes) % 16:
            raise RemoteProtocolError("Hashes: length is not a multiple of 16")
        return True

    def _answered(self, msg: Ack | Need) -> VolumeState:
        vs = self._vol(msg.volume, True)
        if not vs.committed or vs.committed[0] != msg.epoch:
            raise RemoteProtocolError(
                f"{msg.volume}: {type(msg).__name__}({msg.epoch}) for an epoch not awaiting one")
        return vs

    def _on_ack(self, msg: Ack) -> bool:
        self._answered(msg).committed.pop(0)
        return True

    def _on_need(self, msg: Need) -> bool:
        """The receiver dropped this epoch and every later one."""
        vs = self._answered(msg)
        vs.committed.clear()
        vs.in_epoch = False
        vs.expected = msg.epoch
        return True

    def _on_label_answer(self, msg: Labelled | LabelTaken) -> bool:
        key = (msg.volume, msg.epoch, msg.label)
        name = type(msg).__name__
        if key not in self._labels:
            raise RemoteProtocolError(f"{msg.volume}: {name}({msg.epoch}) that we did not ask for")
        check_label_answer(msg, self._labels.pop(key), RemoteProtocolError)
        return True

    _RECEIVE_STATES = {Challenge: State.HELLO_SENT, Welcome: State.AUTH_SENT}
    _ON_RECEIVE = {
        Challenge: _on_challenge, Welcome: _on_welcome, Pong: _on_pong,
        FileOpened: _on_file_opened, FileAck: _on_file_ack, FileError: _on_file_error,
        Error: _on_error, Opened: _on_opened, Hashes: _on_hashes, Ack: _on_ack, Need: _on_need,
        Labelled: _on_label_answer, LabelTaken: _on_label_answer,
    }

    def auth(self) -> None:
        """Send the Auth answering the Challenge received."""
        self.send(Auth(source_mac(self.token, self.name, self.nonce, self._server_nonce)))

    def hashes_done(self, volume: str) -> None:
        """The caller got all the Hashes it asked for with one GetHashes."""
        n = self._pending_hashes.get(volume, 0)
        if n:
            self._pending_hashes[volume] = n - 1
