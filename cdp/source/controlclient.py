"""Client side of the source's control channel (cdp/source/control.py): one request, one answer.

Used by `cdp checkpoint|pause|resume|resync`; blocking, no event loop.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from cdp.errors import CdpError

SOCKET = "control.sock"  # in the source's state_dir


def ask(state_dir: Path, request: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Client side: send one request to the running source and return its answer (a dict);
    CdpError if the source is not running or says nothing, TimeoutError after `timeout`."""
    path = state_dir / SOCKET
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise CdpError(f"the source is not running (no control socket at {path}); start it "
                           "(`cdp source -c ...`, or its service) and try again") from None
        s.sendall((json.dumps(request) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except TimeoutError:
        raise TimeoutError(f"no answer from the source within {timeout:.0f}s") from None
    except OSError as exc:
        raise CdpError(f"cannot talk to the source at {path}: {exc}") from None
    finally:
        s.close()
    try:
        answer = json.loads(buf)
    except ValueError:
        raise CdpError("the source closed the control channel without an answer") from None
    if not isinstance(answer, dict):
        raise CdpError("the source answered something unexpected")
    return answer


def request_checkpoint(state_dir: Path, volume: str | None, label: str, timeout: float,
                       group: str | None = None, move: bool = False) -> dict[str, Any]:
    """Client side (cdp checkpoint): ask the running source; the answer, or a CdpError."""
    which = {"volume": volume} if group is None else {"group": group}
    return ask(state_dir, {"op": "checkpoint", **which, "label": label, "move": move}, timeout)
