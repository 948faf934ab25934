"""Property tests: restoring a hostile file-system tree never creates anything outside the target.

`cdp.archive.extract.extract` (behind `cdp archive get`) is driven with fake,
in-memory trees in the uniform Node model: names with "/", "..", NUL, control
characters, hundreds of bytes or none; absolute names and symlinks aimed at a
sentinel folder beside the target; a symlink followed by entries "under" it
(a name "link/x", or a folder of the same name); folders that hold themselves;
setuid/setgid/sticky modes; declared sizes of 2**62 bytes and streams that never
end. After each example the test walks the whole scratch folder: the sentinel
stays empty, nothing appears beside the target, and nothing inside it carries a
special mode bit unless asked.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.archive.extract import MAX_DEPTH, Extracted, extract
from cdp.archive.files import Node
from cdp.errors import RestoreWriteError
from cdp.safewrite import Target

OUT = "@OUT@"  # replaced by the sentinel folder's absolute path once the example runs
HOSTILE = ["..", ".", "", "/", "../escaped", "../../../escaped", "a/../../escaped", f"{OUT}/abs",
           OUT, "x\0y", "\0", "\x1b[31mred\x1b[0m", "new\nline", "a" * 255, "a" * 256, "é" * 128,
           "\ud800", "\udcff", "a\\..\\b", "link/under", "link/../../escaped", "link", "d", "a", "b"]
names = st.one_of(st.sampled_from(HOSTILE),
                  st.text(st.characters(blacklist_characters="/"), max_size=12))
targets = st.one_of(st.sampled_from([OUT, f"{OUT}/x", "..", "../..", "../../../..", "/", "", "x\0",
                                     "a" * 5000, "link", ".", "\x1b]0;title\x07"]),
                    st.text(st.characters(blacklist_characters="\0"), max_size=20))
modes = st.one_of(st.sampled_from([0o644, 0o755, 0o4755, 0o2755, 0o1777, 0o6777, 0o7777, 0o000]),
                  st.integers(0, 0o177777))
mtimes = st.one_of(st.just(1_700_000_000.0), st.floats(), st.sampled_from([1e30, -1e30, -1.0]))
contents = st.one_of(st.binary(max_size=200).map(lambda d: ("data", d)),
                     st.sampled_from([("huge", b"small"), ("endless", b""), ("zeros", b""),
                                      ("longer", b"x" * 100)]))

leaves = st.one_of(
    st.tuples(st.just("file"), names, modes, mtimes, contents),
    st.tuples(st.just("link"), names, targets),
    st.tuples(st.just("loop"), names),
    st.tuples(st.just("device"), names))
trees = st.recursive(leaves, lambda kids: st.tuples(st.just("dir"), names, modes, mtimes,
                                                      st.lists(kids, max_size=5)), max_leaves=14)
roots = st.tuples(st.just("dir"), st.just("root"), modes, mtimes, st.lists(trees, max_size=6))


class Endless(io.RawIOBase):
    """A stream that never ends: the declared size must stop the copy."""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        b[:] = b"x" * len(b)
        return len(b)


class Fake(Node):
    """An entry of an in-memory file system; folders may list anything, themselves included."""

    def __init__(self, kind: str, mode: int = 0o644, mtime: float = 0.0, data: bytes = b"",
                 declared: int | None = None, target: str | None = None, stream: str = "data") -> None:
        self.type = kind
        self.mode = mode & 0o7777
        self._mtime = mtime
        self.data = data
        self.declared = len(data) if declared is None else declared
        self._target = target
        self.stream = stream
        self.kids: list[tuple[str, Node]] = []
        self.ident = id(self) if kind == "dir" else None

    @property
    def size(self) -> int:
        return self.declared

    @property
    def mtime(self) -> float:
        return self._mtime

    @property
    def target(self) -> str | None:
        return self._target

    def children(self) -> list[tuple[str, Node]]:
        return list(self.kids)

    def open(self) -> BinaryIO:
        if self.stream == "endless":
            return io.BufferedReader(Endless())  # type: ignore[return-value]
        if self.stream == "zeros":
            return io.BytesIO(bytes(self.declared))
        return io.BytesIO(self.data)


def build(spec: tuple[Any, ...], out: str, parent: Fake | None = None) -> tuple[str, Fake]:
    """(name, node) of a generated spec, with OUT replaced by the sentinel's path."""
    kind, name = spec[0], spec[1].replace(OUT, out)
    if kind == "file":
        _, _, mode, mtime, (how, data) = spec
        declared = {"huge": 2**62, "endless": 3 * 2**20 + 5, "zeros": 4 * 2**20, "longer": 10}.get(how)
        return name, Fake("file", mode, mtime, data, declared, stream=how)
    if kind == "link":
        return name, Fake("symlink", 0o777, target=spec[2].replace(OUT, out))
    if kind == "loop":
        return name, parent or Fake("dir", 0o755)
    if kind == "device":
        return name, Fake("chardev")
    _, _, mode, mtime, kids = spec
    node = Fake("dir", mode, mtime)
    node.kids = [build(k, out, node) for k in kids]
    return name, node


def walk(root: Path) -> list[Path]:
    """Every entry below root, symlinks not followed."""
    found = []
    for d, dirs, files in os.walk(root, followlinks=False):
        found += [Path(d) / n for n in dirs + files]
    return found


def unlock_and_remove(base: Path) -> None:
    for p in walk(base):
        if not p.is_symlink() and p.is_dir():
            os.chmod(p, 0o700)
    os.chmod(base, 0o700)
    shutil.rmtree(base)


def restore(spec: tuple[Any, ...], top: str, preserve: bool) -> Extracted | None:
    """Extract the spec into a fresh target beside a sentinel folder; check; return the report."""
    base = Path(tempfile.mkdtemp(prefix="cdp-restore-prop-"))
    try:
        outside = base / "outside"
        chain = base / "d1" / "d2" / "d3"
        dest = chain / "target"
        outside.mkdir()
        dest.mkdir(parents=True)
        _, node = build(spec, str(outside))
        with Target.open(dest) as target:
            try:
                done = extract(node, target, top, "/", preserve_special=preserve)
            except RestoreWriteError:
                done = None  # a clear error (e.g. no permission as a non-root user) is allowed

        assert list(outside.iterdir()) == [], "something was created in the sentinel folder"
        beside = {p for p in walk(base) if dest not in p.parents and p != dest}
        assert beside == {base / "outside", base / "d1", base / "d1" / "d2", chain}, beside
        for p in walk(dest):
            st_ = p.lstat()
            if not stat.S_ISLNK(st_.st_mode) and not preserve:
                assert st_.st_mode & 0o7000 == 0, f"{p}: special bits {oct(st_.st_mode)}"
            if stat.S_ISREG(st_.st_mode):
                assert st_.st_size <= 4 * 2**20, f"{p}: {st_.st_size} bytes"
        if done is not None:
            for w in done.written:
                assert os.path.commonpath([w, str(dest)]) == str(dest), w
                assert os.path.lexists(w), w
        return done
    finally:
        unlock_and_remove(base)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(roots, names, st.booleans())
def test_nothing_is_created_outside_the_target(spec: tuple[Any, ...], top: str, preserve: bool) -> None:
    restore(spec, top, preserve)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["link", "d"]), targets, st.booleans(), st.binary(max_size=50))
def test_nothing_is_written_through_a_symlink_from_the_image(name: str, target: str, dir_first: bool,
                                                              data: bytes) -> None:
    """A symlink then a folder of the same name (or a name under it): the symlink is never followed."""
    under = ("dir", name, 0o755, 0.0, [("file", "x", 0o644, 0.0, ("data", data))])
    link = ("link", name, target)
    entries = [under, link] if dir_first else [link, under]
    entries.append(("file", f"{name}/x", 0o644, 0.0, ("data", data)))
    done = restore(("dir", "root", 0o755, 0.0, entries), "root", False)
    assert done is not None
    assert any(p == f"/{name}/x" and "'/'" in why for p, why in done.skipped)
    why = " ".join(why for p, why in done.skipped if p == f"/{name}")
    if not dir_first and "symlink target" not in why:  # the symlink was made: the folder is refused
        assert "a symlink is in the way" in why


def test_restores_a_plain_tree_exactly(tmp_path: Path) -> None:
    out, dest = tmp_path / "outside", tmp_path / "target"
    out.mkdir()
    dest.mkdir()
    _, root = build(("dir", "root", 0o750, 1_600_000_000.0, [
        ("file", "a.txt", 0o4755, 1_500_000_000.0, ("data", b"hello")),
        ("file", "\x1b[31mred", 0o600, 0.0, ("data", b"esc")),
        ("file", "sparse", 0o644, 0.0, ("zeros", b"")),
        ("link", "up", f"{OUT}/x"),
        ("dir", "sub", 0o2775, 0.0, [("file", "b", 0o644, 0.0, ("huge", b"small"))])]), str(out))
    with Target.open(dest) as target:
        done = extract(root, target, "root", "/")
    assert done.skipped == []
    r = dest / "root"
    assert (r / "a.txt").read_bytes() == b"hello"
    assert stat.S_IMODE((r / "a.txt").stat().st_mode) == 0o755  # setuid dropped
    assert (r / "a.txt").stat().st_mtime == 1_500_000_000
    assert (r / "\x1b[31mred").read_bytes() == b"esc"  # a strange name is fine inside the target
    assert (r / "sparse").stat().st_size == 4 * 2**20
    assert (r / "sparse").stat().st_blocks * 512 < 2**20  # zeros left as holes
    assert os.readlink(r / "up") == f"{out}/x" and list(out.iterdir()) == []
    assert stat.S_IMODE((r / "sub").stat().st_mode) == 0o775 and (r / "sub" / "b").read_bytes() == b"small"
    assert stat.S_IMODE(r.stat().st_mode) == 0o750

    with Target.open(dest) as target:
        extract(root, target, "again", "/", preserve_special=True)
    assert stat.S_IMODE((dest / "again" / "a.txt").stat().st_mode) == 0o4755
    assert stat.S_IMODE((dest / "again" / "sub").stat().st_mode) == 0o2775


def test_looped_folders_end(tmp_path: Path) -> None:
    """A folder holding itself is copied once; without an identity, MAX_DEPTH ends it."""
    _, loop = build(("dir", "root", 0o755, 0.0, [("loop", "again")]), str(tmp_path))
    with Target.open(tmp_path) as target:
        done = extract(loop, target, "root", "/")
    assert [p for p, _ in done.skipped] == ["/again"] and not (tmp_path / "root" / "again").exists()

    loop.ident = None
    with Target.open(tmp_path) as target:
        done = extract(loop, target, "deep", "/")
    assert len(done.skipped) == 1 and "deep" in done.skipped[0][1]
    assert len(done.written) == MAX_DEPTH + 1
