"""The host: one owner of all tag storage state, and the operations a VMM drives.

Every public method is one operation that either completes, keeping every invariant, or raises
a :class:`~hostd.model.errors.TagStoreError`. Argument errors are found before anything
changes. Guest-protocol outcomes (virtio-mem) are returned as answers.
"""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from hostd.model import export, invariants
from hostd.model.compaction import HostPageMigration
from hostd.model.errors import (
    RESOURCE_DIMM_SLOTS,
    RESOURCE_GUEST_ADDRESS_SPACE,
    RESOURCE_MEMORY,
    RESOURCE_TAGGABLE_MEMORY,
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    TagStoreError,
)
from hostd.model.events import (
    EVENT_DEVICE_ADDED,
    EVENT_DEVICE_REMOVED,
    EVENT_FAULT,
    EVENT_VIRTIO_MEM_PLUGGED,
    EVENT_VIRTIO_MEM_RESIZED,
    EVENT_VIRTIO_MEM_UNPLUGGED,
    EVENT_VM_CREATED,
    EVENT_VM_DESTROYED,
    EVENT_VMM_DIFFERENCE,
    Event,
    Subscriber,
)
from hostd.model.migration import HostMigration, MigrationState
from hostd.model.physmem import (
    KIND_TAGGABLE,
    POOL_ANY,
    POOL_MTE_CAPABLE,
    POOL_NOT_CMA,
    POOL_TAGGABLE_FIRST,
    REBUILD_CHUNK_PAGES,
    TG_DATA,
    TG_FREE,
    TG_TAGGED,
    PhysicalMemory,
    as_slice,
    require_pages,
)
from hostd.model.topology import HostTopology, parse_topology
from hostd.model.types import (
    BOOT_RAM_GPA,
    HUGETLB_BYTES,
    MAX_FAULT_BYTES,
    MTE_GRANULE_BYTES,
    THP_BYTES,
    Access,
    BackingKind,
    DiscardResult,
    FaultResult,
    HostCounters,
    HostExport,
    HostStatus,
    MemoryDeviceKind,
    MemoryDeviceStatus,
    MiB,
    MigrationReason,
    Placement,
    RegionStatus,
    TagCopyDirection,
    TagPolicy,
    TiB,
    VirtioMemAnswer,
    VirtioMemConfig,
    VirtioMemRequestType,
    VirtioMemResponse,
    VmConfig,
    VmStatus,
    backing_kind,
)
from hostd.model.vm import MemoryDevice, Vm

IndexArray = npt.NDArray[np.int64]

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MAX_VMS = (1 << 16) - 1  # owner ids are uint16, 0 = no owner
MAX_GUEST_MEMORY_BYTES = 4 * TiB
MAX_DIMM_SLOTS = 256  # QEMU/ACPI limit
MAX_TAG_COPY_BYTES = 32 * MiB
MAX_DIFFERENCE_CHARS = (
    512  # a VMM's account of a difference, for logs and events  # 2 MiB of tags in one call
)
VIRTIO_MEM_MIN_BLOCK_BYTES = MiB
MAX_VIRTIO_MEM_NB_BLOCKS = 0xFFFF  # the request's nb_blocks is a le16
# The result of a fault that found nothing to do (frozen, so one is shared by all of them).
_NOTHING_DONE = FaultResult()


@dataclass
class HostState:
    """What :meth:`Host.save_state` persists: flat arrays plus JSON-serialisable tables."""

    arrays: dict[str, npt.NDArray[Any]]
    tables: dict[str, Any]


def _check_id(field: str, value: str) -> None:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise InvalidArgumentError(
            field, value, "must be 1-63 characters of [A-Za-z0-9._-], starting alphanumeric"
        )


class Host(HostMigration, HostPageMigration):
    """A modelled arm64 KVM host with dynamic (or static) MTE tag storage.

    Live migration's operations come from :class:`~hostd.model.migration.HostMigration`, host
    page migration's (compaction, offlining) from
    :class:`~hostd.model.compaction.HostPageMigration`.
    Not thread-safe: the daemon serialises calls.
    """

    def __init__(
        self, topology: HostTopology, placement: Placement = Placement.TAG_BLOCK_AWARE
    ) -> None:
        self.topology = topology
        self.counters = HostCounters()
        self._subscribers: list[Subscriber] = []
        self.mem = PhysicalMemory(
            topology, placement, self.counters, self._emit, lambda: bool(self._subscribers)
        )
        self.mem.on_remap = self._remap
        self._vms: dict[str, Vm] = {}
        self._by_slot: dict[int, Vm] = {}
        # Migrations in progress by VM id (the rules are in hostd.model.migration).
        self.migrations: dict[str, MigrationState] = {}

    @property
    def page_size(self) -> int:
        return self.topology.page_size_bytes

    @property
    def placement(self) -> Placement:
        return self.mem.placement

    # ----------------------------------------------------------------- events

    def subscribe(self, fn: Subscriber) -> None:
        """Call ``fn(event)`` after each state change (see :mod:`hostd.model.events`)."""
        self._subscribers.append(fn)

    def unsubscribe(self, fn: Subscriber) -> None:
        if fn in self._subscribers:
            self._subscribers.remove(fn)

    def _emit(self, event: Event) -> None:
        for fn in list(self._subscribers):
            fn(event)

    # ----------------------------------------------------------------- lookups

    def _vm(self, vm_id: str) -> Vm:
        vm = self._vms.get(vm_id)
        if vm is None:
            raise NotFoundError(f"no VM {vm_id!r}", reason="VM_NOT_FOUND", vm_id=vm_id)
        return vm

    def _device(self, vm: Vm, device_id: str) -> MemoryDevice:
        dev = vm.devices.get(device_id)
        if dev is None:
            raise NotFoundError(
                f"VM {vm.vm_id!r} has no memory device {device_id!r}",
                reason="DEVICE_NOT_FOUND",
                vm_id=vm.vm_id,
                device_id=device_id,
            )
        return dev

    def _virtio_mem(self, vm: Vm, device_id: str) -> MemoryDevice:
        dev = self._device(vm, device_id)
        if not dev.is_virtio_mem:
            raise FailedPreconditionError(
                f"memory device {device_id!r} is a {dev.kind.value}, not virtio-mem",
                reason="NOT_VIRTIO_MEM",
                vm_id=vm.vm_id,
                device_id=device_id,
            )
        return dev

    def _guest_range(self, vm: Vm, gpa: int, length_bytes: int, max_bytes: int) -> IndexArray:
        """Stage-2 offsets of a page-aligned, plugged guest range (or an error, nothing done)."""
        self._check_range_args(gpa, length_bytes, max_bytes)
        ps = self.page_size
        nr = length_bytes // ps
        first = vm.gfn_offset(gpa)
        if self._plugged_in_one_device(vm, gpa, length_bytes):
            return np.arange(first, first + nr, dtype=np.int64)
        plugged = vm.plugged_mask(gpa, nr)
        if not plugged.all():
            bad = gpa + int(np.flatnonzero(~plugged)[0]) * ps
            raise FailedPreconditionError(
                f"gpa {bad:#x} of VM {vm.vm_id!r} is not plugged guest memory",
                reason="GPA_NOT_PLUGGED",
                vm_id=vm.vm_id,
                gpa=bad,
            )
        return np.arange(first, first + nr, dtype=np.int64)

    def _check_range_args(self, gpa: int, length_bytes: int, max_bytes: int) -> None:
        ps = self.page_size
        if gpa < 0 or gpa % ps:
            raise InvalidArgumentError("gpa", gpa, f"must be aligned to the page size ({ps:#x})")
        if length_bytes <= 0:
            raise InvalidArgumentError("length", length_bytes, "must not be zero")
        if length_bytes % ps:
            raise InvalidArgumentError(
                "length", length_bytes, f"must be a multiple of the page size ({ps:#x})"
            )
        if length_bytes > max_bytes:
            raise InvalidArgumentError("length", length_bytes, f"at most {max_bytes:#x} per call")
        if gpa + length_bytes > 1 << 64:
            raise InvalidArgumentError("length", length_bytes, "gpa + length wraps past 2^64")

    @staticmethod
    def _plugged_in_one_device(vm: Vm, gpa: int, length_bytes: int) -> bool:
        """Whether the range lies in one device and is plugged: the common case, answered
        without building a per-page mask."""
        dev = vm.device_at(gpa)
        if dev is None or gpa + length_bytes > dev.end:
            return False
        if not dev.is_virtio_mem:
            return True
        first = (gpa - dev.gpa) // dev.block_size_bytes
        last = (gpa + length_bytes - 1 - dev.gpa) // dev.block_size_bytes
        return bool(dev.plugged[first : last + 1].all())

    # ----------------------------------------------------------------- mapping

    def _map(self, vm: Vm, offs: IndexArray, pages: IndexArray, *, tagged: bool) -> None:
        vm.stage2[as_slice(offs)] = pages + 1
        vm.mapped_pages += offs.size
        if tagged:
            vm.tagged_pages += offs.size

    def _unmap(self, vm: Vm, offs: IndexArray) -> None:
        """Drop the guest pages at ``offs``: host pages, tags and tag blocks are released."""
        # One run of mapped pages (a guest mapped throughout, destroyed) is read and cleared as
        # a slice, with no gather or scatter.
        at = as_slice(offs)
        s2 = vm.stage2[at]
        mapped = s2 != 0
        if not mapped.any():
            return
        every = bool(mapped.all())
        pages = (s2 if every else s2[mapped]).astype(np.int64) - 1
        gone = offs if every else offs[mapped]
        self._migration_mark_dirty(vm, gone)
        vm.tagged_pages -= int(np.count_nonzero(self.mem.flags[pages] == TG_TAGGED))
        vm.mapped_pages -= pages.size
        vm.stage2[at if every else gone] = 0
        vm.split_folios(gone)
        self.mem.free(pages)

    def _remap(self, slot: int, offs: IndexArray, pages: IndexArray) -> None:
        vm = self._by_slot[slot]
        vm.stage2[offs] = (pages + 1).astype(np.uint32)
        # A migrated page leaves its folio: the THP is split.
        vm.split_folios(offs)

    def _prefault_tagged(self, vm: Vm, offs: IndexArray) -> int:
        """Back guest pages with tagged memory now, so later faults cannot fail."""
        pages, reserved, _ = self.mem.alloc_tagged(offs.size, vm.slot, offs)
        self._map(vm, offs, pages, tagged=True)
        return reserved

    def _backs_up_front(self, vm: Vm) -> bool:
        """Whether plugged memory is backed the moment it appears: EAGER is preallocation (QEMU
        ``prealloc=on`` for an MTE guest), and a pinned guest's memory is pinned, so backed, when
        VFIO maps it."""
        cfg = vm.config
        return cfg.pinned or (cfg.mte_enabled and cfg.tag_policy is TagPolicy.EAGER)

    @staticmethod
    def _untagged_pool(config: VmConfig) -> int:
        """Where a VM's untagged pages may live (physmem ``POOL_*``)."""
        if config.pinned:
            # Long-term pinning migrates pages out of CMA first: never lent tag storage.
            return POOL_NOT_CMA
        if not config.mte_enabled:
            return POOL_ANY
        if config.tag_policy is TagPolicy.ON_TAG_ACCESS:
            # Mapped NoTagAccess (FEAT_MTE_PERM), untagged data may even live on memory that
            # cannot hold tags; taggable memory first, so a first tag access rarely moves it.
            return POOL_TAGGABLE_FIRST
        return POOL_MTE_CAPABLE

    # ----------------------------------------------------------------- VMs

    def create_vm(self, config: VmConfig) -> VmStatus:
        """Create a VM; an EAGER MTE VM gets all of its boot RAM tagged up front."""
        _check_id("vm_id", config.vm_id)
        ps = self.page_size
        for field, value in (
            ("boot_memory_bytes", config.boot_memory_bytes),
            ("max_memory_bytes", config.max_memory_bytes),
        ):
            if value < 0 or value % ps:
                raise InvalidArgumentError(field, value, f"must be a multiple of {ps:#x}")
            if value > MAX_GUEST_MEMORY_BYTES:
                raise InvalidArgumentError(field, value, f"at most {MAX_GUEST_MEMORY_BYTES:#x}")
        if config.boot_memory_bytes == 0:
            raise InvalidArgumentError("boot_memory_bytes", 0, "must not be zero")
        if config.max_memory_bytes and config.max_memory_bytes < config.boot_memory_bytes:
            raise InvalidArgumentError(
                "max_memory_bytes",
                config.max_memory_bytes,
                f"must be 0 or at least boot_memory_bytes ({config.boot_memory_bytes:#x})",
            )
        if not 0 <= config.dimm_slots <= MAX_DIMM_SLOTS:
            raise InvalidArgumentError("dimm_slots", config.dimm_slots, f"0..{MAX_DIMM_SLOTS}")
        kind = backing_kind(ps, config.backing_page_size_bytes)
        if kind is None:
            raise InvalidArgumentError(
                "backing_page_size",
                config.backing_page_size_bytes,
                f"must be 0 or the page size ({ps:#x}), the THP size "
                f"({THP_BYTES[ps]:#x}) or the hugetlb size ({HUGETLB_BYTES[ps]:#x})",
            )
        config = replace(config, backing_page_size_bytes=max(config.backing_page_size_bytes, ps))
        huge_bytes = config.backing_page_size_bytes
        if kind is BackingKind.HUGETLB and config.boot_memory_bytes % huge_bytes:
            # QEMU: a hugetlbfs memory backend's size must be a multiple of its page size.
            raise InvalidArgumentError(
                "boot_memory_bytes",
                config.boot_memory_bytes,
                f"must be a multiple of the hugetlb page size "
                f"({config.backing_page_size_bytes:#x})",
            )
        on_tag_access = config.mte_enabled and config.tag_policy is TagPolicy.ON_TAG_ACCESS
        if on_tag_access and config.pinned:
            raise FailedPreconditionError(
                "tag policy ON_TAG_ACCESS cannot serve a pinned VM: a page that must move when "
                "the guest first touches its tags cannot move while it is pinned",
                reason="POLICY_NOT_SUPPORTED",
                tag_policy=config.tag_policy.value,
                pinned=True,
            )
        if on_tag_access and not self.topology.mte_perm:
            raise FailedPreconditionError(
                "tag policy ON_TAG_ACCESS needs a host with FEAT_MTE_PERM (mte_perm)",
                reason="POLICY_NOT_SUPPORTED",
                tag_policy=config.tag_policy.value,
            )
        if config.vm_id in self._vms:
            raise AlreadyExistsError(
                f"VM {config.vm_id!r} exists", reason="VM_ALREADY_EXISTS", vm_id=config.vm_id
            )
        slot = next((s for s in range(1, MAX_VMS + 1) if s not in self._by_slot), None)
        if slot is None:
            raise ResourceExhaustedError("vm_slots", f"at most {MAX_VMS} VMs")
        vm = Vm.create(slot, config, ps)
        self.mem.owner_pool[slot] = self._untagged_pool(config)
        self.mem.pinned_owner[slot] = config.pinned
        self._vms[config.vm_id] = vm
        self._by_slot[slot] = vm
        if self._backs_up_front(vm):
            boot = vm.boot_ram
            first = vm.gfn_offset(boot.gpa)
            try:
                self._back(vm, np.arange(first, first + boot.size_bytes // ps))
            except TagStoreError:
                self._forget_vm(vm)
                raise
        self._emit(Event(EVENT_VM_CREATED, vm_id=vm.vm_id))
        return self._vm_status(vm)

    def _forget_vm(self, vm: Vm) -> None:
        del self._vms[vm.vm_id]
        del self._by_slot[vm.slot]
        self.mem.owner_pool[vm.slot] = POOL_ANY
        self.mem.pinned_owner[vm.slot] = False

    def get_vm(self, vm_id: str) -> VmStatus:
        return self._vm_status(self._vm(vm_id))

    def list_vms(self) -> list[VmStatus]:
        return [self._vm_status(vm) for vm in sorted(self._vms.values(), key=lambda v: v.vm_id)]

    def destroy_vm(self, vm_id: str) -> VmStatus:
        """Destroy a VM: every page, tag and tag block it held goes back to the host.

        Returns the VM as it was just before (its final mapped and tagged bytes)."""
        vm = self._vm(vm_id)
        self._migration_refuse_config(vm, "destroying it")
        final = self._vm_status(vm)
        self._release_vm(vm)
        return final

    def _release_vm(self, vm: Vm) -> None:
        """Destroy ``vm`` (no status: its caller needs none)."""
        # Its tags go first, in one pass over the tag store (a VM's pages are the pages it
        # owns): unmapping then finds none to drop, where an unmapping in steps would compact
        # the store, hundreds of MiB for a large tagged guest, once per step.
        tags = self.mem.tags
        tags.discard_stored(self.mem.owner[tags.pages] == vm.slot)
        # A chunk of the map at a time: a large VM's whole page list would be a temporary of
        # several bytes per host page (the daemon's memory is bounded, also during replay).
        for start in range(0, vm.stage2.size, REBUILD_CHUNK_PAGES):
            offs = np.flatnonzero(vm.stage2[start : start + REBUILD_CHUNK_PAGES])
            if offs.size:
                self._unmap(vm, offs + start)
        self._forget_vm(vm)
        self._emit(Event(EVENT_VM_DESTROYED, vm_id=vm.vm_id))

    def _vm_status(self, vm: Vm) -> VmStatus:
        regions = [
            self._device_status(vm, d) for d in sorted(vm.devices.values(), key=lambda d: d.gpa)
        ]
        ps = self.page_size
        c = vm.config
        return VmStatus(
            vm_id=vm.vm_id,
            mte_enabled=c.mte_enabled,
            tag_policy=c.tag_policy,
            boot_memory_bytes=c.boot_memory_bytes,
            dimm_slots=c.dimm_slots,
            max_memory_bytes=c.max_memory_bytes,
            mapped_bytes=vm.mapped_pages * ps,
            tagged_bytes=vm.tagged_pages * ps,
            regions=tuple(regions),
            pinned=c.pinned,
            discarded_bytes=vm.discarded_pages * ps,
            backing_page_size_bytes=c.backing_page_size_bytes,
            huge_page_bytes=vm.huge_pages * ps,
        )

    def _device_status(self, vm: Vm, d: MemoryDevice) -> MemoryDeviceStatus:
        first = vm.gfn_offset(d.gpa)
        end = first + d.size_bytes // self.page_size
        mapped = tagged = 0
        for start in range(first, end, REBUILD_CHUNK_PAGES):
            s2 = vm.stage2[start : min(start + REBUILD_CHUNK_PAGES, end)]
            # Host page index + 1, so never 0 here: uint32 indices, no int64 copy.
            pages = s2[s2 != 0] - 1
            mapped += pages.size
            tagged += int(np.count_nonzero(self.mem.flags[pages] == TG_TAGGED))
        return vm.device_status(d, mapped, tagged)

    # ----------------------------------------------------------------- memory devices

    def add_dimm(self, vm_id: str, device_id: str, size_bytes: int) -> MemoryDeviceStatus:
        """Hot-add a DIMM (plugged as a whole); an EAGER MTE VM gets it tagged up front."""
        vm = self._vm(vm_id)
        self._migration_refuse_config(vm, "adding a memory device")
        _check_id("device_id", device_id)
        ps = self.page_size
        unit = self._hugetlb_bytes(vm) or ps
        if size_bytes <= 0 or size_bytes % unit:
            raise InvalidArgumentError(
                "size_bytes", size_bytes, f"must be a non-zero multiple of {unit:#x}"
            )
        self._check_new_device(vm, device_id)
        if vm.nr_dimms() >= vm.config.dimm_slots:
            raise ResourceExhaustedError(
                RESOURCE_DIMM_SLOTS,
                f"VM {vm_id!r} has all {vm.config.dimm_slots} DIMM slots in use",
                vm_id=vm_id,
                dimm_slots=vm.config.dimm_slots,
            )
        gpa = self._place(vm, size_bytes, ps)
        dev = MemoryDevice(device_id, MemoryDeviceKind.DIMM, gpa, size_bytes)
        vm.devices[device_id] = dev
        if self._backs_up_front(vm):
            first = vm.gfn_offset(gpa)
            try:
                self._back(vm, np.arange(first, first + size_bytes // ps))
            except TagStoreError:
                del vm.devices[device_id]
                raise
        self.counters.add(self.counters.dimm_operations, "plug")
        self._emit(Event(EVENT_DEVICE_ADDED, vm_id=vm_id, device_id=device_id))
        return self._device_status(vm, dev)

    def add_virtio_mem(
        self, vm_id: str, device_id: str, config: VirtioMemConfig
    ) -> MemoryDeviceStatus:
        """Add a virtio-mem device with nothing plugged; the guest plugs blocks on request."""
        vm = self._vm(vm_id)
        self._migration_refuse_config(vm, "adding a memory device")
        _check_id("device_id", device_id)
        bs = config.block_size_bytes
        if bs < max(VIRTIO_MEM_MIN_BLOCK_BYTES, self.page_size) or bs & (bs - 1):
            raise InvalidArgumentError(
                "block_size", bs, "must be a power of two of at least 1 MiB and the page size"
            )
        if config.region_size_bytes <= 0 or config.region_size_bytes % bs:
            raise InvalidArgumentError(
                "region_size",
                config.region_size_bytes,
                f"must be a non-zero multiple of block_size ({bs:#x})",
            )
        hugetlb = self._hugetlb_bytes(vm)
        if hugetlb and bs % hugetlb:
            # QEMU: the block size must be at least the memory backend's page size.
            raise InvalidArgumentError(
                "block_size", bs, f"must be a multiple of the VM's hugetlb page size ({hugetlb:#x})"
            )
        self._check_requested(config.requested_size_bytes, bs, config.region_size_bytes)
        self._check_new_device(vm, device_id)
        gpa = self._place(vm, config.region_size_bytes, bs)
        dev = MemoryDevice(
            device_id,
            MemoryDeviceKind.VIRTIO_MEM,
            gpa,
            config.region_size_bytes,
            block_size_bytes=bs,
            requested_size_bytes=config.requested_size_bytes,
            prealloc=bool(config.prealloc),
            plugged=np.zeros(config.region_size_bytes // bs, dtype=bool),
        )
        dev.resize_usable_region(config.requested_size_bytes, can_shrink=True)
        vm.devices[device_id] = dev
        self._emit(Event(EVENT_DEVICE_ADDED, vm_id=vm_id, device_id=device_id))
        return self._device_status(vm, dev)

    @staticmethod
    def _check_requested(requested: int, block_size: int, region_size: int) -> None:
        if requested < 0 or requested % block_size or requested > region_size:
            raise InvalidArgumentError(
                "requested_size",
                requested,
                f"must be a multiple of block_size ({block_size:#x}) "
                f"no larger than region_size ({region_size:#x})",
            )

    def _check_new_device(self, vm: Vm, device_id: str) -> None:
        if device_id in vm.devices:
            raise AlreadyExistsError(
                f"VM {vm.vm_id!r} already has a memory device {device_id!r}",
                reason="DEVICE_ALREADY_EXISTS",
                vm_id=vm.vm_id,
                device_id=device_id,
            )

    def _hugetlb_bytes(self, vm: Vm) -> int:
        """The VM's hugetlb page size, or 0 when it is not backed by hugetlbfs."""
        size = vm.config.backing_page_size_bytes
        return size if backing_kind(self.page_size, size) is BackingKind.HUGETLB else 0

    def _place(self, vm: Vm, size_bytes: int, align_bytes: int) -> int:
        # Folios are aligned in the stage-2 map (as in the memory backend), counted from boot
        # RAM: a device starts on a folio boundary so that it can be backed by whole folios.
        folio_bytes = vm.folio_pages * self.page_size
        if folio_bytes > align_bytes:
            gpa = vm.place_device(size_bytes, folio_bytes, origin=BOOT_RAM_GPA)
        else:
            gpa = vm.place_device(size_bytes, align_bytes)
        if gpa is None:
            raise ResourceExhaustedError(
                RESOURCE_GUEST_ADDRESS_SPACE,
                f"no room for {size_bytes:#x} bytes in VM {vm.vm_id!r}'s device memory "
                f"(max_memory_bytes {vm.config.max_memory_bytes:#x})",
                vm_id=vm.vm_id,
                size_bytes=size_bytes,
            )
        return gpa

    def remove_memory_device(self, vm_id: str, device_id: str) -> None:
        """Remove a DIMM (its memory is released) or a virtio-mem device with nothing plugged
        and nothing requested."""
        vm = self._vm(vm_id)
        self._migration_refuse_config(vm, "removing a memory device")
        dev = self._device(vm, device_id)
        if dev.kind is MemoryDeviceKind.BOOT_RAM:
            raise FailedPreconditionError(
                "boot RAM cannot be removed", reason="BOOT_RAM", vm_id=vm_id, device_id=device_id
            )
        if dev.is_virtio_mem and dev.plugged.any():
            raise FailedPreconditionError(
                f"virtio-mem device {device_id!r} still has {dev.plugged_bytes:#x} bytes plugged",
                reason="DEVICE_HAS_PLUGGED_MEMORY",
                vm_id=vm_id,
                device_id=device_id,
                plugged_bytes=dev.plugged_bytes,
            )
        if dev.is_virtio_mem and dev.requested_size_bytes:
            # QEMU's unplug request check, after the plugged size: "cannot get unplugged while
            # 'requested-size' != '0'".
            raise FailedPreconditionError(
                f"virtio-mem device {device_id!r} has requested_size "
                f"{dev.requested_size_bytes:#x}; set it to 0 and let the guest unplug first",
                reason="REQUESTED_SIZE_NOT_ZERO",
                vm_id=vm_id,
                device_id=device_id,
                requested_size_bytes=dev.requested_size_bytes,
            )
        first = vm.gfn_offset(dev.gpa)
        self._unmap(vm, np.arange(first, first + dev.size_bytes // self.page_size))
        del vm.devices[device_id]
        if dev.kind is MemoryDeviceKind.DIMM:
            self.counters.add(self.counters.dimm_operations, "unplug")
        self._emit(Event(EVENT_DEVICE_REMOVED, vm_id=vm_id, device_id=device_id))

    def resize_virtio_mem(
        self, vm_id: str, device_id: str, requested_size_bytes: int
    ) -> MemoryDeviceStatus:
        """The operator changes ``requested_size``; the guest driver then plugs or unplugs."""
        vm = self._vm(vm_id)
        self._migration_refuse_config(vm, "resizing a memory device")
        dev = self._virtio_mem(vm, device_id)
        self._check_requested(requested_size_bytes, dev.block_size_bytes, dev.size_bytes)
        if self._preallocates(vm, dev) and requested_size_bytes > dev.requested_size_bytes:
            self._check_backable(vm, dev, requested_size_bytes)
        dev.requested_size_bytes = requested_size_bytes
        dev.resize_usable_region(requested_size_bytes, can_shrink=False)
        self._emit(
            Event(
                EVENT_VIRTIO_MEM_RESIZED,
                vm_id=vm_id,
                device_id=device_id,
                detail={"requested_size_bytes": str(requested_size_bytes)},
            )
        )
        return self._device_status(vm, dev)

    def virtio_mem_request(
        self,
        vm_id: str,
        device_id: str,
        kind: VirtioMemRequestType,
        addr: int = 0,
        nb_blocks: int = 0,
    ) -> VirtioMemAnswer:
        """Process a guest driver request; the outcome is an answer, never an exception."""
        vm = self._vm(vm_id)
        dev = self._virtio_mem(vm, device_id)
        if self._migration_busy(vm):
            # QEMU answers BUSY while a migration runs; the driver retries on a timer.
            answer = VirtioMemAnswer(VirtioMemResponse.BUSY)
        else:
            answer = self._process_virtio_mem(vm, dev, kind, addr, nb_blocks)
        self.counters.add(self.counters.virtio_mem_requests, (kind.value, answer.response.value))
        return answer

    def _process_virtio_mem(
        self, vm: Vm, dev: MemoryDevice, kind: VirtioMemRequestType, addr: int, nb_blocks: int
    ) -> VirtioMemAnswer:
        if kind is VirtioMemRequestType.UNPLUG_ALL:
            self._unplug_blocks(vm, dev, np.flatnonzero(dev.plugged))
            dev.resize_usable_region(dev.requested_size_bytes, can_shrink=True)
            return VirtioMemAnswer(VirtioMemResponse.ACK)
        if not 0 <= nb_blocks <= MAX_VIRTIO_MEM_NB_BLOCKS or addr < 0:
            return VirtioMemAnswer(VirtioMemResponse.ERROR)
        if kind is VirtioMemRequestType.STATE:
            if not dev.valid_range(addr, nb_blocks):
                return VirtioMemAnswer(VirtioMemResponse.ERROR)
            return VirtioMemAnswer(VirtioMemResponse.ACK, dev.block_state(addr, nb_blocks))
        refusal = dev.check_request(kind, addr, nb_blocks)
        if refusal is not None:
            return VirtioMemAnswer(refusal)
        blocks = np.arange(
            dev.block_range(addr, nb_blocks).start, dev.block_range(addr, nb_blocks).stop
        )
        if kind is VirtioMemRequestType.UNPLUG:
            self._unplug_blocks(vm, dev, blocks)
            return VirtioMemAnswer(VirtioMemResponse.ACK)
        return VirtioMemAnswer(self._plug_blocks(vm, dev, blocks))

    def _block_offsets(self, vm: Vm, dev: MemoryDevice, blocks: IndexArray) -> IndexArray:
        per = dev.block_size_bytes // self.page_size
        base = vm.gfn_offset(dev.gpa)
        return (base + blocks[:, None] * per + np.arange(per)).ravel().astype(np.int64)

    def _preallocates(self, vm: Vm, dev: MemoryDevice) -> bool:
        """Whether a PLUG on ``dev`` backs its blocks before it is ACKed: QEMU's ``prealloc``
        device property, which an EAGER MTE guest and a pinned guest imply."""
        return dev.prealloc or self._backs_up_front(vm)

    def _plug_blocks(self, vm: Vm, dev: MemoryDevice, blocks: IndexArray) -> VirtioMemResponse:
        offs = self._block_offsets(vm, dev, blocks)
        if self._preallocates(vm, dev):
            try:
                self._back(vm, offs)
            except ResourceExhaustedError:
                # QEMU answers BUSY when preallocation fails (Linux retries on a backoff
                # timer); NACK is only for requested_size, and a guest retries it at once.
                return VirtioMemResponse.BUSY
        # Without prealloc the PLUG promises address space only: memory is found at fault
        # time, as on a real host (where a fault that cannot be backed fails).
        dev.plugged[blocks] = True
        self._emit(
            Event(
                EVENT_VIRTIO_MEM_PLUGGED, vm_id=vm.vm_id, device_id=dev.device_id, count=blocks.size
            )
        )
        return VirtioMemResponse.ACK

    def _back(self, vm: Vm, offs: IndexArray) -> None:
        """Back guest pages ``offs`` (not mapped yet) now, as a preallocation does: tagged for
        an MTE guest whose policy provides tags at fault, untagged otherwise."""
        cfg = vm.config
        tagged = cfg.mte_enabled and cfg.tag_policy is not TagPolicy.ON_TAG_ACCESS
        folio_offs = np.empty(0, np.int64)
        if vm.folio_pages > 1:
            offs, folio_offs, _ = self._map_folios(vm, offs, tagged=tagged)
        try:
            if tagged:
                self._prefault_tagged(vm, offs)
            else:
                pool = self._untagged_pool(cfg)
                pages = self.mem.alloc_untagged(offs.size, vm.slot, offs, pool=pool)
                self._map(vm, offs, pages, tagged=False)
        except TagStoreError:
            self._unmap(vm, folio_offs)
            raise

    def _backable_pages(self, vm: Vm) -> int:
        cfg = vm.config
        if cfg.mte_enabled and cfg.tag_policy is not TagPolicy.ON_TAG_ACCESS:
            return self.mem.free_pages(TG_FREE)
        return self.mem.untagged_capacity(self._untagged_pool(cfg))

    def _check_backable(self, vm: Vm, dev: MemoryDevice, requested_size_bytes: int) -> None:
        """Refuse a requested size a preallocating device could not back now: the admission
        check a VMM makes before it sets QEMU's ``requested-size``."""
        need = (requested_size_bytes - dev.plugged_bytes) // self.page_size
        available = self._backable_pages(vm)
        if need > available:
            cfg = vm.config
            tagged = cfg.mte_enabled and cfg.tag_policy is not TagPolicy.ON_TAG_ACCESS
            resource = RESOURCE_TAGGABLE_MEMORY if tagged else RESOURCE_MEMORY
            raise ResourceExhaustedError(
                resource,
                f"virtio-mem device {dev.device_id!r} preallocates: requested_size "
                f"{requested_size_bytes:#x} needs {need} more pages, the host can back "
                f"{available}",
                vm_id=vm.vm_id,
                device_id=dev.device_id,
                requested_size_bytes=requested_size_bytes,
                nr_pages=need,
                available_pages=available,
            )

    def _unplug_blocks(self, vm: Vm, dev: MemoryDevice, blocks: IndexArray) -> None:
        if blocks.size == 0:
            return
        # Unplugged memory may be discarded by the device: pages and tags are gone.
        self._unmap(vm, self._block_offsets(vm, dev, blocks))
        dev.plugged[blocks] = False
        self._emit(
            Event(
                EVENT_VIRTIO_MEM_UNPLUGGED,
                vm_id=vm.vm_id,
                device_id=dev.device_id,
                count=blocks.size,
            )
        )

    # ----------------------------------------------------------------- guest faults

    def guest_fault(self, vm_id: str, gpa: int, length_bytes: int, access: Access) -> FaultResult:
        """A stage-2 fault over ``[gpa, gpa + length_bytes)``: back and map what is not mapped,
        and provide tag storage as the VM's tag policy says."""
        t0 = time.perf_counter()
        outcome = "error"
        try:
            vm = self._fault_vm(vm_id, gpa, length_bytes, access)
            if self._fault_is_present(vm, gpa, length_bytes, access):
                # The hot path (a fault that raced with another vCPU's): mapped pages are
                # plugged pages, so there is nothing to check or do.
                result = _NOTHING_DONE
            else:
                offs = self._guest_range(vm, gpa, length_bytes, MAX_FAULT_BYTES)
                result = self._fault(vm, offs, access)
            outcome = "mapped" if result.newly_mapped_pages else "present"
            return result
        finally:
            self._count_fault(vm_id, access, outcome, t0)

    def guest_fault_if_present(
        self, vm_id: str, gpa: int, length_bytes: int, access: Access
    ) -> FaultResult | None:
        """:meth:`guest_fault` when every page of the range is already mapped as ``access``
        needs: its result, counted like any fault, and no state changed. None when the fault
        has work to do or would be refused; then nothing is done or counted, and
        :meth:`guest_fault` does the work (or refuses)."""
        t0 = time.perf_counter()
        try:
            vm = self._fault_vm(vm_id, gpa, length_bytes, access)
        except TagStoreError:
            return None
        if not self._fault_is_present(vm, gpa, length_bytes, access):
            return None
        self._count_fault(vm_id, access, "present", t0)
        return _NOTHING_DONE

    def _fault_vm(self, vm_id: str, gpa: int, length_bytes: int, access: Access) -> Vm:
        """The VM of a fault, or the refusal of the fault's arguments."""
        vm = self._vm(vm_id)
        self._migration_refuse_io(vm, "guest fault")
        self._check_range_args(gpa, length_bytes, MAX_FAULT_BYTES)
        if access is Access.TAG and not vm.config.mte_enabled:
            raise FailedPreconditionError(
                f"VM {vm_id!r} does not have MTE enabled: no tag access",
                reason="VM_NOT_MTE",
                vm_id=vm_id,
            )
        return vm

    def _fault_is_present(self, vm: Vm, gpa: int, length_bytes: int, access: Access) -> bool:
        """Whether every page of a checked fault's range is mapped as ``access`` needs."""
        first = vm.gfn_offset(gpa)
        last = first + length_bytes // self.page_size
        return (
            first >= 0
            and last <= vm.stage2.size
            and self._mapped_as_wanted(vm, vm.stage2[first:last], access)
        )

    def _count_fault(self, vm_id: str, access: Access, outcome: str, t0: float) -> None:
        seconds = time.perf_counter() - t0
        kind = access.value
        faults = self.counters.faults
        faults[(kind, outcome)] = faults.get((kind, outcome), 0) + 1
        self.counters.fault_seconds[kind].observe(seconds)
        if self._subscribers:  # only a WatchEvents stream that asked for faults wants one
            self._emit(
                Event(
                    EVENT_FAULT,
                    vm_id=vm_id,
                    seconds=seconds,
                    detail={"access": kind, "outcome": outcome},
                )
            )

    def report_vmm_difference(self, vm_id: str, device_id: str, reporter: str, what: str) -> None:
        """A VMM found that its view of a VM and hostd's differ in a way it could not reconcile
        (the QEMU bridge: QEMU's plugged size against hostd's). Counted per reporter and
        published as an event, so that the difference is never silent; changes no VM state."""
        vm = self._vm(vm_id)
        if device_id:
            self._device(vm, device_id)
        _check_id("reporter", reporter)
        if not isinstance(what, str) or not 0 < len(what) <= MAX_DIFFERENCE_CHARS:
            raise InvalidArgumentError(
                "what", str(what)[:32], f"must be 1-{MAX_DIFFERENCE_CHARS} characters"
            )
        table = self.counters.vmm_differences
        table[reporter] = table.get(reporter, 0) + 1
        self._emit(
            Event(
                EVENT_VMM_DIFFERENCE,
                vm_id=vm_id,
                device_id=device_id,
                detail={"reporter": reporter, "what": what},
            )
        )

    def fault_changes_nothing(
        self, vm_id: str, gpa: int, length_bytes: int, access: Access
    ) -> bool:
        """Whether :meth:`guest_fault` with these arguments would find every page already
        mapped as ``access`` needs, and so change no state. Reads only; False when unsure."""
        vm = self._vms.get(vm_id)
        ps = self.page_size
        if vm is None or not isinstance(gpa, int) or not isinstance(length_bytes, int):
            return False
        if length_bytes <= 0 or gpa % ps or length_bytes % ps:
            return False
        first = vm.gfn_offset(gpa)
        last = first + length_bytes // ps
        return (
            first >= 0
            and last <= vm.stage2.size
            and self._mapped_as_wanted(vm, vm.stage2[first:last], access)
        )

    def _mapped_as_wanted(self, vm: Vm, s2: npt.NDArray[np.uint32], access: Access) -> bool:
        """Whether stage-2 entries ``s2`` are all mapped as the VM's policy wants for
        ``access`` (ON_FAULT / EAGER pages are tagged from their first fault)."""
        # count_nonzero: a third of the cost of all() on the few pages of a typical fault.
        if np.count_nonzero(s2) != s2.size:
            return False
        cfg = vm.config
        if cfg.mte_enabled and cfg.tag_policy is TagPolicy.ON_TAG_ACCESS and access is Access.TAG:
            return bool((self.mem.flags[s2.astype(np.int64) - 1] == TG_TAGGED).all())
        return True

    def _fault(self, vm: Vm, offs: IndexArray, access: Access) -> FaultResult:
        s2 = vm.stage2[as_slice(offs)]
        cfg = vm.config
        needs_tags = cfg.mte_enabled and (
            cfg.tag_policy is not TagPolicy.ON_TAG_ACCESS or access is Access.TAG
        )
        if self._mapped_as_wanted(vm, s2, access):
            return FaultResult()
        self._migration_mark_dirty(vm, offs)
        unmapped = offs[s2 == 0]
        on_tag_access = cfg.mte_enabled and cfg.tag_policy is TagPolicy.ON_TAG_ACCESS
        if on_tag_access and access is Access.TAG and vm.folio_pages > 1:
            # Tag storage is reserved per folio: a tag access to a huge folio tags all of it
            # (pages that cannot be tagged in place move, which splits the folio).
            fp = vm.folio_pages
            folios = np.unique(offs // fp)
            folios = folios[vm.huge[folios]]
            if folios.size:
                offs = np.union1d(offs, (folios[:, None] * fp + np.arange(fp)).ravel())
                s2 = vm.stage2[offs]
            return self._fault_pages(vm, offs, s2, unmapped, needs_tags)
        if vm.folio_pages == 1 or not unmapped.size:
            return self._fault_pages(vm, offs, s2, unmapped, needs_tags)
        unmapped, folio_offs, folio_reserved = self._map_folios(vm, unmapped, tagged=needs_tags)
        try:
            rest = self._fault_pages(vm, offs, vm.stage2[as_slice(offs)], unmapped, needs_tags)
        except TagStoreError:
            self._unmap(vm, folio_offs)  # a refused fault maps nothing
            raise
        return FaultResult(
            newly_mapped_pages=rest.newly_mapped_pages + folio_offs.size,
            tag_blocks_reserved=rest.tag_blocks_reserved + folio_reserved,
            pages_migrated=rest.pages_migrated,
            replays=rest.replays,
        )

    def _map_folios(
        self, vm: Vm, unmapped: IndexArray, *, tagged: bool
    ) -> tuple[IndexArray, IndexArray, int]:
        """Back whole huge folios of a fault: every folio touched by ``unmapped`` that is wholly
        unmapped, plugged and inside one device gets one contiguous, aligned host folio (the
        fault maps and reserves tag storage for all of it, as v3 does by ``folio_order``).

        Returns the offsets left for small pages, the offsets mapped here and the tag blocks
        reserved. When the host has no such folios left (fragmentation), THP falls back to
        small pages and hugetlb refuses the fault (ResourceExhaustedError, nothing mapped).
        """
        fp = vm.folio_pages
        ps = self.page_size
        empty = np.empty(0, np.int64)
        folios = np.unique(unmapped // fp)
        folios = folios[(folios + 1) * fp <= vm.stage2.size]
        if folios.size == 0:
            return unmapped, empty, 0
        starts = folios * fp
        lo = int(starts[0])
        nr = int(starts[-1]) + fp - lo
        span = vm.stage2[lo : lo + nr].reshape(-1, fp) if nr == folios.size * fp else None
        if span is None:
            whole = (vm.stage2[starts[:, None] + np.arange(fp)] == 0).all(axis=1)
        else:
            whole = (span == 0).all(axis=1)
        plugged = vm.plugged_mask(BOOT_RAM_GPA + lo * ps, nr)
        rel = starts - lo
        whole &= plugged[rel[:, None] + np.arange(fp)].all(axis=1)
        bounds = np.array(sorted(vm.gfn_offset(d.gpa) for d in vm.devices.values()), np.int64)
        whole &= np.searchsorted(bounds, starts, "right") == np.searchsorted(
            bounds, starts + fp - 1, "right"
        )
        take = folios[whole]
        if take.size == 0:
            return unmapped, empty, 0
        offs = (take[:, None] * fp + np.arange(fp)).ravel()
        try:
            pages, reserved = self.mem.alloc_folios(
                take.size,
                fp,
                vm.slot,
                offs,
                tagged=tagged,
                pool=self._untagged_pool(vm.config),
            )
        except ResourceExhaustedError:
            if self._hugetlb_bytes(vm):
                raise  # hugetlbfs has no fallback: the fault fails (SIGBUS in the VMM)
            self.counters.add(self.counters.huge_folios, "fallback", take.size)
            return unmapped, empty, 0
        self._map(vm, offs, pages, tagged=tagged)
        vm.huge[take] = True
        self.counters.add(self.counters.huge_folios, "mapped", take.size)
        return unmapped[~np.isin(unmapped // fp, take)], offs, reserved

    def _fault_pages(
        self,
        vm: Vm,
        offs: IndexArray,
        s2: npt.NDArray[np.uint32],
        unmapped: IndexArray,
        needs_tags: bool,
    ) -> FaultResult:
        """The small-page part of a fault: map ``unmapped`` page by page (vectorised) and, for
        ON_TAG_ACCESS tag accesses, tag or move the mapped untagged pages of ``offs``."""
        cfg = vm.config
        if not unmapped.size and not (needs_tags and bool((s2 != 0).any())):
            return FaultResult()
        if not needs_tags:
            # Untagged memory, from where the VM's pool allows (may be lent tag storage).
            pages = self.mem.alloc_untagged(
                unmapped.size, vm.slot, unmapped, pool=self._untagged_pool(cfg)
            )
            self._map(vm, unmapped, pages, tagged=False)
            return FaultResult(newly_mapped_pages=unmapped.size)
        reserved = migrated = replays = 0
        to_move = np.empty(0, np.int64)
        if cfg.tag_policy is TagPolicy.ON_TAG_ACCESS:
            # First tag access to pages mapped untagged: tag them where they are, or move them.
            mapped = s2 != 0
            src = s2[mapped].astype(np.int64) - 1
            src_offs = offs[mapped]
            fl = self.mem.flags[src]
            in_place = fl == TG_DATA
            must_alloc = unmapped.size + int(np.count_nonzero((fl != TG_TAGGED) & ~in_place))
            # Refuse before tagging anything in place: a refused fault changes nothing.
            require_pages(
                RESOURCE_TAGGABLE_MEMORY,
                "free taggable pages",
                must_alloc,
                self.mem.free_pages(TG_FREE),
            )
            failed, nr_reserved = self.mem.make_tagged(src[in_place])
            reserved += nr_reserved
            vm.tagged_pages += int(in_place.sum()) - failed.size
            must_move = (fl != TG_TAGGED) & ~in_place
            self.counters.add(
                self.counters.page_migrations,
                MigrationReason.TAG_ACCESS.value,
                int(must_move.sum()),
            )
            must_move[in_place] = np.isin(src[in_place], failed)
            if failed.size:
                self.counters.add(
                    self.counters.page_migrations, MigrationReason.RESERVE_FAILED.value, failed.size
                )
            to_move = src_offs[must_move]
        n_new = unmapped.size
        want = np.concatenate([unmapped, to_move])
        pages, nr_reserved, nr_replays = self.mem.alloc_tagged(want.size, vm.slot, want)
        reserved += nr_reserved
        replays += nr_replays
        if to_move.size:
            old = vm.stage2[to_move].astype(np.int64) - 1
            moved_to = pages[n_new:]
            vm.split_folios(to_move)
            # Restore tags on the destination before the source is given up.
            self.mem.tags.move(old, moved_to)
            vm.stage2[to_move] = (moved_to + 1).astype(np.uint32)
            vm.tagged_pages += to_move.size
            self.mem.free(old)
            migrated += to_move.size
            replays += to_move.size
            self.counters.fault_replays += to_move.size
        self._map(vm, unmapped, pages[:n_new], tagged=True)
        return FaultResult(
            newly_mapped_pages=n_new,
            tag_blocks_reserved=reserved,
            pages_migrated=migrated + nr_replays,
            replays=replays,
        )

    # ----------------------------------------------------------------- memory given back

    def discard_guest_memory(self, vm_id: str, gpa: int, length_bytes: int) -> DiscardResult:
        """The VMM discards a guest range the guest gave back (free page reporting, balloon
        inflation: ``MADV_DONTNEED``): its host pages are freed with their tags, and a tag block
        with its last tagged page. A later access maps fresh zeroed, untagged memory.

        Whole pages of plugged memory only; a pinned VM's memory cannot be discarded (QEMU
        inhibits the balloon and free page reporting while a VFIO device pins guest memory).
        """
        vm = self._vm(vm_id)
        offs = self._guest_range(vm, gpa, length_bytes, MAX_FAULT_BYTES)
        if vm.config.pinned:
            raise FailedPreconditionError(
                f"VM {vm_id!r} is pinned: its memory cannot be discarded (QEMU inhibits the "
                "balloon and free page reporting while a VFIO device pins guest memory)",
                reason="VM_PINNED",
                vm_id=vm_id,
            )
        hugetlb = self._hugetlb_bytes(vm)
        if hugetlb and ((gpa - BOOT_RAM_GPA) % hugetlb or length_bytes % hugetlb):
            # MADV_DONTNEED on hugetlbfs takes whole huge pages (EINVAL otherwise).
            field, value = ("length", length_bytes) if length_bytes % hugetlb else ("gpa", gpa)
            raise InvalidArgumentError(
                field, value, f"must be aligned to the VM's hugetlb page size ({hugetlb:#x})"
            )
        s2 = vm.stage2[as_slice(offs)]
        pages = s2[s2 != 0].astype(np.int64) - 1
        nr_tagged = int(np.count_nonzero(self.mem.flags[pages] == TG_TAGGED))
        released_before = sum(self.counters.tag_blocks_released.values())
        self._unmap(vm, offs)
        vm.discarded_pages += pages.size
        self.counters.add(self.counters.discarded_bytes, "tagged", nr_tagged * self.page_size)
        self.counters.add(
            self.counters.discarded_bytes, "untagged", (pages.size - nr_tagged) * self.page_size
        )
        return DiscardResult(
            discarded_bytes=pages.size * self.page_size,
            tagged_bytes=nr_tagged * self.page_size,
            tag_blocks_released=sum(self.counters.tag_blocks_released.values()) - released_before,
        )

    # ----------------------------------------------------------------- tags

    def copy_tags(
        self,
        vm_id: str,
        gpa: int,
        length_bytes: int,
        direction: TagCopyDirection,
        tags: bytes = b"",
    ) -> bytes:
        """``KVM_ARM_MTE_COPY_TAGS``: ``length/16`` tags, one per byte, to or from the guest.

        TO_GUEST writes tags: pages not mapped yet are faulted in as a tag access, so every page
        of the range ends up tagged. FROM_GUEST only reads: a page without tags (unmapped or
        untagged) reads as zeros and is neither mapped nor tagged (KVM: "No tags in memory, so
        write zeros"), so that a tag dump, as migration pre-copy does, changes nothing.
        """
        vm = self._vm(vm_id)
        self._migration_refuse_io(vm, "tag copy")
        offs = self._guest_range(vm, gpa, length_bytes, MAX_TAG_COPY_BYTES)
        if not vm.config.mte_enabled:
            raise FailedPreconditionError(
                f"VM {vm_id!r} does not have MTE enabled: it has no tags",
                reason="VM_NOT_MTE",
                vm_id=vm_id,
            )
        nr_tags = length_bytes // MTE_GRANULE_BYTES
        arr = np.empty(0, np.uint8)
        if direction is TagCopyDirection.TO_GUEST:
            if len(tags) != nr_tags:
                raise InvalidArgumentError(
                    "tags", f"{len(tags)} bytes", f"expected length/16 = {nr_tags} bytes"
                )
            arr = np.frombuffer(tags, dtype=np.uint8)
            if arr.size and int(arr.max()) > 0xF:
                bad = int(np.flatnonzero(arr > 0xF)[0])
                raise InvalidArgumentError(
                    "tags", f"tags[{bad}]={arr[bad]:#x}", "an MTE tag is 4 bits (0..15)"
                )
        self.counters.add(self.counters.tags_copied_bytes, direction.value, nr_tags)
        if direction is TagCopyDirection.TO_GUEST:
            self._fault(vm, offs, Access.TAG)
            pages = vm.stage2[offs].astype(np.int64) - 1
            self.mem.tags.write(pages, arr.reshape(offs.size, -1))
            self._migration_mark_dirty(vm, offs)
            return b""
        s2 = vm.stage2[offs]
        mapped = s2 != 0
        out = np.zeros((offs.size, self.mem.tags.tags_per_page), dtype=np.uint8)
        out[mapped] = self.mem.tags.read(s2[mapped].astype(np.int64) - 1)
        return out.tobytes()

    # ----------------------------------------------------------------- views

    def status(self) -> HostStatus:
        """Host-wide and per-region memory by state, tag blocks and capacity."""
        mem = self.mem
        ps = self.page_size
        regions: list[RegionStatus] = []
        for reg in mem.regions:
            regions.append(
                RegionStatus(
                    index=len(regions),
                    name=reg.name,
                    memory_base=reg.data.base_pfn * ps,
                    memory_size_bytes=reg.data.nr_pages * ps,
                    tag_base=reg.tag.base_pfn * ps,
                    tag_size_bytes=reg.tag.nr_pages * ps,
                    block_size_bytes=reg.block_pages * ps,
                    usage=mem.usage([reg.data, reg.tag]),
                    tag_blocks_total=reg.nr_blocks,
                    tag_blocks_reserved=reg.nr_reserved,
                    tag_blocks_min_needed=mem.min_blocks_needed(reg),
                    tagged_capacity_bytes=int(mem.seg_counts[reg.data.index, TG_FREE]) * ps,
                )
            )
        for seg in mem.segments:
            if seg.kind == KIND_TAGGABLE or seg.region >= 0:
                continue
            regions.append(
                RegionStatus(
                    index=len(regions),
                    name=seg.name,
                    memory_base=seg.base_pfn * ps,
                    memory_size_bytes=seg.nr_pages * ps,
                    tag_base=0,
                    tag_size_bytes=0,
                    block_size_bytes=0,
                    usage=mem.usage([seg]),
                    tag_blocks_total=0,
                    tag_blocks_reserved=0,
                    tag_blocks_min_needed=0,
                    tagged_capacity_bytes=0,
                )
            )
        return HostStatus(
            page_size_bytes=ps,
            mte_perm=self.topology.mte_perm,
            tag_storage_mode=self.topology.tag_storage_mode,
            placement=mem.placement,
            usage=mem.usage(),
            regions=tuple(regions),
            vm_count=len(self._vms),
        )

    def check_invariants(self) -> list[str]:
        """Every violated invariant, as a sentence; empty when the state is sound."""
        return invariants.check(self)

    @property
    def vms(self) -> dict[str, Vm]:
        """The VMs by id (read-only use: invariants, export, persistence)."""
        return self._vms

    def export_state(self) -> HostExport:
        """Every host page extent, reserved tag block and VM mapping run (all at once; the
        daemon streams :func:`hostd.model.export.stream` instead)."""
        return HostExport(
            tuple(itertools.chain.from_iterable(export.page_extents(self))),
            tuple(itertools.chain.from_iterable(export.reserved_tag_blocks(self))),
            tuple(itertools.chain.from_iterable(export.mapping_runs(self))),
        )

    # ----------------------------------------------------------------- persistence

    def save_state(self) -> HostState:
        """The minimal state: page flags, owners, tag reverse map, tags, VM maps and tables.

        Everything else (per-block counts, totals, VM accounting) is derived on restore.
        The arrays are the host's own, not copies (a copy of a 1 TiB host's arrays would double
        its memory): write them out before the next call changes the host.
        """
        mem = self.mem
        tag_pages, tag_rows = mem.tags.state()
        arrays: dict[str, npt.NDArray[Any]] = {
            "flags": mem.flags,
            "owner": mem.owner,
            "ts_gfn": mem.ts_gfn,
            "tags_pages": tag_pages,
            "tags_rows": tag_rows,
        }
        vms: list[dict[str, Any]] = []
        for vm in self._vms.values():
            arrays[f"vm{vm.slot}_stage2"] = vm.stage2
            if vm.folio_pages > 1:
                arrays[f"vm{vm.slot}_huge"] = vm.huge
            devices = []
            for i, d in enumerate(vm.devices.values()):
                if d.is_virtio_mem:
                    arrays[f"vm{vm.slot}_dev{i}_plugged"] = d.plugged
                devices.append(
                    {
                        "index": i,
                        "device_id": d.device_id,
                        "kind": d.kind.value,
                        "gpa": d.gpa,
                        "size_bytes": d.size_bytes,
                        "block_size_bytes": d.block_size_bytes,
                        "requested_size_bytes": d.requested_size_bytes,
                        "usable_region_size_bytes": d.usable_region_size_bytes,
                        "prealloc": d.prealloc,
                    }
                )
            config = asdict(vm.config)
            config["tag_policy"] = vm.config.tag_policy.value
            vms.append(
                {
                    "slot": vm.slot,
                    "config": config,
                    "devices": devices,
                    "discarded_pages": vm.discarded_pages,
                }
            )
        tables = {
            "topology": topology_to_doc(self.topology),
            "placement": mem.placement.value,
            "vms": vms,
            "counters": self.counters.to_doc(),
            "migrations": self._migrations_doc(arrays),
        }
        return HostState(arrays, tables)

    @classmethod
    def restore(cls, state: HostState) -> Host:
        """Rebuild a host from :meth:`save_state` output, re-deriving every count."""
        t = state.tables
        host = cls(parse_topology(t["topology"]), Placement(t["placement"]))
        mem = host.mem
        a = state.arrays
        _copy_in_chunks(mem.flags, a["flags"])
        _copy_in_chunks(mem.owner, a["owner"])
        _copy_in_chunks(mem.ts_gfn, a["ts_gfn"])
        mem.tags.restore(np.asarray(a["tags_pages"]), np.asarray(a["tags_rows"]))
        mem.rebuild_derived()
        for entry in t["vms"]:
            cfg = dict(entry["config"])
            cfg["tag_policy"] = TagPolicy(cfg["tag_policy"])
            vm = Vm.create(entry["slot"], VmConfig(**cfg), host.page_size)
            vm.devices.clear()
            for d in entry["devices"]:
                dev = MemoryDevice(
                    d["device_id"],
                    MemoryDeviceKind(d["kind"]),
                    d["gpa"],
                    d["size_bytes"],
                    d["block_size_bytes"],
                    d["requested_size_bytes"],
                    d["usable_region_size_bytes"],
                    d.get("prealloc", False),
                )
                if dev.is_virtio_mem:
                    dev.plugged = np.asarray(a[f"vm{vm.slot}_dev{d['index']}_plugged"], bool)
                vm.devices[dev.device_id] = dev
            _copy_in_chunks(vm.stage2, a[f"vm{vm.slot}_stage2"])
            if vm.folio_pages > 1 and f"vm{vm.slot}_huge" in a:
                _copy_in_chunks(vm.huge, a[f"vm{vm.slot}_huge"])
            vm.discarded_pages = int(entry.get("discarded_pages", 0))
            host._vms[vm.vm_id] = vm
            host._by_slot[vm.slot] = vm
            mem.owner_pool[vm.slot] = host._untagged_pool(vm.config)
            mem.pinned_owner[vm.slot] = vm.config.pinned
        host._recount_vm_pages()
        host.counters.load_doc(t["counters"])
        host._restore_migrations(t.get("migrations", []), a)
        return host

    def _recount_vm_pages(self) -> None:
        """Every VM's mapped and tagged page counts, from the restored arrays.

        Sequential passes in chunks: the stage-2 maps for mapped pages, the taggable ranges'
        flags and owners for tagged pages (a VM's pages are exactly the pages it owns, an
        invariant), so no gather over a whole VM and no whole-host temporary.
        """
        mem = self.mem
        tagged = np.zeros(MAX_VMS + 1, dtype=np.int64)
        for reg in mem.regions:
            for start in range(reg.data.start, reg.data.end, REBUILD_CHUNK_PAGES):
                stop = min(start + REBUILD_CHUNK_PAGES, reg.data.end)
                owner = mem.owner[start:stop]
                # Per run of one owner (a VM's pages are mostly contiguous): a sum per run
                # is several times faster than selecting the tagged pages' owners.
                runs = np.flatnonzero(owner[1:] != owner[:-1]) + 1
                runs = np.concatenate([np.zeros(1, np.int64), runs])
                per_run = np.add.reduceat(mem.flags[start:stop] == TG_TAGGED, runs, dtype=np.int64)
                np.add.at(tagged, owner[runs], per_run)
        for vm in self._vms.values():
            vm.mapped_pages = sum(
                int(np.count_nonzero(vm.stage2[start : start + REBUILD_CHUNK_PAGES]))
                for start in range(0, vm.stage2.size, REBUILD_CHUNK_PAGES)
            )
            vm.tagged_pages = int(tagged[vm.slot])


def _copy_in_chunks(dst: npt.NDArray[Any], src: Any) -> None:
    """``dst[:] = src`` a chunk at a time: ``src`` may be an array read lazily from a file
    (the store's), which then never needs a whole-array copy in memory. One that can
    ``read_into(start, out)`` reads straight into ``dst``, without even a chunk's copy."""
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise ValueError(
            f"saved array of shape {src.shape} and type {src.dtype}, "
            f"expected {dst.shape} and {dst.dtype}"
        )
    read_into = getattr(src, "read_into", None)
    for start in range(0, dst.size, REBUILD_CHUNK_PAGES):
        part = dst[start : start + REBUILD_CHUNK_PAGES]
        if read_into is not None:
            read_into(start, part)
        else:
            part[...] = src[start : start + REBUILD_CHUNK_PAGES]


def topology_to_doc(topology: HostTopology) -> dict[str, Any]:
    """The TOML-shaped document of a topology (``parse_topology`` reads it back)."""
    return {
        "page_size": topology.page_size_bytes,
        "mte_perm": topology.mte_perm,
        "tag_storage": topology.tag_storage_mode.value.lower(),
        "tag_region": [
            {
                "memory_base": r.memory_base,
                "memory_size": r.memory_size_bytes,
                "tag_base": r.tag_base,
                "tag_size": r.tag_size_bytes,
                "block_size": r.block_size_bytes,
            }
            for r in topology.tag_regions
        ],
        "untagged_range": [
            {"base": u.base, "size": u.size_bytes} for u in topology.untagged_ranges
        ],
    }
