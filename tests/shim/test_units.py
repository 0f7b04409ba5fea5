"""Sizes and addresses as the CLI reads and prints them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmm_shim.units import (
    U64_MAX,
    GiB,
    KiB,
    MiB,
    TiB,
    format_size,
    one_line,
    parse_address,
    parse_size,
    quoted,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("0x1000", 4096),
        ("0X200000", 2 * MiB),
        ("2MiB", 2 * MiB),
        ("2mib", 2 * MiB),
        ("2M", 2 * MiB),
        ("64k", 64 * KiB),
        ("4GiB", 4 * GiB),
        ("1TiB", TiB),
        ("1.5GiB", 3 * GiB // 2),
        (" 8 MiB ", 8 * MiB),
        ("0", 0),
        ("12B", 12),
    ],
)
def test_sizes_are_binary_and_accept_hex(text: str, expected: int) -> None:
    assert expected == parse_size(text)


@pytest.mark.parametrize("text", ["", "-1", "2XB", "MiB", "0.3B", "1.5", "0xZZ", "2 Mi B"])
def test_malformed_or_fractional_byte_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_an_address_is_read_like_a_size() -> None:
    assert (0x4000_0000, 0x4000_0000) == (parse_address("0x40000000"), parse_address("1GiB"))


@pytest.mark.parametrize(
    ("size", "expected"),
    [(0, "0B"), (512, "512B"), (2 * MiB, "2MiB"), (3 * GiB // 2, "1.5GiB"), (4 * GiB, "4GiB")],
)
def test_human_sizes_use_the_largest_unit_reached(size: int, expected: str) -> None:
    assert expected == format_size(size)


def test_exact_sizes_fall_back_to_a_smaller_unit_rather_than_round() -> None:
    assert ("1536MiB", "4097B") == (
        format_size(3 * GiB // 2, exact=True),
        format_size(4097, exact=True),
    )


@given(st.integers(min_value=0, max_value=1 << 50))
def test_exact_format_reads_back_the_same_size(size: int) -> None:
    assert size == parse_size(format_size(size, exact=True))


@pytest.mark.parametrize(
    "text", ["99999999TiB", str(1 << 64), "0x10000000000000000", "9" * 5000, "16777216TiB"]
)
def test_sizes_beyond_uint64_are_refused_quoting_the_input(text: str) -> None:
    """Every size travels as a uint64: 2^64 and above is refused by the parser, with the text
    as typed (cut when long), before any conversion to a huge int."""
    with pytest.raises(ValueError, match="larger than 2\\^64-1 bytes") as refused:
        parse_size(text)
    assert quoted(text) in str(refused.value)


def test_the_largest_uint64_is_a_valid_size() -> None:
    assert (U64_MAX, U64_MAX) == (parse_size(str(U64_MAX)), parse_size(hex(U64_MAX)))


@pytest.mark.parametrize("text", ["\u0661\u0662\u0663", "\uff14KiB", "0x\u0661"])
def test_only_ascii_digits_are_numbers(text: str) -> None:
    """int() reads Arabic-Indic or full-width digits; a size typed with them is refused."""
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_an_address_error_says_address() -> None:
    with pytest.raises(ValueError, match="invalid address 'zz'"):
        parse_address("zz")


def test_a_long_fraction_that_cannot_be_whole_is_refused_without_big_arithmetic() -> None:
    with pytest.raises(ValueError, match="not a whole number of bytes"):
        parse_size("1." + "3" * 5000 + "TiB")


def test_quoted_values_stay_short_and_on_one_line() -> None:
    assert "'a\\nb'" == quoted("a\nb")
    assert quoted("x" * 1000).endswith("... (1000 characters)")
    assert "a\\nb\\x1b[0m" == one_line("a\nb\x1b[0m")
