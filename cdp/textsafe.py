"""Text from parties cdp does not trust, made safe to print on a terminal or in a log line.

Names from a guest's file system, file-set paths and strings a peer sent can hold
control characters: an escape sequence that rewrites the terminal, a newline that
forges a log line. `printable` turns every character that is not printable into
a visible escape, the way Python's repr() does, and doubles backslashes so the
result is unambiguous (a name holding the two characters `\\n` stays apart from
one holding a newline). Bytes that were not valid UTF-8 (decoded with
surrogateescape) come out as `\\xNN` of the original byte.

No imports from the rest of cdp: loggers and formatters anywhere may use it.
"""

from __future__ import annotations

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape(ch: str) -> str:
    if ch in _SHORT:
        return _SHORT[ch]
    cp = ord(ch)
    if 0xDC80 <= cp <= 0xDCFF:  # a byte that was not UTF-8, kept by surrogateescape
        return f"\\x{cp - 0xDC00:02x}"
    if cp <= 0xFF:
        return f"\\x{cp:02x}"
    if cp <= 0xFFFF:
        return f"\\u{cp:04x}"
    return f"\\U{cp:08x}"


def printable(s: str) -> str:
    """`s` with control, format (bidi overrides), separator and unassigned characters escaped."""
    if s.isprintable() and "\\" not in s:
        return s  # the common case, without building a new string
    return "".join(ch if ch.isprintable() and ch != "\\" else _escape(ch) for ch in s)
