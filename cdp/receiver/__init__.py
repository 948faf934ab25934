"""The receiver: the DR-site daemon that accepts sources and applies their epochs to replicas.

- daemon: Receiver, run_receiver: listens, opens replicas (one writer per volume, session
  takeover), reloads its config (SIGHUP), reports status, serves metrics and the status page;
- admission: who may hold a connection before authenticating (caps, eviction, refusal);
- connection: one connection's serve loop and the handling of each message it sends;
- sink: one volume's receiving end on a connection: the epoch being received, then the
  sealed epochs applied and answered in order;
- live: VolumeLive, a volume's run-time facts (who writes it, its rate, its last error).

Every module logs to "cdp.receiver".
"""

from cdp.receiver.daemon import Receiver, run_receiver
from cdp.receiver.live import VolumeLive

__all__ = ["Receiver", "VolumeLive", "run_receiver"]
