"""A source that retries a failing volume sends the same Error on each retry: the receiver
warns once and logs the repeats at info; a different error, or one after the volume worked
again, is warned anew."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

from cdp.receiver.connection import Connection
from cdp.wire.messages import Error


def _conn() -> Connection:
    link = SimpleNamespace(session=SimpleNamespace(client="host1"))
    rx = SimpleNamespace(owners={})
    return Connection(rx, link, None)  # type: ignore[arg-type]


def _levels(caplog, conn: Connection, *errors: Error) -> list[int]:
    caplog.clear()
    for e in errors:
        asyncio.run(conn._on_error(e, 0))
    return [r.levelno for r in caplog.records if "gave up" in r.getMessage()]


def test_the_same_failure_again_is_not_a_new_warning(caplog) -> None:
    caplog.set_level(logging.INFO, logger="cdp")
    conn = _conn()
    gone = Error("tracker", "cannot talk QMP on /run/vm1.qmp", "vm1")
    assert _levels(caplog, conn, gone, gone, gone) == [logging.WARNING, logging.INFO, logging.INFO]
    other = Error("tracker", "image /vm2.img: no such file", "vm2")  # another volume: news
    changed = Error("tracker", "QEMU has no block node named 'drive0'", "vm1")  # another error
    assert _levels(caplog, conn, other, changed) == [logging.WARNING, logging.WARNING]
    conn._gave_up.pop("vm1")  # what an acknowledged epoch of vm1 does (_on_commit)
    assert _levels(caplog, conn, changed) == [logging.WARNING]
