"""Offsite archives of the replicas: deduplicated, compressed, encrypted snapshots.

Modules: crypto (keys, sealing, chunk ids), pack (pack file format), backend
(directory and S3), repo (index, manifests, chunk reads), lock, job (runs),
restore (images and a random-access snapshot file), maint (verify, prune),
files (single files out of an archived image), retention (pure); schedules are
cdp/schedule.py (pure, also read by the config loader).
The daemon calls `run_archive(cfg, name)` when `due(archive_cfg, last, now)`.
"""

from __future__ import annotations

from cdp.archive.job import due, run_archive

__all__ = ["due", "run_archive"]
