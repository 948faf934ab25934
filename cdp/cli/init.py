"""`cdp init DIR`: a working pair of example configs, a token and a small example image."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cdp.errors import UsageError

RECEIVER = """\
# cdp receiver: runs at the DR site and keeps the offline replicas.
[receiver]
listen = "127.0.0.1:7400"        # host:port to accept sources on
data_dir = "replicas"            # one folder per volume: replicas/<volume>/image is the replica
# idle_timeout = "10s"           # drop connections silent for this long (sources Ping every 2s)
# max_connections = 64           # more authenticated connections: refused with "busy"; sources retry
# auth_timeout = "10s"           # close connections not authenticated by then
# max_unauthenticated_per_ip = 8 # more not-yet-authenticated connections from one address: refused
# max_unauthenticated = 32       # in all; beyond, the busiest address loses its oldest one
# allow_plaintext = false        # beyond loopback, TLS is required unless this is true
# keep_points = "24h"            # recovery points kept ("forever"; 0 turns the journal off)
# keep_points_size = "10GiB"     # ... and at most this much undo data ("unlimited")
# drill_format = "auto"          # failover test clones: qcow2 overlay (qemu-img) or raw copy
# max_concurrent_archives = 1    # scheduled [[archive]] jobs running at once
# [receiver.tls]                 # required on any non-loopback address
# cert = "receiver.crt"
# key = "receiver.key"
# client_ca = "ca.crt"           # require client certificates signed by this CA

[[receiver.client]]              # who may connect, and which volumes each may write
name = "host1"
token_file = "host1.token"
volumes = ["vm1-disk0"]
# filesets = ["vm1-config"]      # file sets this client may write

# [[receiver.volume]]            # per-volume overrides
# name = "vm1-disk0"
# keep_points = "7d"

# [[archive]]                    # offsite snapshots of the replicas (cdp archive init first)
# name = "offsite"
# repository = "archive"         # a directory, file:///path or s3://bucket/prefix
# endpoint = "http://127.0.0.1:8333"   # S3-compatible endpoint; omit for AWS
# password_file = "archive.pass" # chmod 600; keep a copy: nothing restores without it
# schedule = "daily 02:00"       # hourly | "every 6h" | "weekly sun 03:00" | manual
# keep = { last = 7, daily = 7, weekly = 4, monthly = 12 }
"""

SOURCE = """\
# cdp source: runs beside production and streams changed blocks to the receiver.
[source]
name = "host1"
receiver = "127.0.0.1:7400"
token_file = "host1.token"
state_dir = "state"
# window = 2                     # epochs in flight before waiting for acknowledgements
# batch_bytes = "2MiB"           # blocks compressed together in one frame
# max_epoch_bytes = "64MiB"      # a longer scan is split into epochs of this size
# compress_level = 1             # zstd level (-7..19)
# workers = 2                    # compression threads
# max_concurrent_scans = 2       # full scans / nbd resyncs running at once, all volumes
# keepalive = "2s"               # Ping after this long without traffic (< receiver idle_timeout)
# dead_after = "6s"              # nothing received this long while awaiting an answer: the link is
#                                # dead (NAT timeout, peer gone): drop it and reconnect
# reconnect_min = "0.5s"         # reconnect delays double from this...
# reconnect_max = "5s"           # ...up to this (each drawn from [d/2, d])
# retry_max = "10s"              # a volume the receiver refused for now: retried at most this far apart
# rate_limit = "200MiB/s"        # cap on what is sent, all volumes together ("unlimited")
# read_limit = "unlimited"       # cap on scan reads, all volumes together
# [[source.schedule]]            # other caps at certain times; the first match wins
# days = "mon-fri"
# hours = "08:00-18:00"
# rate_limit = "50MiB/s"
# [source.tls]
# ca = "ca.crt"                  # verify the receiver against this CA
# cert = "host1.crt"             # optional client certificate
# key = "host1.key"

[[volume]]
name = "vm1-disk0"
path = "images/vm1-disk0.raw"
mode = "scan"
# block_size = "64KiB"
# scan_interval = "10s"          # rescan at least this often (file events wake it sooner)
# pre_scan = "virsh domfsfreeze vm1"   # quiesce the guest before a scan ...
# post_scan = "virsh domfsthaw vm1"    # ... and thaw it afterwards
# snapshot = "reflink"           # scan a reflink copy (XFS/btrfs): consistent, short freeze
# rate_limit = "20MiB/s"         # cap on what is sent for this volume

# [[volume]]                     # nbd mode: the VM opens its disk through cdp; every write,
# name = "vm1-disk1"             # in order, epochs cut at the guest's flushes
# path = "images/vm1-disk1.raw"
# mode = "nbd"
# nbd_listen = "unix:vm1-disk1.sock"   # and/or "127.0.0.1:10809"
# epoch_interval = "1s"          # cut at least this often while writes come
# capture_memory = "256MiB"      # captured data held before falling back to dirty tracking
# group = "vm1"                  # disks of one VM: epochs cut at the same instant

# [[fileset]]                    # small files kept with every version (the receiver's client
# name = "vm1-config"            # entry must list it in filesets)
# paths = ["/etc/libvirt/qemu/vm1.xml", "/etc/libvirt/qemu/networks"]
# max_file_size = "16MiB"
"""


def init(target: Path, image_size: int = 64 << 20) -> list[Path]:
    """Write the example configs into `target`; refuses to overwrite anything."""
    target.mkdir(parents=True, exist_ok=True)
    files = {target / "receiver.toml": RECEIVER, target / "source.toml": SOURCE}
    token = target / "host1.token"
    image = target / "images" / "vm1-disk0.raw"
    existing = [p for p in [*files, token] if p.exists()]
    if existing:
        raise UsageError(f"{existing[0]} already exists; choose an empty folder")
    for path, text in files.items():
        path.write_text(text)
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    image.parent.mkdir(exist_ok=True)
    if not image.exists():
        with open(image, "wb") as fh:
            fh.truncate(image_size)
            fh.write(b"cdp example volume\n" * 1000)
    return [*files, token, image]
