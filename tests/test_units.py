"""Parsing counts and byte sizes from users, formatting them back."""

from __future__ import annotations

import pytest

from memplan.errors import MemplanError
from memplan.units import GiB, MiB, format_bytes, format_count, gib, parse_bytes, parse_count


@pytest.mark.parametrize(("text", "expected"), [
    ("7e9", 7_000_000_000),
    ("7E9", 7_000_000_000),
    ("7B", 7_000_000_000),
    ("7b", 7_000_000_000),
    ("6.7b", 6_700_000_000),
    ("6.7B", 6_700_000_000),
    ("124,439,808", 124_439_808),
    ("124_439_808", 124_439_808),
    ("350M", 350_000_000),
    ("350m", 350_000_000),
    ("1.5k", 1_500),
    ("1T", 10**12),
    ("1", 1),
    (" 7e9 ", 7_000_000_000),
    ("7 B", 7_000_000_000),
    ("7.5e9", 7_500_000_000),
    ("1e+3", 1000),
    (7_000_000_000, 7_000_000_000),
    (7e9, 7_000_000_000),
])
def test_parse_count(text, expected: int) -> None:
    value = parse_count(text)
    assert value == expected
    assert isinstance(value, int)


@pytest.mark.parametrize("text", [
    "abc", "-1", "0", "nan", "inf", "-inf", "", "7X", "7BB", "0.1", "1e400", "0B", "1e-3",
    "7GiB", "one", "--5", "0x10",
])
def test_parse_count_errors(text: str) -> None:
    with pytest.raises(MemplanError) as info:
        parse_count(text, "--params")
    message = str(info.value)
    assert "--params" in message
    assert "\n" not in message
    if text.strip():
        assert repr(text.strip()) in message or text in message


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), True, False])
def test_parse_count_rejects_bad_numbers(value) -> None:
    with pytest.raises(MemplanError):
        parse_count(value)


@pytest.mark.parametrize(("text", "expected"), [
    ("24GiB", 24 * 2**30),
    ("24 GiB", 24 * 2**30),
    ("24gib", 24 * 2**30),
    ("80GB", 80 * 10**9),
    ("80gb", 80 * 10**9),
    ("512MiB", 512 * 2**20),
    ("1.5GiB", 3 * 2**29),
    ("1TiB", 2**40),
    ("1TB", 10**12),
    ("4KiB", 4096),
    ("4kB", 4000),
    ("100B", 100),
    ("85,520,809,984B", 85_520_809_984),
    (1024, 1024),
])
def test_parse_bytes(text, expected: int) -> None:
    value = parse_bytes(text)
    assert value == expected
    assert isinstance(value, int)


@pytest.mark.parametrize(("text", "pattern"), [
    ("24", "needs a unit"),
    ("-1GiB", "-1GiB"),
    ("xGB", "xGB"),
    ("24 GiBs", "needs a unit"),
    ("24Gi", "needs a unit"),
    ("0GiB", "positive"),
    ("1e400GiB", "positive"),
    ("", "needs a unit"),
    ("GiB", "GiB"),
    ("nanGB", "nanGB"),
])
def test_parse_bytes_errors(text: str, pattern: str) -> None:
    with pytest.raises(MemplanError, match=pattern) as info:
        parse_bytes(text, "--memory")
    assert "--memory" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [0, -5, True])
def test_parse_bytes_rejects_bad_ints(value) -> None:
    with pytest.raises(MemplanError):
        parse_bytes(value)


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"),
    (1023, "1023 B"),
    (1024, "1.00 KiB"),
    (310 * MiB, "310.00 MiB"),
    (12.55 * GiB, "12.55 GiB"),
    (24 * GiB, "24.00 GiB"),
    (2**40, "1.00 TiB"),
    (-3 * GiB, "-3.00 GiB"),
    (80 * 10**9, "74.51 GiB"),
])
def test_format_bytes(n, text: str) -> None:
    assert format_bytes(int(n)) == text


def test_format_bytes_round_trip() -> None:
    for text in ("24GiB", "512MiB", "2TiB"):
        assert parse_bytes(format_bytes(parse_bytes(text)).replace(".00 ", "")) == \
            parse_bytes(text)


@pytest.mark.parametrize(("n", "text"), [
    (6_738_415_616, "6.74B"), (124_439_808, "124M"), (4_194_304, "4.19M"), (999, "999"),
    (1_000, "1K"), (10**12, "1T"),
])
def test_format_count(n: int, text: str) -> None:
    assert format_count(n) == text


def test_gib() -> None:
    assert gib(3 * 2**30) == 3.0
    assert gib(80 * 10**9) == pytest.approx(74.505805969)
