"""VM lifecycle, persistence and refusals: a host returns to its fresh state, save/restore
round-trips, and every refused call changes nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from hostd.model import (
    BOOT_RAM_GPA,
    Access,
    AlreadyExistsError,
    FailedPreconditionError,
    GiB,
    Host,
    InvalidArgumentError,
    MiB,
    NotFoundError,
    PageState,
    ResourceExhaustedError,
    TagCopyDirection,
    TagPolicy,
    TagStoreError,
    TiB,
    VirtioMemConfig,
    VirtioMemRequestType,
    VmConfig,
)

from .conftest import (
    SMALL_DATA_PAGES,
    SMALL_UNTAGGED_PAGES,
    VMEM,
    VMEM_BLOCK,
    assert_sound,
    assert_unchanged,
    fill,
    mte_config,
    snapshot,
)

PAGE = 4096
POLICIES: list[tuple[bool, TagPolicy]] = [
    (True, TagPolicy.ON_FAULT),
    (True, TagPolicy.EAGER),
    (True, TagPolicy.ON_TAG_ACCESS),
    (False, TagPolicy.ON_FAULT),
]


def busy_vm(host: Host, vm_id: str, mte: bool, policy: TagPolicy, seed: int) -> None:
    """A VM that used every feature: faults of each access, a DIMM, plugged virtio-mem blocks
    and (MTE) tags."""
    host.create_vm(
        VmConfig(
            vm_id,
            mte,
            policy,
            boot_memory_bytes=32 * MiB,
            dimm_slots=1,
            max_memory_bytes=32 * MiB + 512 * MiB,
        )
    )
    rng = np.random.default_rng(seed)
    dimm = host.add_dimm(vm_id, "dimm0", 8 * MiB)
    dev = host.add_virtio_mem(vm_id, VMEM, VirtioMemConfig(256 * MiB, VMEM_BLOCK, 8 * MiB))
    host.virtio_mem_request(vm_id, VMEM, VirtioMemRequestType.PLUG, dev.gpa + VMEM_BLOCK, 3)
    for gpa, length in (
        (BOOT_RAM_GPA, 32 * MiB),
        (dimm.gpa, 8 * MiB),
        (dev.gpa + VMEM_BLOCK, 6 * MiB),
    ):
        for _ in range(3):
            nr = int(rng.integers(1, 64))
            off = int(rng.integers(0, length // PAGE - nr)) * PAGE
            access = Access.READ if not mte else list(Access)[int(rng.integers(0, 3))]
            host.guest_fault(vm_id, gpa + off, nr * PAGE, access)
    if mte:
        tags = bytes(rng.integers(0, 16, 2 * PAGE // 16, dtype=np.uint8))
        host.copy_tags(vm_id, BOOT_RAM_GPA + 64 * PAGE, 2 * PAGE, TagCopyDirection.TO_GUEST, tags)
    assert_sound(host)


def populate(host: Host, rounds: int = 2) -> list[str]:
    ids = []
    for r in range(rounds):
        for i, (mte, policy) in enumerate(POLICIES):
            vm_id = f"vm-{r}-{i}"
            busy_vm(host, vm_id, mte, policy, seed=10 * r + i)
            ids.append(vm_id)
    return ids


def assert_all_free(host: Host) -> None:
    export = host.export_state()
    assert {PageState.FREE, PageState.TAG_FREE} == {e.state for e in export.page_extents}
    assert {""} == {e.vm_id for e in export.page_extents}
    assert ((), ()) == (export.reserved_tag_blocks, export.mapping_runs)
    assert 0 == len(host.mem.tags)


def test_destroying_every_vm_returns_the_host_to_fresh(host: Host) -> None:
    """After VMs of every policy are created, used and destroyed, status equals the fresh host's
    and the export shows all memory free."""
    fresh = host.status()
    ids = populate(host)
    assert len(ids) == host.status().vm_count
    assert fresh != host.status()
    for vm_id in ids:
        host.destroy_vm(vm_id)
        assert_sound(host)
    assert fresh == host.status()
    assert_all_free(host)
    assert [] == host.list_vms()


def test_create_destroy_cycles_do_not_leak(host: Host) -> None:
    """Creating and destroying the same VMs again and again leaves the host fresh each time."""
    fresh = host.status()
    for r in range(3):
        for i, (mte, policy) in enumerate(POLICIES):
            busy_vm(host, f"cycle-{i}", mte, policy, seed=r)
        for i in range(len(POLICIES)):
            host.destroy_vm(f"cycle-{i}")
        assert fresh == host.status()
    assert_sound(host)
    assert host.counters.tag_blocks_reserved == host.counters.tag_blocks_released


def test_list_vms_is_sorted_by_id(host: Host) -> None:
    """list_vms returns every VM, sorted by id."""
    for vm_id in ("b", "a", "c"):
        host.create_vm(VmConfig(vm_id, False))
    assert ["a", "b", "c"] == [v.vm_id for v in host.list_vms()]


# ----------------------------------------------------------------- save / restore


def assert_round_trip(host: Host) -> Host:
    restored = Host.restore(host.save_state())
    assert_sound(restored)
    assert host.status() == restored.status()
    assert host.export_state() == restored.export_state()
    assert host.list_vms() == restored.list_vms()
    assert vars(host.counters) == vars(restored.counters)
    return restored


def test_save_restore_round_trip_at_several_points(host: Host) -> None:
    """Restoring a saved state gives equal status, export, VMs and counters, at every point."""
    assert_round_trip(host)
    ids = populate(host, rounds=1)
    assert_round_trip(host)
    host.destroy_vm(ids[0])
    host.virtio_mem_request(ids[1], VMEM, VirtioMemRequestType.UNPLUG_ALL)
    assert_round_trip(host)
    for vm_id in ids[1:]:
        host.destroy_vm(vm_id)
    assert_round_trip(host)


def test_restored_host_keeps_tags_and_device_state(host: Host) -> None:
    """A restored host reads back the same tags and answers virtio-mem STATE the same."""
    busy_vm(host, "vm", True, TagPolicy.ON_FAULT, seed=3)
    restored = assert_round_trip(host)
    for h in (host, restored):
        tags = h.copy_tags("vm", BOOT_RAM_GPA + 64 * PAGE, 2 * PAGE, TagCopyDirection.FROM_GUEST)
        assert any(tags)
    gpa = next(r.gpa for r in host.get_vm("vm").regions if r.device_id == VMEM)
    answers = [
        h.virtio_mem_request("vm", VMEM, VirtioMemRequestType.STATE, gpa, 4)
        for h in (host, restored)
    ]
    assert answers[0] == answers[1]


def test_restored_host_behaves_like_the_original(make_host: Callable[..., Host]) -> None:
    """The same operations on the original and on a restored copy give the same state."""
    host = make_host()
    fill(host, "hog", SMALL_UNTAGGED_PAGES + SMALL_DATA_PAGES - 300)
    host.create_vm(VmConfig("m", True, boot_memory_bytes=4 * MiB))
    host.guest_fault("m", BOOT_RAM_GPA, 100 * PAGE, Access.WRITE)
    restored = Host.restore(host.save_state())
    for h in (host, restored):
        h.destroy_vm("hog")
        h.guest_fault("m", BOOT_RAM_GPA + 200 * PAGE, 500 * PAGE, Access.WRITE)
        h.create_vm(VmConfig("p", False, boot_memory_bytes=64 * MiB))
        h.guest_fault("p", BOOT_RAM_GPA, 64 * MiB, Access.WRITE)
        assert_sound(h)
    assert host.export_state() == restored.export_state()
    assert event_counts(host) == event_counts(restored)


def event_counts(host: Host) -> dict[str, object]:
    """The counters without the measured durations (which differ from run to run)."""
    out = {k: v for k, v in vars(host.counters).items() if not k.endswith("_seconds")}
    out["faults_timed"] = {a: h.count for a, h in host.counters.fault_seconds.items()}
    out["reservations_timed"] = host.counters.reservation_seconds.count
    return out


# ----------------------------------------------------------------- refusals


def test_duplicate_vm_id_is_already_exists(host: Host, mte_vm: str) -> None:
    """A second VM with the same id is AlreadyExists, whatever its config."""
    before = snapshot(host)
    with pytest.raises(AlreadyExistsError) as info:
        host.create_vm(VmConfig(mte_vm, False))
    assert "VM_ALREADY_EXISTS" == info.value.reason
    assert_unchanged(host, before)


@pytest.mark.parametrize("device_id", ["dimm0", "vmem0", "boot-ram"])
def test_duplicate_device_id_is_already_exists(host: Host, mte_vm: str, device_id: str) -> None:
    """A device id already used in the VM (boot RAM's included) is AlreadyExists."""
    host.add_dimm(mte_vm, "dimm0", 2 * MiB)
    host.add_virtio_mem(mte_vm, "vmem0", VirtioMemConfig(GiB, VMEM_BLOCK))
    before = snapshot(host)
    for add in (
        lambda: host.add_dimm(mte_vm, device_id, 2 * MiB),
        lambda: host.add_virtio_mem(mte_vm, device_id, VirtioMemConfig(64 * MiB, VMEM_BLOCK)),
    ):
        with pytest.raises(AlreadyExistsError) as info:
            add()
        assert "DEVICE_ALREADY_EXISTS" == info.value.reason
    assert_unchanged(host, before)
    assert 3 == len(host.get_vm(mte_vm).regions)


@pytest.mark.parametrize("vm_id", ["", "-vm", ".x", "a b", "vm/1", "a" * 64, "é"])
def test_bad_vm_id_is_invalid_argument(host: Host, vm_id: str) -> None:
    """A VM id must be 1-63 characters of [A-Za-z0-9._-], starting alphanumeric."""
    before = snapshot(host)
    with pytest.raises(InvalidArgumentError) as info:
        host.create_vm(VmConfig(vm_id, False))
    assert ("vm_id", vm_id) == (info.value.field, info.value.value)
    assert_unchanged(host, before)


def test_longest_vm_id_is_accepted(host: Host) -> None:
    """63 characters are fine."""
    host.create_vm(VmConfig("a" + "-" * 61 + "z", False))
    assert 1 == host.status().vm_count


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"boot_memory_bytes": 0}, "boot_memory_bytes"),
        ({"boot_memory_bytes": PAGE + 1}, "boot_memory_bytes"),
        ({"boot_memory_bytes": -PAGE}, "boot_memory_bytes"),
        ({"boot_memory_bytes": 8 * TiB}, "boot_memory_bytes"),
        ({"max_memory_bytes": 8 * MiB}, "max_memory_bytes"),
        ({"max_memory_bytes": GiB + 1}, "max_memory_bytes"),
        ({"dimm_slots": -1}, "dimm_slots"),
        ({"dimm_slots": 257}, "dimm_slots"),
    ],
)
def test_bad_vm_config_is_invalid_argument(
    host: Host, overrides: dict[str, Any], field: str
) -> None:
    """Bad memory sizes and slot counts are InvalidArgument naming the field."""
    before = snapshot(host)
    with pytest.raises(InvalidArgumentError) as info:
        host.create_vm(mte_config(**overrides))
    assert field == info.value.field
    assert_unchanged(host, before)


def test_dimm_slots_exhausted_is_resource_exhausted(host: Host, mte_vm: str) -> None:
    """A DIMM beyond the VM's slots is ResourceExhausted('dimm_slots')."""
    host.add_dimm(mte_vm, "d0", 2 * MiB)
    host.add_dimm(mte_vm, "d1", 2 * MiB)
    before = snapshot(host)
    with pytest.raises(ResourceExhaustedError) as info:
        host.add_dimm(mte_vm, "d2", 2 * MiB)
    assert ("dimm_slots", "DIMM_SLOTS_EXHAUSTED") == (info.value.resource, info.value.reason)
    assert_unchanged(host, before)
    # A removed DIMM frees its slot.
    host.remove_memory_device(mte_vm, "d0")
    host.add_dimm(mte_vm, "d2", 2 * MiB)
    assert_sound(host)


def test_max_memory_exhausted_is_resource_exhausted(host: Host, mte_vm: str) -> None:
    """Devices beyond max_memory_bytes are ResourceExhausted('guest_address_space')."""
    host.add_virtio_mem(mte_vm, VMEM, VirtioMemConfig(GiB, VMEM_BLOCK))
    host.add_dimm(mte_vm, "d0", GiB - 2 * MiB)
    before = snapshot(host)
    for add in (
        lambda: host.add_dimm(mte_vm, "d1", 4 * MiB),
        lambda: host.add_virtio_mem(mte_vm, "v1", VirtioMemConfig(4 * MiB, VMEM_BLOCK)),
    ):
        with pytest.raises(ResourceExhaustedError) as info:
            add()
        assert "guest_address_space" == info.value.resource
    assert_unchanged(host, before)
    host.add_dimm(mte_vm, "d1", 2 * MiB)
    assert_sound(host)


def test_vm_without_device_memory_cannot_add_devices(host: Host) -> None:
    """max_memory_bytes = 0 means boot RAM only: any device is out of address space."""
    host.create_vm(VmConfig("vm", True, dimm_slots=1))
    with pytest.raises(ResourceExhaustedError) as info:
        host.add_dimm("vm", "d0", 2 * MiB)
    assert "guest_address_space" == info.value.resource


def test_boot_ram_cannot_be_removed(host: Host, mte_vm: str) -> None:
    """Removing boot RAM is FailedPrecondition BOOT_RAM."""
    with pytest.raises(FailedPreconditionError) as info:
        host.remove_memory_device(mte_vm, "boot-ram")
    assert "BOOT_RAM" == info.value.reason


@pytest.mark.parametrize(
    "call",
    [
        lambda h: h.get_vm("ghost"),
        lambda h: h.destroy_vm("ghost"),
        lambda h: h.add_dimm("ghost", "d", 2 * MiB),
        lambda h: h.remove_memory_device("mte", "ghost"),
        lambda h: h.resize_virtio_mem("mte", "ghost", 0),
        lambda h: h.virtio_mem_request("ghost", VMEM, VirtioMemRequestType.STATE, 0, 1),
        lambda h: h.copy_tags("ghost", BOOT_RAM_GPA, PAGE, TagCopyDirection.FROM_GUEST),
    ],
)
def test_unknown_vm_or_device_is_not_found(host: Host, mte_vm: str, call: Callable) -> None:
    """Calls naming a VM or device that does not exist are NotFound and change nothing."""
    before = snapshot(host)
    with pytest.raises(NotFoundError):
        call(host)
    assert_unchanged(host, before)


REFUSED_CALLS: list[tuple[str, Callable[[Host], Any]]] = [
    ("duplicate vm", lambda h: h.create_vm(VmConfig("mte", True))),
    ("bad vm id", lambda h: h.create_vm(VmConfig("", True))),
    (
        "eager too big",
        lambda h: h.create_vm(
            mte_config("e", TagPolicy.EAGER, boot_memory_bytes=4 * GiB, max_memory_bytes=0)
        ),
    ),
    ("dimm misaligned", lambda h: h.add_dimm("mte", "d9", PAGE + 1)),
    ("dimm zero", lambda h: h.add_dimm("mte", "d9", 0)),
    ("dimm bad id", lambda h: h.add_dimm("mte", "bad id", 2 * MiB)),
    ("dimm slots", lambda h: h.add_dimm("mte", "d9", 2 * MiB)),
    ("dimm duplicate", lambda h: h.add_dimm("mte", "d0", 2 * MiB)),
    ("vmem duplicate", lambda h: h.add_virtio_mem("mte", VMEM, VirtioMemConfig(GiB, VMEM_BLOCK))),
    ("vmem too big", lambda h: h.add_virtio_mem("mte", "v9", VirtioMemConfig(2 * GiB, VMEM_BLOCK))),
    ("vmem bad block", lambda h: h.add_virtio_mem("mte", "v9", VirtioMemConfig(GiB, 3 * MiB))),
    ("remove plugged vmem", lambda h: h.remove_memory_device("mte", VMEM)),
    ("remove boot ram", lambda h: h.remove_memory_device("mte", "boot-ram")),
    ("resize bad", lambda h: h.resize_virtio_mem("mte", VMEM, MiB)),
    ("resize dimm", lambda h: h.resize_virtio_mem("mte", "d0", 0)),
    ("fault misaligned", lambda h: h.guest_fault("mte", BOOT_RAM_GPA + 8, PAGE, Access.READ)),
    ("fault zero", lambda h: h.guest_fault("mte", BOOT_RAM_GPA, 0, Access.READ)),
    ("fault too large", lambda h: h.guest_fault("mte", BOOT_RAM_GPA, 2 * GiB, Access.READ)),
    ("fault unplugged", lambda h: h.guest_fault("mte", BOOT_RAM_GPA - PAGE, PAGE, Access.READ)),
    (
        "fault straddling",
        lambda h: h.guest_fault("mte", BOOT_RAM_GPA + 255 * MiB, 2 * MiB, Access.TAG),
    ),
    ("tag fault non-mte", lambda h: h.guest_fault("plain", BOOT_RAM_GPA, PAGE, Access.TAG)),
    (
        "tags non-mte",
        lambda h: h.copy_tags("plain", BOOT_RAM_GPA, PAGE, TagCopyDirection.FROM_GUEST),
    ),
    (
        "tags length",
        lambda h: h.copy_tags("mte", BOOT_RAM_GPA, PAGE, TagCopyDirection.TO_GUEST, b"\x01"),
    ),
    (
        "tags value",
        lambda h: h.copy_tags("mte", BOOT_RAM_GPA, PAGE, TagCopyDirection.TO_GUEST, b"\x10" * 256),
    ),
    (
        "tags too long",
        lambda h: h.copy_tags("mte", BOOT_RAM_GPA, 64 * MiB, TagCopyDirection.FROM_GUEST),
    ),
]


@pytest.mark.parametrize("call", [c for _, c in REFUSED_CALLS], ids=[n for n, _ in REFUSED_CALLS])
def test_every_refused_call_changes_nothing(host: Host, call: Callable[[Host], Any]) -> None:
    """A refused call raises a TagStoreError and leaves the saved state arrays as they were."""
    host.create_vm(mte_config())
    host.create_vm(VmConfig("plain", False))
    host.add_dimm("mte", "d0", 4 * MiB)
    host.add_dimm("mte", "d1", 4 * MiB)
    dev = host.add_virtio_mem("mte", VMEM, VirtioMemConfig(GiB, VMEM_BLOCK, 4 * MiB))
    host.virtio_mem_request("mte", VMEM, VirtioMemRequestType.PLUG, dev.gpa, 2)
    host.guest_fault("mte", BOOT_RAM_GPA, 4 * MiB, Access.WRITE)
    host.copy_tags("mte", BOOT_RAM_GPA, PAGE, TagCopyDirection.TO_GUEST, b"\x05" * 256)
    host.guest_fault("plain", BOOT_RAM_GPA, 4 * MiB, Access.WRITE)
    before = snapshot(host)
    status = host.status()
    vms = host.list_vms()
    with pytest.raises(TagStoreError):
        call(host)
    assert_unchanged(host, before)
    assert status == host.status()
    assert vms == host.list_vms()


def test_destroying_a_vm_a_chunk_of_its_map_at_a_time_frees_the_same_pages(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """destroy_vm walks a large VM's map in chunks (bounded temporaries): with chunk
    boundaries inside every VM, the host, its counters and the final status are those of a
    destroy in one go."""
    ids = populate(host)
    clone = Host.restore(host.save_state())
    monkeypatch.setattr("hostd.model.host.REBUILD_CHUNK_PAGES", 999)
    finals = [host.destroy_vm(vm_id) for vm_id in ids]
    monkeypatch.setattr("hostd.model.host.REBUILD_CHUNK_PAGES", 1 << 40)
    assert finals == [clone.destroy_vm(vm_id) for vm_id in ids]
    assert (clone.status(), clone.export_state()) == (host.status(), host.export_state())
    assert vars(clone.counters) == vars(host.counters)
    assert_sound(host)
