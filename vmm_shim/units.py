"""Sizes and addresses as people write them: ``2MiB``, ``4GiB``, ``0x1000``, ``4096``.

Suffixes are binary (``K``/``KiB`` = 1024, as QEMU's ``-m`` reads them) and case-insensitive;
a bare number is bytes; ``0x``/``0o``/``0b`` prefixes are accepted for plain numbers. Digits are
ASCII, and every value fits the wire's uint64 (at most 2^64 - 1).
Misuse is a plain :class:`ValueError` with a message that quotes the input as typed (its first
:data:`QUOTE_CHARS` characters if it is longer).
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = [
    "U64_MAX",
    "GiB",
    "KiB",
    "MiB",
    "TiB",
    "format_size",
    "one_line",
    "parse_address",
    "parse_size",
    "quoted",
]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
# Sizes and addresses travel as protobuf uint64.
U64_MAX = (1 << 64) - 1
# Characters of a bad input repeated in an error message.
QUOTE_CHARS = 40
# More integer digits than any uint64 needs (2^64 has 20): refused before converting, because
# converting a long digit string costs time quadratic in its length.
_MAX_DIGITS = 24

# Binary suffixes, shortest spelling first; "B" alone means bytes.
_SUFFIX_BYTES = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kb": KiB,
    "kib": KiB,
    "m": MiB,
    "mb": MiB,
    "mib": MiB,
    "g": GiB,
    "gb": GiB,
    "gib": GiB,
    "t": TiB,
    "tb": TiB,
    "tib": TiB,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE | re.ASCII)
# Largest first: format_size picks the largest unit the value reaches.
_UNITS = (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB))


def quoted(text: str) -> str:
    """``text`` as typed, quoted and on one line (control characters escaped), cut to
    :data:`QUOTE_CHARS` characters."""
    if len(text) > QUOTE_CHARS:
        return f"{text[:QUOTE_CHARS]!r}... ({len(text)} characters)"
    return repr(text)


def one_line(text: str) -> str:
    """``text`` fit for one line of stderr: control characters (a newline in a typed value or a
    file name) escaped as Python would write them."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def parse_size(text: str, *, what: str = "size") -> int:
    """Bytes for a size such as ``2MiB``, ``1.5GiB``, ``64k``, ``0x200000`` or ``4096``.

    A fraction is accepted only if it names a whole number of bytes (``1.5KiB`` is 1536,
    ``0.3B`` is refused). Negative sizes and sizes above :data:`U64_MAX` are refused; ``what``
    names the value in the message (``invalid address '...'``).
    """
    value = text.strip()
    if len(value) > 2 and value.lower().startswith(("0x", "0o", "0b")):
        if not value.isascii():
            raise ValueError(f"invalid {what} {quoted(text)}")
        try:
            size = int(value, 0) if len(value) <= 2 + 4 * _MAX_DIGITS else U64_MAX + 1
        except ValueError:
            raise ValueError(f"invalid {what} {quoted(text)}") from None
        return _in_range(size, text, what)
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(f"invalid {what} {quoted(text)}: expected e.g. 4096, 0x1000, 2MiB or 4GiB")
    number, suffix = match.groups()
    unit = _SUFFIX_BYTES.get(suffix.lower())
    if unit is None:
        raise ValueError(
            f"invalid {what} {quoted(text)}: unknown unit {suffix!r} (use KiB, MiB, GiB, TiB)"
        )
    whole, _, fraction = number.partition(".")
    if len(whole.lstrip("0")) > _MAX_DIGITS:
        return _in_range(U64_MAX + 1, text, what)
    # n / 10^k times a unit of at most 2^40 bytes is whole only if k <= 40 (trailing zeros aside).
    if len(fraction.rstrip("0")) > 40:
        raise ValueError(f"invalid {what} {quoted(text)}: not a whole number of bytes")
    size = Fraction(number) * unit
    if size.denominator != 1:
        raise ValueError(f"invalid {what} {quoted(text)}: not a whole number of bytes")
    return _in_range(int(size), text, what)


def _in_range(size: int, text: str, what: str) -> int:
    if size > U64_MAX:
        raise ValueError(f"invalid {what} {quoted(text)}: larger than 2^64-1 bytes")
    return size


def parse_address(text: str) -> int:
    """A guest-physical address: ``0x40000000``, ``1073741824`` or a size such as ``1GiB``."""
    return parse_size(text, what="address")


def format_size(size_bytes: int, *, exact: bool = False) -> str:
    """A human size: ``0B``, ``512B``, ``2MiB``, ``1.5GiB``.

    With ``exact=False`` (for tables) the value is rounded to one decimal in the largest unit it
    reaches (``127.9MiB``); with ``exact=True`` it is written in the largest unit that divides it,
    else in bytes, so that :func:`parse_size` reads back the same number.
    """
    if size_bytes < 0:
        return "-" + format_size(-size_bytes, exact=exact)
    for name, unit in _UNITS:
        if exact:
            if size_bytes % unit == 0 and size_bytes >= unit:
                return f"{size_bytes // unit}{name}"
        elif size_bytes >= unit:
            text = f"{size_bytes / unit:.1f}".removesuffix(".0")
            return f"{text}{name}"
    return f"{size_bytes}B"
