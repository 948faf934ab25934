"""Failover drills: clone a recovery point and check it boots; promote the replica to live."""
