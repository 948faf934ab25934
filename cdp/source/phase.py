"""Which changes of a source volume's phase (cdp.status.Phase) are legal.

`cdp status`, status.json and the metrics show the phase; the rules below are the
volume's life cycle: nothing is sent for a volume before it is opened on the
receiver (starting, disconnected and failed lead only to opening), a seeded volume
never goes back to seeding, and "queued" (waiting for a scan slot) returns to
whatever came before it. A change the table does not allow is a bug in the daemon: it
is logged as an error and made anyway (bookkeeping must never stop replication), or
raised when CDP_STRICT_PHASES=1 (the test suite sets it).
"""

from __future__ import annotations

import logging
import os

from cdp.status import Phase

__all__ = ["ALLOWED", "Phase", "PhaseError", "check"]  # Phase lives in cdp.status

log = logging.getLogger(__name__)


P = Phase
_DOWN = {P.FAILED, P.DISCONNECTED}  # a link or a volume can fail at any moment
_OPEN = {P.FETCHING_MAP, P.SEEDING, P.SCANNING, P.RESYNC, P.SENDING, P.IDLE, P.QUEUED, P.PAUSED}

ALLOWED: dict[Phase, frozenset[Phase]] = {
    P.STARTING: frozenset({P.OPENING, *_DOWN}),
    P.OPENING: frozenset({*_OPEN, *_DOWN}),
    P.FETCHING_MAP: frozenset({*_OPEN, *_DOWN}),
    P.SEEDING: frozenset({*_OPEN, *_DOWN}),
    P.SCANNING: frozenset({*_OPEN - {P.SEEDING}, *_DOWN}),
    P.RESYNC: frozenset({*_OPEN - {P.SEEDING}, *_DOWN}),
    P.SENDING: frozenset({*_OPEN, *_DOWN}),  # an nbd seed: sending, then seeding the rest
    P.IDLE: frozenset({*_OPEN - {P.SEEDING}, *_DOWN}),
    P.QUEUED: frozenset({*_OPEN, *_DOWN}),
    P.PAUSED: frozenset({*_OPEN, *_DOWN}),
    P.DISCONNECTED: frozenset({P.OPENING, *_DOWN}),
    P.FAILED: frozenset({P.OPENING, P.FAILED}),
}


class PhaseError(AssertionError):
    """A change of phase the life cycle does not allow (a bug in the daemon)."""


def check(volume: str, old: Phase, new: Phase, *, seeded: bool) -> None:
    """Raise PhaseError (CDP_STRICT_PHASES=1) or log when old -> new is not allowed."""
    bad = new not in ALLOWED[old] and new != old
    if new is P.SEEDING and seeded:
        bad = True  # a seeded replica is rescanned or resynced, never seeded again
    if not bad:
        return
    msg = f"volume={volume}: phase {old.value!r} -> {new.value!r} is not allowed"
    if os.environ.get("CDP_STRICT_PHASES") == "1":
        raise PhaseError(msg)
    log.error("%s (a bug in cdp; replication goes on)", msg)
