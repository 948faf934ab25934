"""The receiver's end of a replication connection (sans-I/O; see cdp.wire.session).

It challenges and authenticates the client before taking more than a few bytes,
then polices every message: volumes and file sets the client may write, epochs in
order, Cut groups, Labels and Pings within their limits, paths that stay inside
their set.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable

from cdp.errors import AuthError, LocalProtocolError, RemoteProtocolError, VolumeError
from cdp.limits import valid_name
from cdp.wire.frames import DEFAULT_MAX_FRAME
from cdp.wire.messages import (
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
    negotiate,
)
from cdp.wire.session import (
    LABEL_MOVE_VERSION,
    MAX_FILE_SIZE,
    MAX_MEMBERS,
    MAX_UNANSWERED,
    MAX_ZERO_RUNS,
    NONCE_LEN,
    PREAUTH_MAX_FRAME,
    FilesetError,
    Session,
    State,
    VolumeState,
    check_label,
    check_label_answer,
    receiver_proof,
    source_mac,
    valid_file_path,
)

Lookup = Callable[[str], "tuple[bytes, tuple[str, ...]] | None"]


class ReceiverSession(Session):
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

    _ROLE, _PEER = "receiver", "source"

    def _on_hello(self, msg: Hello) -> bool:
        if self._client_nonce:
            raise RemoteProtocolError("unexpected Hello")
        try:
            self.version = negotiate(msg.version, msg.min_version)  # the Challenge says it
        except ValueError as exc:
            raise RemoteProtocolError(str(exc)) from None
        if len(msg.nonce) != NONCE_LEN:
            raise RemoteProtocolError("Hello nonce has the wrong length")
        if not valid_name(msg.name):  # it reaches logs and status before authentication
            raise RemoteProtocolError(f"invalid client name {msg.name[:64]!r}")
        self.client, self._client_nonce = msg.name, msg.nonce
        return True

    def _on_auth(self, msg: Auth) -> bool:
        entry = self._lookup(self.client)
        token = entry[0] if entry else os.urandom(32)
        want = source_mac(token, self.client, self._client_nonce, self.nonce)
        if not hmac.compare_digest(want, msg.mac) or entry is None:
            raise AuthError(
                f"authentication failed for client {self.client!r}: unknown client or wrong "
                "token (check [[receiver.client]] and the token files on both sides)")
        self._token, self.allowed = entry
        return True

    def _on_ping(self, msg: Ping) -> bool:
        if len(self._pings) >= MAX_UNANSWERED:
            raise RemoteProtocolError(f"more than {MAX_UNANSWERED} Pings awaiting an answer")
        self._pings.append(msg.nonce)
        return True

    def _drops(self, msg: Message) -> bool:
        """Open starts a volume we stopped again; its other frames still in flight are dropped."""
        return type(msg) is not Open and getattr(msg, "volume", None) in self.failed

    def _on_error(self, msg: Error) -> bool:
        """The source gives up on a volume (e.g. cannot read it)."""
        self.volumes.pop(msg.volume, None)
        self._opening.discard(msg.volume)
        self.failed.add(msg.volume)
        return True

    def _on_open(self, msg: Open) -> bool:
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

    def _on_get_hashes(self, msg: GetHashes) -> bool:
        self._vol(msg.volume, True)
        return True

    def _on_current(self, msg: Current) -> bool:
        vs = self._vol(msg.volume, True)
        if vs.readonly:
            raise RemoteProtocolError(f"{msg.volume}: Current on a volume opened read-only")
        return not vs.discarding

    def _on_begin(self, msg: Begin) -> bool:
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

    def _on_label(self, msg: Label) -> bool:
        check_label(self._vol(msg.volume, True), msg, RemoteProtocolError)
        if msg.move and self.version < LABEL_MOVE_VERSION:
            raise RemoteProtocolError(f"{msg.volume}: Label.move needs protocol "
                                      f"{LABEL_MOVE_VERSION}; the source said {self.version}")
        if len(self._labels) >= MAX_UNANSWERED:
            raise RemoteProtocolError(f"more than {MAX_UNANSWERED} labels awaiting an answer")
        self._labels[(msg.volume, msg.epoch, msg.label)] = msg.move
        return True

    def _in_epoch(self, msg: Data | Zero | Ref | Cut | Commit) -> VolumeState | None:
        """The volume of a frame inside its epoch; None if a Need discards that epoch."""
        vs = self._vol(msg.volume, True)
        if vs.discarding and msg.epoch >= vs.expected:
            return None
        if not vs.in_epoch or msg.epoch != vs.expected:
            raise RemoteProtocolError(
                f"{msg.volume}: {type(msg).__name__}({msg.epoch}) outside its epoch")
        return vs

    def _on_epoch_frame(self, msg: Data | Ref) -> bool:
        return self._in_epoch(msg) is not None

    def _on_zero(self, msg: Zero) -> bool:
        if self._in_epoch(msg) is None:
            return False
        if len(msg.runs) > 16 * MAX_ZERO_RUNS:
            raise RemoteProtocolError(f"{msg.volume}: Zero with {len(msg.runs) // 16} runs; at "
                                      f"most {MAX_ZERO_RUNS} per frame")
        return True

    def _on_cut(self, msg: Cut) -> bool:
        if self._in_epoch(msg) is None:
            return False
        self._check_cut(msg)
        return True

    def _on_commit(self, msg: Commit) -> bool:
        vs = self._in_epoch(msg)
        if vs is None:
            return False
        vs.in_epoch = False
        vs.committed.append(msg.epoch)
        vs.expected = msg.epoch + 1
        return True

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

    def _on_file_open(self, msg: FileOpen) -> bool:
        name = msg.fileset
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

    def _on_file_request(self, msg: FilePut | FileDelete) -> bool:
        name = msg.fileset
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
        return True

    def _on_file_put(self, msg: FilePut) -> bool:
        self._on_file_request(msg)  # the same request rules, then the file's own
        name = msg.fileset
        if len(msg.hash) != 16:
            raise FilesetError(f"{name}/{msg.path}: hash must be 16 bytes", code="protocol",
                               fileset=name, path=msg.path)
        if msg.size > MAX_FILE_SIZE or msg.mode > 0o7777:
            raise FilesetError(f"{name}/{msg.path}: size or mode out of range",
                               code="protocol", fileset=name, path=msg.path)
        return True

    _RECEIVE_STATES = {Hello: State.START, Auth: State.CHALLENGED}
    _ON_RECEIVE = {
        Hello: _on_hello, Auth: _on_auth, Ping: _on_ping,
        FileOpen: _on_file_open, FilePut: _on_file_put, FileDelete: _on_file_request,
        Error: _on_error, Open: _on_open, GetHashes: _on_get_hashes, Current: _on_current,
        Begin: _on_begin, Label: _on_label,
        Data: _on_epoch_frame, Ref: _on_epoch_frame, Zero: _on_zero, Cut: _on_cut,
        Commit: _on_commit,
    }

    def reject(self, volume: str, epoch: int) -> None:
        """Epoch `epoch` will be answered with Need: drop its frames and later ones from now on.

        Called when the decision is made (answers may be sent later, in order).
        """
        vs = self._vol(volume, False)
        vs.expected, vs.discarding, vs.in_epoch = epoch, True, False
        vs.committed = [c for c in vs.committed if c <= epoch]  # later ones go with it

    def _sending_challenge(self, msg: Challenge) -> None:
        if self.state is not State.START or not self._client_nonce:
            raise LocalProtocolError("Challenge only after Hello")
        self.state = State.CHALLENGED

    def _sending_welcome(self, msg: Welcome) -> None:
        if self.state is not State.CHALLENGED or not self._token:
            raise LocalProtocolError("Welcome only after a good Auth")
        self.state = State.READY
        self._decoder.max_frame = self.max_frame

    def _sending_error(self, msg: Error) -> None:
        if not msg.volume:
            self.state = State.CLOSED
            return
        if self.state is not State.READY:
            raise LocalProtocolError("a volume-level Error only after authentication")
        self.volumes.pop(msg.volume, None)
        self._opening.discard(msg.volume)
        self.failed.add(msg.volume)
        self._labels = {k: m for k, m in self._labels.items()
                        if k[0] != msg.volume}  # never answered

    def _sending_bye(self, msg: Bye) -> None:
        self.state = State.CLOSED

    def _sending_opened(self, msg: Opened) -> None:
        if msg.volume not in self._opening:
            raise LocalProtocolError(f"Opened for {msg.volume!r} without an Open")
        self._opening.discard(msg.volume)
        self.volumes[msg.volume] = VolumeState(expected=msg.epoch + 1,
                                                readonly=msg.volume in self._readonly)

    def _sending_hashes(self, msg: Hashes) -> None:
        self._vol(msg.volume, False)

    def _sending_pong(self, msg: Pong) -> None:
        if not self._pings or self._pings[0] != msg.nonce:
            raise LocalProtocolError(f"Pong({msg.nonce}) without its Ping")
        self._pings.pop(0)

    def _sending_label_answer(self, msg: Labelled | LabelTaken) -> None:
        key = (msg.volume, msg.epoch, msg.label)
        if key not in self._labels:
            raise LocalProtocolError(f"{type(msg).__name__}({msg.epoch}) without its Label")
        if isinstance(msg, LabelTaken) and self.version < LABEL_MOVE_VERSION:
            raise LocalProtocolError(f"a protocol {self.version} source knows no LabelTaken "
                                     "(unanswered() forgets its Label instead)")
        check_label_answer(msg, self._labels[key], LocalProtocolError)
        del self._labels[key]

    def _sending_file_opened(self, msg: FileOpened) -> None:
        if self.filesets.get(msg.fileset, "") is not None:
            raise LocalProtocolError(f"FileOpened for {msg.fileset!r} without a FileOpen")

    def _sending_file_ack(self, msg: FileAck | FileError) -> None:
        if self.filesets.get(msg.fileset) != msg.path:
            raise LocalProtocolError(f"{type(msg).__name__} for {msg.fileset}/{msg.path} "
                                     "without its request")
        self.filesets[msg.fileset] = None

    def _sending_file_error(self, msg: FileError) -> None:
        if msg.path:
            self._sending_file_ack(msg)
        else:  # the whole set
            self.filesets.pop(msg.fileset, None)

    def _sending_ack(self, msg: Ack | Need) -> VolumeState:
        vs = self._vol(msg.volume, False)
        if not vs.committed or vs.committed[0] != msg.epoch:
            raise LocalProtocolError(f"{type(msg).__name__}({msg.epoch}) without its Commit")
        vs.committed.pop(0)
        return vs

    def _sending_need(self, msg: Need) -> None:
        vs = self._sending_ack(msg)
        if not (vs.discarding and vs.expected == msg.epoch):
            vs.expected, vs.discarding, vs.in_epoch = msg.epoch, True, False
            vs.committed.clear()

    _SEND_ANY_STATE = frozenset({Challenge, Welcome, Error, Bye})
    _ON_SEND = {
        Challenge: _sending_challenge, Welcome: _sending_welcome, Error: _sending_error,
        Bye: _sending_bye, Opened: _sending_opened, Hashes: _sending_hashes, Pong: _sending_pong,
        Labelled: _sending_label_answer, LabelTaken: _sending_label_answer,
        FileOpened: _sending_file_opened, FileAck: _sending_file_ack,
        FileError: _sending_file_error, Ack: _sending_ack, Need: _sending_need,
    }

    def unanswered(self, volume: str, epoch: int, label: str) -> None:
        """A Label that gets no answer: refused, but its source (protocol 1 or 2) knows no
        LabelTaken to be told with."""
        if self._labels.pop((volume, epoch, label), None) is None:
            raise LocalProtocolError(f"Label({epoch}) of {volume} is not awaiting an answer")

    def challenge(self) -> None:
        """Send the Challenge answering the Hello, in the version negotiated."""
        self.send(Challenge(self.version, self.nonce))

    def welcome(self) -> None:
        """Send the Welcome, with our proof, after a good Auth."""
        proof = receiver_proof(self._token, self.client, self._client_nonce, self.nonce)
        self.send(Welcome(proof, list(self.allowed), self.max_frame))
