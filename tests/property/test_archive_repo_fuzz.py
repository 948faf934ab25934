"""Property tests: the repository's config and key file come from an untrusted bucket.

1. arbitrary bytes, mutated valid objects and well-formed maps with arbitrary
   field values given to parse_config / parse_key_file either parse or raise
   an ArchiveError; nothing else (KeyError, TypeError, OverflowError ...)
   escapes;
2. whatever a key file says, unlock never runs scrypt with parameters above
   the caps (scrypt is replaced by a recorder, so no example costs memory);
3. a parsed config that is changed in any field no longer matches its MAC.
"""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.archive import crypto
from cdp.archive.repo import CONFIG_FORMAT, ENCRYPTED_PARAMS, RepoConfig, parse_config
from cdp.errors import ArchiveError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEY_FILE, KEYS = crypto.new_key_file(b"fuzz password", "0" * 32, n=1 << 10)
_cfg = RepoConfig(CONFIG_FORMAT, "0" * 32, True, 1.7e9, dict(ENCRYPTED_PARAMS))
CONFIG = dataclasses.replace(_cfg, mac=KEYS.mac(_cfg.signed())).encode()

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
                    st.floats(), st.text(max_size=40), st.binary(max_size=80))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner,
                                                                       max_size=4)), max_leaves=12)
CONFIG_KEYS = ["v", "id", "encrypted", "created", "params", "mac"]
KEY_KEYS = ["v", "kdf", "cipher", "id", "n", "r", "p", "salt", "nonce", "wrapped"]


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        if b:
            b[pos % len(b)] = val
    return bytes(b)


def _map(keys: list[str], base: bytes) -> st.SearchStrategy[bytes]:
    """A valid object's map with some fields replaced by arbitrary values or removed."""
    orig = msgpack.unpackb(base, raw=False)

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        d = dict(orig)
        for k in draw(st.lists(st.sampled_from(keys), max_size=4, unique=True)):
            if draw(st.booleans()):
                d[k] = draw(values)
            else:
                d.pop(k, None)
        return msgpack.packb(d)

    return build()


def _parse_config(raw: bytes) -> None:
    try:
        cfg = parse_config(raw, "fuzz")
    except ArchiveError:
        return
    assert cfg.version in (1, CONFIG_FORMAT) and isinstance(cfg.encrypted, bool)
    assert isinstance(cfg.params, dict) and (cfg.mac is None or len(cfg.mac) == 32)


def _parse_key(raw: bytes) -> None:
    try:
        k = crypto.parse_key_file(raw, "fuzz")
    except ArchiveError:
        return
    crypto.check_kdf(k.n, k.r, k.p)  # what parses is inside the caps


@FUZZ
@given(st.binary(max_size=400))
def test_config_parser_arbitrary_bytes(raw: bytes) -> None:
    _parse_config(raw)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6))
def test_config_parser_mutated(edits: list[tuple[int, int]]) -> None:
    _parse_config(_mutate(CONFIG, edits))


@FUZZ
@given(_map(CONFIG_KEYS, CONFIG))
def test_config_parser_fields(raw: bytes) -> None:
    _parse_config(raw)


@FUZZ
@given(st.binary(max_size=400))
def test_key_file_parser_arbitrary_bytes(raw: bytes) -> None:
    _parse_key(raw)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6))
def test_key_file_parser_mutated(edits: list[tuple[int, int]]) -> None:
    _parse_key(_mutate(KEY_FILE, edits))


@FUZZ
@given(_map(KEY_KEYS, KEY_FILE), st.integers(0, 24), st.integers(0, 40), st.integers(0, 20))
def test_unlock_never_runs_scrypt_above_the_caps(raw: bytes, log_n: int, r: int, p: int) -> None:
    d = msgpack.unpackb(raw, raw=False)
    d.update(n=1 << log_n, r=r, p=p)
    seen: list[tuple[int, int, int]] = []

    def scrypt(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
        seen.append((n, r, p))
        return bytes(32)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(crypto, "_scrypt", scrypt)
        try:
            crypto.unlock(msgpack.packb(d), b"fuzz password", "0" * 32, "fuzz")
        except ArchiveError:
            pass
    for n, r_, p_ in seen:
        assert 128 * n * r_ <= crypto.KDF_MAX_MEMORY and n * r_ * p_ <= crypto.KDF_MAX_WORK


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["id", "encrypted", "created", "params"]), values)
def test_any_changed_config_field_breaks_the_mac(field: str, value: object) -> None:
    cfg = parse_config(CONFIG, "fuzz")
    d = msgpack.unpackb(CONFIG, raw=False)
    d[field] = value
    try:
        changed = parse_config(msgpack.packb(d), "fuzz")
    except ArchiveError:
        return
    if changed.signed() != cfg.signed():
        assert changed.mac is not None and KEYS.mac(changed.signed()) != changed.mac
