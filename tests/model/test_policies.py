"""Tag policies (docs/domain.md, "KVM and guests"): ON_FAULT, EAGER, ON_TAG_ACCESS, non-MTE
VMs, fault argument rules, the static carve-out and tag-block-aware vs naive placement."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from hostd.model import (
    BOOT_RAM_GPA,
    Access,
    FailedPreconditionError,
    FaultResult,
    GiB,
    Host,
    InvalidArgumentError,
    KiB,
    MiB,
    NotFoundError,
    Placement,
    ResourceExhaustedError,
    TagPolicy,
    TagStorageMode,
    VirtioMemConfig,
    VirtioMemRequestType,
    VirtioMemResponse,
    VmConfig,
    default_topology,
)
from hostd.model.physmem import TG_DATA, TG_TAGGED, TS_LENT, UT_DATA

from .conftest import (
    DEVICE_GPA,
    SMALL_DATA_PAGES,
    SMALL_TAG_PAGES,
    SMALL_UNTAGGED_PAGES,
    VMEM,
    VMEM_BLOCK,
    assert_sound,
    assert_unchanged,
    fill,
    flags_of,
    mte_config,
    pages_of,
    snapshot,
)

PAGE = 4 * KiB


def fault(host: Host, vm_id: str, gpa: int, nr_pages: int, access: Access) -> FaultResult:
    result = host.guest_fault(vm_id, gpa, nr_pages * host.page_size, access)
    assert_sound(host)
    return result


def region_usage(host: Host, name: str):
    return next(r for r in host.status().regions if r.name == name).usage


# ----------------------------------------------------------------- ON_FAULT


def test_on_fault_maps_tagged_pages_and_reserves_blocks(host: Host, mte_vm: str) -> None:
    """An ON_FAULT fault maps tagged pages and reserves their tag blocks."""
    result = fault(host, mte_vm, BOOT_RAM_GPA, 100, Access.WRITE)
    assert FaultResult(newly_mapped_pages=100, tag_blocks_reserved=2) == result
    vm = host.get_vm(mte_vm)
    assert (100 * PAGE, 100 * PAGE) == (vm.mapped_bytes, vm.tagged_bytes)
    assert (flags_of(host, mte_vm, BOOT_RAM_GPA, 100) == TG_TAGGED).all()
    assert 2 == host.status().tag_blocks_reserved


def test_on_fault_refault_maps_nothing_new(host: Host, mte_vm: str) -> None:
    """Faulting mapped pages again maps nothing and is counted as 'present'."""
    fault(host, mte_vm, BOOT_RAM_GPA, 10, Access.READ)
    before = pages_of(host, mte_vm, BOOT_RAM_GPA, 10)
    assert FaultResult() == fault(host, mte_vm, BOOT_RAM_GPA, 10, Access.WRITE)
    assert before.tolist() == pages_of(host, mte_vm, BOOT_RAM_GPA, 10).tolist()
    assert {("READ", "mapped"): 1, ("WRITE", "present"): 1} == host.counters.faults


def test_on_fault_tag_access_on_mapped_page_changes_nothing(host: Host, mte_vm: str) -> None:
    """For ON_FAULT pages are tagged from the start: a TAG access maps nothing new."""
    fault(host, mte_vm, BOOT_RAM_GPA, 10, Access.READ)
    assert FaultResult() == fault(host, mte_vm, BOOT_RAM_GPA, 10, Access.TAG)


def test_on_fault_fills_reserved_blocks_before_new_ones(host: Host, mte_vm: str) -> None:
    """Two small faults share one tag block (32 * block_pages = 64 data pages)."""
    assert 1 == fault(host, mte_vm, BOOT_RAM_GPA, 10, Access.WRITE).tag_blocks_reserved
    assert 0 == fault(host, mte_vm, BOOT_RAM_GPA + GiB // 8, 54, Access.WRITE).tag_blocks_reserved
    assert 1 == fault(host, mte_vm, BOOT_RAM_GPA + GiB // 16, 1, Access.WRITE).tag_blocks_reserved


# ----------------------------------------------------------------- faults with nothing to do


def test_a_fault_on_mapped_pages_is_answered_and_counted_as_present(
    host: Host, mte_vm: str
) -> None:
    """guest_fault_if_present answers a fault on mapped pages as guest_fault would, counts it
    'present' and changes nothing."""
    fault(host, mte_vm, BOOT_RAM_GPA, 10, Access.READ)
    before = snapshot(host)
    assert FaultResult() == host.guest_fault_if_present(
        mte_vm, BOOT_RAM_GPA, 10 * PAGE, Access.WRITE
    )
    assert {("READ", "mapped"): 1, ("WRITE", "present"): 1} == host.counters.faults
    assert 1 == host.counters.fault_seconds["WRITE"].count
    assert_unchanged(host, before)


def test_a_fault_with_work_to_do_is_left_to_guest_fault(host: Host, mte_vm: str) -> None:
    """A range with an unmapped page, or a TAG access to untagged ON_TAG_ACCESS pages: None,
    nothing done or counted."""
    fault(host, mte_vm, BOOT_RAM_GPA, 10, Access.READ)
    host.create_vm(mte_config("ota", TagPolicy.ON_TAG_ACCESS, boot_memory_bytes=MiB))
    fault(host, "ota", BOOT_RAM_GPA, 1, Access.READ)
    counted = dict(host.counters.faults)
    before = snapshot(host)
    assert None is host.guest_fault_if_present(mte_vm, BOOT_RAM_GPA, 11 * PAGE, Access.WRITE)
    assert None is host.guest_fault_if_present("ota", BOOT_RAM_GPA, PAGE, Access.TAG)
    assert counted == host.counters.faults
    assert_unchanged(host, before)
    assert 1 == fault(host, mte_vm, BOOT_RAM_GPA, 11, Access.WRITE).newly_mapped_pages
    fault(host, "ota", BOOT_RAM_GPA, 1, Access.TAG)
    assert [TG_TAGGED] == flags_of(host, "ota", BOOT_RAM_GPA, 1).tolist()


@pytest.mark.parametrize(
    ("vm_id", "gpa", "length", "access", "error"),
    [
        ("nope", BOOT_RAM_GPA, PAGE, Access.READ, NotFoundError),
        ("mte", BOOT_RAM_GPA + 1, PAGE, Access.READ, InvalidArgumentError),
        ("mte", BOOT_RAM_GPA, 0, Access.READ, InvalidArgumentError),
        ("mte", BOOT_RAM_GPA, 2 * GiB, Access.READ, InvalidArgumentError),
        ("plain", BOOT_RAM_GPA, PAGE, Access.TAG, FailedPreconditionError),
    ],
)
def test_a_fault_that_would_be_refused_is_left_to_guest_fault(
    host: Host,
    mte_vm: str,
    vm_id: str,
    gpa: int,
    length: int,
    access: Access,
    error: type[Exception],
) -> None:
    """Arguments guest_fault refuses, even over mapped pages: None, nothing counted, and
    guest_fault gives the refusal."""
    host.create_vm(VmConfig("plain", False, boot_memory_bytes=256 * MiB))
    for vm in (mte_vm, "plain"):
        host.guest_fault(vm, BOOT_RAM_GPA, 256 * MiB, Access.WRITE)
    counted = dict(host.counters.faults)
    assert None is host.guest_fault_if_present(vm_id, gpa, length, access)
    assert counted == host.counters.faults
    with pytest.raises(error):
        host.guest_fault(vm_id, gpa, length, access)


# ----------------------------------------------------------------- EAGER


def test_eager_boot_ram_is_tagged_at_creation(host: Host) -> None:
    """An EAGER VM's boot RAM is mapped tagged when it is created."""
    status = host.create_vm(mte_config("eager", TagPolicy.EAGER))
    assert_sound(host)
    assert (256 * MiB, 256 * MiB) == (status.mapped_bytes, status.tagged_bytes)
    assert 256 * MiB // (64 * PAGE) == host.status().tag_blocks_reserved


def test_eager_dimm_and_plugged_blocks_are_tagged(host: Host) -> None:
    """An EAGER VM's DIMM is tagged when added, virtio-mem blocks when plugged."""
    host.create_vm(mte_config("eager", TagPolicy.EAGER))
    dimm = host.add_dimm("eager", "dimm0", 64 * MiB)
    assert (64 * MiB, 64 * MiB) == (dimm.mapped_bytes, dimm.tagged_bytes)
    dev = host.add_virtio_mem("eager", VMEM, VirtioMemConfig(GiB, VMEM_BLOCK, 4 * VMEM_BLOCK))
    answer = host.virtio_mem_request("eager", VMEM, VirtioMemRequestType.PLUG, dev.gpa, 4)
    assert VirtioMemResponse.ACK == answer.response
    assert_sound(host)
    vm = host.get_vm("eager")
    assert (256 + 64 + 8) * MiB == vm.tagged_bytes
    assert vm.mapped_bytes == vm.tagged_bytes


def test_eager_faults_map_nothing_new(host: Host) -> None:
    """Faults of an EAGER VM find everything mapped already."""
    host.create_vm(mte_config("eager", TagPolicy.EAGER))
    for access in Access:
        assert FaultResult() == fault(host, "eager", BOOT_RAM_GPA, 1024, access)


def test_eager_creation_that_cannot_be_backed_leaves_no_vm(host: Host) -> None:
    """EAGER creation beyond taggable memory is ResourceExhausted and leaves no VM."""
    before = snapshot(host)
    with pytest.raises(ResourceExhaustedError) as info:
        host.create_vm(
            mte_config("eager", TagPolicy.EAGER, boot_memory_bytes=3584 * MiB, max_memory_bytes=0)
        )
    assert "taggable_memory" == info.value.resource
    assert [] == host.list_vms()
    with pytest.raises(NotFoundError):
        host.get_vm("eager")
    assert_unchanged(host, before)
    assert 0 == host.status().vm_count
    # The id is free again.
    host.create_vm(mte_config("eager", TagPolicy.EAGER))
    assert_sound(host)


def test_eager_dimm_that_cannot_be_backed_is_not_added(small_host: Host) -> None:
    """An EAGER DIMM beyond taggable memory is ResourceExhausted and leaves no device."""
    small_host.create_vm(mte_config("eager", TagPolicy.EAGER, boot_memory_bytes=MiB))
    before = snapshot(small_host)
    with pytest.raises(ResourceExhaustedError):
        small_host.add_dimm("eager", "dimm0", 64 * MiB)
    assert ["boot-ram"] == [r.device_id for r in small_host.get_vm("eager").regions]
    assert_unchanged(small_host, before)


# ----------------------------------------------------------------- ON_TAG_ACCESS


@pytest.fixture
def ota_vm(host: Host) -> str:
    host.create_vm(mte_config("ota", TagPolicy.ON_TAG_ACCESS))
    return "ota"


@pytest.mark.parametrize("access", [Access.READ, Access.WRITE])
def test_on_tag_access_data_fault_maps_untagged(host: Host, ota_vm: str, access: Access) -> None:
    """READ / WRITE faults of an ON_TAG_ACCESS VM map untagged, MTE-capable pages."""
    result = fault(host, ota_vm, BOOT_RAM_GPA, 100, access)
    assert FaultResult(newly_mapped_pages=100) == result
    vm = host.get_vm(ota_vm)
    assert (100 * PAGE, 0) == (vm.mapped_bytes, vm.tagged_bytes)
    assert (flags_of(host, ota_vm, BOOT_RAM_GPA, 100) == TG_DATA).all()
    assert 0 == host.status().tag_blocks_reserved


def test_on_tag_access_tag_fault_tags_pages_in_place(host: Host, ota_vm: str) -> None:
    """The first TAG access tags mapped taggable pages where they are."""
    fault(host, ota_vm, BOOT_RAM_GPA, 100, Access.READ)
    pages = pages_of(host, ota_vm, BOOT_RAM_GPA, 100)
    result = fault(host, ota_vm, BOOT_RAM_GPA, 100, Access.TAG)
    assert FaultResult(tag_blocks_reserved=2) == result
    assert pages.tolist() == pages_of(host, ota_vm, BOOT_RAM_GPA, 100).tolist()
    assert (flags_of(host, ota_vm, BOOT_RAM_GPA, 100) == TG_TAGGED).all()
    assert 100 * PAGE == host.get_vm(ota_vm).tagged_bytes
    assert {} == host.counters.page_migrations


def test_on_tag_access_tag_fault_on_unmapped_pages_maps_tagged(host: Host, ota_vm: str) -> None:
    """A TAG fault on unmapped pages maps them tagged at once."""
    result = fault(host, ota_vm, BOOT_RAM_GPA, 64, Access.TAG)
    assert FaultResult(newly_mapped_pages=64, tag_blocks_reserved=1) == result
    assert 64 * PAGE == host.get_vm(ota_vm).tagged_bytes


@pytest.fixture
def ota_in_tag_storage(small_host: Host) -> Host:
    """An ON_TAG_ACCESS VM whose first 64 pages were READ-faulted while taggable memory was
    full (so they live in lent tag storage); the hog that filled memory is gone again."""
    small_host.create_vm(mte_config("ota", TagPolicy.ON_TAG_ACCESS, boot_memory_bytes=MiB))
    fill(small_host, "hog", SMALL_UNTAGGED_PAGES + SMALL_DATA_PAGES)
    fault(small_host, "ota", BOOT_RAM_GPA, 64, Access.READ)
    assert (flags_of(small_host, "ota", BOOT_RAM_GPA, 64) == TS_LENT).all()
    small_host.destroy_vm("hog")
    assert_sound(small_host)
    return small_host


def test_on_tag_access_migrates_pages_out_of_tag_storage(ota_in_tag_storage: Host) -> None:
    """A TAG access to pages living in tag storage migrates them to tagged memory, replayed."""
    host = ota_in_tag_storage
    old = pages_of(host, "ota", BOOT_RAM_GPA, 64)
    result = fault(host, "ota", BOOT_RAM_GPA, 64, Access.TAG)
    assert FaultResult(tag_blocks_reserved=1, pages_migrated=64, replays=64) == result
    new = pages_of(host, "ota", BOOT_RAM_GPA, 64)
    assert not np.isin(new, old).any()
    assert (host.mem.flags[new] == TG_TAGGED).all()
    assert {"tag_access": 64} == host.counters.page_migrations
    assert 64 == host.counters.fault_replays
    vm = host.get_vm("ota")
    assert (64 * PAGE, 64 * PAGE) == (vm.mapped_bytes, vm.tagged_bytes)
    assert 0 == host.status().usage.tag_lent_bytes


def test_on_tag_access_mixed_in_place_and_migrated(ota_in_tag_storage: Host) -> None:
    """In one TAG fault, taggable pages are tagged in place and tag storage pages move."""
    host = ota_in_tag_storage
    fault(host, "ota", BOOT_RAM_GPA + 64 * PAGE, 16, Access.READ)
    in_place = pages_of(host, "ota", BOOT_RAM_GPA + 64 * PAGE, 16)
    assert (host.mem.flags[in_place] == TG_DATA).all()
    result = fault(host, "ota", BOOT_RAM_GPA, 80, Access.TAG)
    assert (64, 64) == (result.pages_migrated, result.replays)
    assert in_place.tolist() == pages_of(host, "ota", BOOT_RAM_GPA + 64 * PAGE, 16).tolist()
    assert (flags_of(host, "ota", BOOT_RAM_GPA, 80) == TG_TAGGED).all()


def test_refused_on_tag_access_tag_fault_changes_nothing(small_host: Host) -> None:
    """A TAG fault refused for lack of taggable memory leaves every page as it was."""
    small_host.create_vm(mte_config("ota", TagPolicy.ON_TAG_ACCESS, boot_memory_bytes=MiB))
    fault(small_host, "ota", BOOT_RAM_GPA, 1, Access.READ)  # taggable page 0, in place
    fill(small_host, "hog", SMALL_UNTAGGED_PAGES + SMALL_DATA_PAGES - 1)
    fault(small_host, "ota", BOOT_RAM_GPA + PAGE, 1, Access.READ)  # lent tag storage
    assert [TG_DATA, TS_LENT] == flags_of(small_host, "ota", BOOT_RAM_GPA, 2).tolist()
    before = snapshot(small_host)
    with pytest.raises(ResourceExhaustedError):
        small_host.guest_fault("ota", BOOT_RAM_GPA, 2 * PAGE, Access.TAG)
    assert 0 == small_host.get_vm("ota").tagged_bytes
    assert_unchanged(small_host, before)


def test_on_tag_access_needs_mte_perm() -> None:
    """Without FEAT_MTE_PERM an MTE VM cannot use ON_TAG_ACCESS (POLICY_NOT_SUPPORTED)."""
    host = Host(default_topology(GiB, mte_perm=False))
    before = snapshot(host)
    with pytest.raises(FailedPreconditionError) as info:
        host.create_vm(mte_config("ota", TagPolicy.ON_TAG_ACCESS))
    assert "POLICY_NOT_SUPPORTED" == info.value.reason
    assert [] == host.list_vms()
    assert_unchanged(host, before)
    # A non-MTE VM's policy is ignored.
    host.create_vm(VmConfig("plain", False, TagPolicy.ON_TAG_ACCESS))
    assert_sound(host)


# ----------------------------------------------------------------- non-MTE VMs


def test_non_mte_vm_prefers_untaggable_then_taggable_then_lends_tag_storage(
    small_host: Host,
) -> None:
    """Untagged data fills untaggable memory, then taggable memory, then lent tag storage."""
    host = small_host
    total = SMALL_UNTAGGED_PAGES + SMALL_DATA_PAGES + SMALL_TAG_PAGES
    host.create_vm(VmConfig("plain", False, boot_memory_bytes=total * PAGE))
    fault(host, "plain", BOOT_RAM_GPA, SMALL_UNTAGGED_PAGES, Access.WRITE)
    assert SMALL_UNTAGGED_PAGES * PAGE == region_usage(host, "untagged0").data_bytes
    assert 0 == region_usage(host, "tag0").data_bytes
    fault(host, "plain", BOOT_RAM_GPA + SMALL_UNTAGGED_PAGES * PAGE, SMALL_DATA_PAGES, Access.READ)
    assert SMALL_DATA_PAGES * PAGE == region_usage(host, "tag0").data_bytes
    assert 0 == host.status().usage.tag_lent_bytes
    rest = BOOT_RAM_GPA + (SMALL_UNTAGGED_PAGES + SMALL_DATA_PAGES) * PAGE
    fault(host, "plain", rest, SMALL_TAG_PAGES, Access.WRITE)
    usage = host.status().usage
    assert (SMALL_TAG_PAGES * PAGE, 0, 0) == (
        usage.tag_lent_bytes,
        usage.tag_free_bytes,
        usage.free_bytes,
    )
    assert 0 == usage.tagged_bytes
    assert 0 == host.get_vm("plain").tagged_bytes


def test_non_mte_vm_beyond_all_memory_is_resource_exhausted(small_host: Host) -> None:
    """When nothing is free, an untagged fault is ResourceExhausted('memory'), nothing mapped."""
    fill(small_host, "hog", SMALL_UNTAGGED_PAGES + SMALL_DATA_PAGES + SMALL_TAG_PAGES - 1)
    small_host.create_vm(VmConfig("plain", False, boot_memory_bytes=MiB))
    before = snapshot(small_host)
    with pytest.raises(ResourceExhaustedError) as info:
        small_host.guest_fault("plain", BOOT_RAM_GPA, 2 * PAGE, Access.WRITE)
    assert "memory" == info.value.resource
    assert 0 == small_host.get_vm("plain").mapped_bytes
    assert_unchanged(small_host, before)


def test_mte_data_never_lands_on_untaggable_memory(small_host: Host) -> None:
    """An MTE VM's pages stay on MTE-capable RAM even when untaggable memory is free."""
    small_host.create_vm(mte_config("ota", TagPolicy.ON_TAG_ACCESS, boot_memory_bytes=MiB))
    fault(small_host, "ota", BOOT_RAM_GPA, 256, Access.READ)
    assert not (flags_of(small_host, "ota", BOOT_RAM_GPA, 256) == UT_DATA).any()
    assert 0 == region_usage(small_host, "untagged0").data_bytes


def test_tag_access_on_non_mte_vm_is_failed_precondition(host: Host) -> None:
    """A TAG fault on a non-MTE VM is FailedPrecondition VM_NOT_MTE and maps nothing."""
    host.create_vm(VmConfig("plain", False))
    before = snapshot(host)
    with pytest.raises(FailedPreconditionError) as info:
        host.guest_fault("plain", BOOT_RAM_GPA, PAGE, Access.TAG)
    assert "VM_NOT_MTE" == info.value.reason
    assert_unchanged(host, before)
    assert {("TAG", "error"): 1} == host.counters.faults


# ----------------------------------------------------------------- fault arguments


@pytest.mark.parametrize(
    "gpa",
    [
        BOOT_RAM_GPA - PAGE,  # below boot RAM
        BOOT_RAM_GPA + 256 * MiB,  # right after boot RAM
        DEVICE_GPA,  # device area with no device
        DEVICE_GPA + 2 * GiB,  # beyond the VM
    ],
)
def test_fault_outside_plugged_memory_is_failed_precondition(
    host: Host, mte_vm: str, gpa: int
) -> None:
    """A fault on guest memory that is not plugged is FailedPrecondition GPA_NOT_PLUGGED."""
    before = snapshot(host)
    with pytest.raises(FailedPreconditionError) as info:
        host.guest_fault(mte_vm, gpa, PAGE, Access.READ)
    assert "GPA_NOT_PLUGGED" == info.value.reason
    assert_unchanged(host, before)


def test_fault_straddling_end_of_boot_ram_maps_nothing(host: Host, mte_vm: str) -> None:
    """A range that runs past plugged memory is refused whole, naming the first bad gpa."""
    end = BOOT_RAM_GPA + 256 * MiB
    before = snapshot(host)
    with pytest.raises(FailedPreconditionError) as info:
        host.guest_fault(mte_vm, end - 4 * PAGE, 8 * PAGE, Access.WRITE)
    assert f"{end:#x}" == info.value.metadata["gpa"]
    assert 0 == host.get_vm(mte_vm).mapped_bytes
    assert_unchanged(host, before)


def test_fault_on_unplugged_virtio_mem_block_is_failed_precondition(
    host: Host, vm_with_virtio_mem: str
) -> None:
    """virtio-mem blocks that are not plugged cannot be faulted."""
    with pytest.raises(FailedPreconditionError) as info:
        host.guest_fault(vm_with_virtio_mem, DEVICE_GPA, PAGE, Access.READ)
    assert "GPA_NOT_PLUGGED" == info.value.reason


@pytest.mark.parametrize(
    ("gpa", "length", "field"),
    [
        (BOOT_RAM_GPA + 1, PAGE, "gpa"),
        (BOOT_RAM_GPA + 2048, PAGE, "gpa"),
        (-PAGE, PAGE, "gpa"),
        (BOOT_RAM_GPA, 0, "length"),
        (BOOT_RAM_GPA, -PAGE, "length"),
        (BOOT_RAM_GPA, PAGE + 16, "length"),
        (BOOT_RAM_GPA, GiB + PAGE, "length"),
    ],
)
def test_bad_fault_arguments_are_invalid_naming_the_field(
    host: Host, gpa: int, length: int, field: str
) -> None:
    """Misaligned, zero, negative and too-large (> 1 GiB) faults are InvalidArgument."""
    host.create_vm(mte_config(boot_memory_bytes=2 * GiB, max_memory_bytes=0))
    before = snapshot(host)
    with pytest.raises(InvalidArgumentError) as info:
        host.guest_fault("mte", gpa, length, Access.READ)
    assert field == info.value.field
    assert field in str(info.value)
    assert_unchanged(host, before)


def test_one_gib_fault_is_allowed(host: Host) -> None:
    """Exactly 1 GiB in one fault is fine."""
    host.create_vm(VmConfig("plain", False, boot_memory_bytes=GiB))
    assert (
        GiB // PAGE
        == fault(host, "plain", BOOT_RAM_GPA, GiB // PAGE, Access.READ).newly_mapped_pages
    )


def test_fault_on_unknown_vm_is_not_found(host: Host) -> None:
    """A fault on a VM that does not exist is NotFound."""
    with pytest.raises(NotFoundError):
        host.guest_fault("ghost", BOOT_RAM_GPA, PAGE, Access.READ)


# ----------------------------------------------------------------- static carve-out


def test_static_carve_out_reserves_all_tag_storage_at_boot(make_host: Callable[..., Host]) -> None:
    """In static mode every tag block is reserved at boot and none is free."""
    host = make_host(mode=TagStorageMode.STATIC)
    status = host.status()
    assert (SMALL_TAG_PAGES * PAGE, 0) == (
        status.usage.tag_reserved_bytes,
        status.usage.tag_free_bytes,
    )
    assert SMALL_TAG_PAGES // 2 == status.tag_blocks_reserved
    assert_sound(host)


def test_static_carve_out_never_lends_tag_storage(make_host: Callable[..., Host]) -> None:
    """Untagged data never goes to tag storage in static mode: memory runs out first."""
    host = make_host(mode=TagStorageMode.STATIC)
    fill(host, "hog", SMALL_UNTAGGED_PAGES + SMALL_DATA_PAGES)
    host.create_vm(VmConfig("plain", False, boot_memory_bytes=MiB))
    with pytest.raises(ResourceExhaustedError) as info:
        host.guest_fault("plain", BOOT_RAM_GPA, PAGE, Access.WRITE)
    assert "memory" == info.value.resource
    assert 0 == host.status().usage.tag_lent_bytes
    assert_sound(host)


def test_static_carve_out_faults_reserve_nothing(make_host: Callable[..., Host]) -> None:
    """MTE faults in static mode find their blocks reserved; destroying releases none."""
    host = make_host(mode=TagStorageMode.STATIC)
    host.create_vm(mte_config(boot_memory_bytes=MiB))
    assert FaultResult(newly_mapped_pages=200) == fault(
        host, "mte", BOOT_RAM_GPA, 200, Access.WRITE
    )
    assert 200 * PAGE == host.get_vm("mte").tagged_bytes
    host.destroy_vm("mte")
    assert_sound(host)
    assert SMALL_TAG_PAGES // 2 == host.status().tag_blocks_reserved
    assert {} == host.counters.tag_blocks_released


# ----------------------------------------------------------------- placement


def fragmented(host: Host) -> None:
    """MTE VM 'a' holds data pages 64..95: block 0 (pages 0..63) is free and unreserved,
    block 1 (pages 64..127) is reserved with 32 free pages."""
    host.create_vm(mte_config("a", dimm_slots=3, boot_memory_bytes=MiB))
    for i, nr in enumerate((64, 32, 32)):
        dimm = host.add_dimm("a", f"d{i}", nr * PAGE)
        fault(host, "a", dimm.gpa, nr, Access.WRITE)
    start = host.mem.regions[0].data.start
    assert list(range(start, start + 128)) == sorted(
        np.concatenate([pages_of(host, "a", DEVICE_GPA, 128)]).tolist()
    )
    host.remove_memory_device("a", "d0")
    host.remove_memory_device("a", "d2")
    assert_sound(host)
    assert 1 == host.status().tag_blocks_reserved


@pytest.mark.parametrize(
    ("placement", "new_blocks"), [(Placement.TAG_BLOCK_AWARE, 0), (Placement.NAIVE, 1)]
)
def test_block_aware_placement_reserves_fewer_blocks_after_fragmentation(
    make_host: Callable[..., Host], placement: Placement, new_blocks: int
) -> None:
    """Tag-block-aware placement fills a partly used reserved block; naive first fit reserves
    a new block for the same request."""
    host = make_host(placement=placement)
    fragmented(host)
    host.create_vm(mte_config("b", boot_memory_bytes=MiB))
    result = fault(host, "b", BOOT_RAM_GPA, 32, Access.WRITE)
    assert new_blocks == result.tag_blocks_reserved
    assert 1 + new_blocks == host.status().tag_blocks_reserved
    assert 1 == host.status().tag_blocks_min_needed
