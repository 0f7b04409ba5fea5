"""Evacuation (docs/domain.md, "Reservation" and "Migration"): lent tag storage is taken back
when an MTE VM needs its blocks; the non-MTE guest page moves and its stage-2 mapping follows.
When the data has nowhere to go the reservation fails, other pages are used or the call is
refused with nothing half-done.

Every scenario runs on the small host (16 MiB untaggable, 64 MiB taggable, 512 tag pages,
blocks of 2 tag pages describing 64 data pages) laid out page by page with DIMMs of a non-MTE
VM 'plain', faulted in order: untagged data fills untaggable, then taggable memory in physical
order, then lends tag storage in physical order.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from hostd.model import (
    BOOT_RAM_GPA,
    Access,
    FaultResult,
    Host,
    MiB,
    Placement,
    ResourceExhaustedError,
    TagPolicy,
    VmConfig,
)
from hostd.model.physmem import (
    TG_DATA,
    TG_FREE,
    TG_TAGGED,
    TS_FREE,
    TS_LENT,
    TS_RESERVED,
    UT_DATA,
)

from .conftest import (
    SMALL_DATA_PAGES,
    SMALL_TAG_PAGES,
    SMALL_UNTAGGED_PAGES,
    assert_sound,
    assert_unchanged,
    lay_out,
    mte_config,
    pages_of,
    snapshot,
)

PAGE = 4096


def untagged_free_bytes(host: Host) -> int:
    return next(r for r in host.status().regions if r.name == "untagged0").usage.free_bytes


def tag_page(host: Host, i: int) -> int:
    return host.mem.regions[0].tag.start + i


def data_page(host: Host, i: int) -> int:
    return host.mem.regions[0].data.start + i


@pytest.fixture
def lent_block_0(small_host: Host) -> tuple[Host, dict[str, int]]:
    """Taggable pages 0..63 (block 0's span) are free; block 0's tag pages are lent to 'plain'
    (DIMM 'lent', 10 tag pages: blocks 0..4); everything else taggable is in use."""
    gpas = lay_out(
        small_host,
        [("span0", 64), ("rest", SMALL_DATA_PAGES - 64), ("lent", 10)],
        ["span0"],
    )
    lent = pages_of(small_host, "plain", gpas["lent"], 10)
    assert [tag_page(small_host, i) for i in range(10)] == lent.tolist()
    assert (small_host.mem.flags[lent] == TS_LENT).all()
    small_host.create_vm(mte_config(boot_memory_bytes=MiB))
    return small_host, gpas


def test_lent_tag_storage_is_evacuated_for_an_mte_vm(lent_block_0) -> None:
    """Reserving a lent block moves the non-MTE guest's pages; its stage-2 mapping follows."""
    host, gpas = lent_block_0
    plain_before = host.get_vm("plain")
    result = host.guest_fault("mte", BOOT_RAM_GPA, PAGE, Access.WRITE)
    assert_sound(host)
    assert FaultResult(newly_mapped_pages=1, tag_blocks_reserved=1) == result
    # The MTE page is in block 0's span and tagged.
    (mte_page,) = pages_of(host, "mte", BOOT_RAM_GPA, 1).tolist()
    assert 0 == host.mem.regions[0].block_of_data(np.array([mte_page]))[0]
    assert TG_TAGGED == host.mem.flags[mte_page]
    # Block 0's tag pages now hold tags; 'plain's first two lent pages moved out and stay mapped.
    assert (host.mem.flags[[tag_page(host, 0), tag_page(host, 1)]] == TS_RESERVED).all()
    moved = pages_of(host, "plain", gpas["lent"], 10)
    assert [tag_page(host, i) for i in range(2, 10)] == moved[2:].tolist()
    assert not np.isin(moved[:2], [tag_page(host, 0), tag_page(host, 1)]).any()
    assert (host.mem.flags[moved[:2]] == TG_DATA).all()
    assert (host.mem.owner[moved] == host.vms["plain"].slot).all()
    assert plain_before == host.get_vm("plain")
    assert {"tag0": 2} == host.counters.evacuated_pages
    assert {"evacuation": 2} == host.counters.page_migrations


def test_evacuation_counters_grow_with_each_evacuated_block(small_host: Host) -> None:
    """Each lent block taken back adds its lent pages to evacuated_pages and page_migrations."""
    host = small_host
    lay_out(host, [("span01", 128), ("rest", SMALL_DATA_PAGES - 128), ("lent", 10)], ["span01"])
    host.create_vm(mte_config(boot_memory_bytes=MiB))
    host.guest_fault("mte", BOOT_RAM_GPA, PAGE, Access.WRITE)
    assert ({"tag0": 2}, {"evacuation": 2}) == (
        host.counters.evacuated_pages,
        host.counters.page_migrations,
    )
    # Block 0's span has 61 free pages left (the evacuated data took 2): 64 more pages fill it
    # and take block 1, whose tag pages are lent too.
    result = host.guest_fault("mte", BOOT_RAM_GPA + PAGE, 64 * PAGE, Access.WRITE)
    assert_sound(host)
    assert 1 == result.tag_blocks_reserved
    assert ({"tag0": 4}, {"evacuation": 4}) == (
        host.counters.evacuated_pages,
        host.counters.page_migrations,
    )
    assert 6 * PAGE == host.status().usage.tag_lent_bytes


def test_evacuated_on_tag_access_data_may_move_to_untaggable_memory(small_host: Host) -> None:
    """Lent pages of an ON_TAG_ACCESS MTE VM are untagged data mapped NoTagAccess
    (FEAT_MTE_PERM), which memory that cannot hold tags allows: evacuation moves them to free
    untaggable memory too, before lending other tag storage."""
    host = small_host
    host.create_vm(VmConfig("u", False, boot_memory_bytes=MiB))
    host.guest_fault("u", BOOT_RAM_GPA, PAGE, Access.WRITE)  # untaggable page 0
    lay_out(
        host,
        [("span0", 64), ("rest", SMALL_DATA_PAGES - 64)],
        ["span0"],
        boot_pages=SMALL_UNTAGGED_PAGES - 1,
    )
    host.create_vm(mte_config("ota", TagPolicy.ON_TAG_ACCESS, boot_memory_bytes=MiB))
    # 64 untagged pages fill block 0's span, 2 more are lent block 0's tag pages.
    host.guest_fault("ota", BOOT_RAM_GPA, 66 * PAGE, Access.READ)
    lent = pages_of(host, "ota", BOOT_RAM_GPA + 64 * PAGE, 2)
    assert [tag_page(host, 0), tag_page(host, 1)] == lent.tolist()
    host.destroy_vm("u")
    assert PAGE == untagged_free_bytes(host)
    # Tagging page 0 in place reserves block 0: its lent pages are evacuated.
    host.guest_fault("ota", BOOT_RAM_GPA, PAGE, Access.TAG)
    assert_sound(host)
    moved = pages_of(host, "ota", BOOT_RAM_GPA + 64 * PAGE, 2)
    assert [UT_DATA, TS_LENT] == host.mem.flags[moved].tolist()
    assert (host.mem.flags[lent] == TS_RESERVED).all()
    assert 0 == untagged_free_bytes(host)
    assert {"tag0": 2} == host.counters.evacuated_pages


def test_reservation_fails_when_evacuated_data_has_nowhere_to_go(small_host: Host) -> None:
    """With no free memory for the lent data, the block is not reserved and the fault is
    refused (tag_storage) with nothing half-done."""
    lay_out(
        small_host,
        [("page0", 1), ("rest", SMALL_DATA_PAGES - 1), ("lent", SMALL_TAG_PAGES)],
        ["page0"],
    )
    assert 1 == small_host.mem.free_pages(TG_FREE)
    small_host.create_vm(mte_config(boot_memory_bytes=MiB))
    plain_before = small_host.get_vm("plain")
    plain_map = small_host.vms["plain"].stage2.copy()
    before = snapshot(small_host)
    with pytest.raises(ResourceExhaustedError) as info:
        small_host.guest_fault("mte", BOOT_RAM_GPA, PAGE, Access.WRITE)
    assert "tag_storage" == info.value.resource
    assert "TAG_STORAGE_EXHAUSTED" == info.value.reason
    assert_unchanged(small_host, before)
    assert plain_before == small_host.get_vm("plain")
    assert np.array_equal(plain_map, small_host.vms["plain"].stage2)
    assert (0, 0) == (small_host.get_vm("mte").mapped_bytes, small_host.get_vm("mte").tagged_bytes)
    assert {"tag0": 1} == small_host.counters.tag_block_reserve_failures
    assert {} == small_host.counters.evacuated_pages
    assert 0 == small_host.status().tag_blocks_reserved


def test_no_free_taggable_memory_is_taggable_memory_exhausted(small_host: Host) -> None:
    """With no free taggable page at all, a tagged fault is ResourceExhausted(taggable_memory)."""
    lay_out(small_host, [("all", SMALL_DATA_PAGES)], [])
    small_host.create_vm(mte_config(boot_memory_bytes=MiB))
    before = snapshot(small_host)
    with pytest.raises(ResourceExhaustedError) as info:
        small_host.guest_fault("mte", BOOT_RAM_GPA, PAGE, Access.TAG)
    assert "taggable_memory" == info.value.resource
    assert_unchanged(small_host, before)
    assert 0 == small_host.get_vm("mte").mapped_bytes


def test_failed_block_is_given_up_for_other_pages(make_host: Callable[..., Host]) -> None:
    """Naive placement: a page whose lent block cannot be evacuated is replaced by a page in a
    reserved block, and the fault is replayed."""
    host = make_host(placement=Placement.NAIVE)
    # Block 0: data page 0 free, tag pages free. Block 1: data page 64 free, tag pages lent to
    # 'plain'. Block 2: data page 128 free, reserved by MTE VM 'm1' (page 129).
    host.create_vm(mte_config("m1", boot_memory_bytes=MiB))
    host.create_vm(
        VmConfig(
            "plain",
            False,
            boot_memory_bytes=SMALL_UNTAGGED_PAGES * PAGE,
            dimm_slots=8,
            max_memory_bytes=SMALL_UNTAGGED_PAGES * PAGE + 256 * MiB,
        )
    )
    host.guest_fault("plain", BOOT_RAM_GPA, SMALL_UNTAGGED_PAGES * PAGE, Access.WRITE)

    def dimm(name: str, nr: int) -> None:
        gpa = host.add_dimm("plain", name, nr * PAGE).gpa
        host.guest_fault("plain", gpa, nr * PAGE, Access.WRITE)

    for name, nr in [("a", 1), ("b", 63), ("c", 1), ("d", 63), ("e", 1)]:
        dimm(name, nr)
    host.guest_fault("m1", BOOT_RAM_GPA, PAGE, Access.WRITE)
    assert [data_page(host, 129)] == pages_of(host, "m1", BOOT_RAM_GPA, 1).tolist()
    dimm("f", SMALL_DATA_PAGES - 130)
    dimm("g1", 2)
    dimm("g2", SMALL_TAG_PAGES - 4)
    for name in ("a", "c", "e", "g1"):
        host.remove_memory_device("plain", name)
    assert_sound(host)
    fl = host.mem.flags
    assert [TG_FREE] * 3 == fl[[data_page(host, i) for i in (0, 64, 128)]].tolist()
    assert [TS_FREE, TS_FREE, TS_LENT, TS_LENT, TS_RESERVED] == fl[
        [tag_page(host, i) for i in range(5)]
    ].tolist()

    host.create_vm(mte_config("m2", boot_memory_bytes=MiB))
    result = host.guest_fault("m2", BOOT_RAM_GPA, 2 * PAGE, Access.WRITE)
    assert_sound(host)
    assert (
        FaultResult(newly_mapped_pages=2, tag_blocks_reserved=1, pages_migrated=1, replays=1)
        == result
    )
    assert [data_page(host, 0), data_page(host, 128)] == sorted(
        pages_of(host, "m2", BOOT_RAM_GPA, 2).tolist()
    )
    assert TG_FREE == host.mem.flags[data_page(host, 64)]
    assert {"tag0": 1} == host.counters.tag_block_reserve_failures
    assert {"reserve_failed": 1} == host.counters.page_migrations
    assert 1 == host.counters.fault_replays


def test_free_block_is_reserved_even_when_an_earlier_block_fails(
    make_host: Callable[..., Host],
) -> None:
    """A free tag block is reserved without migration even when a lent block reserved in the same
    batch cannot be evacuated (the fast path does not depend on other blocks)."""
    host = make_host(placement=Placement.NAIVE)
    # Block 0: data page 0 free, its tag pages lent (unevacuable). Block 1: data pages 64 and
    # 65 free, tag pages free. Nothing else free.
    lay_out(
        host,
        [
            ("a", 1),
            ("b", 63),
            ("c", 2),
            ("d", SMALL_DATA_PAGES - 66),
            ("g1", 2),
            ("g2", 2),
            ("g3", SMALL_TAG_PAGES - 4),
        ],
        ["a", "c", "g2"],
    )
    host.create_vm(mte_config("m2", boot_memory_bytes=MiB))
    result = host.guest_fault("m2", BOOT_RAM_GPA, 2 * PAGE, Access.WRITE)
    assert_sound(host)
    assert (1, 1) == (result.tag_blocks_reserved, result.replays)
    assert [data_page(host, 64), data_page(host, 65)] == sorted(
        pages_of(host, "m2", BOOT_RAM_GPA, 2).tolist()
    )
