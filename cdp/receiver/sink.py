"""One volume's receiving end on one connection: the epoch being received, then the sealed
epochs applied and answered in order."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from cdp.errors import ProtocolError
from cdp.lifecycle import cancel_and_wait
from cdp.replica import EpochWriter

log = logging.getLogger("cdp.receiver")  # one logger for the whole receiver: operators filter on it


class VolumeSink:
    """One volume's receiving end on one connection.

    It holds the epoch being received (its writer, and the blocks whose references could
    not be resolved) and the sealed epochs awaiting their answer. Answers (apply then Ack,
    or Need) run in epoch order on one consumer task: epoch e applies in a thread while e+1
    is being received. A sealed epoch is applied even if its connection goes away: the
    connection settles its sinks before it lets go of their volumes.
    """

    def __init__(self, volume: str) -> None:
        self.volume = volume
        self.writer: EpochWriter | None = None
        self.missing: list[int] = []  # blocks of the epoch being received that no ref resolved
        self._answers: asyncio.Queue[tuple[Coroutine[Any, Any, None], asyncio.Future[None]]] = (
            asyncio.Queue())
        self._waiting: list[tuple[int, asyncio.Future[None]]] = []  # epochs not yet answered
        self._consumer: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        """Sealed (or refused) epochs whose answer has not gone out yet."""
        return len(self._waiting)

    def begin(self, writer: EpochWriter) -> None:
        self.writer, self.missing = writer, []

    def receiving(self) -> EpochWriter:
        """The writer of the epoch being received; the session lets no data in outside one."""
        if self.writer is None:
            raise ProtocolError(f"{self.volume}: epoch data outside an epoch")
        return self.writer

    def take(self) -> tuple[EpochWriter, list[int]]:
        """The epoch just committed: its writer and unresolved blocks; none is being received."""
        w, missing = self.receiving(), self.missing
        self.writer, self.missing = None, []
        return w, missing

    def abort(self) -> None:
        """Discard the epoch being received (not sealed: nothing of it reached the image)."""
        if self.writer is not None:
            self.writer.abort()
        self.writer, self.missing = None, []

    def answer(self, epoch: int, coro: Coroutine[Any, Any, None]) -> None:
        """Queue `epoch`'s answer behind those of the earlier epochs."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((epoch, done))
        self._answers.put_nowait((coro, done))
        if self._consumer is None:
            self._consumer = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        while True:
            coro, done = await self._answers.get()
            try:
                await coro
            except Exception:  # a bug: said loudly; the next epochs are still answered in order
                log.exception("internal error answering an epoch volume=%s", self.volume)
            finally:
                self._waiting = [(e, d) for e, d in self._waiting if d is not done]
                done.set_result(None)

    async def settle(self, before: int | None = None) -> None:
        """Until the answers of the queued epochs (those < `before`) are out."""
        for epoch, done in list(self._waiting):
            if before is None or epoch < before:
                await asyncio.shield(done)

    async def close(self) -> None:
        """Once settled: stop the consumer (it waits for work that will not come)."""
        await self.settle()
        await cancel_and_wait(self._consumer)
        self._consumer = None
