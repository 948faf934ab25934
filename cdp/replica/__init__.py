"""The receiver's store per volume: image, write-ahead log, block-hash map, state."""

from cdp.replica.state import ReplicaState
from cdp.replica.store import Replica
from cdp.replica.writer import EpochWriter

__all__ = ["EpochWriter", "Replica", "ReplicaState"]
