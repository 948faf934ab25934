"""TOML configuration -> frozen, validated dataclasses.

Every error names the file, the key and the reason, and says what to do.
Relative paths are relative to the folder of the config file. Unknown keys
are errors: a typo must never silently fall back to a default. Which keys each
table accepts, and their defaults, are declared once in cdp/config/keys.py.

The package: `model` (the dataclasses and limits), `values` (tables and value converters),
`source` and `receiver` (the two loaders), `reload` (what SIGHUP applies live).
"""

from cdp.config.model import (
    DEFAULT_BLOCK_SIZE,
    MAX_BLOCK_SIZE,
    MAX_WINDOW,
    MIN_BLOCK_SIZE,
    NBD_BLOCK_SIZE,
    ArchiveConfig,
    ClientConfig,
    FilesetConfig,
    KeepConfig,
    KeepPolicy,
    ReceiverConfig,
    SourceConfig,
    TlsClient,
    TlsServer,
    VolumeConfig,
    valid_name,
)
from cdp.config.receiver import load_receiver
from cdp.config.reload import ReceiverReload, Reload, log_reload, reload_receiver, reload_source
from cdp.config.source import load_source
from cdp.config.values import Table, config_kind, read_token

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "MAX_BLOCK_SIZE",
    "MAX_WINDOW",
    "MIN_BLOCK_SIZE",
    "NBD_BLOCK_SIZE",
    "ArchiveConfig",
    "ClientConfig",
    "FilesetConfig",
    "KeepConfig",
    "KeepPolicy",
    "ReceiverConfig",
    "ReceiverReload",
    "Reload",
    "SourceConfig",
    "Table",
    "TlsClient",
    "TlsServer",
    "VolumeConfig",
    "config_kind",
    "load_receiver",
    "load_source",
    "log_reload",
    "read_token",
    "reload_receiver",
    "reload_source",
    "valid_name",
]
