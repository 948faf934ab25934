"""A receiver refuses to listen in clear text beyond loopback unless told explicitly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cdp.config import load_receiver
from cdp.errors import ConfigError


def _write(tmp_path: Path, listen: str, extra: str = "") -> Path:
    tok = tmp_path / "t.token"
    fd = os.open(tok, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, b"0123456789abcdef0123456789abcdef\n")
    os.close(fd)
    cfg = tmp_path / "receiver.toml"
    cfg.write_text(f'[receiver]\nlisten = "{listen}"\n{extra}\n[[receiver.client]]\nname = "h"\n'
                   'token_file = "t.token"\nvolumes = ["v"]\n')
    return cfg


@pytest.mark.parametrize("listen", ["127.0.0.1:7400", "[::1]:7400", "localhost:7400",
                                    "127.9.9.9:1"])
def test_loopback_needs_no_tls(tmp_path: Path, listen: str) -> None:
    assert load_receiver(_write(tmp_path, listen)).tls is None


@pytest.mark.parametrize("listen", ["0.0.0.0:7400", "10.0.0.5:7400", "[::]:7400",
                                    "dr.example.net:7400"])
def test_network_address_without_tls_is_refused(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError, match=r"receiver\.listen.*allow_plaintext"):
        load_receiver(_write(tmp_path, listen))


def test_explicit_plaintext_is_allowed(tmp_path: Path) -> None:
    cfg = load_receiver(_write(tmp_path, "0.0.0.0:7400", "allow_plaintext = true"))
    assert cfg.listen == ("0.0.0.0", 7400)


def test_allow_plaintext_must_be_a_boolean(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="allow_plaintext"):
        load_receiver(_write(tmp_path, "0.0.0.0:7400", 'allow_plaintext = "yes"'))
