"""The domain's rules that the config, the wire and both daemons share, in one place.

Names become folder names on the receiver; block sizes bound memory and the hash map; the
window bounds how many committed epochs a receiver answers per volume. A leaf module: the
wire layer checks a peer against these without importing the config loader.
"""

from __future__ import annotations

import re

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEFAULT_BLOCK_SIZE = 64 * 1024
NBD_BLOCK_SIZE = 16 * 1024  # default for nbd volumes: 16 B of source RAM per block (1 GiB/TiB)
MIN_BLOCK_SIZE = 4 * 1024
MAX_BLOCK_SIZE = 4 * 1024 * 1024
MAX_WINDOW = 16  # the receiver answers at most this many committed epochs per volume


def valid_name(name: str) -> bool:
    """Volume and client names become folder names: no separators, no '..', no hidden files."""
    return bool(NAME_RE.fullmatch(name)) and ".." not in name


def valid_block_size(n: int) -> bool:
    """A power of two from 4 KiB to 4 MiB."""
    return MIN_BLOCK_SIZE <= n <= MAX_BLOCK_SIZE and not n & (n - 1)
