"""The NBD protocol as the spec (doc/proto.md) writes it: wire layout, numbers, and our limits.

Shared by the two halves of the server session: option negotiation
(cdp.nbd.handshake) and transmission (cdp.nbd.protocol).

Wire layout (all integers big-endian), from the NBD protocol spec (doc/proto.md)::

    server greeting  "NBDMAGIC" | "IHAVEOPT" | u16 handshake flags (FIXED_NEWSTYLE|NO_ZEROES)
    client flags     u32
    option request   "IHAVEOPT" | u32 option | u32 length | data
    option reply     u64 0x3e889045565a9 | u32 option | u32 reply type | u32 length | data
    meta option data u32 name length | name | u32 query count | (u32 length | query)*
    request          u32 0x25609513 | u16 flags | u16 type | u64 cookie | u64 offset | u32 length
                     [+ length bytes of payload for WRITE]
    simple reply     u32 0x67446698 | u32 error | u64 cookie [+ data for a successful READ]
    structured chunk u32 0x668e33ef | u16 flags (DONE) | u16 type | u64 cookie | u32 length | payload
      OFFSET_DATA    u64 offset | data               OFFSET_HOLE  u64 offset | u32 size
      BLOCK_STATUS   u32 context id | (u32 extent length | u32 status flags)+
      ERROR          u32 errno | u16 message length | message
"""

from __future__ import annotations

import errno
import struct
from enum import Enum

from cdp.errors import RemoteProtocolError

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# Option reply types.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6

# Info types.
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# Transmission flags.
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TRANSMISSION_FLAGS = (TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM
                      | TFLAG_SEND_WRITE_ZEROES)

# Command flags and types.
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

# Structured reply flags and chunk types.
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# The one metadata context we serve, its id in SET_META_CONTEXT replies and its status flags.
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# The errno values NBD defines; the numbers are the Linux ones. The spec asks for quota and
# file-size errors to be reported as ENOSPC; any other errno goes out as EIO.
NBD_ERRNOS = frozenset({errno.EPERM, errno.EIO, errno.ENOMEM, errno.EINVAL, errno.ENOSPC,
                        errno.EOVERFLOW, errno.ENOTSUP, errno.ESHUTDOWN})
ERRNO_ALIASES = {errno.EDQUOT: errno.ENOSPC, errno.EFBIG: errno.ENOSPC}

MAX_REQUEST = 32 * 1024 * 1024  # largest READ/WRITE payload; advertised as the maximum block size
PREFERRED_BLOCK = 4096
MAX_OPTION_DATA = 64 * 1024  # names are at most 4096 bytes; nothing we accept needs more
MAX_OPTIONS = 256  # options haggled before transmission; stops a client looping forever
MAX_NAME = 4096
MAX_EXTENTS = 1 << 16  # per BLOCK_STATUS reply (the spec's ceiling is 2^20); clients ask again
RECV_BUFFER = 64 * 1024  # initial receive buffer: enough for the handshake of an idle connection
RECV_BUFFER_MAX = 4 << 20  # grows (instead of compacting) up to this; back to it when a huge WRITE is done
MIN_RECV_ROOM = 64 * 1024  # get_buffer() never offers less free space than this

# The messages above, packed and unpacked.
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
OPT_HEADER = struct.Struct(">QII")
OPT_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")
CHUNK_OFFSET = struct.Struct(">IHHQIQ")  # chunk header + the u64 offset of OFFSET_DATA
HOLE = struct.Struct(">QI")
ERROR = struct.Struct(">IH")
EXTENT = struct.Struct(">II")
INFO_EXPORT_REPLY = struct.Struct(">HQH")
INFO_BLOCK_SIZE_REPLY = struct.Struct(">HIII")


class NbdProtocolError(RemoteProtocolError):
    """The NBD client broke the protocol; the connection must be closed (flush data_to_send first)."""


class Phase(Enum):
    """Where a session is (the state diagram is in cdp.nbd.protocol)."""

    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


# Which command flags each command may carry. SEND_FUA is advertised, so the spec says FUA must
# be accepted (and may be ignored) on every command. DF needs structured replies (checked apart).
ALLOWED_FLAGS = {
    CMD_READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
    CMD_BLOCK_STATUS: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
}
