"""Guest memory of one VM: its layout, memory devices and the stage-2 map (gfn -> host page).

The stage-2 map is one ``uint32`` array over the VM's whole guest-physical span, holding
``host page index + 1`` (0 = unmapped). It is allocated zeroed, so the kernel commits only the
parts a guest actually uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from hostd.model.types import (
    BOOT_RAM_GPA,
    DEVICE_MEMORY_ALIGN_BYTES,
    MemoryDeviceKind,
    MemoryDeviceStatus,
    MiB,
    VirtioMemBlockState,
    VirtioMemRequestType,
    VirtioMemResponse,
    VmConfig,
)

BOOT_RAM_DEVICE_ID = "boot-ram"
# QEMU grows the usable region this far beyond the requested size: VIRTIO_MEM_USABLE_EXTENT,
# 2 * 512 MiB for TARGET_ARM (x86 uses 2 * 128 MiB), from arm64's 512 MiB sections with 64K pages.
VIRTIO_MEM_USABLE_EXTENT_BYTES = 2 * 512 * MiB

IndexArray = npt.NDArray[np.int64]


def align_up(value: int, align: int) -> int:
    return -(-value // align) * align


@dataclass(eq=False)
class MemoryDevice:
    """Boot RAM, a DIMM (always fully plugged) or a virtio-mem device (plugged per block)."""

    device_id: str
    kind: MemoryDeviceKind
    gpa: int
    size_bytes: int  # virtio-mem: region size
    block_size_bytes: int = 0
    requested_size_bytes: int = 0
    usable_region_size_bytes: int = 0
    prealloc: bool = False
    plugged: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, dtype=bool))

    @property
    def end(self) -> int:
        return self.gpa + self.size_bytes

    @property
    def is_virtio_mem(self) -> bool:
        return self.kind is MemoryDeviceKind.VIRTIO_MEM

    @property
    def plugged_bytes(self) -> int:
        if not self.is_virtio_mem:
            return self.size_bytes
        return int(self.plugged.sum()) * self.block_size_bytes

    def resize_usable_region(self, requested_size_bytes: int, *, can_shrink: bool) -> None:
        """QEMU's ``virtio_mem_resize_usable_region``: grow with the request, shrink only when
        allowed (on UNPLUG_ALL / reset)."""
        new = min(
            self.size_bytes,
            align_up(requested_size_bytes + VIRTIO_MEM_USABLE_EXTENT_BYTES, self.block_size_bytes),
        )
        if requested_size_bytes == 0:
            new = 0
        if new < self.usable_region_size_bytes and not can_shrink:
            return
        self.usable_region_size_bytes = new

    def valid_range(self, addr: int, nb_blocks: int) -> bool:
        """``virtio_mem_valid_range``: block-aligned, non-empty, inside the usable region."""
        size = nb_blocks * self.block_size_bytes
        if addr % self.block_size_bytes or size == 0:
            return False
        usable_end = self.gpa + self.usable_region_size_bytes
        return self.gpa <= addr < usable_end and addr + size <= usable_end

    def block_range(self, addr: int, nb_blocks: int) -> slice:
        first = (addr - self.gpa) // self.block_size_bytes
        return slice(first, first + nb_blocks)

    def check_request(
        self, kind: VirtioMemRequestType, addr: int, nb_blocks: int
    ) -> VirtioMemResponse | None:
        """The rules of a PLUG/UNPLUG request, in QEMU's order; None if it may go ahead."""
        if not self.valid_range(addr, nb_blocks):
            return VirtioMemResponse.ERROR
        blocks = self.plugged[self.block_range(addr, nb_blocks)]
        if kind is VirtioMemRequestType.PLUG:
            if self.plugged_bytes + nb_blocks * self.block_size_bytes > self.requested_size_bytes:
                return VirtioMemResponse.NACK
            if blocks.any():
                return VirtioMemResponse.ERROR
        elif not blocks.all():
            return VirtioMemResponse.ERROR
        return None

    def block_state(self, addr: int, nb_blocks: int) -> VirtioMemBlockState:
        blocks = self.plugged[self.block_range(addr, nb_blocks)]
        if blocks.all():
            return VirtioMemBlockState.PLUGGED
        if not blocks.any():
            return VirtioMemBlockState.UNPLUGGED
        return VirtioMemBlockState.MIXED


@dataclass(eq=False)
class Vm:
    """One guest: config, devices and stage-2 map. Owned by :class:`hostd.model.host.Host`."""

    slot: int  # owner id of its host pages (1..65535)
    config: VmConfig
    page_size: int
    devices: dict[str, MemoryDevice]
    stage2: npt.NDArray[np.uint32]
    mapped_pages: int = 0
    tagged_pages: int = 0
    # Pages the VMM has discarded so far (free page reporting, balloon): persisted, since an
    # EAGER VM that gave memory back no longer has all of its plugged memory backed.
    discarded_pages: int = 0
    # Host pages per backing folio (1: small pages), and per folio of the stage-2 map (folio i
    # covers offsets [i * folio_pages, (i + 1) * folio_pages)) whether one huge host folio backs
    # it whole. Split (cleared) when any of its pages is unmapped or moved.
    folio_pages: int = 1
    huge: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, dtype=bool))

    @classmethod
    def create(cls, slot: int, config: VmConfig, page_size: int) -> Vm:
        boot = MemoryDevice(
            BOOT_RAM_DEVICE_ID, MemoryDeviceKind.BOOT_RAM, BOOT_RAM_GPA, config.boot_memory_bytes
        )
        span = cls.device_area(config)[1] - BOOT_RAM_GPA
        nr = span // page_size
        fp = max(config.backing_page_size_bytes, page_size) // page_size
        vm = cls(slot, config, page_size, {boot.device_id: boot}, np.zeros(nr, np.uint32))
        if fp > 1:
            vm.folio_pages = fp
            vm.huge = np.zeros(-(-nr // fp), dtype=bool)
        return vm

    @property
    def huge_pages(self) -> int:
        """Guest pages backed by whole huge folios."""
        return int(np.count_nonzero(self.huge)) * self.folio_pages

    def split_folios(self, offs: npt.NDArray[np.int64]) -> None:
        """Forget that the folios holding stage-2 offsets ``offs`` are huge (THP split)."""
        if self.folio_pages > 1 and offs.size:
            self.huge[offs // self.folio_pages] = False

    @staticmethod
    def device_area(config: VmConfig) -> tuple[int, int]:
        """Guest-physical [start, end) of device memory (DIMMs and virtio-mem), as QEMU."""
        boot_end = BOOT_RAM_GPA + config.boot_memory_bytes
        if config.max_memory_bytes <= config.boot_memory_bytes:
            return boot_end, boot_end
        start = align_up(boot_end, DEVICE_MEMORY_ALIGN_BYTES)
        return start, start + config.max_memory_bytes - config.boot_memory_bytes

    @property
    def vm_id(self) -> str:
        return self.config.vm_id

    @property
    def boot_ram(self) -> MemoryDevice:
        return self.devices[BOOT_RAM_DEVICE_ID]

    def gfn_offset(self, gpa: int) -> int:
        """Index into the stage-2 map of a guest physical address."""
        return (gpa - BOOT_RAM_GPA) // self.page_size

    def gfn_of_offset(self, offs: IndexArray) -> IndexArray:
        return offs + BOOT_RAM_GPA // self.page_size

    def nr_dimms(self) -> int:
        return sum(d.kind is MemoryDeviceKind.DIMM for d in self.devices.values())

    def place_device(self, size_bytes: int, align_bytes: int, origin: int = 0) -> int | None:
        """First-fit guest address for a new device in the device area, or None; aligned to
        ``align_bytes`` counted from ``origin``."""
        start, end = self.device_area(self.config)
        taken = sorted(
            (d.gpa, d.end) for d in self.devices.values() if d.kind is not MemoryDeviceKind.BOOT_RAM
        )
        pos = origin + align_up(start - origin, align_bytes)
        for lo, hi in taken:
            if pos + size_bytes <= lo:
                break
            pos = max(pos, origin + align_up(hi - origin, align_bytes))
        return pos if pos + size_bytes <= end else None

    def device_at(self, gpa: int) -> MemoryDevice | None:
        for d in self.devices.values():
            if d.gpa <= gpa < d.end:
                return d
        return None

    def plugged_mask(self, gpa: int, nr_pages: int) -> npt.NDArray[np.bool_]:
        """Which pages of [gpa, gpa + nr_pages pages) are plugged guest memory."""
        ps = self.page_size
        mask = np.zeros(nr_pages, dtype=bool)
        end = gpa + nr_pages * ps
        for d in self.devices.values():
            lo, hi = max(gpa, d.gpa), min(end, d.end)
            if lo >= hi:
                continue
            first, last = (lo - gpa) // ps, (hi - gpa) // ps
            if d.is_virtio_mem:
                block_of_page = (np.arange(lo, hi, ps) - d.gpa) // d.block_size_bytes
                mask[first:last] = d.plugged[block_of_page]
            else:
                mask[first:last] = True
        return mask

    def plugged_offsets(self) -> IndexArray:
        """Stage-2 map offsets of every plugged guest page."""
        ps = self.page_size
        parts: list[IndexArray] = []
        for d in self.devices.values():
            base = self.gfn_offset(d.gpa)
            if d.is_virtio_mem:
                per = d.block_size_bytes // ps
                blocks = np.flatnonzero(d.plugged)
                parts.append((base + blocks[:, None] * per + np.arange(per)).ravel())
            else:
                parts.append(np.arange(base, base + d.size_bytes // ps, dtype=np.int64))
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def device_status(self, d: MemoryDevice, mapped: int, tagged: int) -> MemoryDeviceStatus:
        return MemoryDeviceStatus(
            device_id=d.device_id,
            kind=d.kind,
            gpa=d.gpa,
            size_bytes=d.size_bytes,
            plugged_bytes=d.plugged_bytes,
            mapped_bytes=mapped * self.page_size,
            tagged_bytes=tagged * self.page_size,
            block_size_bytes=d.block_size_bytes,
            requested_size_bytes=d.requested_size_bytes,
            usable_region_size_bytes=d.usable_region_size_bytes,
            prealloc=d.prealloc,
        )
