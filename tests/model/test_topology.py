"""Host topology: parsing, validation (docs/domain.md, "Geometry"), ``load_topology`` and
``default_topology``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from hostd.model import (
    ConfigError,
    GiB,
    Host,
    InvalidArgumentError,
    KiB,
    MiB,
    TagStorageMode,
    default_topology,
    load_topology,
    parse_size,
    parse_topology,
    topology_to_doc,
)
from hostd.model.topology import PAGEBLOCK_BYTES

BASE = 0x8000_0000


def region(**kw: Any) -> dict[str, Any]:
    """A valid tag region: 64 MiB of data at BASE, its 2 MiB of tags (one pageblock) right
    after."""
    r: dict[str, Any] = {
        "memory_base": BASE,
        "memory_size": "64MiB",
        "tag_base": BASE + 64 * MiB,
        "tag_size": "2MiB",
        "block_size": 0x2000,
    }
    r.update(kw)
    return r


def doc(*regions: dict[str, Any], **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"tag_region": list(regions) or [region()]}
    d.update(kw)
    return d


def config_error(document: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_topology(document)
    return info.value


def assert_names(err: ConfigError, field: str, value: object) -> None:
    """The error names the field and the value, in its attributes and its message."""
    assert field == err.field
    assert value == err.value
    assert field in str(err)
    assert "INVALID_TOPOLOGY" == err.reason
    assert field == err.metadata["field"]


# ----------------------------------------------------------------- valid documents


def test_valid_region_parses_to_its_config() -> None:
    """A valid document gives the sizes in bytes, the defaults and the block size."""
    topo = parse_topology(doc(untagged_range=[{"base": 0x1_0000_0000, "size": "16MiB"}]))
    assert 4 * KiB == topo.page_size_bytes
    assert False is topo.mte_perm
    assert TagStorageMode.DYNAMIC == topo.tag_storage_mode
    r = topo.tag_regions[0]
    assert (BASE, 64 * MiB, BASE + 64 * MiB, 2 * MiB, 0x2000) == (
        r.memory_base,
        r.memory_size_bytes,
        r.tag_base,
        r.tag_size_bytes,
        r.block_size_bytes,
    )
    assert 66 * MiB + 16 * MiB == topo.total_bytes


def test_block_size_defaults_to_8k() -> None:
    """A tag region without block_size gets the DT example's 0x2000."""
    r = region()
    del r["block_size"]
    assert 0x2000 == parse_topology(doc(r)).tag_regions[0].block_size_bytes


def test_static_mode_and_mte_perm_are_read() -> None:
    """tag_storage = "static" and mte_perm = true are read as such."""
    topo = parse_topology(doc(tag_storage="static", mte_perm=True))
    assert TagStorageMode.STATIC == topo.tag_storage_mode
    assert True is topo.mte_perm


def test_topology_to_doc_round_trips() -> None:
    """parse_topology(topology_to_doc(t)) == t."""
    topo = parse_topology(doc(region(), region(memory_base=BASE + GiB, tag_base=BASE + 2 * GiB)))
    assert topo == parse_topology(topology_to_doc(topo))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("4K", 4 * KiB),
        ("4kib", 4 * KiB),
        ("2MiB", 2 * MiB),
        ("1 GiB", GiB),
        ("1T", 1 << 40),
        ("0x2000", 0x2000),
        ("1_024", 1024),
        (" 64K ", 64 * KiB),
    ],
)
def test_parse_size_accepts_ints_units_and_hex(text: object, expected: int) -> None:
    """Sizes are ints or strings with an optional unit; hex and underscores are allowed."""
    assert expected == parse_size("f", text)


@pytest.mark.parametrize("bad", ["4GiBs", "abc", "-4K", "1.5G", "", "4 X", True, 1.5, None, -1])
def test_parse_size_rejects_bad_sizes_naming_field_and_value(bad: object) -> None:
    """A bad size is a ConfigError naming the field and the value."""
    with pytest.raises(ConfigError) as info:
        parse_size("tag_region[0].memory_size", bad)
    assert "tag_region[0].memory_size" == info.value.field
    assert bad == info.value.value
    assert "tag_region[0].memory_size" in str(info.value)


@pytest.mark.parametrize("bad", ["_", "0x_", "0x", "__K"])
def test_parse_size_rejects_digitless_strings(bad: str) -> None:
    """'_', '0x_' and friends are ConfigErrors naming the field, never a ValueError."""
    with pytest.raises(ConfigError) as info:
        parse_size("tag_region[0].memory_size", bad)
    assert bad == info.value.value


@pytest.mark.parametrize(("text", "size"), [("010M", 10 * MiB), ("08K", 8 * KiB), ("0x010", 16)])
def test_parse_size_reads_leading_zeros_as_decimal(text: str, size: int) -> None:
    """A leading zero is not octal: '08K' is 8 KiB, as a person writing it means."""
    assert size == parse_size("memory", text)


def test_bad_size_string_in_document_names_its_field() -> None:
    """A bad size in a tag region names that region's field."""
    err = config_error(doc(region(memory_size="32 MB please")))
    assert_names(err, "tag_region[0].memory_size", "32 MB please")


# ----------------------------------------------------------------- validation errors


def test_tag_size_must_be_exactly_one_32nd() -> None:
    """A tag region whose tag size is not exactly 1/32 of its memory is refused."""
    err = config_error(doc(region(tag_size="4MiB")))
    assert_names(err, "tag_region[0].tag_size", 4 * MiB)


def test_tag_size_slightly_too_large_is_refused() -> None:
    """Off by one tag block is still not 1/32."""
    err = config_error(doc(region(tag_size=4 * MiB, memory_size=96 * MiB)))
    assert_names(err, "tag_region[0].tag_size", 4 * MiB)


@pytest.mark.parametrize("block_size", [0x2000, 0x4000, 0x10000])
def test_tag_base_must_be_aligned_to_block_size(block_size: int) -> None:
    """The tag region's base is aligned to the tag block size."""
    bad = BASE + 64 * MiB + block_size // 2
    err = config_error(doc(region(tag_base=bad, block_size=block_size)))
    assert_names(err, "tag_region[0].tag_base", bad)


def test_tag_base_alignment_uses_lcm_with_page_size() -> None:
    """With 64K pages and 8K blocks a tag block is 64 KiB: tag_base must be 64K-aligned."""
    bad = BASE + 64 * MiB + 0x2000
    err = config_error(doc(region(tag_base=bad), page_size="64K"))
    assert_names(err, "tag_region[0].tag_base", bad)


def test_tag_region_overlapping_its_own_data_is_refused() -> None:
    """The tag storage must not overlap the memory it describes."""
    err = config_error(doc(region(tag_base=BASE + 16 * MiB)))
    assert_names(err, "tag_region[0].tag_base", BASE + 16 * MiB)
    assert "overlaps tag_region[0]" in str(err)


def test_tag_region_starting_below_its_data_and_overlapping_is_refused() -> None:
    """Tags just below the data range, overlapping its start, are refused."""
    err = config_error(doc(region(memory_base=BASE + MiB, tag_base=BASE)))
    assert_names(err, "tag_region[0].memory_base", BASE + MiB)


def test_overlapping_tag_regions_are_refused() -> None:
    """Two tagged ranges may not overlap."""
    second = region(memory_base=BASE + 16 * MiB, tag_base=BASE + GiB)
    err = config_error(doc(region(), second))
    assert_names(err, "tag_region[1].memory_base", BASE + 16 * MiB)


def test_untagged_range_overlapping_a_tag_region_is_refused() -> None:
    """An untaggable range overlapping tag storage is refused."""
    err = config_error(doc(untagged_range=[{"base": BASE + 64 * MiB, "size": "4MiB"}]))
    assert_names(err, "untagged_range[0].base", BASE + 64 * MiB)


def test_adjacent_ranges_do_not_overlap() -> None:
    """Ranges that touch end to start are fine."""
    parse_topology(doc(untagged_range=[{"base": BASE + 66 * MiB, "size": "4MiB"}]))


def test_at_most_32_tag_regions() -> None:
    """33 tag regions are refused (MAX_TAG_REGIONS = 32), 32 are fine."""

    def regions(n: int) -> list[dict[str, Any]]:
        step = 128 * MiB
        return [
            region(memory_base=BASE + i * step, tag_base=BASE + i * step + 64 * MiB)
            for i in range(n)
        ]

    assert 32 == len(parse_topology({"tag_region": regions(32)}).tag_regions)
    err = config_error({"tag_region": regions(33)})
    assert_names(err, "tag_region", 33)


@pytest.mark.parametrize("block_size", [0, 0x1000 + 1, 0x1800, 0x3000 - 0x800])
def test_block_size_must_be_a_multiple_of_4k(block_size: int) -> None:
    """block_size is a non-zero multiple of 4 KiB."""
    err = config_error(doc(region(block_size=block_size)))
    assert_names(err, "tag_region[0].block_size", block_size)


@pytest.mark.parametrize("page_size", ["8K", "32K", "2M", 4097, 0])
def test_page_size_is_4k_16k_or_64k(page_size: object) -> None:
    """Only 4K, 16K and 64K pages exist on arm64."""
    err = config_error(doc(page_size=page_size))
    assert_names(err, "page_size", page_size)


@pytest.mark.parametrize(("page_size", "expected"), [("4K", 4096), ("16K", 16384), (65536, 65536)])
def test_page_sizes_accepted(page_size: object, expected: int) -> None:
    """4K, 16K and 64K pages are accepted (with tag storage of one pageblock)."""
    tag_size = {4096: 2 * MiB, 16384: 32 * MiB, 65536: 512 * MiB}[expected]
    r = region(memory_size=32 * tag_size, tag_base=BASE + 32 * tag_size, tag_size=tag_size)
    assert expected == parse_topology(doc(r, page_size=page_size)).page_size_bytes


def test_unknown_top_level_key_is_refused() -> None:
    """A top-level key the schema does not know is refused, naming it."""
    err = config_error(doc(pagesize="4K"))
    assert_names(err, "pagesize", "4K")


def test_unknown_key_in_tag_region_is_refused() -> None:
    """A misspelt key in a tag region (DT-style 'block-size') is refused, not ignored."""
    r = region()
    del r["block_size"]
    r["block-size"] = 0x4000
    err = config_error(doc(r))
    assert "block-size" in err.field


@pytest.mark.parametrize("document", [{"tag_region": [1]}, {"untagged_range": 5}])
def test_non_table_entries_are_config_errors(document: dict[str, Any]) -> None:
    """tag_region = [1] or untagged_range = 5 is a ConfigError, not a TypeError."""
    config_error(document)


def test_tag_region_must_be_an_array() -> None:
    """tag_region given as one table is refused."""
    err = config_error({"tag_region": region()})
    assert "tag_region" == err.field


def test_missing_key_names_it() -> None:
    """A required key that is missing is named with the value <missing>."""
    r = region()
    del r["tag_base"]
    assert_names(config_error(doc(r)), "tag_region[0].tag_base", "<missing>")


@pytest.mark.parametrize(
    ("document", "field", "value"),
    [
        (doc(mte_perm="yes"), "mte_perm", "yes"),
        (doc(tag_storage="carved"), "tag_storage", "carved"),
        ({"tag_region": []}, "tag_region", "[]"),
        (doc(region(memory_size=0, tag_size=0)), "tag_region[0].memory_size", 0),
        (doc(region(memory_base=BASE + 0x800)), "tag_region[0].memory_base", BASE + 0x800),
        (doc(untagged_range=[{"base": 0x1_0000_0000, "size": 0}]), "untagged_range[0].size", 0),
        (
            doc(untagged_range=[{"base": 0x1_0000_0800, "size": "4K"}]),
            "untagged_range[0].base",
            0x1_0000_0800,
        ),
        (
            doc(untagged_range=[{"base": 0x1_0000_0000, "size": 100}]),
            "untagged_range[0].size",
            100,
        ),
    ],
)
def test_other_invalid_fields_are_named(
    document: dict[str, Any], field: str, value: object
) -> None:
    """Every other invalid field is refused with its name and value."""
    assert_names(config_error(document), field, value)


def test_config_error_is_an_invalid_argument() -> None:
    """ConfigError is an InvalidArgumentError (one hierarchy)."""
    assert issubclass(ConfigError, InvalidArgumentError)


# ----------------------------------------------------------------- load_topology


TOML = """
page_size = "16K"
mte_perm = true
tag_storage = "static"

[[tag_region]]
memory_base = 0x8000_0000
memory_size = "1GiB"
tag_base = 0xC000_0000
tag_size = "32MiB"
block_size = 0x4000

[[untagged_range]]
base = 0x1_0000_0000
size = "8MiB"
"""


def test_load_topology_reads_a_toml_file(tmp_path: Path) -> None:
    """A TOML file is read and validated like the document it holds."""
    path = tmp_path / "host.toml"
    path.write_text(TOML)
    topo = load_topology(path)
    assert 16 * KiB == topo.page_size_bytes
    assert TagStorageMode.STATIC == topo.tag_storage_mode
    assert 0x4000 == topo.tag_regions[0].block_size_bytes
    assert 8 * MiB == topo.untagged_ranges[0].size_bytes
    assert topo == load_topology(str(path))


def test_load_topology_refuses_bad_toml(tmp_path: Path) -> None:
    """A file that is not TOML is a ConfigError on field 'config' naming the path."""
    path = tmp_path / "bad.toml"
    path.write_text("page_size = \n[[tag_region\n")
    with pytest.raises(ConfigError) as info:
        load_topology(path)
    assert "config" == info.value.field
    assert str(path) == info.value.value
    assert "not valid TOML" in str(info.value)


def test_load_topology_refuses_a_missing_file(tmp_path: Path) -> None:
    """A file that cannot be read is a ConfigError on field 'config'."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_topology(path)
    assert ("config", str(path)) == (info.value.field, info.value.value)


def test_load_topology_validates_the_file(tmp_path: Path) -> None:
    """A valid TOML file with an invalid topology names the bad field."""
    path = tmp_path / "host.toml"
    path.write_text(TOML.replace('tag_size = "32MiB"', 'tag_size = "64MiB"'))
    with pytest.raises(ConfigError) as info:
        load_topology(path)
    assert "tag_region[0].tag_size" == info.value.field


# ----------------------------------------------------------------- default_topology


# Hosts big enough for two tag regions of at least one pageblock of tags each.
DEFAULT_HOSTS = [
    *[(m, 4 * KiB) for m in (256 * MiB, GiB, 4 * GiB, 6 * GiB + 64 * KiB, 64 * GiB, 1 << 40)],
    *[(m, 16 * KiB) for m in (4 * GiB, 6 * GiB + 64 * KiB, 64 * GiB, 1 << 40)],
    *[(m, 64 * KiB) for m in (64 * GiB, 1 << 40)],
]


@pytest.mark.parametrize(("memory", "page_size"), DEFAULT_HOSTS)
def test_default_topology_sizes_add_up(memory: int, page_size: int) -> None:
    """Two tag regions (data exactly 32x tags) plus the untaggable rest make up all memory, and
    every tag region is a valid CMA area: base and size pageblock-aligned (mm/cma.c)."""
    topo = default_topology(memory, page_size)
    assert memory == topo.total_bytes
    assert 2 == len(topo.tag_regions)
    pageblock = PAGEBLOCK_BYTES[page_size]
    for r in topo.tag_regions:
        assert r.memory_size_bytes == 32 * r.tag_size_bytes
        assert 0 == r.tag_size_bytes % math.lcm(page_size, r.block_size_bytes)
        assert (0, 0) == (r.tag_base % pageblock, r.tag_size_bytes % pageblock)
    assert topo == parse_topology(topology_to_doc(topo))


@pytest.mark.parametrize(("memory", "page_size"), [(GiB, 16 * KiB), (16 * GiB, 64 * KiB)])
def test_default_topology_too_small_for_pageblock_aligned_tag_storage_is_refused(
    memory: int, page_size: int
) -> None:
    """A built-in host too small to give each tag region a whole pageblock of tag storage
    (32 MiB with 16K pages, 512 MiB with 64K) is refused, naming the memory size."""
    with pytest.raises(ConfigError) as info:
        default_topology(memory, page_size)
    assert "memory" == info.value.field


@pytest.mark.parametrize(
    ("page_size", "pageblock"), [("4K", 2 * MiB), ("16K", 32 * MiB), ("64K", 512 * MiB)]
)
@pytest.mark.parametrize("field", ["tag_base", "tag_size"])
def test_tag_region_not_pageblock_aligned_is_refused_as_a_cma_area(
    page_size: str, pageblock: int, field: str
) -> None:
    """A tag region becomes a CMA area; cma_init_reserved_mem() refuses a base or size that is
    not pageblock-aligned (2 MiB / 32 MiB / 512 MiB for 4K / 16K / 64K pages), and the refusal
    disables tag storage management: the topology is refused, naming the field."""
    tag_size = pageblock if field == "tag_base" else pageblock // 2
    tag_base = BASE + 32 * pageblock + (pageblock // 2 if field == "tag_base" else 0)
    r = region(memory_size=32 * tag_size, tag_base=tag_base, tag_size=tag_size)
    err = config_error(doc(r, page_size=page_size))
    assert_names(err, f"tag_region[0].{field}", tag_base if field == "tag_base" else tag_size)
    assert "pageblock" in str(err)


def test_an_8k_tag_region_is_refused() -> None:
    """The smallest tag region the block size allows (one 8 KiB block) is not a CMA area."""
    err = config_error(doc(region(memory_size="256K", tag_size="8K")))
    assert_names(err, "tag_region[0].tag_size", 8 * KiB)


@pytest.mark.parametrize(("memory", "page_size"), DEFAULT_HOSTS[:3] + DEFAULT_HOSTS[6:7])
def test_default_host_usage_totals_memory(memory: int, page_size: int) -> None:
    """A host on the default topology reports all its memory free, tag storage included."""
    topo = default_topology(memory, page_size)
    usage = Host(topo).status().usage
    assert memory == usage.total_bytes
    assert sum(r.tag_size_bytes for r in topo.tag_regions) == usage.tag_free_bytes
    assert memory == usage.all_free_bytes


@pytest.mark.parametrize(
    ("memory", "page_size", "field"),
    [(64 * KiB, 4 * KiB, "memory"), (4 * GiB + 1, 4 * KiB, "memory"), (GiB, 8 * KiB, "page_size")],
)
def test_default_topology_refuses_bad_sizes(memory: int, page_size: int, field: str) -> None:
    """Too little memory, unaligned memory or a bad page size is a ConfigError."""
    with pytest.raises(ConfigError) as info:
        default_topology(memory, page_size)
    assert field == info.value.field


@pytest.mark.parametrize("page_size", [4 * KiB, 16 * KiB, 64 * KiB])
@pytest.mark.parametrize("block_size", [k * 4 * KiB for k in range(1, 17)])
def test_block_pages_is_lcm_over_page_size(page_size: int, block_size: int) -> None:
    """block_pages = lcm(page, block) / page for every page size and 4K..64K blocks."""
    block_bytes = math.lcm(page_size, block_size, PAGEBLOCK_BYTES[page_size])
    tag_size = block_bytes
    tag_base = -(-(BASE + 32 * tag_size) // block_bytes) * block_bytes
    topo = parse_topology(
        {
            "page_size": page_size,
            "tag_region": [
                {
                    "memory_base": BASE,
                    "memory_size": 32 * tag_size,
                    "tag_base": tag_base,
                    "tag_size": tag_size,
                    "block_size": block_size,
                }
            ],
        }
    )
    expected = math.lcm(page_size, block_size) // page_size
    assert expected == topo.tag_regions[0].block_pages(page_size)
    assert expected * page_size == Host(topo).status().regions[0].block_size_bytes
