"""Sizes, durations, host:port and byte formatting (cdp.units)."""

from __future__ import annotations

import math

import pytest

from cdp.units import format_bytes, parse_duration, parse_hostport, parse_size

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (4096, 4096),
        ("0", 0),
        ("512", 512),
        ("512B", 512),
        ("512b", 512),
        ("64KiB", 64 * KiB),
        ("64kib", 64 * KiB),
        ("64 KiB", 64 * KiB),
        ("  64KiB  ", 64 * KiB),
        ("4MiB", 4 * MiB),
        ("1GiB", GiB),
        ("1.5GiB", 3 * GiB // 2),
        ("2TiB", 2 * TiB),
        ("1k", 1000),
        ("1KB", 1000),
        ("100MB", 100 * 1000**2),
        ("100m", 100 * 1000**2),
        ("3GB", 3 * 1000**3),
        ("1t", 1000**4),
        ("1TB", 1000**4),
    ],
)
def test_parse_size_good(value, expected):
    got = parse_size(value)
    assert got == expected
    assert type(got) is int


@pytest.mark.parametrize(
    "value",
    [
        "", " ", "KiB", "-1", "-1KiB", "1.5.0KiB", "1e3", "1 2KiB", "64XiB", "64Ki B",
        "64 KiBs", "1PiB", "0x10", "ten", "nan", "inf", ".5KiB", "5.KiB",
        -1, True, False,
    ],
)
def test_parse_size_bad(value):
    with pytest.raises(ValueError):
        parse_size(value)


def test_parse_size_error_message_shows_value():
    with pytest.raises(ValueError, match="64XiB"):
        parse_size("64XiB")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0.0),
        (30, 30.0),
        (2.5, 2.5),
        ("30", 30.0),
        ("30s", 30.0),
        ("30S", 30.0),
        ("500ms", 0.5),
        ("5m", 300.0),
        ("5min", 300.0),
        ("24h", 86400.0),
        ("2d", 172800.0),
        ("1.5h", 5400.0),
        (" 10 s ", 10.0),
    ],
)
def test_parse_duration_good(value, expected):
    got = parse_duration(value)
    assert got == pytest.approx(expected)
    assert type(got) is float


@pytest.mark.parametrize(
    "value",
    ["", "s", "-5s", "-5", "5 x", "5w", "5sec", "1e3s", "1.2.3s", "5 m s", -1, -0.5, True, False],
)
def test_parse_duration_bad(value):
    with pytest.raises(ValueError):
        parse_duration(value)


def test_parse_duration_refuses_nan():
    with pytest.raises(ValueError):
        parse_duration(math.nan)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:7400", ("127.0.0.1", 7400)),
        ("localhost:1", ("localhost", 1)),
        ("example.org:65535", ("example.org", 65535)),
        ("[::1]:7400", ("::1", 7400)),
        ("[fe80::1]:22", ("fe80::1", 22)),
        ("0.0.0.0:7400", ("0.0.0.0", 7400)),
    ],
)
def test_parse_hostport_good(value, expected):
    assert parse_hostport(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "", "7400", ":7400", "host", "host:", "host:0", "host:65536", "host:99999",
        "host:-1", "host:+80", "host:80a", "host:port", "[::1]", "host: 80",
    ],
)
def test_parse_hostport_bad(value):
    with pytest.raises(ValueError):
        parse_hostport(value)


def test_parse_hostport_refuses_empty_bracketed_host():
    with pytest.raises(ValueError):
        parse_hostport("[]:7400")


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (64 * KiB, "64.0 KiB"),
        (MiB, "1.0 MiB"),
        (3 * GiB // 2, "1.5 GiB"),
        (TiB, "1.0 TiB"),
        (2048 * TiB, "2048.0 TiB"),
        (-2048, "-2.0 KiB"),
        (512.4, "512 B"),
    ],
)
def test_format_bytes(n, expected):
    assert format_bytes(n) == expected


@pytest.mark.parametrize("text", ["64KiB", "1MiB", "3GiB", "5TiB"])
def test_format_bytes_inverts_parse_size(text):
    value, unit = format_bytes(parse_size(text)).split()
    assert parse_size(f"{value}{unit}") == parse_size(text)
