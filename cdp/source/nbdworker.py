"""An nbd volume's worker: ships what the NBD export journalled (cdp/source/nbdmode.py)."""

from __future__ import annotations

from cdp.errors import TrackerError
from cdp.source.nbdmode import nbd_session
from cdp.source.worker import VolumeWorker
from cdp.wire.transport import Link


class NbdWorker(VolumeWorker):
    async def session(self, link: Link) -> None:
        """Open, resync the dirty regions, then send the journal's units until an error ends it."""
        vs = self.vs
        export = self.src.nbd.get(vs.name)
        if export is None:
            raise TrackerError(f"volume {vs.name} is not served over NBD: {vs.error or 'see the log'}")
        await nbd_session(self.src, link, vs, export)
