"""The receiver's archive scheduler: runs [[archive]] jobs when their schedule is due.

At most `max_concurrent_archives` jobs run at once; due jobs wait in a FIFO
queue. A job runs `run_archive` in its own daemon thread (it blocks; a
receiver that stops does not wait for it: an interrupted run leaves a valid
repository and the next run adopts what it uploaded). The last run of each
archive is recorded in ``<data_dir>/.archive-state.json`` (written
atomically after every change)::

    {"updated": T, "limit": 1, "queue": ["b"], "running": ["a"],
     "archives": {"a": {"last_run": T, "ok": true, "error": "", "seconds": 12.3,
                        "snapshot": "...", "bytes_uploaded": N}}}

A run's start time is its "last run" for the schedule (a run that starts in
a slot satisfies that slot, however long it takes); a failed run counts too
and is retried at the next slot.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

from cdp.archive.job import due, run_archive
from cdp.config import ReceiverConfig
from cdp.durable import atomic_write_json, read_json
from cdp.errors import CdpError

log = logging.getLogger(__name__)
STATE = ".archive-state.json"
CHECK_EVERY = 2.0  # seconds between looks at the schedules


def read_state(data_dir: Path) -> dict[str, Any]:
    """The scheduler's state file ({} if there is none or it is unreadable)."""
    try:
        st = read_json(data_dir / STATE)
    except (OSError, ValueError):
        return {}
    return st if isinstance(st, dict) else {}


class ArchiveScheduler:
    def __init__(self, cfg: ReceiverConfig) -> None:
        self.cfg = cfg
        self.limit = cfg.max_concurrent_archives
        self.path = cfg.data_dir / STATE
        self.archives: dict[str, dict[str, Any]] = dict(read_state(cfg.data_dir).get("archives", {}))
        self.queue: collections.deque[str] = collections.deque()
        self.running: set[str] = set()

    def configure(self, cfg: ReceiverConfig) -> None:
        """A reloaded config: new archives, schedules and limit from the next tick; a run in
        progress finishes with the config it started with; removed archives leave the queue."""
        self.cfg = cfg
        self.limit = cfg.max_concurrent_archives
        names = {a.name for a in cfg.archives}
        self.queue = collections.deque(n for n in self.queue if n in names)
        self.tick(time.time())

    async def run(self) -> None:
        while True:
            self.tick(time.time())
            await asyncio.sleep(CHECK_EVERY)

    def tick(self, now: float) -> None:
        """Queue the archives that are due, start what the limit allows."""
        changed = False
        for a in self.cfg.archives:
            if a.name in self.queue or a.name in self.running:
                continue
            last = self.archives.get(a.name, {}).get("last_run")
            if due(a, last, now):
                self.queue.append(a.name)
                log.info("archive queued name=%s", a.name)
                changed = True
        while self.queue and len(self.running) < self.limit:
            self._start(self.queue.popleft())
            changed = True
        if changed:
            self._save()

    def _start(self, name: str) -> None:
        self.running.add(name)
        loop = asyncio.get_running_loop()
        started = time.time()
        log.info("archive start name=%s t=%.3f", name, started)

        def work() -> None:
            rec: dict[str, Any] = {"last_run": started, "ok": False, "error": ""}
            try:
                rep = run_archive(self.cfg, name, lock_wait=60.0)
                rec.update(ok=True, snapshot=rep.snapshot, bytes_uploaded=rep.bytes_uploaded)
            except CdpError as exc:
                rec["error"] = str(exc)
            except Exception as exc:  # a bug must not kill the scheduler
                rec["error"] = f"internal error: {exc!r}"
                log.exception("archive %s: internal error", name)
            rec["seconds"] = time.time() - started
            with contextlib.suppress(RuntimeError):  # the loop is gone: the receiver stopped
                loop.call_soon_threadsafe(self._done, name, rec)

        threading.Thread(target=work, name=f"cdp-archive-{name}", daemon=True).start()

    def _done(self, name: str, rec: dict[str, Any]) -> None:
        self.running.discard(name)
        self.archives[name] = rec
        if rec["ok"]:
            log.info("archive end name=%s t=%.3f seconds=%.1f snapshot=%s", name, time.time(),
                     rec["seconds"], rec.get("snapshot"))
        else:
            log.error("archive end name=%s t=%.3f failed: %s", name, time.time(), rec["error"])
        self.tick(time.time())
        self._save()

    def _save(self) -> None:
        try:
            atomic_write_json(self.path, {
                "updated": time.time(), "limit": self.limit, "queue": list(self.queue),
                "running": sorted(self.running), "archives": self.archives})
        except OSError as exc:
            log.warning("cannot write %s: %s", self.path, exc)
