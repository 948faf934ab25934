"""Who may open an nbd volume's Unix socket: nbd_socket_owner, nbd_socket_group, nbd_socket_mode.

Issue 15, item 2: the socket was always cdp's user's, mode 0600, so libvirt's qemu (its own
unprivileged user) could not open it and the README's libvirt recipe could not work. The
volume keys give it an owner, a group and a mode (never open to others), applied inside the
private folder before the socket is renamed into place. Tested as a real unprivileged user
(a throwaway one made with useradd; root needed) with nbdinfo and qemu-io, through a real
source daemon as well.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import random
import re
import shutil
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import MiB, assert_replica_equal, scaled, wait_converged, wait_for
from test_nbd_qemu import _serve

from cdp.config import load_source
from cdp.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SIZE = 4 * MiB


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["runuser", "-u", self.name, "--", *args], capture_output=True,
                              text=True, timeout=scaled(60), stdin=subprocess.DEVNULL)

    def nbdinfo_size(self, sock: Path, export: str) -> subprocess.CompletedProcess[str]:
        return self.run("nbdinfo", "--size", f"nbd+unix:///{export}?socket={sock}")


@pytest.fixture(scope="module")
def hypervisor_user() -> Iterator[User]:
    """A throwaway unprivileged user, like libvirt's qemu user: own uid and group."""
    if os.geteuid() != 0:
        pytest.skip("needs root: makes a throwaway user with useradd and chowns the socket")
    for tool in ("useradd", "userdel", "runuser", "nbdinfo", "qemu-io"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    name = f"cdpq{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell",
                    "/usr/sbin/nologin", name], check=True, capture_output=True, timeout=60)
    try:
        import pwd

        pw = pwd.getpwnam(name)
        yield User(name, pw.pw_uid, pw.pw_gid)
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=60)
        subprocess.run(["groupdel", name], capture_output=True, timeout=60)  # if userdel left it


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """Like the unit's /run/cdp (RuntimeDirectoryMode=0711): others pass through, never list."""
    d = Path(tempfile.mkdtemp(prefix="cdp-run-", dir="/tmp"))
    d.chmod(0o711)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def image(run_dir: Path) -> Path:
    path = run_dir / "disk.raw"
    with open(path, "wb") as fh:
        fh.truncate(SIZE)
    path.chmod(0o600)  # the user may reach the disk only through the export
    return path


def test_default_socket_is_closed_to_another_user(hypervisor_user: User, image: Path,
                                                  run_dir: Path) -> None:
    sock = run_dir / "vm.sock"
    for _ in _serve(image, "disk", sock):
        st = os.lstat(sock)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o600)
        r = hypervisor_user.nbdinfo_size(sock, "disk")
        assert r.returncode != 0 and "Permission denied" in r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("how", ["group", "owner"])
def test_socket_given_to_the_hypervisor_user(hypervisor_user: User, image: Path, run_dir: Path,
                                             how: str) -> None:
    sock = run_dir / "vm.sock"
    kw = ({"unix_group": hypervisor_user.gid, "unix_mode": 0o660} if how == "group"
          else {"unix_owner": hypervisor_user.uid})
    old = os.umask(0o077)  # the unit's UMask=0027 or stricter must not matter
    try:
        gen = _serve(image, "disk", sock, **kw)
        next(gen)
    finally:
        os.umask(old)
    try:
        st = os.lstat(sock)
        if how == "group":
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
                os.geteuid(), hypervisor_user.gid, 0o660)
        else:
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (hypervisor_user.uid, 0o600)
        r = hypervisor_user.nbdinfo_size(sock, "disk")
        assert r.returncode == 0 and r.stdout.strip() == str(SIZE), r.stdout + r.stderr
        r = hypervisor_user.run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k",
                                f"nbd+unix:///disk?socket={sock}")
        assert r.returncode == 0 and "wrote" in r.stdout, r.stdout + r.stderr
        with open(image, "rb") as fh:
            assert fh.read(64 * 1024) == b"\x5a" * 64 * 1024
        assert sorted(p.name for p in run_dir.iterdir()) == ["disk.raw", "vm.sock"]  # no leftovers
    finally:
        with contextlib.suppress(StopIteration):
            next(gen)
    assert not sock.exists()


def test_stale_socket_of_the_configured_owner_is_replaced(hypervisor_user: User, image: Path,
                                                          run_dir: Path) -> None:
    """After a crash (kill -9), the socket left behind belongs to nbd_socket_owner: a restart
    must take it over, not refuse it as someone else's."""
    sock = run_dir / "vm.sock"
    gen = _serve(image, "disk", sock, unix_owner=hypervisor_user.uid)
    next(gen)
    stale = os.lstat(sock)
    os.rename(sock, run_dir / "kept.sock")  # the first server forgets it (as after a crash) ...
    with contextlib.suppress(StopIteration):
        next(gen)
    os.rename(run_dir / "kept.sock", sock)  # ... and its socket is still there, nobody serving
    assert os.lstat(sock).st_ino == stale.st_ino
    for _ in _serve(image, "disk", sock, unix_owner=hypervisor_user.uid):
        assert os.lstat(sock).st_ino != stale.st_ino
        assert hypervisor_user.nbdinfo_size(sock, "disk").returncode == 0


def test_source_daemon_serves_the_socket_to_the_hypervisor_group(
        hypervisor_user: User, run_dir: Path, cdp_env, daemons) -> None:
    """The deploy recipe end to end: a source (root, like the unit) serves an nbd volume on a
    socket in a 0711 folder with nbd_socket_group/mode; the VM's user writes through it and
    the replica converges."""
    sock = run_dir / "vol1.sock"
    env = cdp_env(mode="nbd")
    toml = env.source.toml
    toml.write_text(re.sub(r'nbd_listen = "[^"]*"',
                           f'nbd_listen = "unix:{sock}"\nnbd_socket_group = "{hypervisor_user.name}"\n'
                           'nbd_socket_mode = "0660"', toml.read_text()))
    img = env.source.images["vol1"]
    with open(img, "wb") as fh:
        fh.write(random.Random(5).randbytes(MiB))
        fh.truncate(SIZE)
    rx = daemons.receiver(env)
    src = daemons.source(env)
    wait_for(lambda: sock.exists(), scaled(20), what="the source's NBD socket")
    st = os.lstat(sock)
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (hypervisor_user.gid, 0o660)
    url = f"nbd+unix:///vol1?socket={sock}"
    r = hypervisor_user.run("qemu-io", "-f", "raw", "-c", "write -P 0x77 1M 256k", "-c", "flush", url)
    assert r.returncode == 0 and "wrote" in r.stdout, r.stdout + r.stderr
    since = time.time()
    wait_converged(env, "vol1", since, src, rx, timeout=scaled(60))
    assert_replica_equal(env, "vol1")
    src.stop()
    assert not sock.exists()
    rx.stop()


# -- the config keys -------------------------------------------------------------------------


def _load(tmp_path: Path, volume: str) -> object:
    tok = tmp_path / "t.token"
    tok.write_text("0123456789abcdef0123456789abcdef\n")
    tok.chmod(0o600)
    cfg = tmp_path / "source.toml"
    cfg.write_text('[source]\nname = "h"\nreceiver = "127.0.0.1:7400"\ntoken_file = "t.token"\n'
                   f'[[volume]]\nname = "v"\npath = "v.raw"\n{volume}\n')
    return load_source(cfg)


NBD = 'mode = "nbd"\nnbd_listen = "unix:/run/cdp/v.sock"\n'


def test_socket_keys_load(tmp_path: Path) -> None:
    import grp

    gname = grp.getgrgid(os.getgid()).gr_name
    v = _load(tmp_path, NBD).volumes[0]  # type: ignore[attr-defined]
    assert (v.nbd_socket_owner, v.nbd_socket_group, v.nbd_socket_mode) == (None, None, 0o600)
    v = _load(tmp_path, NBD + f'nbd_socket_group = "{gname}"\nnbd_socket_mode = "0660"\n'
              'nbd_socket_owner = 4242\n').volumes[0]  # type: ignore[attr-defined]
    assert (v.nbd_socket_owner, v.nbd_socket_group, v.nbd_socket_mode) == (4242, os.getgid(), 0o660)
    v = _load(tmp_path, NBD + 'nbd_socket_mode = "0o640"\nnbd_socket_owner = "root"\n'
              ).volumes[0]  # type: ignore[attr-defined]
    assert (v.nbd_socket_owner, v.nbd_socket_mode) == (0, 0o640)


@pytest.mark.parametrize("extra, key, reason", [
    ('nbd_socket_mode = "0666"', "nbd_socket_mode", "every user on this host"),
    ('nbd_socket_mode = "4660"', "nbd_socket_mode", "special bits"),
    ('nbd_socket_mode = "0060"', "nbd_socket_mode", "owner needs write"),
    ("nbd_socket_mode = 0o660", "nbd_socket_mode", "octal mode in quotes"),
    ('nbd_socket_mode = "rw"', "nbd_socket_mode", "octal mode in quotes"),
    ('nbd_socket_group = "no-such-group-cdp"', "nbd_socket_group", "no group 'no-such-group-cdp'"),
    ('nbd_socket_owner = "no-such-user-cdp"', "nbd_socket_owner", "no user 'no-such-user-cdp'"),
    ("nbd_socket_owner = -1", "nbd_socket_owner", "not a valid user id"),
])
def test_bad_socket_keys_name_file_key_and_reason(tmp_path: Path, extra: str, key: str,
                                                  reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, NBD + extra)
    msg = str(err.value)
    assert str(tmp_path / "source.toml") in msg and f"volume[0].{key}:" in msg and reason in msg, msg


@pytest.mark.parametrize("volume", ['mode = "scan"', 'mode = "nbd"\nnbd_listen = "127.0.0.1:10809"'])
def test_socket_keys_need_a_unix_socket(tmp_path: Path, volume: str) -> None:
    with pytest.raises(ConfigError, match=r"volume\[0\]\.nbd_socket_mode: only applies to an nbd "
                                          "volume served on a Unix socket"):
        _load(tmp_path, f'{volume}\nnbd_socket_mode = "0660"')


def test_deploy_unit_lets_the_hypervisor_reach_run_cdp() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((ROOT / "deploy" / "systemd" / "cdp-source.service").read_text())
    s = unit["Service"]
    assert s["RuntimeDirectory"] == "cdp" and int(s["RuntimeDirectoryMode"], 8) & 0o001
    assert "CAP_CHOWN" in s["CapabilityBoundingSet"]  # for nbd_socket_owner/group
    recipe = " ".join((ROOT / "deploy" / "README.md").read_text().split())
    assert 'nbd_socket_group = "kvm"' in recipe and 'nbd_socket_mode = "0660"' in recipe
    readme = " ".join((ROOT / "docs" / "nbd-mode.md").read_text().split())
    assert "nbd_socket_group" in readme and "nbd_socket_mode" in readme
