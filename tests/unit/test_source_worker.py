"""VolumeWorker: one volume's runtime state; the reader delivers, the volume's task consumes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from helpers import one_volume_source

from cdp.config import load_source
from cdp.errors import ProtocolError, RemoteError
from cdp.source.daemon import Source
from cdp.source.worker import VolumeWorker
from cdp.wire.messages import Error, Hashes, Opened


def _worker(tmp_path: Path) -> VolumeWorker:
    src = Source(load_source(one_volume_source(tmp_path)))
    src.pool.shutdown()
    w = src.workers["v"]
    assert isinstance(w, VolumeWorker) and w.src is src and w.vs is src.volumes["v"]
    return w


def test_answers_come_in_order_and_a_wrong_one_is_a_protocol_error(tmp_path: Path) -> None:
    async def main() -> None:
        w = _worker(tmp_path)
        w.deliver(Opened("v", "r", 3, 0.0))
        w.deliver(Hashes("v", 0, b""))
        assert await w.expect(Opened) == Opened("v", "r", 3, 0.0)
        with pytest.raises(ProtocolError, match="expected Opened, got Hashes"):
            await w.expect(Opened)

    asyncio.run(main())


def test_a_stop_from_the_receiver_cancels_the_work_and_is_raised_once(tmp_path: Path) -> None:
    async def main() -> None:
        w = _worker(tmp_path)
        w.deliver(Error("promoted", "promoted at the DR site", "v"))
        assert w.cancel.is_set() and w.acked.is_set()  # a scan thread and a window wait wake up
        with pytest.raises(RemoteError, match="promoted"):
            await w.expect(Opened)  # the one awaiting an answer gets it as an error
        err = w.take_error()
        assert isinstance(err, RemoteError) and err.code == "promoted"
        assert w.take_error() is None

    asyncio.run(main())


def test_a_need_rolls_back_and_a_new_session_forgets_what_came_before(tmp_path: Path) -> None:
    async def main() -> None:
        w = _worker(tmp_path)
        w.needed(7)
        assert w.vs.need == 7 and w.vs.stats["needs"] == 1 and w.cancel.is_set()
        w.deliver(Error("x", "old news", "v"))
        w.reset()
        assert w.take_error() is None and w.inbox.empty()

    asyncio.run(main())


def test_a_connection_that_does_not_end_is_reported_with_a_task_dump(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """If a connection's tasks outlive its end (one ignoring its cancel, as asyncio.wait_for
    once made a volume's task do), the source says so with where each task waits, instead
    of hanging silently; one that ended in time says nothing."""
    import cdp.source.daemon as daemon

    monkeypatch.setattr(daemon, "TEARDOWN_GRACE", 0.01)
    src = Source(load_source(one_volume_source(tmp_path)))

    class FakeLink:
        peer = "127.0.0.1:1"

    async def main() -> None:
        link = FakeLink()
        src.link = None  # ended in time
        await src._teardown_watch(link)  # type: ignore[arg-type]
        assert "has not" not in caplog.text
        src.link = link  # still held: the teardown is stuck
        await src._teardown_watch(link)  # type: ignore[arg-type]

    asyncio.run(main())
    assert "began to end" in caplog.text and "ignores its cancellation" in caplog.text
    assert "asyncio tasks" in capsys.readouterr().err
