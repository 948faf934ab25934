"""Where the NBD server listens and who may connect.

Who may connect: beyond loopback the server insists on TLS with client
certificates (an ssl context with CERT_REQUIRED) unless told `allow_any_client`.
A Unix socket is created inside a private 0700 directory, given its owner,
group and mode there (default: cdp's user, 0600), and only then renamed into
place, so it is never more open than asked; an existing path is replaced only
when it is a stale socket of ours, never a symlink, a file or a live socket.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import ssl
import stat
import tempfile
from pathlib import Path

from cdp.errors import CdpError, ListenError

log = logging.getLogger(__name__)


class NbdServerError(CdpError):
    """The NBD server could not open its image or bind its address."""


class NbdListenError(NbdServerError, ListenError):
    """The NBD export's address cannot be used: taken, or a path that is not ours to replace."""


def is_loopback(host: str) -> bool:
    """Only this machine can reach host (a host name other than localhost may resolve anywhere)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _refuse_existing(path: Path, owner: int | None = None) -> None:
    """NbdListenError unless path is free or a stale socket of ours (nobody accepts on it); a
    socket of `owner` (nbd_socket_owner) counts as ours."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise NbdListenError(f"{path} is a symlink; the NBD socket is never created through one: "
                             "remove it, or point nbd_listen at a path in a folder only cdp writes")
    if not stat.S_ISSOCK(st.st_mode):
        raise NbdListenError(f"{path} exists and is not a socket; remove it or choose another "
                             "unix: path for nbd_listen")
    if st.st_uid not in (os.geteuid(), owner):
        raise NbdListenError(f"{path} is a socket of user {st.st_uid}, not ours; remove it or choose "
                             "another unix: path for nbd_listen")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return  # stale: left by a process that is gone
    except OSError as exc:
        raise NbdListenError(f"{path}: cannot tell whether another process serves it ({exc}); "
                             "remove it if none does") from None
    finally:
        probe.close()
    raise NbdListenError(f"another process serves {path} already; stop it or choose another path")


def bind_unix(path: Path, owner: int | None = None, group: int | None = None,
              mode: int = 0o600) -> tuple[socket.socket, tuple[int, int]]:
    """A Unix socket bound at path with its owner, group and mode from its first instant; its
    (dev, inode).

    Bound inside a fresh 0700 directory next to path (whatever the umask, no
    one else can reach it there), chown'ed and chmod'ed there, then renamed
    over path: rename never follows a symlink, and `_refuse_existing` runs
    just before it. None keeps our own user or group.
    """
    _refuse_existing(path, owner)
    parent = path.parent
    try:
        pst = os.stat(parent)
    except FileNotFoundError:
        raise NbdListenError(f"folder {parent} for the NBD socket does not exist: create it, owned "
                             "by cdp's user and writable by no one else (e.g. mode 0750)") from None
    if pst.st_mode & 0o002 and not pst.st_mode & stat.S_ISVTX:
        log.warning("%s is writable by every user: anyone could replace the NBD socket %s; use a "
                    "folder only cdp writes (e.g. /run/cdp, mode 0700 or 0750)", parent, path.name)
    tmpdir = tempfile.mkdtemp(prefix=".c", dir=parent)  # mode 0700
    tmp = os.path.join(tmpdir, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        if owner is not None or group is not None:
            try:
                os.chown(tmp, -1 if owner is None else owner, -1 if group is None else group)
            except PermissionError:
                whom = " and ".join(f"{k} {v}" for k, v in (("user", owner), ("group", group))
                                    if v is not None)
                raise NbdServerError(
                    f"cannot give the NBD socket {path} to {whom}: only root may choose the "
                    "owner (nbd_socket_owner), and other users only a group they are in "
                    "(nbd_socket_group)") from None
        os.chmod(tmp, mode)
        _refuse_existing(path, owner)
        os.rename(tmp, path)
        st = os.lstat(path)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(tmpdir)
    return sock, (st.st_dev, st.st_ino)


def check_reach(host: str | None, tls: ssl.SSLContext | None, tls_required: bool,
                allow_any_client: bool) -> None:
    """Beyond loopback, only clients with a certificate (or allow_any_client): else refuse."""
    if host is None or is_loopback(host):
        return
    if tls is None or not tls_required:
        raise NbdServerError(f"NBD export on {host} is reachable beyond this machine and TLS is "
                             "not required: serve it on 127.0.0.1 or a unix: socket, or add TLS")
    if tls.verify_mode != ssl.CERT_REQUIRED and not allow_any_client:
        raise NbdServerError(f"NBD export on {host} is reachable beyond this machine and "
                             "accepts clients without a certificate: set client_ca (or "
                             "allow_any_client, if any TLS client may use the disk)")
