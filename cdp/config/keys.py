"""Every key a config file accepts, with its meaning, default and unit: declared once.

The loader (cdp/config/) reads only keys declared here, takes their defaults
from here, and lists them when a key is unknown; `cdp init` (cdp/cli/init.py)
writes every one of them into its example files. A default is written as it
would be in a TOML file ("10s", "32MiB") and the loader parses it like a value
read from a file, so the default an example shows is the one in force.

A key has exactly one of: `required`; a `default`; a `derived` default (computed
from other keys; `example` is its value in the example files); or no default at
all, `unset` saying what leaving it out means (`example` shows a value).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Key:
    name: str
    doc: str  # one line: what it does, its unit and range
    default: Any = None  # TOML value used when the key is absent; None: see the others
    example: Any = None  # TOML value shown where there is no plain default
    required: bool = False
    derived: str = ""  # a default computed from other keys, e.g. "3 x keepalive"
    unset: str = ""  # what leaving out a key without a default means, e.g. "off"
    table: bool = False  # a sub-table [a.b] or array of tables [[a.b]], declared in TABLES
    only: str = ""  # "scan", "nbd" or "qemu": meaningful for volumes of that mode only

    @property
    def has_default(self) -> bool:
        """Absent means a definite value (`default` or `derived`), not "none" or "off"."""
        return self.default is not None or bool(self.derived)

    def why_absent(self) -> str:
        """What the example files say about leaving the key out."""
        if self.required:
            return "required"
        if self.default is not None:
            return f"default: {toml_value(self.default)}"
        return f"default: {self.derived}" if self.derived else f"unset: {self.unset}"


def toml_value(v: Any) -> str:
    """A value as written in a TOML file (the types config keys use)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML form for {v!r}")


def _tables(*keys: Key) -> dict[str, Key]:
    return {k.name: k for k in keys}


# Each table by its TOML path; keys in the order `cdp init` writes them.
TABLES: dict[str, dict[str, Key]] = {
    # ---- receiver.toml ---------------------------------------------------------------------
    "receiver": _tables(
        Key("listen", "where sources connect; beyond loopback needs [receiver.tls]",
            default="127.0.0.1:7400"),
        Key("data_dir", "<data_dir>/<volume>/image is a replica", default="replicas"),
        Key("idle_timeout", "drop a connection silent this long", default="10s"),
        Key("max_connections", "authenticated connections; more are refused (busy)", default=64),
        Key("auth_timeout", "close a connection not authenticated by then", default="10s"),
        Key("max_unauthenticated_per_ip", "not-yet-authenticated connections from one address", default=8),
        Key("max_unauthenticated", "... in all; beyond, the busiest address loses its oldest one",
            default=32),
        Key("max_frame", "largest frame accepted, 1MiB..1GiB", default="32MiB"),
        Key("allow_plaintext", "true: no TLS beyond loopback (VPN, IPsec protect the link)", default=False),
        Key("keep_points", 'recovery points kept by age ("forever"; "0s": no journal)', default="24h"),
        Key("keep_points_size", 'undo data kept for them at most ("unlimited")', default="10GiB"),
        Key("drill_format", 'drill clones: "qcow2" overlay, "raw" copy or "auto"', default="auto"),
        Key("drill_dir", "where drill clones go", example="drills", unset="<data_dir>/.drills"),
        Key("max_concurrent_archives", "scheduled [[archive]] runs at once (the others queue)", default=1),
        Key("metrics_listen", "Prometheus /metrics, plain HTTP: keep it on loopback",
            example="127.0.0.1:9740", unset="off"),
        Key("status_listen", "status page and /status.json, plain HTTP: keep on loopback",
            example="127.0.0.1:9741", unset="off"),
        Key("tls", "[receiver.tls]: TLS for sources", table=True),
        Key("client", "[[receiver.client]]: who may connect and write what", table=True),
        Key("volume", "[[receiver.volume]]: retention of one volume", table=True),
    ),
    "receiver.tls": _tables(
        Key("cert", "certificate presented to sources (deploy/make-certs.sh makes one)", required=True,
            example="receiver.crt"),
        Key("key", "its private key (chmod 600)", required=True, example="receiver.key"),
        Key("client_ca", "sources must present a certificate signed by this CA", example="ca.crt",
            unset="the token alone"),
    ),
    "receiver.client": _tables(
        Key("name", "the source's [source] name", required=True, example="host1"),
        Key("token_file", "its secret (chmod 600; the same bytes on the source host)", required=True,
            example="host1.token"),
        Key("volumes", "the volumes it may write, nothing else", required=True, example=["vm1-disk0"]),
        Key("filesets", "the file sets it may write", default=[]),
        Key("keep_points", "retention of its volumes by age", example="7d", unset="[receiver] keep_points"),
        Key("keep_points_size", "... and by undo data", example="50GiB",
            unset="[receiver] keep_points_size"),
    ),
    "receiver.volume": _tables(
        Key("name", "this volume's retention wins over its client's and [receiver]'s", required=True,
            example="vm1-disk0"),
        Key("keep_points", "its recovery points kept by age", example="72h",
            unset="[receiver] keep_points"),
        Key("keep_points_size", "... and by undo data", example="unlimited",
            unset="[receiver] keep_points_size"),
    ),
    "archive": _tables(
        Key("name", "the archive's name (cdp archive ... --archive NAME)", required=True,
            example="offsite"),
        Key("repository", "a directory, file:///path or s3://bucket/prefix", required=True,
            example="archive"),
        Key("endpoint", "S3-compatible endpoint (SeaweedFS, MinIO...)", example="http://127.0.0.1:8333",
            unset="AWS"),
        Key("password_file", "repository password file, chmod 600; keep a copy offline",
            example="archive.pass", unset="needed while encrypt = true"),
        Key("encrypt", "false: no encryption (a local directory only)", default=True),
        Key("schedule", 'receiver runs it: "hourly", "daily 02:00", "every 6h", "weekly sun 03:00"',
            default="manual"),
        Key("volumes", "the volumes archived ([]: every volume of every client)", default=[]),
        Key("chunk_size", "dedup chunk, a power of two 64KiB..64MiB", default="4MiB"),
        Key("pack_size", "chunks uploaded together, 1MiB..1GiB (at least chunk_size)", default="32MiB"),
        Key("compress_level", "zstd level (-7..19)", default=3),
        Key("uploads", "packs uploaded at once (1..32)", default=4),
        Key("keep", "[archive.keep]: snapshots kept", table=True),
    ),
    "archive.keep": _tables(
        Key("last", "the newest N snapshots (all five 0: every snapshot is kept)", default=0),
        Key("hourly", "one snapshot per hour for the last N hours", default=0),
        Key("daily", "one snapshot per day for the last N days", default=0),
        Key("weekly", "one snapshot per week for the last N weeks", default=0),
        Key("monthly", "one snapshot per month for the last N months", default=0),
    ),
    # ---- source.toml -----------------------------------------------------------------------
    "source": _tables(
        Key("name", "this host, as in the receiver's [[receiver.client]]", required=True, example="host1"),
        Key("receiver", "the receiver's listen address as seen from here", required=True,
            example="127.0.0.1:7400"),
        Key("token_file", "the secret (chmod 600; the same bytes as the receiver's)", required=True,
            example="host1.token"),
        Key("state_dir", "block maps, dirty maps and status.json of this source", default="state"),
        Key("window", "epochs in flight before waiting for acknowledgements (1..16)", default=2),
        Key("batch_bytes", "blocks compressed together in one frame (at most max_frame/2)", default="2MiB"),
        Key("max_epoch_bytes", "a longer scan is split into epochs of this size", default="64MiB"),
        Key("compress_level", "zstd level (-7..19)", default=1),
        Key("workers", "compression threads (1..64)", default=2),
        Key("max_concurrent_scans", "full scans and resyncs at once, all volumes; the others queue",
            default=2),
        Key("keepalive", "Ping after this long without traffic (< receiver idle_timeout)", default="2s"),
        Key("dead_after", "no answer this long while one is awaited: drop and reconnect",
            derived="3 x keepalive", example="6s"),
        Key("reconnect_min", "first reconnect delay; doubles up to reconnect_max (jittered)",
            default="0.5s"),
        Key("reconnect_max", "longest reconnect delay", default="5s"),
        Key("retry_max", "a volume the receiver refused for now: retried at most this far apart",
            default="10s"),
        Key("dedup_index_entries", "hashes remembered for dedup across volumes (~60 B each; 0: off)",
            default=4_000_000),
        Key("max_frame", "largest frame sent or accepted, 1MiB..1GiB", default="32MiB"),
        Key("rate_limit", 'cap on what is sent, all volumes together, e.g. "200MiB/s"',
            default="unlimited"),
        Key("read_limit", "cap on scan reads, all volumes together", default="unlimited"),
        Key("metrics_listen", "Prometheus /metrics, plain HTTP: keep it on loopback",
            example="127.0.0.1:9750", unset="off"),
        Key("tls", "[source.tls]: TLS to the receiver", table=True),
        Key("schedule", "[[source.schedule]]: other caps at certain times", table=True),
    ),
    "source.tls": _tables(
        Key("ca", "CA to verify the receiver's certificate against", example="ca.crt",
            unset="the system's CAs"),
        Key("cert", "client certificate (when the receiver sets client_ca)", example="host1.crt",
            unset="none"),
        Key("key", "its private key (chmod 600)", example="host1.key", unset="none"),
        Key("server_name", "name checked in the receiver's certificate", example="dr.example.net",
            unset="the host in `receiver`"),
    ),
    "source.schedule": _tables(
        Key("days", 'weekdays, e.g. "mon-fri", "sat,sun", "fri-mon"', default="all"),
        Key("hours", 'local time; "22:00-06:00" wraps midnight', default="00:00-24:00"),
        Key("rate_limit", "cap on what is sent then", example="50MiB/s", unset="[source] rate_limit"),
        Key("read_limit", "cap on scan reads then", example="100MiB/s", unset="[source] read_limit"),
    ),
    "volume": _tables(
        Key("name", "unique among this source's volumes and file sets", required=True, example="vm1-disk0"),
        Key("path", "a raw image file or a block device (qemu: the image QEMU has open; never read)",
            required=True, example="images/vm1-disk0.raw"),
        Key("mode", '"scan": compare block hashes; "nbd": VM writes through cdp; "qemu" (experimental): '
            "QEMU's dirty bitmap, read over QMP and NBD", default="scan"),
        Key("block_size", "power of two, 4KiB..4MiB; 16 B of source RAM per block",
            derived="64KiB; nbd: 16KiB", example="64KiB"),
        Key("rate_limit", "cap on what is sent for this volume", default="unlimited"),
        Key("scan_interval", "rescan at least this often (file events wake it sooner)", default="10s",
            only="scan"),
        Key("min_scan_interval", "scans start at most this often (a change: 5-50 ms later)",
            default="0.1s", only="scan"),
        Key("pre_scan", "command quiescing the guest before a scan ...", example="virsh domfsfreeze vm1",
            unset="none", only="scan"),
        Key("post_scan", "... and thawing it after, whatever happened", example="virsh domfsthaw vm1",
            unset="none", only="scan"),
        Key("snapshot", '"reflink": scan a reflink copy (XFS, btrfs); "none"', default="none", only="scan"),
        Key("nbd_listen", '"unix:PATH" and/or "127.0.0.1:10809", opened by the VM',
            example="unix:vm1-disk1.sock", unset="needed in nbd mode", only="nbd"),
        Key("nbd_socket_owner", "unix: socket's owner, a user name or id", example="libvirt-qemu",
            unset="cdp's user", only="nbd"),
        Key("nbd_socket_group", "unix: socket's group, e.g. qemu's (kvm, qemu)", example="kvm",
            unset="cdp's group", only="nbd"),
        Key("nbd_socket_mode", 'unix: socket\'s mode: "0660" lets that group in; never others',
            default="0600", only="nbd"),
        Key("epoch_interval", "cut an epoch at least this often while writes come (qemu: at most "
            "this often)", default="1s", only="nbd"),
        Key("capture_memory", "captured writes held in memory ...", default="256MiB", only="nbd"),
        Key("capture_disk", "... then spilled to state_dir, then tracked as dirty regions", default="1GiB",
            only="nbd"),
        Key("dirty_region", "granularity of the dirty map (a multiple of block_size)", default="4MiB",
            only="nbd"),
        Key("group", "disks of one VM: epochs cut at the same instant", example="vm1", unset="none",
            only="nbd"),
        Key("nbd_tls", "[volume.nbd_tls]: TLS on the NBD export (clients use STARTTLS)", table=True,
            only="nbd"),
        Key("qmp", "QMP monitor socket of the QEMU that runs the disk", example="/run/vm1.qmp",
            unset="needed in qemu mode", only="qemu"),
        Key("node", "the disk's block node name in that QEMU (query-named-block-nodes)", example="drive0",
            unset="needed in qemu mode", only="qemu"),
        Key("nbd_socket", "Unix socket of an NBD server QEMU already runs; cdp exports its view there",
            example="/run/vm1-nbd.sock", unset="cdp starts one in state_dir", only="qemu"),
    ),
    "volume.nbd_tls": _tables(
        Key("cert", "certificate of the NBD export", required=True, example="nbd.crt"),
        Key("key", "its private key (chmod 600)", required=True, example="nbd.key"),
        Key("client_ca", "NBD clients need a certificate from this CA", example="ca.crt",
            unset="needed beyond loopback unless allow_any_client"),
        Key("allow_any_client", "true: any TLS client may read and write the disk (warned)", default=False),
    ),
    "fileset": _tables(
        Key("name", "unique among this source's volumes and file sets", required=True,
            example="vm1-config"),
        Key("paths", "files or folders (folders: everything under them)", required=True,
            example=["/etc/libvirt/qemu/vm1.xml"]),
        Key("max_file_size", "larger files are refused (logged); the rest go on", default="16MiB"),
        Key("scan_interval", "re-check this often, besides file-change events", default="10s"),
    ),
}

# The top-level tables of each kind of config file.
RECEIVER_FILE = ("receiver", "archive")
SOURCE_FILE = ("source", "volume", "fileset")


def table_of(where: str) -> str:
    """The TOML path of a table from a loader's location: "receiver.client[2]" -> "receiver.client"."""
    return ".".join(part.split("[", 1)[0] for part in where.split("."))
