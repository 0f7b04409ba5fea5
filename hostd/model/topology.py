"""Host topology: page size, tag regions and untaggable ranges, validated as docs/domain.md
("Geometry") says.

A topology is read from TOML::

    page_size = "4K"            # 4K, 16K or 64K (or bytes)
    mte_perm = true             # FEAT_MTE_PERM: ON_TAG_ACCESS is possible
    tag_storage = "dynamic"     # or "static": the boot-time carve-out baseline

    [[tag_region]]
    memory_base = 0x8000_0000   # the tagged data range ...
    memory_size = "32GiB"
    tag_base = 0x8_8000_0000    # ... and its tag storage, exactly 1/32 of it
    tag_size = "1GiB"
    block_size = 0x2000         # bytes, multiple of 4 KiB

    [[untagged_range]]          # memory with no tag storage (CXL, arm,no-mte)
    base = 0x10_0000_0000
    size = "8GiB"

Any error names the field and the value; the host refuses to start on it.
"""

from __future__ import annotations

import itertools
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostd.model.errors import ConfigError
from hostd.model.types import TAG_STORAGE_RATIO, GiB, KiB, MiB, TagStorageMode

PAGE_SIZES_BYTES = (4 * KiB, 16 * KiB, 64 * KiB)
# Each tag region becomes a CMA area (cma_init_reserved_mem()), which refuses a base or size
# that is not a multiple of the pageblock: 2^pageblock_order pages, the PMD size on arm64.
PAGEBLOCK_BYTES = {4 * KiB: 2 * MiB, 16 * KiB: 32 * MiB, 64 * KiB: 512 * MiB}
MAX_TAG_REGIONS = 32  # v3's MAX_TAG_REGIONS
DEFAULT_BLOCK_SIZE_BYTES = 0x2000  # the DT example: 256 KiB of data over 8 KiB of tags
DEFAULT_MEMORY_BYTES = 64 * GiB
DEFAULT_DRAM_BASE = 0x8000_0000

_UNITS = {
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
    "t": 1 << 40,
    "tb": 1 << 40,
    "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(0x[0-9a-fA-F_]+|[0-9_]+)\s*([a-zA-Z]*)\s*$")


def parse_size(field: str, value: object) -> int:
    """Bytes from an int or a string such as ``"4GiB"``, ``"64K"``, ``"0x2000"``."""
    if isinstance(value, bool):
        raise ConfigError(field, value, "expected a size in bytes")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(field, value, "must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        unit = m.group(2).lower() if m else ""
        if m and unit in _UNITS:
            digits = m.group(1).replace("_", "")
            hexa = digits[:2] in ("0x", "0X")
            try:
                # Decimal unless 0x: "08K" is 8 KiB, not an invalid octal literal.
                return int(digits[2:] if hexa else digits, 16 if hexa else 10) * _UNITS[unit]
            except ValueError:
                pass  # no digits at all, e.g. "_" or "0x_"
    raise ConfigError(field, value, "expected a size such as 4096, '4K', '2MiB' or '1TiB'")


@dataclass(frozen=True)
class TagRegionConfig:
    """A tagged data range and the tag storage that describes it."""

    memory_base: int
    memory_size_bytes: int
    tag_base: int
    tag_size_bytes: int
    block_size_bytes: int

    def block_pages(self, page_size_bytes: int) -> int:
        """Pages per tag block: ``lcm(PAGE_SIZE, block_size) / PAGE_SIZE`` (docs/domain.md,
        "Geometry")."""
        return math.lcm(page_size_bytes, self.block_size_bytes) // page_size_bytes


@dataclass(frozen=True)
class UntaggedRangeConfig:
    base: int
    size_bytes: int


@dataclass(frozen=True)
class HostTopology:
    """A validated host description (build it with :func:`parse_topology`)."""

    page_size_bytes: int
    mte_perm: bool
    tag_storage_mode: TagStorageMode
    tag_regions: tuple[TagRegionConfig, ...]
    untagged_ranges: tuple[UntaggedRangeConfig, ...]

    @property
    def total_bytes(self) -> int:
        return sum(r.memory_size_bytes + r.tag_size_bytes for r in self.tag_regions) + sum(
            u.size_bytes for u in self.untagged_ranges
        )


def _get(table: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in table:
        raise ConfigError(f"{where}.{key}" if where else key, "<missing>", "required")
    return table[key]


def _page_size(value: object) -> int:
    size = parse_size("page_size", value)
    if size not in PAGE_SIZES_BYTES:
        raise ConfigError("page_size", value, "must be 4K, 16K or 64K")
    return size


def parse_topology(doc: Mapping[str, Any]) -> HostTopology:
    """Validate a topology document (the parsed TOML) and return it as a :class:`HostTopology`."""
    known = {"page_size", "mte_perm", "tag_storage", "tag_region", "untagged_range"}
    for key in doc:
        if key not in known:
            raise ConfigError(key, doc[key], f"unknown key; expected one of {sorted(known)}")
    page_size = _page_size(doc.get("page_size", 4 * KiB))
    mte_perm = doc.get("mte_perm", False)
    if not isinstance(mte_perm, bool):
        raise ConfigError("mte_perm", mte_perm, "expected true or false")
    mode_text = doc.get("tag_storage", "dynamic")
    try:
        mode = TagStorageMode(str(mode_text).upper())
    except ValueError:
        raise ConfigError("tag_storage", mode_text, "expected 'dynamic' or 'static'") from None

    regions = []
    raw_regions = doc.get("tag_region", [])
    if not isinstance(raw_regions, list):
        raise ConfigError("tag_region", raw_regions, "expected an array of tables [[tag_region]]")
    if len(raw_regions) > MAX_TAG_REGIONS:
        raise ConfigError("tag_region", len(raw_regions), f"at most {MAX_TAG_REGIONS} tag regions")
    for i, raw in enumerate(raw_regions):
        where = f"tag_region[{i}]"
        _check_table(where, raw, _TAG_REGION_KEYS)
        region = TagRegionConfig(
            memory_base=parse_size(f"{where}.memory_base", _get(raw, "memory_base", where)),
            memory_size_bytes=parse_size(f"{where}.memory_size", _get(raw, "memory_size", where)),
            tag_base=parse_size(f"{where}.tag_base", _get(raw, "tag_base", where)),
            tag_size_bytes=parse_size(f"{where}.tag_size", _get(raw, "tag_size", where)),
            block_size_bytes=parse_size(
                f"{where}.block_size", raw.get("block_size", DEFAULT_BLOCK_SIZE_BYTES)
            ),
        )
        _check_region(region, page_size, where)
        regions.append(region)

    untagged = []
    raw_untagged = doc.get("untagged_range", [])
    if not isinstance(raw_untagged, list):
        raise ConfigError(
            "untagged_range", raw_untagged, "expected an array of tables [[untagged_range]]"
        )
    for i, raw in enumerate(raw_untagged):
        where = f"untagged_range[{i}]"
        _check_table(where, raw, _UNTAGGED_KEYS)
        rng = UntaggedRangeConfig(
            base=parse_size(f"{where}.base", _get(raw, "base", where)),
            size_bytes=parse_size(f"{where}.size", _get(raw, "size", where)),
        )
        _check_aligned(f"{where}.base", rng.base, page_size, "the page size")
        _check_aligned(f"{where}.size", rng.size_bytes, page_size, "the page size")
        if rng.size_bytes == 0:
            raise ConfigError(f"{where}.size", 0, "must not be zero")
        untagged.append(rng)

    if not regions and not untagged:
        raise ConfigError("tag_region", "[]", "the host has no memory")
    _check_no_overlap(regions, untagged)
    return HostTopology(page_size, mte_perm, mode, tuple(regions), tuple(untagged))


_TAG_REGION_KEYS = ("memory_base", "memory_size", "tag_base", "tag_size", "block_size")
_UNTAGGED_KEYS = ("base", "size")


def _check_table(where: str, raw: object, known: tuple[str, ...]) -> None:
    """An entry of an array of tables must be a table with only known keys (a misspelt
    ``block-size`` must not silently fall back to the default)."""
    if not isinstance(raw, dict):
        raise ConfigError(where, raw, "expected a table")
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"{where}.{key}", raw[key], f"unknown key; expected one of {list(known)}"
            )


def _check_aligned(field: str, value: int, align: int, what: str) -> None:
    if value % align:
        raise ConfigError(field, value, f"must be a multiple of {what} ({align:#x})")


def _check_region(region: TagRegionConfig, page_size: int, where: str) -> None:
    block = region.block_size_bytes
    if block == 0 or block % (4 * KiB):
        raise ConfigError(f"{where}.block_size", block, "must be a non-zero multiple of 4 KiB")
    block_bytes = region.block_pages(page_size) * page_size
    if region.memory_size_bytes == 0:
        raise ConfigError(f"{where}.memory_size", 0, "must not be zero")
    _check_aligned(f"{where}.memory_base", region.memory_base, page_size, "the page size")
    _check_aligned(f"{where}.tag_base", region.tag_base, block_bytes, "the tag block size")
    _check_aligned(f"{where}.tag_size", region.tag_size_bytes, block_bytes, "the tag block size")
    # The kernel hands each tag region to cma_init_reserved_mem(), which refuses one that is not
    # pageblock-aligned; a refused region disables tag storage management for the host.
    pageblock = PAGEBLOCK_BYTES[page_size]
    what = "the pageblock size, as a CMA area must be"
    _check_aligned(f"{where}.tag_base", region.tag_base, pageblock, what)
    _check_aligned(f"{where}.tag_size", region.tag_size_bytes, pageblock, what)
    if region.tag_size_bytes * TAG_STORAGE_RATIO != region.memory_size_bytes:
        raise ConfigError(
            f"{where}.tag_size",
            region.tag_size_bytes,
            f"must be exactly 1/32 of memory_size ({region.memory_size_bytes:#x})",
        )


def _check_no_overlap(regions: list[TagRegionConfig], untagged: list[UntaggedRangeConfig]) -> None:
    spans: list[tuple[int, int, str]] = []
    for i, r in enumerate(regions):
        spans.append((r.memory_base, r.memory_size_bytes, f"tag_region[{i}].memory_base"))
        spans.append((r.tag_base, r.tag_size_bytes, f"tag_region[{i}].tag_base"))
    for i, u in enumerate(untagged):
        spans.append((u.base, u.size_bytes, f"untagged_range[{i}].base"))
    spans.sort()
    for (a_base, a_size, a_name), (b_base, _, b_name) in itertools.pairwise(spans):
        if a_base + a_size > b_base:
            raise ConfigError(b_name, b_base, f"overlaps {a_name.rsplit('.', 1)[0]}")


def load_topology(path: str | Path) -> HostTopology:
    """Read and validate a topology TOML file."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError("config", str(path), f"cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("config", str(path), f"not valid TOML: {e}") from None
    return parse_topology(doc)


def default_topology(
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    page_size_bytes: int = 4 * KiB,
    *,
    mte_perm: bool = True,
    tag_storage_mode: TagStorageMode = TagStorageMode.DYNAMIC,
) -> HostTopology:
    """The built-in host: ``memory_bytes`` of RAM from 0x8000_0000, laid out as two tagged
    ranges each followed by its tag storage, then an untaggable range (about 1/8 of RAM).

    Tag storage sizes are whole pageblocks (a CMA area must be pageblock-aligned), so every
    base is aligned too. The default (64 GiB, 4K pages) gives 2 x 27.1 GiB tagged + 2 x 868 MiB
    tag storage + 8.1 GiB untaggable.
    """
    _page_size(page_size_bytes)
    if memory_bytes <= 0 or memory_bytes % page_size_bytes:
        raise ConfigError("memory", memory_bytes, "must be a positive multiple of the page size")
    block = DEFAULT_BLOCK_SIZE_BYTES
    block_bytes = math.lcm(page_size_bytes, block, PAGEBLOCK_BYTES[page_size_bytes])
    # Each tagged range with its tag storage gets 7/16 of RAM; sizes are whole tag blocks.
    tag_size = (memory_bytes * 7 // 16 // (TAG_STORAGE_RATIO + 1)) // block_bytes * block_bytes
    if tag_size == 0:
        raise ConfigError(
            "memory",
            memory_bytes,
            f"too small for two tag regions with a whole pageblock ({block_bytes:#x} bytes) "
            "of tag storage each",
        )
    data_size = tag_size * TAG_STORAGE_RATIO
    regions = []
    base = DEFAULT_DRAM_BASE
    for _ in range(2):
        regions.append(TagRegionConfig(base, data_size, base + data_size, tag_size, block))
        base += data_size + tag_size
    rest = memory_bytes - 2 * (data_size + tag_size)
    untagged = (UntaggedRangeConfig(base, rest),) if rest else ()
    topo = HostTopology(page_size_bytes, mte_perm, tag_storage_mode, tuple(regions), untagged)
    return topo
