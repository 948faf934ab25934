"""A thin typed wrapper over qemu.qmp's QMPClient: the QMP commands cdp needs, errors as QemuError.

QMP is QEMU's JSON monitor protocol on a Unix socket (`-chardev socket,...
--monitor chardev=...` or libvirt's per-domain monitor). qemu.qmp (QEMU's own
asyncio library) does the greeting, capability negotiation and id matching;
this module adds a timeout to every step, turns every failure into a QemuError
that names the socket and the command, and spells out the dirty-bitmap
commands and their `transaction` actions:

    async with Qmp("/run/vm1.qmp") as qmp:
        node = await qmp.node("disk0")               # query-named-block-nodes, by node-name
        await qmp.transaction([bitmap_add("disk0", "cdp-2"), bitmap_disable("disk0", "cdp-1")])

No policy: which bitmap to add, freeze or merge when is the caller's business.
An action is the `{"type": ..., "data": ...}` member of a QMP transaction; `run()`
executes one on its own as the command of the same name, so each bitmap
operation is written once and used both ways.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError

from cdp.errors import QemuError
from cdp.textsafe import printable

log = logging.getLogger(__name__)

TIMEOUT = 10.0  # seconds for connecting (greeting and negotiation) and for each command
READ_LIMIT = 16 * 1024 * 1024  # largest QMP message accepted (query-named-block-nodes grows with the graph)


@dataclass(frozen=True)
class Action:
    """One member of a QMP transaction; on its own, the QMP command of the same name."""

    type: str
    data: Mapping[str, Any]

    def wire(self) -> dict[str, Any]:
        return {"type": self.type, "data": dict(self.data)}


def bitmap_add(node: str, name: str, *, persistent: bool = True, granularity: int | None = None,
               disabled: bool = False) -> Action:
    """A new dirty bitmap on node; persistent ones are stored in the qcow2 image on close."""
    data: dict[str, Any] = {"node": node, "name": name, "persistent": persistent}
    if granularity is not None:
        data["granularity"] = granularity
    if disabled:
        data["disabled"] = True
    return Action("block-dirty-bitmap-add", data)


def bitmap_remove(node: str, name: str) -> Action:
    """Drop a bitmap (and its persistent copy)."""
    return Action("block-dirty-bitmap-remove", {"node": node, "name": name})


def bitmap_clear(node: str, name: str) -> Action:
    """Mark every block of a bitmap clean."""
    return Action("block-dirty-bitmap-clear", {"node": node, "name": name})


def bitmap_enable(node: str, name: str) -> Action:
    """Make a bitmap record writes again."""
    return Action("block-dirty-bitmap-enable", {"node": node, "name": name})


def bitmap_disable(node: str, name: str) -> Action:
    """Stop a bitmap recording writes: it keeps what it has (frozen)."""
    return Action("block-dirty-bitmap-disable", {"node": node, "name": name})


def bitmap_merge(node: str, target: str, sources: Iterable[str]) -> Action:
    """OR the source bitmaps (all on node) into target; the sources stay as they are."""
    return Action("block-dirty-bitmap-merge", {"node": node, "target": target, "bitmaps": list(sources)})


@dataclass(frozen=True)
class Bitmap:
    """A dirty bitmap as query-named-block-nodes describes it."""

    name: str
    granularity: int  # bytes per bit
    count: int  # dirty bytes
    recording: bool  # False once disabled
    busy: bool  # in use by an export or a job: cannot be changed until that ends
    persistent: bool
    inconsistent: bool  # stored but not closed cleanly: QEMU will not trust (or use) it

    @classmethod
    def from_qmp(cls, info: Mapping[str, Any]) -> Bitmap:
        return cls(name=str(info.get("name", "")), granularity=int(info["granularity"]),
                   count=int(info["count"]), recording=bool(info.get("recording", True)),
                   busy=bool(info.get("busy", False)), persistent=bool(info.get("persistent", False)),
                   inconsistent=bool(info.get("inconsistent", False)))


@dataclass(frozen=True)
class Node:
    """A named block node (query-named-block-nodes): its driver, size and dirty bitmaps."""

    name: str
    driver: str
    file: str  # the image file name QEMU reports
    size: int  # virtual size in bytes
    read_only: bool
    bitmaps: tuple[Bitmap, ...]

    @classmethod
    def from_qmp(cls, info: Mapping[str, Any]) -> Node:
        image = info.get("image") or {}
        return cls(name=str(info.get("node-name", "")), driver=str(info.get("drv", "")),
                   file=str(info.get("file", "")), size=int(image.get("virtual-size", 0)),
                   read_only=bool(info.get("ro", False)),
                   bitmaps=tuple(Bitmap.from_qmp(b) for b in info.get("dirty-bitmaps") or ()))

    def bitmap(self, name: str) -> Bitmap | None:
        return next((b for b in self.bitmaps if b.name == name), None)


class Qmp:
    """One QMP connection to a running QEMU; use `async with`, or connect() and close()."""

    def __init__(self, path: str | Path, *, timeout: float = TIMEOUT) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._client = QMPClient(f"cdp:{Path(path).name}", readbuflen=READ_LIMIT)

    async def __aenter__(self) -> Qmp:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect, read the greeting, negotiate capabilities; QemuError if any of it fails in time."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._client.connect(self.path)
        except TimeoutError:
            await self.close()
            raise QemuError(f"QEMU's QMP socket {self.path} did not answer within {self.timeout:g} s: "
                            "is QEMU stuck, or another program listening there?", socket=self.path) from None
        except (QMPError, OSError, EOFError) as exc:
            raise QemuError(f"cannot talk QMP on {self.path}: {_cause(exc)}; check that QEMU runs with "
                            "a QMP monitor on that socket and that cdp may open it",
                            socket=self.path) from exc
        log.debug("QMP connected to %s", self.path)

    async def close(self) -> None:
        """Disconnect; never raises (a connection that already broke is closed as well)."""
        try:
            await self._client.disconnect()
        except Exception as exc:  # the reader task's failure resurfaces here: it was reported already
            log.debug("QMP disconnect from %s: %s", self.path, exc)

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run one QMP command and return its "return" member; QemuError on any failure."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self._client.execute(command, arguments)
        except ExecuteError as exc:
            raise QemuError(f"QEMU ({self.path}) refused {command}: {printable(str(exc))} "
                            f"[{exc.error_class}]", socket=self.path, command=command,
                            error_class=exc.error_class) from None
        except TimeoutError:
            raise QemuError(f"QEMU ({self.path}) did not answer {command} within {self.timeout:g} s; "
                            "whether it took effect is unknown: query the state before retrying",
                            socket=self.path, command=command) from None
        except ExecInterruptedError as exc:
            raise QemuError(f"lost the QMP connection to {self.path} during {command}; whether it took "
                            "effect is unknown: reconnect and query the state", socket=self.path,
                            command=command) from exc
        except (QMPError, OSError, EOFError) as exc:
            raise QemuError(f"QMP {command} on {self.path} failed: {_cause(exc)}", socket=self.path,
                            command=command) from exc

    async def run(self, action: Action) -> None:
        """Execute one transaction action on its own, as the command of the same name."""
        await self.execute(action.type, action.data)

    async def transaction(self, actions: Sequence[Action]) -> None:
        """All actions at once or none (QMP `transaction`, completion-mode individual)."""
        await self.execute("transaction", {"actions": [a.wire() for a in actions]})

    async def query_block(self) -> list[dict[str, Any]]:
        """query-block: the devices (qemu-system's drives) and the node each one has inserted."""
        return list(await self.execute("query-block"))

    async def nodes(self) -> list[Node]:
        """Every named block node (query-named-block-nodes, flat: no backing chains repeated)."""
        return [Node.from_qmp(n) for n in await self.execute("query-named-block-nodes", {"flat": True})]

    async def node(self, name: str) -> Node:
        """The node with this node-name; QemuError naming the nodes there are if it does not exist."""
        nodes = await self.nodes()
        for n in nodes:
            if n.name == name:
                return n
        names = ", ".join(sorted(n.name for n in nodes if n.name)) or "none"
        raise QemuError(f"QEMU ({self.path}) has no block node named {name!r} (it has: {names})",
                        socket=self.path, command="query-named-block-nodes", error_class="DeviceNotFound")

    async def add_bitmap(self, node: str, name: str, *, persistent: bool = True,
                         granularity: int | None = None, disabled: bool = False) -> None:
        await self.run(bitmap_add(node, name, persistent=persistent, granularity=granularity,
                                  disabled=disabled))

    async def remove_bitmap(self, node: str, name: str) -> None:
        await self.run(bitmap_remove(node, name))

    async def clear_bitmap(self, node: str, name: str) -> None:
        await self.run(bitmap_clear(node, name))

    async def merge_bitmaps(self, node: str, target: str, sources: Iterable[str]) -> None:
        await self.run(bitmap_merge(node, target, sources))


def _cause(exc: BaseException) -> str:
    """The innermost reason (qemu.qmp wraps OSError and EOFError in ConnectError)."""
    while True:
        inner = exc.exc if isinstance(exc, ConnectError) else exc.__cause__
        if inner is None:
            break
        exc = inner
    if isinstance(exc, EOFError):
        return "QEMU closed the connection"
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return printable(text or type(exc).__name__)
