"""Pinned guests (VFIO), memory given back without unplug (free page reporting, balloon) and
ON_TAG_ACCESS guests on memory that cannot hold tags (FEAT_MTE_PERM NoTagAccess)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from hostd.model import (
    BOOT_RAM_GPA,
    Access,
    DiscardResult,
    FailedPreconditionError,
    Host,
    InvalidArgumentError,
    MiB,
    Placement,
    ResourceExhaustedError,
    TagCopyDirection,
    TagPolicy,
    VirtioMemConfig,
    VirtioMemRequestType,
    VirtioMemResponse,
    VmConfig,
)
from hostd.model.physmem import KIND_TAG_STORAGE, TG_TAGGED, TS_LENT, UT_DATA

from .conftest import (
    DEVICE_GPA,
    SMALL_DATA_PAGES,
    SMALL_UNTAGGED_PAGES,
    assert_sound,
    assert_unchanged,
    fill,
    flags_of,
    lay_out,
    mte_config,
    pages_of,
    snapshot,
)

PAGE = 4096
TAGS_PER_PAGE = PAGE // 16


# ----------------------------------------------------------------- pinned guests


def test_pinned_vm_is_backed_at_creation_and_never_in_tag_storage(small_host: Host) -> None:
    """A VFIO device pins all guest memory when it maps it, and the kernel migrates long-term
    pinned pages out of CMA first: a pinned VM's boot RAM is backed at creation, never in lent
    tag storage. When only tag storage is free, creating it is refused (nothing changed) where
    an unpinned VM would simply be lent tag storage."""
    fill(small_host, "hog", SMALL_UNTAGGED_PAGES + SMALL_DATA_PAGES)
    before = snapshot(small_host)
    with pytest.raises(ResourceExhaustedError) as info:
        small_host.create_vm(VmConfig("pin", False, boot_memory_bytes=MiB, pinned=True))
    assert "MEMORY_EXHAUSTED" == info.value.reason
    assert_unchanged(small_host, before)
    small_host.destroy_vm("hog")
    fill(small_host, "hog", SMALL_UNTAGGED_PAGES)
    status = small_host.create_vm(VmConfig("pin", False, boot_memory_bytes=MiB, pinned=True))
    assert (True, MiB) == (status.pinned, status.mapped_bytes)
    kinds = small_host.mem.flags[pages_of(small_host, "pin", BOOT_RAM_GPA, MiB // PAGE)] >> 2
    assert not (kinds == KIND_TAG_STORAGE).any()
    assert_sound(small_host)


def test_pinned_mte_vm_is_backed_tagged_at_creation(host: Host) -> None:
    """A pinned ON_FAULT MTE guest's memory is backed, tagged and reserved when it is pinned, so
    no later fault has to allocate or migrate anything."""
    status = host.create_vm(mte_config("pin", pinned=True))
    assert (256 * MiB, 256 * MiB) == (status.mapped_bytes, status.tagged_bytes)
    assert 0 == host.guest_fault("pin", BOOT_RAM_GPA, MiB, Access.TAG).newly_mapped_pages
    assert_sound(host)


def test_pinned_vm_with_on_tag_access_is_refused(host: Host) -> None:
    """ON_TAG_ACCESS may have to move a page when the guest first touches its tags, which a
    pinned page cannot: the combination is refused (POLICY_NOT_SUPPORTED)."""
    with pytest.raises(FailedPreconditionError) as info:
        host.create_vm(mte_config("pin", TagPolicy.ON_TAG_ACCESS, pinned=True))
    assert "POLICY_NOT_SUPPORTED" == info.value.reason
    assert [] == host.list_vms()


def test_pinned_vm_plug_backs_its_blocks_or_is_busy(small_host: Host) -> None:
    """VFIO maps (so pins) plugged virtio-mem blocks when they are plugged (QEMU's
    RamDiscardManager): a PLUG on a pinned VM backs its blocks, and is BUSY when it cannot."""
    small_host.create_vm(mte_config("pin", boot_memory_bytes=PAGE, pinned=True))
    small_host.add_virtio_mem("pin", "vmem0", VirtioMemConfig(128 * MiB, 2 * MiB, 128 * MiB))
    ask = small_host.virtio_mem_request
    answer = ask("pin", "vmem0", VirtioMemRequestType.PLUG, DEVICE_GPA, 4)
    assert VirtioMemResponse.ACK == answer.response
    assert 8 * MiB == small_host.get_vm("pin").regions[1].tagged_bytes
    fill(small_host, "hog", SMALL_DATA_PAGES - 8 * MiB // PAGE - 1, mte=True)
    before = snapshot(small_host)
    answer = ask("pin", "vmem0", VirtioMemRequestType.PLUG, DEVICE_GPA + 8 * MiB, 4)
    assert VirtioMemResponse.BUSY == answer.response
    assert_unchanged(small_host, before)


def test_pinned_memory_cannot_be_discarded(host: Host) -> None:
    """QEMU inhibits the balloon and free page reporting while VFIO pins guest memory: a discard
    on a pinned VM is FailedPrecondition VM_PINNED and changes nothing."""
    host.create_vm(VmConfig("pin", False, boot_memory_bytes=16 * MiB, pinned=True))
    before = snapshot(host)
    with pytest.raises(FailedPreconditionError) as info:
        host.discard_guest_memory("pin", BOOT_RAM_GPA, MiB)
    assert "VM_PINNED" == info.value.reason
    assert_unchanged(host, before)


def test_evacuation_works_around_pinned_pages(make_host: Callable[..., Host]) -> None:
    """A block whose lent pages are pinned cannot be reserved (alloc_contig_range() fails with
    -EBUSY: a pinned page does not migrate); the allocation gives that page up, tries another
    block (RESERVE_TRIES) and the pinned pages stay where they are. Pinned here stands for any
    pin taken while pages sit in lent tag storage (a short-term pin, I/O in flight)."""
    host = make_host(Placement.NAIVE)
    lay_out(
        host, [("span0", 64), ("mid", 256), ("span5", 64), ("rest", SMALL_DATA_PAGES - 384)], []
    )
    host.create_vm(VmConfig("lend", False, boot_memory_bytes=MiB))
    host.guest_fault("lend", BOOT_RAM_GPA, 2 * PAGE, Access.WRITE)
    lent = pages_of(host, "lend", BOOT_RAM_GPA, 2)
    assert [TS_LENT, TS_LENT] == host.mem.flags[lent].tolist()
    host.remove_memory_device("plain", "span0")
    host.remove_memory_device("plain", "span5")
    host.mem.pinned_owner[host.vms["lend"].slot] = True
    host.create_vm(mte_config("m", boot_memory_bytes=MiB))
    result = host.guest_fault("m", BOOT_RAM_GPA, PAGE, Access.WRITE)
    assert (1, 1) == (result.tag_blocks_reserved, result.replays)
    assert {"tag0": 1} == host.counters.tag_block_reserve_failures
    assert lent.tolist() == pages_of(host, "lend", BOOT_RAM_GPA, 2).tolist()
    block = host.mem.regions[0].block_of_data(pages_of(host, "m", BOOT_RAM_GPA, 1))
    assert [5] == block.tolist()
    assert_sound(host)


# ----------------------------------------------------------------- memory given back


def test_discard_frees_pages_and_tags_and_the_block_with_its_last_tagged_page(
    small_host: Host,
) -> None:
    """Discarding (MADV_DONTNEED after free page reporting / balloon inflation) frees the host
    pages and their tags; a tag block is released with its last tagged page; a later access
    maps fresh zeroed memory."""
    host = small_host
    host.create_vm(mte_config("m", boot_memory_bytes=MiB))
    host.guest_fault("m", BOOT_RAM_GPA, 64 * PAGE, Access.WRITE)  # one tag block's span
    tags = bytes(np.full(64 * TAGS_PER_PAGE, 7, np.uint8))
    host.copy_tags("m", BOOT_RAM_GPA, 64 * PAGE, TagCopyDirection.TO_GUEST, tags)
    half = host.discard_guest_memory("m", BOOT_RAM_GPA, 32 * PAGE)
    assert DiscardResult(32 * PAGE, 32 * PAGE, 0) == half
    assert 1 == host.status().tag_blocks_reserved
    rest = host.discard_guest_memory("m", BOOT_RAM_GPA, 64 * PAGE)
    assert DiscardResult(32 * PAGE, 32 * PAGE, 1) == rest
    assert (0, 0) == (host.status().tag_blocks_reserved, len(host.mem.tags))
    vm = host.get_vm("m")
    assert (0, 64 * PAGE) == (vm.mapped_bytes, vm.discarded_bytes)
    host.guest_fault("m", BOOT_RAM_GPA, PAGE, Access.WRITE)
    assert bytes(TAGS_PER_PAGE) == host.copy_tags(
        "m", BOOT_RAM_GPA, PAGE, TagCopyDirection.FROM_GUEST
    )
    assert {"tagged": 64 * PAGE} == host.counters.discarded_bytes
    assert_sound(host)


def test_discard_of_memory_never_backed_gives_back_nothing(host: Host, mte_vm: str) -> None:
    """Discarding pages that were never faulted in frees nothing and reports zero."""
    assert DiscardResult() == host.discard_guest_memory(mte_vm, BOOT_RAM_GPA, MiB)
    assert_sound(host)


def test_discard_of_an_eager_vm_keeps_the_host_sound_and_refaults(host: Host) -> None:
    """EAGER preallocates, but the guest may still give memory back; the memory is faulted in
    again (tagged) when the guest touches it."""
    host.create_vm(mte_config("e", TagPolicy.EAGER))
    host.discard_guest_memory("e", BOOT_RAM_GPA, 4 * MiB)
    assert_sound(host)
    assert (
        4 * MiB // PAGE
        == host.guest_fault("e", BOOT_RAM_GPA, 4 * MiB, Access.READ).newly_mapped_pages
    )
    assert (flags_of(host, "e", BOOT_RAM_GPA, 4 * MiB // PAGE) == TG_TAGGED).all()
    assert_sound(host)


@pytest.mark.parametrize(
    ("gpa", "length", "error", "reason"),
    [
        (BOOT_RAM_GPA + 1, PAGE, InvalidArgumentError, "INVALID_ARGUMENT"),
        (BOOT_RAM_GPA, PAGE + 1, InvalidArgumentError, "INVALID_ARGUMENT"),
        (BOOT_RAM_GPA, 0, InvalidArgumentError, "INVALID_ARGUMENT"),
        (DEVICE_GPA, PAGE, FailedPreconditionError, "GPA_NOT_PLUGGED"),
    ],
)
def test_bad_discard_is_refused_and_changes_nothing(
    host: Host, mte_vm: str, gpa: int, length: int, error: type[Exception], reason: str
) -> None:
    """Whole pages of plugged memory only; anything else is refused, naming the field."""
    host.guest_fault(mte_vm, BOOT_RAM_GPA, MiB, Access.WRITE)
    before = snapshot(host)
    with pytest.raises(error) as info:
        host.discard_guest_memory(mte_vm, gpa, length)
    assert reason == info.value.reason  # type: ignore[attr-defined]
    assert_unchanged(host, before)


# ----------------------------------------------------------------- NoTagAccess on untaggable RAM


def test_on_tag_access_data_lives_on_untaggable_memory_until_tags_are_touched(
    small_host: Host,
) -> None:
    """FEAT_MTE_PERM lets memory that cannot hold tags (CXL, arm,no-mte) be mapped NoTagAccess
    into an MTE guest: with taggable memory full, an ON_TAG_ACCESS data fault maps untaggable
    memory; the first tag access then needs taggable memory (refused, nothing changed, while
    there is none) and moves the page there when there is."""
    host = small_host
    fill(host, "hog", SMALL_DATA_PAGES, mte=True)
    host.create_vm(mte_config("ota", TagPolicy.ON_TAG_ACCESS, boot_memory_bytes=MiB))
    host.guest_fault("ota", BOOT_RAM_GPA, 16 * PAGE, Access.READ)
    assert (flags_of(host, "ota", BOOT_RAM_GPA, 16) == UT_DATA).all()
    assert_sound(host)
    before = snapshot(host)
    with pytest.raises(ResourceExhaustedError):
        host.guest_fault("ota", BOOT_RAM_GPA, PAGE, Access.TAG)
    assert_unchanged(host, before)
    host.destroy_vm("hog")
    result = host.guest_fault("ota", BOOT_RAM_GPA, PAGE, Access.TAG)
    assert 1 == result.pages_migrated
    assert [TG_TAGGED] == flags_of(host, "ota", BOOT_RAM_GPA, 1).tolist()
    assert {"tag_access": 1} == host.counters.page_migrations
    assert_sound(host)


def test_new_invariants_catch_a_broken_state(host: Host) -> None:
    """The checks added for pinned VMs, allocator pools and huge folios are not vacuous: each
    reports a state that breaks it."""
    host.create_vm(VmConfig("pin", False, boot_memory_bytes=4 * MiB, pinned=True))
    host.create_vm(mte_config("thp", backing_page_size_bytes=2 * MiB))
    host.guest_fault("thp", BOOT_RAM_GPA, PAGE, Access.WRITE)
    assert_sound(host)
    pin, thp = host.vms["pin"], host.vms["thp"]
    thp.huge[1] = True  # a folio that is not mapped
    assert any("huge folios not mapped whole" in v for v in host.check_invariants())
    thp.huge[1] = False
    host.mem.owner_pool[pin.slot] = 0
    assert any("allocator pool" in v for v in host.check_invariants())
    host.mem.owner_pool[pin.slot] = 3
    host.mem.pinned_owner[pin.slot] = False
    assert any("not marked pinned" in v for v in host.check_invariants())
