"""Full VM lifecycles through vmm_shim against the real daemon (a subprocess): every tag policy,
faults, tag round trips, DIMMs, virtio-mem driven up and down like the Linux driver, events and
export; the model's invariants hold after every step."""

from __future__ import annotations

import pytest

from vmm_shim import (
    AlreadyExists,
    DriveResult,
    FailedPrecondition,
    HostClient,
    InvalidArgument,
    NotFound,
    VirtioMemRequestError,
    VmHandle,
)
from vmm_shim.units import GiB, MiB

pytestmark = pytest.mark.integration

BLOCK = 2 * MiB


def assert_sound(host: HostClient) -> None:
    assert [] == host.check_invariants()


def make_vm(host: HostClient, vm_id: str, policy: str = "ON_FAULT") -> VmHandle:
    """An MTE VM with 64 MiB of boot RAM, 2 DIMM slots and 1 GiB of device memory."""
    vm = host.create_vm(
        vm_id,
        mte_enabled=True,
        tag_policy=policy,
        boot_memory_bytes=64 * MiB,
        dimm_slots=2,
        max_memory_bytes=64 * MiB + GiB,
    )
    assert_sound(host)
    return vm


def plugged_blocks(vm: VmHandle, device_id: str) -> list[int]:
    """Indexes of the plugged blocks of a device, one STATE request per usable block."""
    dev = vm.device(device_id)
    return [
        i
        for i in range(dev.usable_region_size // dev.block_size)
        if vm.virtio_mem_state(device_id, dev.gpa + i * dev.block_size, 1) == "PLUGGED"
    ]


@pytest.mark.parametrize("policy", ["ON_FAULT", "EAGER", "ON_TAG_ACCESS"])
def test_mte_vm_lifecycle_keeps_the_host_sound_under_every_policy(
    host: HostClient, vm_id: str, policy: str
) -> None:
    before = host.host_status()
    vm = make_vm(host, vm_id, policy)
    assert (True, policy) == (vm.info().mte_enabled, vm.info().tag_policy)

    outcome = vm.fault(vm.boot_gpa, 2 * MiB, access="WRITE")
    assert outcome.seconds >= 0
    assert_sound(host)

    tags = bytes(i % 16 for i in range((1 * MiB) // 16))
    vm.copy_tags_to_guest(vm.boot_gpa, tags)
    assert tags == vm.copy_tags_from_guest(vm.boot_gpa, 1 * MiB)
    assert vm.info().tagged_bytes >= 1 * MiB, "memory whose tags were written is tagged"
    assert_sound(host)

    dimm = vm.add_dimm("dimm0", 128 * MiB)
    assert ("DIMM", 128 * MiB, 128 * MiB) == (dimm.kind, dimm.size, dimm.plugged_size)
    vm.fault(dimm.gpa, 4 * MiB, access="TAG")
    assert_sound(host)
    vm.remove_device("dimm0")
    assert ["boot-ram"] == [d.device_id for d in vm.info().regions]
    assert_sound(host)

    dev = vm.add_virtio_mem("vmem0", region_size=512 * MiB, block_size=BLOCK)
    assert ("VIRTIO_MEM", 0, BLOCK) == (dev.kind, dev.plugged_size, dev.block_size)
    vm.resize_virtio_mem("vmem0", 100 * MiB)
    up = vm.drive_virtio_mem("vmem0")
    assert DriveResult(100 * MiB, 100 * MiB, 2, 2, 0, 0, 0) == up, "50 blocks: 32 + 18"
    vm.fault(dev.gpa, 8 * MiB, access="WRITE")
    assert_sound(host)
    vm.resize_virtio_mem("vmem0", 20 * MiB)
    down = vm.drive_virtio_mem("vmem0")
    assert DriveResult(20 * MiB, 20 * MiB, 2, 2, 0, 0, 0) == down, "40 blocks: 32 + 8"
    assert list(range(10)) == plugged_blocks(vm, "vmem0"), "the highest blocks went first"
    assert_sound(host)
    vm.resize_virtio_mem("vmem0", 0)
    assert 0 == vm.drive_virtio_mem("vmem0").plugged_size
    vm.remove_device("vmem0")
    assert_sound(host)

    vm.destroy()
    after = host.host_status()
    assert (before.vm_count, before.tag_reserved_bytes) == (
        after.vm_count,
        after.tag_reserved_bytes,
    ), "destroying the only VM gives all its tag storage back"
    assert_sound(host)


def test_drive_plugs_the_lowest_unplugged_blocks_around_a_plugged_one(
    host: HostClient, vm_id: str
) -> None:
    vm = make_vm(host, vm_id)
    dev = vm.add_virtio_mem(
        "vmem0", region_size=256 * MiB, block_size=BLOCK, requested_size=8 * MiB
    )
    assert "ACK" == vm.virtio_mem_plug("vmem0", dev.gpa + 5 * BLOCK, 1)
    result = vm.drive_virtio_mem("vmem0")
    assert (8 * MiB, 1, 0) == (result.plugged_size, result.requests, result.errors)
    assert [0, 1, 2, 5] == plugged_blocks(vm, "vmem0")
    assert_sound(host)


def test_drive_unplugs_the_highest_plugged_blocks_first(host: HostClient, vm_id: str) -> None:
    vm = make_vm(host, vm_id)
    dev = vm.add_virtio_mem(
        "vmem0", region_size=256 * MiB, block_size=BLOCK, requested_size=16 * MiB
    )
    for first in (0, 4, 10):
        assert "ACK" == vm.virtio_mem_plug("vmem0", dev.gpa + first * BLOCK, 2)
    vm.resize_virtio_mem("vmem0", 6 * MiB)
    result = vm.drive_virtio_mem("vmem0")
    assert (6 * MiB, 2, 0) == (result.plugged_size, result.requests, result.errors)
    assert [0, 1, 4] == plugged_blocks(vm, "vmem0")
    assert_sound(host)


def test_drive_with_nothing_to_do_sends_no_request(host: HostClient, vm_id: str) -> None:
    vm = make_vm(host, vm_id)
    vm.add_virtio_mem("vmem0", region_size=64 * MiB, block_size=BLOCK)
    assert DriveResult(0, 0, 0, 0, 0, 0, 0) == vm.drive_virtio_mem("vmem0")


def test_drive_stops_at_the_first_busy_when_the_host_cannot_back_the_blocks(
    host: HostClient, vm_id: str
) -> None:
    vm = host.create_vm(
        vm_id,
        mte_enabled=True,
        tag_policy="EAGER",
        boot_memory_bytes=64 * MiB,
        max_memory_bytes=64 * MiB + 8 * GiB,
    )
    vm.add_virtio_mem("vmem0", region_size=8 * GiB, block_size=32 * MiB, requested_size=6 * GiB)
    result = vm.drive_virtio_mem("vmem0")
    # EAGER preallocates: QEMU answers BUSY when it cannot, NACK only beyond requested_size.
    assert (1, 0, 0) == (result.busy, result.nacks, result.errors), "a 4 GiB host cannot tag 6 GiB"
    assert result.requests == result.acks + 1
    assert result.plugged_size < result.requested_size
    assert_sound(host)
    assert "ACK" == vm.virtio_mem_unplug_all("vmem0")
    vm.destroy()
    assert_sound(host)


def test_virtio_mem_protocol_errors_are_answers_not_exceptions(
    host: HostClient, vm_id: str
) -> None:
    vm = make_vm(host, vm_id)
    dev = vm.add_virtio_mem("vmem0", region_size=64 * MiB, block_size=BLOCK, requested_size=BLOCK)
    assert "ERROR" == vm.virtio_mem_plug("vmem0", dev.gpa + 1, 1), "misaligned"
    assert "ERROR" == vm.virtio_mem_unplug("vmem0", dev.gpa, 1), "not plugged"
    assert "NACK" == vm.virtio_mem_plug("vmem0", dev.gpa, 2), "beyond requested_size"
    with pytest.raises(VirtioMemRequestError) as raised:
        vm.virtio_mem_state("vmem0", dev.gpa, 0)
    assert "ERROR" == raised.value.response
    assert_sound(host)


def test_refusals_carry_their_code_reason_and_field(host: HostClient, vm_id: str) -> None:
    vm = make_vm(host, vm_id)
    with pytest.raises(AlreadyExists):
        make_vm(host, vm_id)
    with pytest.raises(InvalidArgument) as bad:
        vm.fault(vm.boot_gpa + 1, 4096)
    assert ("INVALID_ARGUMENT", "gpa") == (bad.value.reason, bad.value.metadata["field"])
    with pytest.raises(NotFound):
        host.vm(vm_id + "-missing").info()
    with pytest.raises(FailedPrecondition):
        vm.fault(vm.boot_gpa + 64 * MiB, 4096)  # device memory with no device: not plugged
    with pytest.raises(NotFound):
        vm.drive_virtio_mem("no-such-device")
    with pytest.raises(FailedPrecondition) as not_virtio_mem:
        vm.drive_virtio_mem("boot-ram")
    assert "NOT_VIRTIO_MEM" == not_virtio_mem.value.reason
    assert_sound(host)


def test_fault_stream_answers_in_order_and_ends_at_the_first_refusal(
    host: HostClient, vm_id: str
) -> None:
    vm = make_vm(host, vm_id)
    faults = [(vm.boot_gpa + i * MiB, MiB, "WRITE") for i in range(4)]
    outcomes = list(vm.fault_stream(faults))
    assert [256] * 4 == [o.newly_mapped_pages for o in outcomes]
    seen = []
    with pytest.raises(InvalidArgument):
        for outcome in vm.fault_stream([(vm.boot_gpa + 8 * MiB, MiB, "READ"), (1, 1, "READ")]):
            seen.append(outcome)
    assert 1 == len(seen), "the answer before the refused fault is delivered"
    assert_sound(host)


def test_watch_events_sees_a_vm_created_after_subscribing(host: HostClient, vm_id: str) -> None:
    with host.watch_events() as events:
        vm = make_vm(host, vm_id)
        first = next(events)
    assert ("vm_created", vm_id) == (first.kind, first.vm_id)
    vm.destroy()


def test_export_state_accounts_for_every_host_page(host: HostClient, vm_id: str) -> None:
    vm = make_vm(host, vm_id)
    vm.fault(vm.boot_gpa, 4 * MiB)
    export = host.export_state()
    status = host.host_status()
    assert status.total_bytes == export.page_size * sum(e.count for e in export.page_extents)
    assert any(run.vm_id == vm_id and run.tagged for run in export.mapping_runs)
    assert export.reserved_tag_blocks
