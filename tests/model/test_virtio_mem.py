"""virtio-mem (docs/domain.md, "Memory hotplug"): every answer of the device, in QEMU's order,
plus the usable region, discarding on unplug and device removal."""

from __future__ import annotations

import numpy as np
import pytest

from hostd.model import (
    Access,
    FailedPreconditionError,
    Host,
    InvalidArgumentError,
    MemoryDeviceKind,
    MiB,
    NotFoundError,
    ResourceExhaustedError,
    TagCopyDirection,
    TagPolicy,
    VirtioMemBlockState,
    VirtioMemConfig,
    VirtioMemRequestType,
    VirtioMemResponse,
    VmConfig,
)

from .conftest import (
    DEVICE_GPA,
    SMALL_DATA_PAGES,
    SMALL_UNTAGGED_PAGES,
    VMEM,
    VMEM_BLOCK,
    VMEM_REGION,
    assert_sound,
    assert_unchanged,
    fill,
    mte_config,
    snapshot,
)

PLUG = VirtioMemRequestType.PLUG
UNPLUG = VirtioMemRequestType.UNPLUG
UNPLUG_ALL = VirtioMemRequestType.UNPLUG_ALL
STATE = VirtioMemRequestType.STATE
ACK = VirtioMemResponse.ACK
NACK = VirtioMemResponse.NACK
BUSY = VirtioMemResponse.BUSY
ERROR = VirtioMemResponse.ERROR


def request(host: Host, kind: VirtioMemRequestType, addr: int = 0, nb_blocks: int = 0):
    answer = host.virtio_mem_request("mte", VMEM, kind, addr, nb_blocks)
    assert_sound(host)
    return answer


def block(i: int) -> int:
    """Guest address of block ``i`` of ``vmem0``."""
    return DEVICE_GPA + i * VMEM_BLOCK


def device(host: Host, vm_id: str = "mte", device_id: str = VMEM):
    return next(r for r in host.get_vm(vm_id).regions if r.device_id == device_id)


@pytest.fixture
def requested(host: Host, vm_with_virtio_mem: str) -> str:
    """``vm_with_virtio_mem`` with 16 MiB (8 blocks) requested."""
    host.resize_virtio_mem(vm_with_virtio_mem, VMEM, 16 * MiB)
    return vm_with_virtio_mem


def test_new_device_has_nothing_plugged(host: Host, vm_with_virtio_mem: str) -> None:
    """A new device sits at the device area start with nothing plugged or usable."""
    d = device(host)
    assert (MemoryDeviceKind.VIRTIO_MEM, DEVICE_GPA, VMEM_REGION) == (d.kind, d.gpa, d.size_bytes)
    assert (0, 0, 0, VMEM_BLOCK) == (
        d.plugged_bytes,
        d.requested_size_bytes,
        d.usable_region_size_bytes,
        d.block_size_bytes,
    )


# ----------------------------------------------------------------- ERROR


@pytest.mark.parametrize("misalign", [4096, MiB, VMEM_BLOCK - 4096])
def test_misaligned_addr_is_error(host: Host, requested: str, misalign: int) -> None:
    """An address that is not block-aligned is answered ERROR."""
    for kind in (PLUG, UNPLUG, STATE):
        assert ERROR == request(host, kind, block(0) + misalign, 1).response
    assert 0 == device(host).plugged_bytes


def test_zero_blocks_is_error(host: Host, requested: str) -> None:
    """nb_blocks == 0 is answered ERROR for PLUG, UNPLUG and STATE."""
    for kind in (PLUG, UNPLUG, STATE):
        assert ERROR == request(host, kind, block(0), 0).response


def test_block_outside_usable_region_is_error(host: Host, requested: str) -> None:
    """Any block outside the usable region (16 MiB + 1 GiB) is answered ERROR."""
    usable = device(host).usable_region_size_bytes
    assert 1040 * MiB == usable
    last = usable // VMEM_BLOCK
    assert ERROR == request(host, PLUG, block(last), 1).response
    assert ERROR == request(host, PLUG, block(last - 1), 2).response
    assert ERROR == request(host, STATE, block(last - 1), 2).response
    assert ERROR == request(host, PLUG, DEVICE_GPA - VMEM_BLOCK, 1).response
    assert ERROR == request(host, PLUG, DEVICE_GPA + VMEM_REGION, 1).response
    assert ACK == request(host, STATE, block(last - 1), 1).response


def test_too_many_blocks_or_negative_addr_is_error(host: Host, requested: str) -> None:
    """nb_blocks beyond a le16 and a negative address are answered ERROR."""
    assert ERROR == request(host, PLUG, block(0), 0x10000).response
    assert ERROR == request(host, PLUG, -VMEM_BLOCK, 1).response


def test_plug_of_plugged_block_is_error(host: Host, requested: str) -> None:
    """PLUG of a block already plugged is answered ERROR (within the requested size)."""
    assert ACK == request(host, PLUG, block(1), 1).response
    assert ERROR == request(host, PLUG, block(0), 2).response
    assert ERROR == request(host, PLUG, block(1), 1).response
    assert VMEM_BLOCK == device(host).plugged_bytes


def test_unplug_of_unplugged_block_is_error(host: Host, requested: str) -> None:
    """UNPLUG of a block that is not plugged (even partly) is answered ERROR."""
    assert ERROR == request(host, UNPLUG, block(0), 1).response
    assert ACK == request(host, PLUG, block(0), 1).response
    assert ERROR == request(host, UNPLUG, block(0), 2).response
    assert VMEM_BLOCK == device(host).plugged_bytes


def test_nack_beyond_requested_is_checked_before_plugged_state(host: Host, requested: str) -> None:
    """QEMU order: a PLUG beyond requested_size is NACK even if its blocks are plugged."""
    assert ACK == request(host, PLUG, block(0), 8).response
    assert NACK == request(host, PLUG, block(0), 1).response


# ----------------------------------------------------------------- NACK / ACK


def test_plug_beyond_requested_size_is_nacked(host: Host, requested: str) -> None:
    """Plugging more than requested_size is answered NACK and plugs nothing."""
    assert NACK == request(host, PLUG, block(0), 9).response
    assert ACK == request(host, PLUG, block(0), 5).response
    assert NACK == request(host, PLUG, block(5), 4).response
    assert 5 * VMEM_BLOCK == device(host).plugged_bytes


def test_plug_is_acked_and_plugs_blocks(host: Host, requested: str) -> None:
    """An acceptable PLUG is ACKed; the blocks are plugged, nothing is mapped yet (ON_FAULT)."""
    assert ACK == request(host, PLUG, block(2), 3).response
    d = device(host)
    assert (3 * VMEM_BLOCK, 0) == (d.plugged_bytes, d.mapped_bytes)
    assert [False, False, True, True, True, False] == host.vms["mte"].devices[VMEM].plugged[
        :6
    ].tolist()


def test_unplug_is_acked_and_unplugs_blocks(host: Host, requested: str) -> None:
    """An acceptable UNPLUG is ACKed and unplugs its blocks."""
    request(host, PLUG, block(0), 4)
    assert ACK == request(host, UNPLUG, block(1), 2).response
    assert [True, False, False, True] == host.vms["mte"].devices[VMEM].plugged[:4].tolist()


def test_unplug_all_unplugs_everything_and_is_acked(host: Host, requested: str) -> None:
    """UNPLUG_ALL is ACKed (even with nothing plugged) and unplugs every block."""
    assert ACK == request(host, UNPLUG_ALL).response
    request(host, PLUG, block(0), 2)
    request(host, PLUG, block(6), 2)
    host.guest_fault("mte", block(0), 2 * VMEM_BLOCK, Access.WRITE)
    assert ACK == request(host, UNPLUG_ALL).response
    d = device(host)
    assert (0, 0) == (d.plugged_bytes, d.mapped_bytes)
    assert 0 == host.status().tag_blocks_reserved


def test_plug_the_host_cannot_back_is_busy_with_prealloc(small_host: Host) -> None:
    """With QEMU's ``prealloc`` device property (which an EAGER guest implies), a PLUG whose
    blocks the host cannot back is answered BUSY (virtio_mem_state_change_request():
    preallocation failed), never NACK, and plugs nothing; Linux retries BUSY on a timer."""
    for vm_id, policy, prealloc in (
        ("mte", TagPolicy.ON_FAULT, True),
        ("eager", TagPolicy.EAGER, False),
    ):
        small_host.create_vm(mte_config(vm_id, policy, boot_memory_bytes=4096))
        config = VirtioMemConfig(VMEM_REGION, VMEM_BLOCK, VMEM_BLOCK, prealloc=prealloc)
        small_host.add_virtio_mem(vm_id, VMEM, config)
    # The EAGER VM's boot RAM holds one taggable page.
    fill(small_host, "hog", SMALL_UNTAGGED_PAGES + SMALL_DATA_PAGES - 1)
    assert 0 == small_host.mem.free_pages(4)
    for vm_id in ("mte", "eager"):
        before = snapshot(small_host)
        answer = small_host.virtio_mem_request(vm_id, VMEM, PLUG, block(0), 1)
        assert BUSY == answer.response
        assert 0 == device(small_host, vm_id).plugged_bytes
        assert_unchanged(small_host, before)


def test_plug_without_prealloc_is_acked_and_memory_is_found_at_fault(small_host: Host) -> None:
    """Without ``prealloc`` a PLUG within requested_size is ACKed whatever the host has free
    (QEMU only checks the request against its config); the memory is found at fault time, and
    a fault that cannot be backed fails there."""
    small_host.create_vm(mte_config("mte", boot_memory_bytes=4096))
    small_host.add_virtio_mem("mte", VMEM, VirtioMemConfig(VMEM_REGION, VMEM_BLOCK, VMEM_BLOCK))
    fill(small_host, "hog", SMALL_UNTAGGED_PAGES + SMALL_DATA_PAGES)
    assert ACK == small_host.virtio_mem_request("mte", VMEM, PLUG, block(0), 1).response
    assert (VMEM_BLOCK, 0) == (
        device(small_host).plugged_bytes,
        device(small_host).mapped_bytes,
    )
    before = snapshot(small_host)
    with pytest.raises(ResourceExhaustedError):
        small_host.guest_fault("mte", block(0), 4096, Access.WRITE)
    assert_unchanged(small_host, before)


def test_prealloc_plug_backs_and_reserves_before_the_ack(host: Host, mte_vm: str) -> None:
    """A prealloc PLUG of an ON_FAULT MTE guest backs its blocks tagged and reserves their tag
    storage before the ACK, so that the memory is promised, not a snapshot: a later fault finds
    it mapped and reserves nothing."""
    host.add_virtio_mem(
        "mte", "pre", VirtioMemConfig(64 * MiB, VMEM_BLOCK, 2 * VMEM_BLOCK, prealloc=True)
    )
    gpa = device(host, "mte", "pre").gpa
    assert ACK == host.virtio_mem_request("mte", "pre", PLUG, gpa, 2).response
    d = device(host, "mte", "pre")
    assert (2 * VMEM_BLOCK, 2 * VMEM_BLOCK, 2 * VMEM_BLOCK, True) == (
        d.plugged_bytes,
        d.mapped_bytes,
        d.tagged_bytes,
        d.prealloc,
    )
    assert 0 == host.guest_fault("mte", gpa, 2 * VMEM_BLOCK, Access.WRITE).newly_mapped_pages
    assert_sound(host)


def test_plug_beyond_requested_size_is_the_only_nack(small_host: Host) -> None:
    """NACK means only "beyond requested_size" (QEMU): on a full host, a PLUG beyond the request
    is NACK and one within it is BUSY (prealloc) or ACK (no prealloc)."""
    small_host.create_vm(mte_config("mte", boot_memory_bytes=4096))
    small_host.add_virtio_mem("mte", VMEM, VirtioMemConfig(64 * MiB, VMEM_BLOCK, VMEM_BLOCK))
    small_host.add_virtio_mem(
        "mte", "pre", VirtioMemConfig(64 * MiB, VMEM_BLOCK, VMEM_BLOCK, prealloc=True)
    )
    fill(small_host, "hog", SMALL_UNTAGGED_PAGES + SMALL_DATA_PAGES)
    pre = device(small_host, "mte", "pre").gpa
    ask = small_host.virtio_mem_request
    assert NACK == ask("mte", VMEM, PLUG, block(0), 2).response
    assert NACK == ask("mte", "pre", PLUG, pre, 2).response
    assert BUSY == ask("mte", "pre", PLUG, pre, 1).response
    assert ACK == ask("mte", VMEM, PLUG, block(0), 1).response
    assert_sound(small_host)


def test_resize_of_a_prealloc_device_beyond_what_the_host_can_back_is_refused(
    small_host: Host,
) -> None:
    """ResizeVirtioMem on a prealloc device refuses (RESOURCE_EXHAUSTED, nothing changed) a
    requested size the host could not back now: the admission check a VMM makes before it sets
    QEMU's requested-size. A device without prealloc accepts it (QEMU does)."""
    small_host.create_vm(mte_config("mte", boot_memory_bytes=4096))
    small_host.add_virtio_mem("mte", "pre", VirtioMemConfig(128 * MiB, VMEM_BLOCK, prealloc=True))
    small_host.add_virtio_mem("mte", VMEM, VirtioMemConfig(128 * MiB, VMEM_BLOCK))
    free_bytes = small_host.mem.free_pages(4) * 4096
    too_much = (free_bytes // VMEM_BLOCK + 1) * VMEM_BLOCK
    before = snapshot(small_host)
    with pytest.raises(ResourceExhaustedError) as info:
        small_host.resize_virtio_mem("mte", "pre", too_much)
    assert "TAGGABLE_MEMORY_EXHAUSTED" == info.value.reason
    assert "pre" == info.value.metadata["device_id"]
    assert 0 == device(small_host, "mte", "pre").requested_size_bytes
    assert_unchanged(small_host, before)
    small_host.resize_virtio_mem("mte", "pre", too_much - VMEM_BLOCK)
    small_host.resize_virtio_mem("mte", VMEM, too_much)
    assert_sound(small_host)


def test_non_mte_plug_is_acked_while_tag_storage_is_left(small_host: Host) -> None:
    """A non-MTE VM can be backed by lent tag storage: its PLUG is ACKed."""
    fill(small_host, "hog", SMALL_UNTAGGED_PAGES + SMALL_DATA_PAGES)
    small_host.create_vm(
        VmConfig("plain", False, boot_memory_bytes=4096, max_memory_bytes=4096 + VMEM_REGION)
    )
    small_host.add_virtio_mem("plain", VMEM, VirtioMemConfig(VMEM_REGION, VMEM_BLOCK, VMEM_BLOCK))
    assert ACK == small_host.virtio_mem_request("plain", VMEM, PLUG, 0x8000_0000, 1).response
    small_host.guest_fault("plain", 0x8000_0000, VMEM_BLOCK, Access.WRITE)
    assert VMEM_BLOCK == small_host.status().usage.tag_lent_bytes
    assert_sound(small_host)


# ----------------------------------------------------------------- STATE


def test_state_answers_plugged_unplugged_and_mixed(host: Host, requested: str) -> None:
    """STATE is ACKed with PLUGGED, UNPLUGGED or MIXED for the blocks asked about."""
    request(host, PLUG, block(2), 2)
    cases = [
        (block(2), 2, VirtioMemBlockState.PLUGGED),
        (block(3), 1, VirtioMemBlockState.PLUGGED),
        (block(0), 2, VirtioMemBlockState.UNPLUGGED),
        (block(4), 100, VirtioMemBlockState.UNPLUGGED),
        (block(1), 2, VirtioMemBlockState.MIXED),
        (block(0), 136, VirtioMemBlockState.MIXED),
    ]
    for addr, nb, expected in cases:
        answer = request(host, STATE, addr, nb)
        assert (ACK, expected) == (answer.response, answer.state)


def test_state_outside_usable_region_is_error(host: Host, requested: str) -> None:
    """STATE over blocks outside the usable region is ERROR with no state."""
    answer = request(host, STATE, block(0), 521)  # 1040 MiB usable = 520 blocks
    assert (ERROR, None) == (answer.response, answer.state)


# ----------------------------------------------------------------- usable region


def test_usable_region_grows_with_requested_size(host: Host, vm_with_virtio_mem: str) -> None:
    """usable_region_size = requested + 1 GiB (QEMU's arm VIRTIO_MEM_USABLE_EXTENT), aligned to
    the block, capped at the region."""
    for requested, usable in [
        (2 * MiB, 1026 * MiB),
        (100 * MiB, 1124 * MiB),
        (1100 * MiB, VMEM_REGION),
        (VMEM_REGION, VMEM_REGION),
    ]:
        status = host.resize_virtio_mem("mte", VMEM, requested)
        assert (requested, usable) == (status.requested_size_bytes, status.usable_region_size_bytes)


def test_usable_region_shrinks_only_on_unplug_all(host: Host, vm_with_virtio_mem: str) -> None:
    """Lowering requested_size keeps the usable region; UNPLUG_ALL shrinks it to fit."""
    host.resize_virtio_mem("mte", VMEM, 512 * MiB)
    assert 1536 * MiB == device(host).usable_region_size_bytes
    host.resize_virtio_mem("mte", VMEM, 4 * MiB)
    assert 1536 * MiB == device(host).usable_region_size_bytes
    assert ACK == request(host, PLUG, block(300), 1).response
    assert ACK == request(host, UNPLUG_ALL).response
    assert 1028 * MiB == device(host).usable_region_size_bytes
    host.resize_virtio_mem("mte", VMEM, 0)
    assert ACK == request(host, UNPLUG_ALL).response
    assert 0 == device(host).usable_region_size_bytes
    assert ERROR == request(host, STATE, block(0), 1).response


def test_usable_region_with_requested_zero_is_empty(host: Host, vm_with_virtio_mem: str) -> None:
    """Nothing is usable while nothing was ever requested: any PLUG is ERROR."""
    assert ERROR == request(host, PLUG, block(0), 1).response


def test_lowering_requested_size_nacks_further_plugs(host: Host, requested: str) -> None:
    """After requested_size drops below plugged_size, PLUG is NACKed and UNPLUG still works."""
    request(host, PLUG, block(0), 8)
    host.resize_virtio_mem("mte", VMEM, 4 * MiB)
    assert NACK == request(host, PLUG, block(10), 1).response
    assert ACK == request(host, UNPLUG, block(0), 6).response
    assert NACK == request(host, PLUG, block(10), 1).response
    assert ACK == request(host, UNPLUG, block(6), 1).response
    assert ACK == request(host, PLUG, block(10), 1).response
    assert 4 * MiB == device(host).plugged_bytes


@pytest.mark.parametrize("requested", [MiB, -VMEM_BLOCK, VMEM_REGION + VMEM_BLOCK])
def test_resize_to_bad_requested_size_is_invalid(
    host: Host, vm_with_virtio_mem: str, requested: int
) -> None:
    """requested_size must be a block multiple within the region."""
    before = snapshot(host)
    with pytest.raises(InvalidArgumentError) as info:
        host.resize_virtio_mem("mte", VMEM, requested)
    assert "requested_size" == info.value.field
    assert_unchanged(host, before)
    assert 0 == device(host).requested_size_bytes


# ----------------------------------------------------------------- discard on unplug


def test_unplug_discards_pages_and_tags(host: Host, requested: str) -> None:
    """Unplugged memory is discarded: re-plugged blocks are new pages with zero tags."""
    request(host, PLUG, block(0), 1)
    tags = bytes((np.arange(VMEM_BLOCK // 16) % 16).astype(np.uint8))
    host.copy_tags("mte", block(0), VMEM_BLOCK, TagCopyDirection.TO_GUEST, tags)
    assert tags == host.copy_tags("mte", block(0), VMEM_BLOCK, TagCopyDirection.FROM_GUEST)
    assert ACK == request(host, UNPLUG, block(0), 1).response
    d = device(host)
    assert (0, 0) == (d.mapped_bytes, d.tagged_bytes)
    assert 0 == len(host.mem.tags)
    assert 0 == host.status().tag_blocks_reserved
    assert ACK == request(host, PLUG, block(0), 1).response
    zeros = bytes(VMEM_BLOCK // 16)
    assert zeros == host.copy_tags("mte", block(0), VMEM_BLOCK, TagCopyDirection.FROM_GUEST)
    assert_sound(host)


def test_unplugged_gpa_cannot_be_faulted(host: Host, requested: str) -> None:
    """After UNPLUG, a fault on the block is FailedPrecondition GPA_NOT_PLUGGED."""
    request(host, PLUG, block(0), 1)
    host.guest_fault("mte", block(0), VMEM_BLOCK, Access.READ)
    request(host, UNPLUG, block(0), 1)
    with pytest.raises(FailedPreconditionError) as info:
        host.guest_fault("mte", block(0), 4096, Access.READ)
    assert "GPA_NOT_PLUGGED" == info.value.reason


# ----------------------------------------------------------------- device add / remove


def test_device_with_requested_size_is_not_removed_even_with_nothing_plugged(
    host: Host, requested: str
) -> None:
    """QEMU refuses to unplug a virtio-mem device "while 'requested-size' != '0'", even with
    nothing plugged: FailedPrecondition REQUESTED_SIZE_NOT_ZERO, nothing changed."""
    before = snapshot(host)
    with pytest.raises(FailedPreconditionError) as info:
        host.remove_memory_device("mte", VMEM)
    assert "REQUESTED_SIZE_NOT_ZERO" == info.value.reason
    assert_unchanged(host, before)
    host.resize_virtio_mem("mte", VMEM, 0)
    host.remove_memory_device("mte", VMEM)
    assert_sound(host)


def test_removing_device_with_plugged_blocks_is_failed_precondition(
    host: Host, requested: str
) -> None:
    """A virtio-mem device with plugged blocks cannot be removed; with none (and nothing
    requested) it can."""
    request(host, PLUG, block(0), 1)
    host.resize_virtio_mem("mte", VMEM, 0)
    before = snapshot(host)
    with pytest.raises(FailedPreconditionError) as info:
        host.remove_memory_device("mte", VMEM)
    assert "DEVICE_HAS_PLUGGED_MEMORY" == info.value.reason
    assert_unchanged(host, before)
    request(host, UNPLUG_ALL)
    host.remove_memory_device("mte", VMEM)
    assert [] == [r for r in host.get_vm("mte").regions if r.device_id == VMEM]
    assert_sound(host)


def test_request_to_unknown_device_is_not_found(host: Host, mte_vm: str) -> None:
    """A request to a device that does not exist raises NotFound (it is not a guest answer)."""
    with pytest.raises(NotFoundError):
        host.virtio_mem_request(mte_vm, "nope", PLUG, 0, 1)


def test_request_to_a_dimm_is_failed_precondition(host: Host, mte_vm: str) -> None:
    """virtio-mem requests to a DIMM are FailedPrecondition NOT_VIRTIO_MEM."""
    host.add_dimm(mte_vm, "dimm0", 64 * MiB)
    with pytest.raises(FailedPreconditionError) as info:
        host.virtio_mem_request(mte_vm, "dimm0", STATE, 0, 1)
    assert "NOT_VIRTIO_MEM" == info.value.reason


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (VirtioMemConfig(VMEM_REGION, 512 * 1024), "block_size"),
        (VirtioMemConfig(VMEM_REGION, 3 * MiB), "block_size"),
        (VirtioMemConfig(VMEM_REGION + MiB, VMEM_BLOCK), "region_size"),
        (VirtioMemConfig(0, VMEM_BLOCK), "region_size"),
        (VirtioMemConfig(VMEM_REGION, VMEM_BLOCK, MiB), "requested_size"),
        (VirtioMemConfig(VMEM_REGION, VMEM_BLOCK, 2 * VMEM_REGION), "requested_size"),
    ],
)
def test_bad_virtio_mem_config_is_invalid_argument(
    host: Host, mte_vm: str, config: VirtioMemConfig, field: str
) -> None:
    """A bad block size, region size or requested size is InvalidArgument naming the field."""
    before = snapshot(host)
    with pytest.raises(InvalidArgumentError) as info:
        host.add_virtio_mem(mte_vm, VMEM, config)
    assert field == info.value.field
    assert_unchanged(host, before)


def test_device_requested_at_creation_gets_usable_region(host: Host, mte_vm: str) -> None:
    """A device created with requested_size has a usable region right away."""
    status = host.add_virtio_mem(mte_vm, VMEM, VirtioMemConfig(VMEM_REGION, VMEM_BLOCK, 8 * MiB))
    assert (8 * MiB, 1032 * MiB) == (status.requested_size_bytes, status.usable_region_size_bytes)


# ----------------------------------------------------------------- counters


def test_requests_are_counted_by_type_and_response(host: Host, requested: str) -> None:
    """Every request is counted under (type, response)."""
    request(host, PLUG, block(0), 1)
    request(host, PLUG, block(0), 1)
    request(host, PLUG, block(0), 9)
    request(host, STATE, block(0), 1)
    request(host, UNPLUG, block(0), 1)
    request(host, UNPLUG_ALL)
    assert {
        ("PLUG", "ACK"): 1,
        ("PLUG", "ERROR"): 1,
        ("PLUG", "NACK"): 1,
        ("STATE", "ACK"): 1,
        ("UNPLUG", "ACK"): 1,
        ("UNPLUG_ALL", "ACK"): 1,
    } == host.counters.virtio_mem_requests


def test_eager_is_preallocation_for_every_device_of_the_guest(small_host: Host) -> None:
    """EAGER is QEMU's prealloc=on for an MTE guest: its virtio-mem devices preallocate even
    without the device property, so a resize the host could not back tagged is refused up
    front, and a PLUG backs (and tags) its blocks before the ACK."""
    small_host.create_vm(mte_config("eager", TagPolicy.EAGER, boot_memory_bytes=4096))
    small_host.add_virtio_mem("eager", VMEM, VirtioMemConfig(128 * MiB, VMEM_BLOCK))
    with pytest.raises(ResourceExhaustedError):
        small_host.resize_virtio_mem("eager", VMEM, 128 * MiB)
    small_host.resize_virtio_mem("eager", VMEM, 2 * VMEM_BLOCK)
    answer = small_host.virtio_mem_request("eager", VMEM, PLUG, block(0), 2)
    assert ACK == answer.response
    assert 2 * VMEM_BLOCK == device(small_host, "eager").tagged_bytes
    assert_sound(small_host)
