"""The error tree. Everything cdp raises derives from CdpError.

Each class carries the process exit code the CLI uses for it (0 ok, 1 check
failed, 2 usage or configuration) and, for errors that cross the wire, the
short code the protocol sends in an Error message.
"""

from __future__ import annotations


class CdpError(Exception):
    """Base of every error cdp raises on purpose."""

    exit_code = 1
    wire_code = "internal"


class ConfigError(CdpError):
    """A configuration file or command-line value is wrong; the message names file, key, reason."""

    exit_code = 2
    wire_code = "config"


class WrongConfigError(ConfigError):
    """The config file is the other side's: a receiver's where a source's is needed, or the reverse."""

    def __init__(self, path: object, found: str, wanted: str) -> None:
        super().__init__(f"{path}: this is a {found} config; this command needs the {wanted}'s "
                         f"(e.g. {wanted}.toml)")
        self.path, self.found, self.wanted = path, found, wanted


class UsageError(CdpError):
    """The command line asks for something that cannot be done as written."""

    exit_code = 2


class ProtocolError(CdpError):
    """Bytes or messages that break the protocol."""

    wire_code = "protocol"


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol (malformed, oversized or out-of-order frames)."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow: a bug in cdp."""


class PeerTooOldError(ProtocolError):
    """The peer's protocol version lacks what was asked for; the message says whom to upgrade."""

    wire_code = "too_old"


class AuthError(CdpError):
    """Authentication failed: wrong token, unknown client, or a receiver we cannot trust."""

    wire_code = "auth"


class VolumeError(CdpError):
    """A volume-level refusal: the volume stops, the connection and other volumes go on."""

    wire_code = "volume"

    def __init__(self, message: str, *, code: str = "volume", volume: str = "") -> None:
        super().__init__(message)
        self.wire_code = code
        self.volume = volume


class ReplicaError(CdpError):
    """The receiver's replica store could not do what was asked (I/O, corruption, disk full)."""

    wire_code = "replica"


class DiskFullError(ReplicaError):
    """No space left for the replica; nothing was changed."""

    wire_code = "disk_full"


class PointError(CdpError):
    """A recovery point that is not kept (or no longer); `cdp points` lists those that are."""

    exit_code = 2


class LabelTakenError(CdpError):
    """A checkpoint label already names another point: `--move` moves it, or pick another label."""

    exit_code = 2
    wire_code = "label_taken"

    def __init__(self, volume: str, label: str, epoch: int, when: float, note: str = "") -> None:
        import time

        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if when else "time unknown"
        super().__init__(f"label {label!r} is on point {epoch} of {volume} ({at}) already{note}: "
                         "pass --move to move it to the new point, or pick another label")
        self.volume, self.label, self.epoch, self.time = volume, label, epoch, when


class DrillError(CdpError):
    """A failover drill or promote could not be done as asked (the message says why)."""


class TrackerError(CdpError):
    """The source could not read or track a protected volume."""

    wire_code = "tracker"


class QemuError(TrackerError):
    """QEMU's monitor (QMP) could not be reached or refused a command; the message names the socket,
    the command and QEMU's own reason."""

    def __init__(self, message: str, *, socket: str = "", command: str = "", error_class: str = "") -> None:
        super().__init__(message)
        self.socket = socket
        self.command = command
        self.error_class = error_class  # QMP's error class (GenericError, DeviceNotFound, ...) or ""


class TransportError(CdpError):
    """The connection failed or was closed; the daemons reconnect with backoff."""

    wire_code = "transport"


class PeerClosed(TransportError):
    """The peer closed the connection between frames (end of stream, no reset)."""


class ArchiveError(CdpError):
    """An archive job could not do what was asked (I/O, a locked or damaged repository)."""


class ArchiveAccessError(ArchiveError):
    """The repository cannot be opened: missing, wrong password, unreachable; nothing was written."""

    exit_code = 2


class ArchiveCorruptError(ArchiveError):
    """Repository data does not decrypt, decompress or hash as it should."""


class ArchiveLockedError(ArchiveError):
    """Another job holds the repository lock; try again when it has finished."""


class RestoreWriteError(CdpError):
    """A restore could not write into its target (no space, no permission); the message names the path."""


class UnsafeEntryError(RestoreWriteError):
    """An entry from an untrusted image or file set cannot be written inside the target; it is skipped."""


class ListenError(CdpError):
    """An address in the config cannot be listened on: another process has it, or it is not ours."""

    exit_code = 2


class InUseError(CdpError):
    """Another running daemon holds this data_dir or state_dir; the message names its pid."""

    exit_code = 2


class RemoteError(CdpError):
    """The peer reported an error in an Error message."""

    def __init__(self, code: str, message: str, volume: str = "") -> None:
        where = f" (volume {volume})" if volume else ""
        super().__init__(f"peer reported {code}{where}: {message}")
        self.code = code
        self.remote_message = message
        self.volume = volume


# Error codes the receiver sends that mean "retrying will not help until the
# operator changes something".
PERMANENT_CODES = frozenset({"auth", "unauthorized", "geometry", "name", "config", "protocol",
                             "promoted"})


class MountError(CdpError):
    """`cdp mount` cannot mount: no FUSE, a mount point that is not an empty folder, libfuse refused."""

    exit_code = 2
