"""cdp.limits: the rules the config loader, the wire sessions and the receiver share."""

from __future__ import annotations

import pytest

from cdp.limits import valid_block_size, valid_name


@pytest.mark.parametrize("n,ok", [(4096, True), (65536, True), (4 << 20, True), (2048, False),
                                  (8 << 20, False), (12288, False), (0, False), (-4096, False)])
def test_block_sizes_are_powers_of_two_from_4k_to_4m(n: int, ok: bool) -> None:
    assert valid_block_size(n) is ok


@pytest.mark.parametrize("name,ok", [("vm1-disk0", True), ("a.b_c", True), ("..", False),
                                     ("a..b", False), (".hidden", False), ("a/b", False),
                                     ("", False), ("x" * 129, False)])
def test_names_are_safe_folder_names(name: str, ok: bool) -> None:
    assert valid_name(name) is ok
