"""Property tests for file sets: the sessions' handling of untrusted file-set messages, the
path check (guarantee 3) and the receiver's version store.

1. any file-set message, plausible or not, fed to a session with a set open (or a
   request in flight) raises only the protocol's own errors;
2. a path accepted by valid_file_path never leaves the set root, holds no NUL;
3. any sequence of puts and deletes leaves a version log from which every version
   comes back byte for byte.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import xxhash
from helpers import feed, sent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.codec import compress
from cdp.errors import AuthError, RemoteProtocolError, VolumeError
from cdp.replica.files import FilesetStore
from cdp.wire.frames import encode
from cdp.wire.messages import FileAck, FileDelete, FileError, FileOpen, FileOpened, FilePut, Message
from cdp.wire.receiver_session import ReceiverSession
from cdp.wire.session import State, valid_file_path
from cdp.wire.source_session import SourceSession

TOKEN = b"0123456789abcdef0123456789abcdef"
CLIENTS = {"host1": (TOKEN, ("vm1",))}
SETS = {"host1": ("cfg",)}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

names = st.sampled_from(["cfg", "cfg", "other", "", "../x"])
paths = st.one_of(st.sampled_from(["etc/a.xml", "etc/a.xml", "../x", "/abs", "a\0b", "", "a//b",
                                   "x/./y"]), st.text(max_size=30))
hashes = st.one_of(st.binary(min_size=16, max_size=16), st.binary(max_size=20))
sizes = st.one_of(st.integers(0, 100), st.integers(0, 2**63 - 1))
floats = st.floats(allow_nan=False)

file_messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(FileOpen, names),
    st.builds(FileOpened, names, st.lists(paths, max_size=4), st.binary(max_size=40),
              st.binary(max_size=40)),
    st.builds(FilePut, names, paths, hashes, sizes, floats, st.integers(0, 2**63 - 1), floats,
              st.binary(max_size=40)),
    st.builds(FileDelete, names, paths, floats),
    st.builds(FileAck, names, paths, st.integers(0, 2**63 - 1)),
    st.builds(FileError, names, paths, st.text(max_size=8), st.text(max_size=20)),
)


def _pair() -> tuple[SourceSession, ReceiverSession]:
    src = SourceSession("host1", TOKEN)
    rcv = ReceiverSession(CLIENTS.get, filesets=lambda c: SETS.get(c, ()))
    src.start()
    feed(rcv, sent(src))
    rcv.challenge()
    feed(src, sent(rcv))
    src.auth()
    feed(rcv, sent(src))
    rcv.welcome()
    feed(src, sent(rcv))
    return src, rcv


def _open(inflight: bool) -> tuple[SourceSession, ReceiverSession]:
    src, rcv = _pair()
    assert feed(rcv, sent(src, FileOpen("cfg"))) == [FileOpen("cfg")]
    feed(src, sent(rcv, FileOpened("cfg", [], b"", b"")))
    if inflight:
        feed(rcv, sent(src, FileDelete("cfg", "etc/a.xml", 1.0)))
    return src, rcv


@FUZZ
@given(st.sampled_from(["source", "receiver"]), st.booleans(),
       st.lists(file_messages, min_size=1, max_size=5))
def test_sessions_take_any_file_message(side, inflight, msgs):
    src, rcv = _open(inflight)
    sess = src if side == "source" else rcv
    allowed: tuple[type[Exception], ...] = (RemoteProtocolError, AuthError, VolumeError)
    for msg in msgs:
        try:
            events = feed(sess, encode(msg))
        except allowed as exc:
            if isinstance(exc, VolumeError):
                assert side == "receiver" and sess.state is not State.CLOSED
                continue
            assert sess.state is State.CLOSED
            return
        for ev in events:
            if side == "receiver" and isinstance(ev, FilePut | FileDelete):
                assert valid_file_path(ev.path)  # only checked paths reach the store
                assert ev.fileset in SETS["host1"]
            if side == "receiver" and isinstance(ev, FileOpen):
                assert ev.fileset in SETS["host1"]  # guarantee 4


@FUZZ
@given(st.text(max_size=40))
def test_valid_paths_stay_inside_the_root(path):
    if not valid_file_path(path):
        return
    assert "\0" not in path and not path.startswith("/")
    root = "/srv/files/set"
    full = os.path.normpath(os.path.join(root, path))
    assert full.startswith(root + "/"), path
    assert os.path.relpath(full, root) == path


ops = st.lists(st.tuples(st.sampled_from(["a", "b/c"]),
                         st.one_of(st.none(), st.binary(max_size=300))), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_store_keeps_every_version(seq):
    with tempfile.TemporaryDirectory() as d:
        store = FilesetStore(Path(d) / "cfg")
        want: dict[str, list[bytes | None]] = {}
        for i, (path, data) in enumerate(seq):
            if data is None:
                store.delete(path, float(i))
                hist = want.setdefault(path, [])
                if hist and hist[-1] is not None:
                    hist.append(None)
            else:
                store.put(path, xxhash.xxh3_128_digest(data), len(data), float(i), 0o600,
                          float(i), compress(data))
                want.setdefault(path, []).append(data)
        for path, hist in want.items():
            got = store.versions(path)
            assert [v.version for v in got] == list(range(1, len(got) + 1))
            assert [None if v.deleted else store.content(v) for v in got] == hist
        live = {p for p, v in store.latest().items() if not v.deleted}
        assert live == {p for p, h in want.items() if h and h[-1] is not None}
