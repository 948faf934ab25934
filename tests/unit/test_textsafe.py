"""cdp.textsafe.printable: untrusted text made safe for terminals and log lines."""

from __future__ import annotations

import ast
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from cdp.textsafe import printable


def test_escapes():
    assert printable("etc/fstab") == "etc/fstab"
    assert printable("Read Me é 日本") == "Read Me é 日本"
    assert printable("\x1b[31mred\x1b[0m") == "\\x1b[31mred\\x1b[0m"
    assert printable("a\nb\rc\td\0") == "a\\nb\\rc\\td\\x00"
    assert printable("C:\\x1b") == "C:\\\\x1b"  # a real backslash stays apart from an escape
    assert printable("\u202eevil") == "\\u202eevil"  # a bidi override
    assert printable("\x85\xa0") == "\\x85\\xa0"
    assert printable(b"caf\xe9".decode(errors="surrogateescape")) == "caf\\xe9"
    assert printable("\U000e0001") == "\\U000e0001"


@given(st.text())
def test_output_is_printable_and_reversible(s: str) -> None:
    out = printable(s)
    assert out.isprintable()
    if not any(0xDC80 <= ord(c) <= 0xDCFF for c in s):
        assert ast.literal_eval('"' + out.replace('"', '\\"') + '"') == s


def test_imports_nothing_from_cdp():
    src = (Path(__file__).resolve().parents[2] / "cdp" / "textsafe.py").read_text()
    mods = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert all(not (getattr(m, "module", None) or "").startswith("cdp") for m in mods)
    assert all(not a.name.startswith("cdp") for m in mods if isinstance(m, ast.Import) for a in m.names)
