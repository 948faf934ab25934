"""Write entries that come from untrusted sources inside one target folder, and nowhere else.

The names, modes and symlink targets a restore writes come from parties cdp does
not trust: a guest's file system (`cdp archive get`) and the paths of a file set
(`cdp files restore`, `cdp archive files --to`). Three rules keep every write
inside the target, whatever those names are:

- a name is one path component: "", ".", "..", names holding "/" or NUL, names
  that do not encode and names over 255 bytes are refused (`check_name`), never
  rewritten into something else;
- everything is created relative to a folder's file descriptor, and every folder
  below the target is opened with O_DIRECTORY|O_NOFOLLOW: a symlink (restored from
  the image a moment ago, or planted in the target by someone else) is never
  followed, so an entry "under" it is refused;
- files and symlinks are made under a fresh random name (O_CREAT|O_EXCL|O_NOFOLLOW
  for files), then renamed over the final name, which replaces a symlink found
  there instead of writing through it.

Entry-level refusals raise UnsafeEntryError (the caller skips the entry and goes
on); anything else that stops writing (no space, no permission) raises
RestoreWriteError. Modes lose setuid, setgid and sticky unless asked (`safe_mode`).
"""

from __future__ import annotations

import errno
import math
import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from cdp.errors import RestoreWriteError, UnsafeEntryError, UsageError
from cdp.textsafe import printable

NAME_MAX = 255  # bytes in one name on Linux file systems
TARGET_MAX = 4095  # bytes in a symlink's target (PATH_MAX less its NUL)
SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# errors of one entry's name or of what sits at it in the target: skip the entry, go on
_IN_THE_WAY = {
    errno.ELOOP: "a symlink is in the way in the target; nothing is written through it",
    errno.ENOTDIR: "something that is not a folder is in the way in the target",
    errno.EISDIR: "a folder of that name is in the way in the target",
    errno.EEXIST: "something of that name is in the way in the target",
    errno.ENOTEMPTY: "a folder of that name is in the way in the target",
    errno.ENAMETOOLONG: "the name is too long for the target's file system",
    errno.EINVAL: "the target's file system does not accept the name",
}


def check_name(name: str) -> None:
    """Refuse (UnsafeEntryError) a name that is not exactly one plain path component."""
    why = ""
    if name in ("", ".", ".."):
        why = "is not a file name"
    elif "/" in name:
        why = "holds a '/' and would leave its folder"
    elif "\0" in name:
        why = "holds a NUL byte"
    else:
        try:
            if len(os.fsencode(name)) > NAME_MAX:
                why = f"is longer than {NAME_MAX} bytes"
        except UnicodeEncodeError:
            why = "cannot be encoded as a file name"
    if why:
        raise UnsafeEntryError(f'refused: the name "{printable(name)}" {why}')


def safe_mode(mode: int, preserve_special: bool = False) -> int:
    """Permission bits to set: setuid, setgid and sticky only when the operator asked for them."""
    return mode & (0o7777 if preserve_special else 0o777)


def _temp_name() -> str:
    return f".cdp-{secrets.token_hex(8)}.tmp"


def _set_mtime(where: int | str, mtime: float | None, dir_fd: int | None = None) -> None:
    """Set atime and mtime, or leave them when the value cannot be represented (a hostile image's)."""
    if mtime is None or not math.isfinite(mtime):
        return
    try:
        ns = round(mtime * 1e9)
        if dir_fd is None:
            os.utime(where, ns=(ns, ns))
        else:
            os.utime(where, ns=(ns, ns), dir_fd=dir_fd, follow_symlinks=False)
    except (OverflowError, ValueError):
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOVERFLOW):
            raise


class Target:
    """An open folder of the restore target; entries are created in it without following symlinks."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path  # for reports and messages, as is (escape it for display)

    @classmethod
    def open(cls, path: Path) -> Target:
        """The folder the operator named (symlinks in the operator's own path are followed)."""
        try:
            fd = os.open(path, _DIR)
        except OSError as exc:
            raise UsageError(f"cannot open folder {printable(str(path))}: {exc.strerror}; give an "
                             "existing folder") from None
        return cls(fd, str(path))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Target:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def child(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _error(self, exc: OSError, name: str) -> RestoreWriteError:
        shown = printable(self.child(name))
        code = exc.errno or 0
        if code in (errno.ENOTDIR, errno.EEXIST) and not self.is_dir(name) and self._is_symlink(name):
            code = errno.ELOOP  # O_DIRECTORY|O_NOFOLLOW on a symlink says ENOTDIR: name the symlink
        why = _IN_THE_WAY.get(code)
        if why:
            return UnsafeEntryError(f"{shown}: {why}")
        return RestoreWriteError(f"cannot write {shown}: {exc.strerror or exc}; check the target's space "
                                 "and permissions")

    def exists(self, name: str) -> bool:
        """Whether anything (a symlink too) has this name here."""
        check_name(name)
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._error(exc, name) from None
        return True

    def is_dir(self, name: str) -> bool:
        """Whether a real folder (not a symlink to one) has this name here."""
        try:
            return stat.S_ISDIR(os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_mode)
        except OSError:
            return False

    def _is_symlink(self, name: str) -> bool:
        try:
            return stat.S_ISLNK(os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_mode)
        except (OSError, ValueError):
            return False

    def subdir(self, name: str) -> Target:
        """The folder `name` here, made (0700 until `settle`) unless it exists; never a symlink's target."""
        check_name(name)
        try:
            os.mkdir(name, 0o700, dir_fd=self.fd)
        except FileExistsError:
            pass  # an existing folder is reused; the open below refuses anything else
        except OSError as exc:
            raise self._error(exc, name) from None
        try:
            fd = os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=self.fd)
        except OSError as exc:
            raise self._error(exc, name) from None
        return Target(fd, self.child(name))

    def settle(self, mode: int, mtime: float | None) -> None:
        """Give this folder its mode and time, once everything in it is written."""
        try:
            os.fchmod(self.fd, mode)
            _set_mtime(self.fd, mtime)
        except OSError as exc:
            raise RestoreWriteError(f"cannot set the mode of {printable(self.path)}: "
                                    f"{exc.strerror}") from None

    def write_file(self, name: str, chunks: Iterable[bytes], *, limit: int | None = None, mode: int = 0o644,
                   mtime: float | None = None, sync: bool = False) -> int:
        """Write `chunks` (at most `limit` bytes; zero blocks as holes) to a new file renamed over `name`.

        Nothing is allocated up front, whatever size the source declares. Returns the size written.
        """
        check_name(name)
        tmp, fd = self._new_file()
        try:
            size = _copy(fd, chunks, limit)
            os.fchmod(fd, mode)
            _set_mtime(fd, mtime)
            if sync:
                os.fsync(fd)
        except BaseException as exc:
            os.close(fd)
            self._drop(tmp)
            if isinstance(exc, OSError):
                raise RestoreWriteError(f"cannot write {printable(self.child(name))}: "
                                        f"{exc.strerror or exc}") from None
            raise
        os.close(fd)
        self._rename(tmp, name, sync)
        return size

    def symlink(self, name: str, target: str, mtime: float | None = None) -> None:
        """A symlink `name` -> `target`, as stored: made, never followed (it replaces a file or symlink)."""
        check_name(name)
        try:
            raw = os.fsencode(target)
        except UnicodeEncodeError:
            raw = b"\0"
        if not raw or b"\0" in raw or len(raw) > TARGET_MAX:
            raise UnsafeEntryError(f"{printable(self.child(name))}: refused: its symlink target "
                                   f'"{printable(target)}" is empty, too long or holds a NUL byte')
        for _ in range(8):
            tmp = _temp_name()
            try:
                os.symlink(raw, os.fsencode(tmp), dir_fd=self.fd)
                break
            except FileExistsError:
                continue
            except OSError as exc:
                raise self._error(exc, name) from None
        else:
            raise RestoreWriteError(f"cannot create a temporary symlink in {printable(self.path)}")
        try:
            _set_mtime(tmp, mtime, dir_fd=self.fd)
        except OSError:
            pass  # a symlink's own time is cosmetic
        self._rename(tmp, name)

    def _new_file(self) -> tuple[str, int]:
        for _ in range(8):
            tmp = _temp_name()
            try:
                return tmp, os.open(tmp, _NEW_FILE, 0o600, dir_fd=self.fd)
            except FileExistsError:
                continue
            except OSError as exc:
                raise RestoreWriteError(f"cannot create a file in {printable(self.path)}: {exc.strerror}; "
                                        "check the target's space and permissions") from None
        raise RestoreWriteError(f"cannot create a temporary file in {printable(self.path)}")

    def _rename(self, tmp: str, name: str, sync: bool = False) -> None:
        try:
            os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            if sync:
                os.fsync(self.fd)
        except OSError as exc:
            self._drop(tmp)
            raise self._error(exc, name) from None

    def _drop(self, tmp: str) -> None:
        try:
            os.unlink(tmp, dir_fd=self.fd)
        except OSError:
            pass


def _copy(fd: int, chunks: Iterable[bytes], limit: int | None) -> int:
    """Write the chunks from the start of `fd`, all-zero ones as holes; stop at `limit` bytes."""
    pos = 0
    for chunk in chunks:
        block = chunk if limit is None else chunk[:limit - pos]
        if block.count(0) == len(block):
            os.lseek(fd, len(block), os.SEEK_CUR)
        else:
            view = memoryview(block)
            while view:
                view = view[os.write(fd, view):]
        pos += len(block)
        if limit is not None and pos >= limit:
            break
    os.ftruncate(fd, pos)
    return pos
