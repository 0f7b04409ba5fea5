"""Random VM lifecycles against the model, with every invariant checked after every step.

Besides ``check_invariants()``, the machine keeps its own record of every tag it wrote and
reads them back: a tag must read back unchanged until its page is discarded (unplug, DIMM
removal, memory given back, VM destruction). Memory pressure from non-MTE guests makes tag
storage lent, so MTE faults must evacuate it. VMs may be backed by transparent huge pages, be
pinned (a VFIO device) and give memory back (free page reporting, balloon).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from hostd.model import (
    BOOT_RAM_GPA,
    Access,
    Host,
    MemoryDeviceKind,
    MiB,
    Placement,
    ResourceExhaustedError,
    TagCopyDirection,
    TagPolicy,
    TagStorageMode,
    TagStoreError,
    VirtioMemConfig,
    VirtioMemRequestType,
    VirtioMemResponse,
    VmConfig,
    default_topology,
)

HOST_BYTES = 256 * MiB
PAGE = 4096
THP_BYTES = 2 * MiB
TAGS_PER_PAGE = PAGE // 16


class HostLifecycle(RuleBasedStateMachine):
    """Drives a small host through random VM lifecycles."""

    vms = Bundle("vms")
    hogs = Bundle("hogs")

    def __init__(self) -> None:
        super().__init__()
        self.host: Host
        self.tags: dict[tuple[str, int], bytes] = {}  # (vm, gpa) -> tags of that page
        self.next_id = 0

    @initialize(
        placement=st.sampled_from(list(Placement)),
        mode=st.sampled_from(list(TagStorageMode)),
    )
    def boot(self, placement: Placement, mode: TagStorageMode) -> None:
        topo = default_topology(HOST_BYTES, PAGE, tag_storage_mode=mode)
        self.host = Host(topo, placement)

    def _fresh_id(self, prefix: str) -> str:
        self.next_id += 1
        return f"{prefix}{self.next_id}"

    @rule(
        target=vms,
        mte=st.sampled_from([True, True, False]),
        policy=st.sampled_from(list(TagPolicy)),
        boot_mib=st.sampled_from([2, 4, 8, 16]),
        extra_mib=st.sampled_from([0, 16, 64]),
        slots=st.integers(0, 2),
        pinned=st.sampled_from([False, False, False, True]),
        backing=st.sampled_from([0, 0, THP_BYTES]),
    )
    def create_vm(
        self,
        mte: bool,
        policy: TagPolicy,
        boot_mib: int,
        extra_mib: int,
        slots: int,
        pinned: bool,
        backing: int,
    ):
        vm_id = self._fresh_id("vm")
        cfg = VmConfig(
            vm_id,
            mte,
            policy,
            boot_mib * MiB,
            slots,
            (boot_mib + extra_mib) * MiB,
            pinned=pinned,
            backing_page_size_bytes=backing,
        )
        try:
            self.host.create_vm(cfg)
        except TagStoreError as e:  # exhausted, or pinned with ON_TAG_ACCESS
            event(f"create refused: {e.reason}")
            return None
        event(f"create {'pinned ' if pinned else ''}{'THP' if backing else 'small'}")
        return vm_id

    @rule(
        vm=vms,
        which=st.integers(0, 7),
        page=st.integers(0, 4095),
        nr_pages=st.integers(1, 600),
    )
    def discard(self, vm, which: int, page: int, nr_pages: int) -> None:
        """The guest gives memory back (free page reporting, balloon); its tags are gone."""
        if vm is None or vm not in self.host.vms:
            return
        region = self._regions(vm)[which % len(self._regions(vm))]
        pages_in = region.size_bytes // PAGE
        start = page % pages_in
        nr = min(nr_pages, pages_in - start)
        gpa = region.gpa + start * PAGE
        try:
            result = self.host.discard_guest_memory(vm, gpa, nr * PAGE)
        except TagStoreError as e:
            event(f"discard refused: {e.reason}")
            return
        event("discard released tag blocks" if result.tag_blocks_released else "discard")
        self._forget_tags(vm, gpa, gpa + nr * PAGE)

    @rule(target=hogs, lend_fraction=st.sampled_from([0.25, 0.75, 1.0]))
    def memory_pressure(self, lend_fraction: float):
        """A non-MTE guest fills all memory outside tag storage and part of the tag storage
        (which gets lent to it); then a small spare guest goes away, leaving room to evacuate
        into, so the next MTE fault that needs a lent tag block must evacuate it."""
        spare = self._fresh_id("spare")
        # Non-MTE data fills untaggable memory first: the spare must reach into taggable RAM.
        untaggable_free = sum(
            r.usage.free_bytes for r in self.host.status().regions if r.tag_size_bytes == 0
        )
        spare_bytes = untaggable_free + 8 * MiB
        self.host.create_vm(VmConfig(spare, False, TagPolicy.ON_FAULT, spare_bytes))
        try:
            self.host.guest_fault(spare, BOOT_RAM_GPA, spare_bytes, Access.WRITE)
        except ResourceExhaustedError:
            self.host.destroy_vm(spare)
            return None
        usage = self.host.status().usage
        hog_bytes = usage.free_bytes + int(usage.tag_free_bytes * lend_fraction) // PAGE * PAGE
        if hog_bytes == 0:
            self.host.destroy_vm(spare)
            return None
        hog = self._fresh_id("hog")
        self.host.create_vm(VmConfig(hog, False, TagPolicy.ON_FAULT, hog_bytes))
        self.host.guest_fault(hog, BOOT_RAM_GPA, hog_bytes, Access.WRITE)
        if self.host.status().usage.tag_lent_bytes:
            event("tag storage lent")
        self.host.destroy_vm(spare)
        return hog

    @rule(hog=consumes(hogs))
    def hog_leaves(self, hog) -> None:
        if hog is not None and hog in self.host.vms:
            self.host.destroy_vm(hog)

    def _regions(self, vm_id: str):
        return self.host.get_vm(vm_id).regions

    @rule(
        vm=vms,
        which=st.integers(0, 7),
        page=st.integers(0, 4095),
        nr_pages=st.integers(1, 600),
        access=st.sampled_from(list(Access)),
    )
    def fault(self, vm, which: int, page: int, nr_pages: int, access: Access) -> None:
        if vm is None or vm not in self.host.vms:
            return
        regions = self._regions(vm)
        region = regions[which % len(regions)]
        pages_in = region.size_bytes // PAGE
        start = page % pages_in
        nr = min(nr_pages, pages_in - start)
        before = dict(self.host.counters.evacuated_pages)
        try:
            result = self.host.guest_fault(vm, region.gpa + start * PAGE, nr * PAGE, access)
            event(f"fault ok ({access.value})")
            if result.pages_migrated:
                event("fault migrated pages")
        except TagStoreError as e:
            event(f"fault refused: {e.reason}")
        if self.host.counters.evacuated_pages != before:
            event("evacuation")

    @rule(
        vm=vms,
        which=st.integers(0, 7),
        page=st.integers(0, 4095),
        nr=st.integers(1, 8),
        seed=st.integers(0, 2**32 - 1),
    )
    def write_tags(self, vm, which: int, page: int, nr: int, seed: int) -> None:
        if vm is None or vm not in self.host.vms:
            return
        region = self._regions(vm)[which % len(self._regions(vm))]
        pages_in = region.size_bytes // PAGE
        start = page % pages_in
        nr = min(nr, pages_in - start)
        gpa = region.gpa + start * PAGE
        tags = np.random.default_rng(seed).integers(0, 16, nr * TAGS_PER_PAGE, dtype=np.uint8)
        try:
            self.host.copy_tags(vm, gpa, nr * PAGE, TagCopyDirection.TO_GUEST, tags.tobytes())
        except TagStoreError as e:
            event(f"write tags refused: {e.reason}")
            return
        for i in range(nr):
            self.tags[(vm, gpa + i * PAGE)] = tags[
                i * TAGS_PER_PAGE : (i + 1) * TAGS_PER_PAGE
            ].tobytes()

    @rule(data=st.data())
    def read_back_tags(self, data) -> None:
        """Every tag written reads back unchanged until its page is discarded."""
        if not self.tags:
            return
        vm, gpa = data.draw(st.sampled_from(sorted(self.tags)))
        got = self.host.copy_tags(vm, gpa, PAGE, TagCopyDirection.FROM_GUEST)
        assert got == self.tags[(vm, gpa)]

    @rule(vm=vms, size_mib=st.sampled_from([2, 4, 8]))
    def add_dimm(self, vm, size_mib: int) -> None:
        if vm is None or vm not in self.host.vms:
            return
        try:
            self.host.add_dimm(vm, self._fresh_id("dimm"), size_mib * MiB)
        except TagStoreError as e:
            event(f"dimm refused: {e.reason}")

    @rule(vm=vms, which=st.integers(0, 7))
    def remove_device(self, vm, which: int) -> None:
        if vm is None or vm not in self.host.vms:
            return
        devices = [r for r in self._regions(vm) if r.kind is not MemoryDeviceKind.BOOT_RAM]
        if not devices:
            return
        dev = devices[which % len(devices)]
        try:
            self.host.remove_memory_device(vm, dev.device_id)
        except TagStoreError as e:
            event(f"remove refused: {e.reason}")
            return
        self._forget_tags(vm, dev.gpa, dev.gpa + dev.size_bytes)

    @rule(
        vm=vms,
        block_mib=st.sampled_from([1, 2]),
        region_blocks=st.integers(1, 16),
        requested_blocks=st.integers(0, 16),
    )
    def add_virtio_mem(self, vm, block_mib: int, region_blocks: int, requested_blocks: int):
        if vm is None or vm not in self.host.vms:
            return
        cfg = VirtioMemConfig(
            region_blocks * block_mib * MiB,
            block_mib * MiB,
            min(requested_blocks, region_blocks) * block_mib * MiB,
        )
        try:
            self.host.add_virtio_mem(vm, self._fresh_id("vmem"), cfg)
        except TagStoreError as e:
            event(f"virtio-mem refused: {e.reason}")

    def _virtio_mem(self, vm, which: int):
        devs = [r for r in self._regions(vm) if r.kind is MemoryDeviceKind.VIRTIO_MEM]
        return devs[which % len(devs)] if devs else None

    @rule(vm=vms, which=st.integers(0, 7), requested_blocks=st.integers(0, 16))
    def resize_virtio_mem(self, vm, which: int, requested_blocks: int) -> None:
        if vm is None or vm not in self.host.vms or not (dev := self._virtio_mem(vm, which)):
            return
        blocks = min(requested_blocks, dev.size_bytes // dev.block_size_bytes)
        self.host.resize_virtio_mem(vm, dev.device_id, blocks * dev.block_size_bytes)

    @rule(
        vm=vms,
        which=st.integers(0, 7),
        kind=st.sampled_from(list(VirtioMemRequestType)),
        block=st.integers(-1, 17),
        nb_blocks=st.integers(0, 4),
        misalign=st.booleans(),
    )
    def virtio_mem_request(self, vm, which, kind, block, nb_blocks, misalign) -> None:
        """Guest requests, including bad ones: they are answered, never raised."""
        if vm is None or vm not in self.host.vms or not (dev := self._virtio_mem(vm, which)):
            return
        addr = dev.gpa + block * dev.block_size_bytes + (PAGE if misalign else 0)
        before_plugged = dev.plugged_bytes
        answer = self.host.virtio_mem_request(vm, dev.device_id, kind, max(addr, 0), nb_blocks)
        event(f"virtio-mem {kind.value} -> {answer.response.value}")
        after = next(r for r in self._regions(vm) if r.device_id == dev.device_id)
        if answer.response is not VirtioMemResponse.ACK or kind is VirtioMemRequestType.STATE:
            assert after.plugged_bytes == before_plugged
        if answer.response is VirtioMemResponse.ACK and kind is VirtioMemRequestType.UNPLUG:
            self._forget_tags(vm, addr, addr + nb_blocks * dev.block_size_bytes)
        if answer.response is VirtioMemResponse.ACK and kind is VirtioMemRequestType.UNPLUG_ALL:
            self._forget_tags(vm, dev.gpa, dev.gpa + dev.size_bytes)
        assert (
            after.plugged_bytes <= after.requested_size_bytes
            or kind is not VirtioMemRequestType.PLUG
        )

    @rule(vm=consumes(vms))
    def destroy_vm(self, vm) -> None:
        if vm is None or vm not in self.host.vms:
            return
        self.host.destroy_vm(vm)
        self.tags = {k: v for k, v in self.tags.items() if k[0] != vm}

    def _forget_tags(self, vm: str, lo: int, hi: int) -> None:
        self.tags = {k: v for k, v in self.tags.items() if not (k[0] == vm and lo <= k[1] < hi)}

    @invariant()
    def state_is_sound(self) -> None:
        assert self.host.check_invariants() == []

    @invariant()
    def usage_adds_up(self) -> None:
        status = self.host.status()
        assert status.usage.total_bytes == HOST_BYTES
        assert sum((r.usage for r in status.regions), start=type(status.usage)()) == status.usage

    @precondition(lambda self: len(self.host.vms) == 0)
    @invariant()
    def empty_host_holds_nothing(self) -> None:
        usage = self.host.status().usage
        assert usage.data_bytes == usage.tagged_bytes == usage.tag_lent_bytes == 0


# CI runs a short form; `TAGSTORE_FUZZ_EXAMPLES=2000 pytest tests/model/test_state_machine.py`
# is the soak (see bench/README.md).
HostLifecycle.TestCase.settings = settings(
    max_examples=int(os.environ.get("TAGSTORE_FUZZ_EXAMPLES", "60")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_host_lifecycle_keeps_invariants_and_tags = pytest.mark.slow(HostLifecycle.TestCase)
