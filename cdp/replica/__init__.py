"""The receiver's store per volume: image, write-ahead log, block-hash map, state."""

from cdp.replica.store import EpochWriter, Replica, ReplicaState

__all__ = ["EpochWriter", "Replica", "ReplicaState"]
