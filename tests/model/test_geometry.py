"""Tag geometry (docs/domain.md, "Geometry"): which tag block describes a data page, how many
blocks a reservation takes, and the cache maintenance it costs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hostd.model import (
    BOOT_RAM_GPA,
    Access,
    GiB,
    Host,
    HostTopology,
    KiB,
    MiB,
    PageState,
    Placement,
    TagPolicy,
    VmConfig,
    default_topology,
    parse_topology,
)
from hostd.model.physmem import TG_TAGGED, TS_RESERVED
from hostd.model.topology import PAGEBLOCK_BYTES

from .conftest import PAGE, assert_sound, pages_of

BASE = 0x8000_0000
PAGE_SIZES = [4 * KiB, 16 * KiB, 64 * KiB]
BLOCK_SIZES = [k * 4 * KiB for k in range(1, 17)]


def topology(page_size: int, block_size: int, nr_blocks: int = 6) -> HostTopology:
    """One tag region of at least ``nr_blocks`` tag blocks (whole pageblocks of them), its tags
    above its data, plus a second
    region below it so that the first region's dense indices do not start at 0."""
    block_bytes = math.lcm(page_size, block_size)
    # Tag storage is a CMA area: whole pageblocks, pageblock-aligned.
    align = math.lcm(block_bytes, PAGEBLOCK_BYTES[page_size])
    tag_size = -(-block_bytes * nr_blocks // align) * align
    first_data = BASE
    first_tag = -(-(first_data + 32 * tag_size) // align) * align
    second_data = -(-(first_tag + tag_size) // (4 * MiB)) * (4 * MiB)
    second_tag = -(-(second_data + 32 * tag_size) // align) * align
    regions = [
        {
            "memory_base": b,
            "memory_size": 32 * tag_size,
            "tag_base": t,
            "tag_size": tag_size,
            "block_size": block_size,
        }
        for b, t in ((first_data, first_tag), (second_data, second_tag))
    ]
    return parse_topology({"page_size": page_size, "tag_region": regions})


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_tag_block_of_data_page_follows_the_lookup_rule(page_size: int, block_size: int) -> None:
    """tag_block_start = T.start + rounddown((p - R.start) // 32, block_pages), for every page."""
    host = Host(topology(page_size, block_size))
    bp = math.lcm(page_size, block_size) // page_size
    for reg in host.mem.regions:
        assert bp == reg.block_pages
        assert 32 * bp == reg.span_pages
        p = np.arange(reg.data.start, reg.data.end, dtype=np.int64)
        tag_pages = reg.tag_pages(reg.block_of_data(p))
        off = (p - reg.data.start) // 32
        expected_start = reg.tag.start + (off - off % bp)
        assert expected_start.tolist() == tag_pages[:, 0].tolist()
        assert (np.arange(bp) == tag_pages - tag_pages[:, :1]).all()
        # The same rule in physical page frame numbers.
        pfn = host.mem.pfn_of(p)
        r_start, t_start = host.mem.pfn_of(np.array([reg.data.start, reg.tag.start]))
        off_pfn = (pfn - r_start) // 32
        expected_pfn = t_start + (off_pfn - off_pfn % bp)
        assert expected_pfn.tolist() == host.mem.pfn_of(tag_pages[:, 0]).tolist()


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("block_size", [4 * KiB, 8 * KiB, 64 * KiB])
def test_data_pages_of_a_block_are_its_span(page_size: int, block_size: int) -> None:
    """A tag block describes 32 * block_pages consecutive data pages, and each maps back to it."""
    host = Host(topology(page_size, block_size))
    reg = host.mem.regions[0]
    blocks = np.arange(reg.nr_blocks, dtype=np.int64)
    data = reg.data_pages(blocks)
    assert (reg.nr_blocks, 32 * reg.block_pages) == data.shape
    assert blocks.tolist() == reg.block_of_data(data[:, 0]).tolist()
    assert blocks.tolist() == reg.block_of_data(data[:, -1]).tolist()
    assert reg.data.nr_pages == reg.nr_blocks * reg.span_pages


def fault_mte(host: Host, nr_pages: int) -> int:
    """Create an ON_FAULT MTE VM and fault ``nr_pages``; returns the blocks reserved."""
    ps = host.page_size
    host.create_vm(VmConfig("vm", True, boot_memory_bytes=max(nr_pages, 1) * ps))
    result = host.guest_fault("vm", BOOT_RAM_GPA, nr_pages * ps, Access.WRITE)
    assert nr_pages == result.newly_mapped_pages
    assert_sound(host)
    return result.tag_blocks_reserved


def test_tag_cache_is_invalidated_per_freed_tagged_page_even_when_its_block_stays() -> None:
    """Freeing one tagged page of a block that keeps other tagged pages invalidates the tag
    cache over exactly that page (the series: PAGE_SIZE << order per freed tagged folio)."""
    host = Host(default_topology(GiB))
    fault_mte(host, 10)
    host.discard_guest_memory("vm", BOOT_RAM_GPA, PAGE)
    assert {"dcache_invalidate": 2 * PAGE, "tag_cache_invalidate": PAGE} == (
        host.counters.cache_maintenance_bytes
    )
    assert 1 == host.status().tag_blocks_reserved
    assert_sound(host)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("block_size", [4 * KiB, 8 * KiB, 32 * KiB, 64 * KiB])
@pytest.mark.parametrize("span_multiple", [(0, 1), (1, -1), (1, 0), (1, 1), (3, 5)])
def test_reserving_n_pages_takes_ceil_n_over_span_blocks(
    page_size: int, block_size: int, span_multiple: tuple[int, int]
) -> None:
    """On a fresh host, N tagged pages reserve ceil(N / (32 * block_pages)) tag blocks."""
    host = Host(topology(page_size, block_size))
    span = host.mem.regions[0].span_pages
    n = span_multiple[0] * span + span_multiple[1]
    expected = -(-n // span)
    assert expected == fault_mte(host, n)
    assert expected == host.status().tag_blocks_reserved
    assert expected == host.status().tag_blocks_min_needed
    blocks = host.export_state().reserved_tag_blocks
    assert n == sum(b.refcount for b in blocks)
    assert [host.mem.regions[0].block_pages] * expected == [b.nr_pages for b in blocks]
    tagged = host.mem.flags[pages_of(host, "vm", BOOT_RAM_GPA, n)]
    assert (tagged == TG_TAGGED).all()


def test_reserved_block_pages_are_tag_reserved_in_the_export(host: Host) -> None:
    """The tag pages of a reserved block are exported as TAG_RESERVED, with the block's pfn."""
    fault_mte(host, 100)
    export = host.export_state()
    reg = host.mem.regions[0]
    assert 2 == len(export.reserved_tag_blocks)
    first = export.reserved_tag_blocks[0]
    assert ("tag0", 64, 2) == (first.region, first.refcount, first.nr_pages)
    assert int(host.mem.pfn_of(np.array([reg.tag.start]))[0]) == first.tag_pfn_start
    idx = reg.tag_pages(np.array([0, 1])).ravel()
    assert (host.mem.flags[idx] == TS_RESERVED).all()
    reserved = [e for e in export.page_extents if e.state is PageState.TAG_RESERVED]
    assert [(first.tag_pfn_start, 4)] == [(e.pfn_start, e.count) for e in reserved]


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("block_size", [4 * KiB, 8 * KiB, 64 * KiB])
def test_cache_maintenance_bytes_on_reserve_and_release(page_size: int, block_size: int) -> None:
    """Reserving invalidates the dcache over the tag block (block_pages * page bytes); freeing
    tagged pages invalidates the tag cache over each of them (page bytes per page), as the
    series does for every freed tagged folio, not over the span of a released block."""
    host = Host(topology(page_size, block_size))
    reg = host.mem.regions[0]
    n = 2 * reg.span_pages + 1
    blocks = fault_mte(host, n)
    assert 3 == blocks
    cm = host.counters.cache_maintenance_bytes
    assert {"dcache_invalidate": blocks * reg.block_pages * page_size} == cm
    host.destroy_vm("vm")
    assert_sound(host)
    assert n * page_size == cm["tag_cache_invalidate"]
    assert {"tag0": blocks} == host.counters.tag_blocks_released
    assert 0 == host.status().tag_blocks_reserved


def test_aware_placement_fills_every_partly_used_block_before_reserving_another() -> None:
    """With several reserved blocks partly used (a VM whose pages were interleaved with another's
    went away), new tagged pages go into those blocks and reserve nothing new."""
    host = Host(default_topology(GiB), Placement.TAG_BLOCK_AWARE)
    for vm_id in "abc":
        host.create_vm(VmConfig(vm_id, True, TagPolicy.ON_FAULT, 64 * MiB))
    for k in range(20):  # interleave a, b and c three pages at a time
        for vm_id in "abc":
            host.guest_fault(vm_id, BOOT_RAM_GPA + k * 3 * PAGE, 3 * PAGE, Access.WRITE)
    host.destroy_vm("b")
    assert 1 < sum(r.nr_partial for r in host.mem.regions)
    free_in_partial = sum(
        int(r.span_free[(r.refcount > 0) & (r.span_free > 0)].sum()) for r in host.mem.regions
    )
    reserved = host.status().tag_blocks_reserved
    host.guest_fault("a", BOOT_RAM_GPA + MiB, free_in_partial * PAGE, Access.WRITE)
    assert reserved == host.status().tag_blocks_reserved
    assert 0 == sum(r.nr_partial for r in host.mem.regions)
    assert_sound(host)
