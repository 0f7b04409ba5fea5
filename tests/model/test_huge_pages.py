"""Huge pages: each VM's backing page size (host pages, THP, hugetlbfs). A fault maps, and for
an MTE guest reserves tag storage for, a whole folio, as the series reserves by folio_order; a
folio is physically contiguous and aligned, so its tag storage is a contiguous run of blocks."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from hostd.model import (
    BOOT_RAM_GPA,
    Access,
    GiB,
    Host,
    InvalidArgumentError,
    MiB,
    Placement,
    ResourceExhaustedError,
    TagPolicy,
    VirtioMemConfig,
    VmConfig,
    default_topology,
)
from hostd.model.physmem import TG_TAGGED

from .conftest import (
    SMALL_DATA_PAGES,
    SMALL_UNTAGGED_PAGES,
    assert_sound,
    assert_unchanged,
    fill,
    mte_config,
    pages_of,
    snapshot,
)

PAGE = 4096
THP = 2 * MiB
THP_PAGES = THP // PAGE


def test_thp_fault_maps_and_reserves_the_whole_aligned_folio(host: Host) -> None:
    """A 4 KiB fault of a THP-backed MTE guest maps the whole 2 MiB folio: 512 contiguous host
    pages aligned to 512 pfns, all tagged, with 64 KiB of tag storage (a contiguous run of 8
    blocks of 8 KiB) reserved: v3 reserves by folio_order."""
    host.create_vm(mte_config("thp", backing_page_size_bytes=THP))
    result = host.guest_fault("thp", BOOT_RAM_GPA + 5 * PAGE, PAGE, Access.WRITE)
    assert (THP_PAGES, 8) == (result.newly_mapped_pages, result.tag_blocks_reserved)
    pages = pages_of(host, "thp", BOOT_RAM_GPA, THP_PAGES)
    assert (np.diff(pages) == 1).all()
    assert 0 == int(host.mem.pfn_of(pages[:1])[0]) % THP_PAGES
    assert (host.mem.flags[pages] == TG_TAGGED).all()
    assert 64 * 1024 == 8 * host.status().regions[0].block_size_bytes
    vm = host.get_vm("thp")
    assert (THP, THP, THP) == (vm.backing_page_size_bytes, vm.huge_page_bytes, vm.mapped_bytes)
    assert_sound(host)


def test_thp_falls_back_to_small_pages_when_no_aligned_folio_is_free(small_host: Host) -> None:
    """Fragmentation can leave no free aligned 2 MiB run where small pages are still free: a THP
    fault then falls back to small pages (the kernel does), and none of it is huge."""
    host = small_host
    # Fill the host with small pages, then give back all but one page of every 2 MiB.
    total = SMALL_UNTAGGED_PAGES + SMALL_DATA_PAGES + 512
    fill(host, "frag", total)
    for i in range(0, total, THP_PAGES):
        host.discard_guest_memory("frag", BOOT_RAM_GPA + (i + 1) * PAGE, (THP_PAGES - 1) * PAGE)
    host.create_vm(VmConfig("thp", False, boot_memory_bytes=64 * MiB, backing_page_size_bytes=THP))
    result = host.guest_fault("thp", BOOT_RAM_GPA, PAGE, Access.WRITE)
    assert 1 == result.newly_mapped_pages
    assert 0 == host.get_vm("thp").huge_page_bytes
    assert 1 <= host.counters.huge_folios.get("fallback", 0)
    assert_sound(host)


def test_hugetlb_fault_without_a_free_huge_page_is_refused() -> None:
    """hugetlbfs has no fallback: with no free 1 GiB folio, the fault fails (the VMM would get
    SIGBUS) and nothing changes."""
    host = Host(default_topology(4 * GiB))
    host.create_vm(VmConfig("h", False, boot_memory_bytes=GiB, backing_page_size_bytes=GiB))
    fill(host, "hog", 3 * GiB // PAGE)  # leaves 0.9 GiB free, no aligned 1 GiB run
    before = snapshot(host)
    with pytest.raises(ResourceExhaustedError):
        host.guest_fault("h", BOOT_RAM_GPA, PAGE, Access.WRITE)
    assert_unchanged(host, before)


def test_hugetlb_fault_maps_a_gigantic_folio(host: Host) -> None:
    """A 1 GiB hugetlb VM's first fault maps one 1 GiB folio."""
    host.create_vm(VmConfig("h", False, boot_memory_bytes=GiB, backing_page_size_bytes=GiB))
    assert GiB // PAGE == host.guest_fault("h", BOOT_RAM_GPA, PAGE, Access.READ).newly_mapped_pages
    assert GiB == host.get_vm("h").huge_page_bytes
    assert_sound(host)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (
            VmConfig("x", False, boot_memory_bytes=GiB, backing_page_size_bytes=64 * 1024),
            "backing_page_size",
        ),
        (
            VmConfig("x", False, boot_memory_bytes=GiB, backing_page_size_bytes=4 * MiB),
            "backing_page_size",
        ),
        (
            VmConfig("x", False, boot_memory_bytes=GiB + THP, backing_page_size_bytes=GiB),
            "boot_memory_bytes",
        ),
    ],
)
def test_bad_backing_page_size_is_refused_naming_the_field(
    host: Host, config: VmConfig, field: str
) -> None:
    """Only the host page size, the THP size and the hugetlb size exist; a hugetlb VM's boot RAM
    is a multiple of its page size (QEMU's memory backend rule)."""
    with pytest.raises(InvalidArgumentError) as info:
        host.create_vm(config)
    assert field == info.value.field
    assert [] == host.list_vms()


def test_hugetlb_virtio_mem_block_must_hold_whole_huge_pages(host: Host) -> None:
    """QEMU: a virtio-mem block is at least the backend's page size."""
    host.create_vm(
        VmConfig(
            "h", False, boot_memory_bytes=GiB, max_memory_bytes=4 * GiB, backing_page_size_bytes=GiB
        )
    )
    with pytest.raises(InvalidArgumentError) as info:
        host.add_virtio_mem("h", "vmem0", VirtioMemConfig(2 * GiB, THP))
    assert "block_size" == info.value.field


def test_discard_of_part_of_a_thp_splits_it(host: Host) -> None:
    """Giving back one page of a THP frees that page (the folio is split); the rest stays
    mapped, no longer huge."""
    host.create_vm(mte_config("thp", backing_page_size_bytes=THP))
    host.guest_fault("thp", BOOT_RAM_GPA, PAGE, Access.WRITE)
    host.discard_guest_memory("thp", BOOT_RAM_GPA, PAGE)
    vm = host.get_vm("thp")
    assert (THP - PAGE, 0) == (vm.mapped_bytes, vm.huge_page_bytes)
    assert_sound(host)


def test_eager_thp_vm_is_preallocated_in_folios(host: Host) -> None:
    """EAGER (prealloc) backs boot RAM in whole folios too."""
    status = host.create_vm(mte_config("e", TagPolicy.EAGER, backing_page_size_bytes=THP))
    assert (256 * MiB, 256 * MiB) == (status.mapped_bytes, status.huge_page_bytes)
    assert_sound(host)


def test_on_tag_access_thp_data_fault_maps_an_untagged_folio(small_host: Host) -> None:
    """An ON_TAG_ACCESS guest's data fault maps a whole untagged folio; its first tag access
    tags the whole folio in place (tag storage is reserved per folio)."""
    host = small_host
    host.create_vm(
        mte_config(
            "ota", TagPolicy.ON_TAG_ACCESS, boot_memory_bytes=8 * MiB, backing_page_size_bytes=THP
        )
    )
    host.guest_fault("ota", BOOT_RAM_GPA, PAGE, Access.READ)
    assert THP == host.get_vm("ota").huge_page_bytes
    host.guest_fault("ota", BOOT_RAM_GPA, PAGE, Access.TAG)
    assert (THP, THP) == (host.get_vm("ota").tagged_bytes, host.get_vm("ota").huge_page_bytes)
    assert_sound(host)


def test_restore_keeps_huge_folios_pinned_vms_and_discarded_bytes(host: Host) -> None:
    """save_state / restore keep which folios are huge, the pinned flag and what was given
    back, and the restored host is sound."""
    host.create_vm(mte_config("thp", backing_page_size_bytes=THP))
    host.create_vm(VmConfig("pin", False, boot_memory_bytes=16 * MiB, pinned=True))
    host.guest_fault("thp", BOOT_RAM_GPA, 8 * MiB, Access.WRITE)
    host.discard_guest_memory("thp", BOOT_RAM_GPA, PAGE)
    restored = Host.restore(host.save_state())
    assert host.list_vms() == restored.list_vms()
    assert (6 * MiB, PAGE) == (
        restored.get_vm("thp").huge_page_bytes,
        restored.get_vm("thp").discarded_bytes,
    )
    assert_sound(restored)


@pytest.mark.parametrize(
    ("placement", "evacuated"), [("TAG_BLOCK_AWARE", {}), ("NAIVE", {"tag0": 2})]
)
def test_tag_block_aware_placement_takes_folios_whose_blocks_are_not_lent(
    make_host: Callable[..., Host], placement: str, evacuated: dict[str, int]
) -> None:
    """A tagged huge folio reserves all of its tag blocks; tag-block-aware placement prefers a
    folio whose blocks hold no lent data (the series' fast path, no migration), where first fit
    takes the first folio and evacuates the lent pages in its blocks."""
    host = make_host(Placement[placement])
    fill(host, "plain", SMALL_UNTAGGED_PAGES + SMALL_DATA_PAGES)
    host.create_vm(VmConfig("lend", False, boot_memory_bytes=MiB))
    host.guest_fault("lend", BOOT_RAM_GPA, 2 * PAGE, Access.WRITE)  # lent: block 0's tag pages
    host.destroy_vm("plain")
    host.create_vm(mte_config("thp", boot_memory_bytes=8 * MiB, backing_page_size_bytes=THP))
    assert THP_PAGES == host.guest_fault("thp", BOOT_RAM_GPA, PAGE, Access.WRITE).newly_mapped_pages
    assert evacuated == host.counters.evacuated_pages
    assert_sound(host)
