"""Value types of the model: enums, validated configs (``*Config``), read-only views
(``*Status``) and guest-protocol answers.

Sizes are bytes (``*_bytes``), counts of host pages are ``nr_pages``, guest addresses ``gpa``.
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, TypeVar

_K = TypeVar("_K")

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

# Boot RAM starts here on QEMU's arm64 `virt` machine.
BOOT_RAM_GPA = 0x4000_0000
# Device memory (DIMMs, virtio-mem) starts at the first 1 GiB boundary after boot RAM (QEMU).
DEVICE_MEMORY_ALIGN_BYTES = GiB
# A guest fault or tag copy may cover at most this much guest memory in one call.
MAX_FAULT_BYTES = GiB
# One tag per 16-byte granule.
MTE_GRANULE_BYTES = 16
# Data bytes described by one byte of packed tag storage (4-bit tags): 1/32 of RAM.
TAG_STORAGE_RATIO = 32


class TagPolicy(enum.Enum):
    """When the host provides tag storage for an MTE guest's memory (docs/domain.md, "KVM and
    guests")."""

    # On the stage-2 fault that maps a page (the series' v3 32/35; also what its VM_MTE_KVM
    # flag amounts to: memory tagged when first allocated, nothing reserved up front).
    ON_FAULT = "ON_FAULT"
    # Preallocation: QEMU prealloc=on for an MTE guest. All memory is backed, tagged and its tag
    # storage reserved when the memslot or plugged block appears, so no later fault can fail.
    EAGER = "EAGER"
    # Mapped NoTagAccess (FEAT_MTE_PERM); tag storage only on the guest's first tag access.
    ON_TAG_ACCESS = "ON_TAG_ACCESS"


# Transparent huge pages are PMD-sized (QEMU backs guest RAM with them by default; its
# virtio-mem default block size is the THP size for that reason).
THP_BYTES = {4 * KiB: 2 * MiB, 16 * KiB: 32 * MiB, 64 * KiB: 512 * MiB}
# Gigantic hugetlbfs pages of arm64: PUD on 4K, contiguous PMDs on 16K and 64K
# (arch/arm64/mm/hugetlbpage.c).
HUGETLB_BYTES = {4 * KiB: GiB, 16 * KiB: GiB, 64 * KiB: 16 * GiB}


class BackingKind(enum.Enum):
    """What backs a VM's RAM on the host."""

    SMALL = "SMALL"  # host pages
    THP = "THP"  # transparent huge pages: a huge fault falls back to small pages
    HUGETLB = "HUGETLB"  # hugetlbfs: no fallback, a fault without a free huge page fails


def backing_kind(page_size_bytes: int, backing_page_size_bytes: int) -> BackingKind | None:
    """The kind of backing a size names on a host with ``page_size_bytes`` pages (None: none)."""
    if backing_page_size_bytes in (0, page_size_bytes):
        return BackingKind.SMALL
    if backing_page_size_bytes == THP_BYTES.get(page_size_bytes):
        return BackingKind.THP
    if backing_page_size_bytes == HUGETLB_BYTES.get(page_size_bytes):
        return BackingKind.HUGETLB
    return None


class Access(enum.Enum):
    """Kind of guest access behind a stage-2 fault."""

    READ = "READ"
    WRITE = "WRITE"
    TAG = "TAG"


class TagCopyDirection(enum.Enum):
    """``KVM_ARM_MTE_COPY_TAGS`` direction, seen from the guest."""

    TO_GUEST = "TO_GUEST"
    FROM_GUEST = "FROM_GUEST"


class Placement(enum.Enum):
    """How tagged allocations choose host pages."""

    # Fill tag blocks that are already reserved, then free blocks, then lent ones.
    TAG_BLOCK_AWARE = "TAG_BLOCK_AWARE"
    # First fit in physical order, reserving whatever blocks that touches.
    NAIVE = "NAIVE"


class TagStorageMode(enum.Enum):
    """Host-wide: lend tag storage (dynamic) or reserve all of it at boot (static carve-out)."""

    DYNAMIC = "DYNAMIC"
    STATIC = "STATIC"


class PageState(enum.IntEnum):
    """Use of one host page, as reported outside the model (export, status)."""

    FREE = 0  # free, outside tag storage
    DATA = 1  # untagged data, outside tag storage
    TAGGED = 2  # tagged data: its tag block is reserved
    TAG_RESERVED = 3  # tag storage holding tags
    TAG_LENT = 4  # tag storage lent to untagged data
    TAG_FREE = 5  # tag storage, free


class MemoryDeviceKind(enum.Enum):
    BOOT_RAM = "BOOT_RAM"
    DIMM = "DIMM"
    VIRTIO_MEM = "VIRTIO_MEM"


class VirtioMemRequestType(enum.Enum):
    PLUG = "PLUG"
    UNPLUG = "UNPLUG"
    UNPLUG_ALL = "UNPLUG_ALL"
    STATE = "STATE"


class VirtioMemResponse(enum.Enum):
    ACK = "ACK"
    NACK = "NACK"
    BUSY = "BUSY"
    ERROR = "ERROR"


class VirtioMemBlockState(enum.Enum):
    PLUGGED = "PLUGGED"
    UNPLUGGED = "UNPLUGGED"
    MIXED = "MIXED"


class MigrationReason(enum.Enum):
    """Why a guest page moved to another host page."""

    EVACUATION = "evacuation"  # lent tag storage taken back for tags
    TAG_ACCESS = "tag_access"  # untagged page had to become tagged where it cannot
    RESERVE_FAILED = "reserve_failed"  # its tag block could not be reserved: moved, replayed
    COMPACTION = "compaction"  # packed into fewer tag blocks, or lent data moved out
    OFFLINING = "offlining"  # moved off a host range before it goes offline


@dataclass(frozen=True)
class VmConfig:
    """What a VMM asks for when it creates a VM (checked by ``Host.create_vm``)."""

    vm_id: str
    mte_enabled: bool
    tag_policy: TagPolicy = TagPolicy.ON_FAULT
    boot_memory_bytes: int = GiB
    dimm_slots: int = 0
    # Boot RAM plus every DIMM and virtio-mem region; 0 means "boot RAM only".
    max_memory_bytes: int = 0
    # A passthrough (VFIO) device long-term-pins all guest memory: it is backed when it appears,
    # never placed in lent tag storage, never migrated, and cannot be discarded.
    pinned: bool = False
    # Size of the host pages backing guest RAM: 0 or the host page size (small pages), the PMD
    # size for transparent huge pages (2 MiB / 32 MiB / 512 MiB on 4K / 16K / 64K hosts), or a
    # gigantic hugetlbfs size (1 GiB / 1 GiB / 16 GiB). See ``backing_kind``.
    backing_page_size_bytes: int = 0


@dataclass(frozen=True)
class VirtioMemConfig:
    """A virtio-mem device as the VMM creates it (sizes in bytes, multiples of block size)."""

    region_size_bytes: int
    block_size_bytes: int
    requested_size_bytes: int = 0
    # QEMU's ``prealloc`` device property: a PLUG backs its blocks (and, for an MTE guest whose
    # policy provides tags at fault, reserves their tag storage) before it is ACKed, and is
    # answered BUSY when the host cannot. Without it a PLUG is a promise of address space only.
    prealloc: bool = False


@dataclass(frozen=True)
class FaultResult:
    """What one guest fault call did."""

    newly_mapped_pages: int = 0
    tag_blocks_reserved: int = 0
    pages_migrated: int = 0
    replays: int = 0


@dataclass(frozen=True)
class DiscardResult:
    """What discarding a guest range (free page reporting, balloon inflation) gave back."""

    discarded_bytes: int = 0  # guest memory that was backed and no longer is
    tagged_bytes: int = 0  # of which tagged: its tags are gone
    tag_blocks_released: int = 0  # tag blocks released with their last tagged page


@dataclass(frozen=True)
class VirtioMemAnswer:
    """The device's answer to a guest request; ``state`` only for STATE requests."""

    response: VirtioMemResponse
    state: VirtioMemBlockState | None = None


@dataclass(frozen=True)
class MemoryDeviceStatus:
    """A VM memory region: boot RAM, a DIMM or a virtio-mem device."""

    device_id: str
    kind: MemoryDeviceKind
    gpa: int
    # DIMM / boot RAM: its size; virtio-mem: the region size.
    size_bytes: int
    plugged_bytes: int
    mapped_bytes: int
    tagged_bytes: int
    # virtio-mem only (0 otherwise).
    block_size_bytes: int = 0
    requested_size_bytes: int = 0
    usable_region_size_bytes: int = 0
    prealloc: bool = False


@dataclass(frozen=True)
class VmStatus:
    vm_id: str
    mte_enabled: bool
    tag_policy: TagPolicy
    boot_memory_bytes: int
    dimm_slots: int
    max_memory_bytes: int
    mapped_bytes: int
    tagged_bytes: int
    # Boot RAM first, then devices in address order.
    regions: tuple[MemoryDeviceStatus, ...]
    pinned: bool = False
    # Guest memory the VMM discarded so far (free page reporting, balloon).
    discarded_bytes: int = 0
    backing_page_size_bytes: int = 0
    # Guest memory backed by whole huge folios right now.
    huge_page_bytes: int = 0


@dataclass(frozen=True)
class MemoryUsage:
    """Bytes by page state; the six fields partition ``total_bytes``."""

    free_bytes: int = 0  # free outside tag storage
    data_bytes: int = 0  # untagged data outside tag storage
    tagged_bytes: int = 0
    tag_reserved_bytes: int = 0
    tag_lent_bytes: int = 0
    tag_free_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return (
            self.free_bytes
            + self.data_bytes
            + self.tagged_bytes
            + self.tag_reserved_bytes
            + self.tag_lent_bytes
            + self.tag_free_bytes
        )

    @property
    def tag_storage_bytes(self) -> int:
        return self.tag_reserved_bytes + self.tag_lent_bytes + self.tag_free_bytes

    @property
    def all_free_bytes(self) -> int:
        """Free memory including free tag storage (the API's ``free_bytes``)."""
        return self.free_bytes + self.tag_free_bytes

    @property
    def all_data_bytes(self) -> int:
        """Untagged data including what lives in lent tag storage (the API's ``data_bytes``)."""
        return self.data_bytes + self.tag_lent_bytes

    def __add__(self, other: MemoryUsage) -> MemoryUsage:
        return MemoryUsage(
            self.free_bytes + other.free_bytes,
            self.data_bytes + other.data_bytes,
            self.tagged_bytes + other.tagged_bytes,
            self.tag_reserved_bytes + other.tag_reserved_bytes,
            self.tag_lent_bytes + other.tag_lent_bytes,
            self.tag_free_bytes + other.tag_free_bytes,
        )


@dataclass(frozen=True)
class RegionStatus:
    """One tag region (tagged range + its tag storage) or one untaggable range."""

    index: int
    name: str  # "tag0", "tag1", ... or "untagged0", ...
    memory_base: int  # physical address of the data range
    memory_size_bytes: int
    tag_base: int  # 0 / 0 for untaggable ranges
    tag_size_bytes: int
    block_size_bytes: int  # tag block size in bytes (block_pages * page size); 0 if untaggable
    usage: MemoryUsage
    tag_blocks_total: int
    tag_blocks_reserved: int
    # Fewest blocks that could hold the tags of the tagged pages of this region.
    tag_blocks_min_needed: int
    # Data bytes that could still become tagged here (free taggable pages).
    tagged_capacity_bytes: int


@dataclass(frozen=True)
class HostStatus:
    page_size_bytes: int
    mte_perm: bool
    tag_storage_mode: TagStorageMode
    placement: Placement
    usage: MemoryUsage
    regions: tuple[RegionStatus, ...]
    vm_count: int

    @property
    def tag_blocks_reserved(self) -> int:
        return sum(r.tag_blocks_reserved for r in self.regions)

    @property
    def tag_blocks_min_needed(self) -> int:
        return sum(r.tag_blocks_min_needed for r in self.regions)

    @property
    def tagged_capacity_bytes(self) -> int:
        return sum(r.tagged_capacity_bytes for r in self.regions)


# Guest faults and tag reservations take microseconds (an already reserved block) to seconds
# (evacuating a large range): 1 us .. 10 s, about 2.5 buckets per decade.
LATENCY_BUCKETS_SECONDS: tuple[float, ...] = (
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4,
    1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


# A live migration takes seconds to many minutes; its paused phase (the guest's downtime) can
# take milliseconds: 10 ms .. 1 h.
MIGRATION_BUCKETS_SECONDS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0,
    1000.0, 3600.0,
)  # fmt: skip


@dataclass
class LatencyHistogram:
    """Counts of durations per bucket (upper bounds in ``bounds``, plus one overflow bucket)
    and their sum: what a Prometheus histogram needs, kept by the model so that a fault pays a
    bisect and two additions for it, not a metrics call."""

    bounds: ClassVar[tuple[float, ...]] = LATENCY_BUCKETS_SECONDS
    counts: list[int] = field(default_factory=list)
    sum_seconds: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum_seconds += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass
class DurationHistogram(LatencyHistogram):
    """A :class:`LatencyHistogram` over ``MIGRATION_BUCKETS_SECONDS`` (live migrations)."""

    bounds: ClassVar[tuple[float, ...]] = MIGRATION_BUCKETS_SECONDS


def _plain(value: object) -> object:
    if isinstance(value, LatencyHistogram):
        return asdict(value)
    return value


@dataclass
class HostCounters:
    """Monotonic event counters kept by the model (metrics derive from these)."""

    faults: dict[tuple[str, str], int] = field(default_factory=dict)  # (access, outcome)
    tag_blocks_reserved: dict[str, int] = field(default_factory=dict)  # region name
    tag_blocks_released: dict[str, int] = field(default_factory=dict)
    tag_block_reserve_failures: dict[str, int] = field(default_factory=dict)
    evacuated_pages: dict[str, int] = field(default_factory=dict)
    page_migrations: dict[str, int] = field(default_factory=dict)  # MigrationReason.value
    fault_replays: int = 0
    virtio_mem_requests: dict[tuple[str, str], int] = field(default_factory=dict)  # (type, resp)
    dimm_operations: dict[str, int] = field(default_factory=dict)  # "plug" / "unplug"
    cache_maintenance_bytes: dict[str, int] = field(default_factory=dict)  # kind
    tags_copied_bytes: dict[str, int] = field(default_factory=dict)  # direction
    discarded_bytes: dict[str, int] = field(default_factory=dict)  # "tagged" / "untagged"
    huge_folios: dict[str, int] = field(default_factory=dict)  # "mapped" / "fallback" (THP)
    vmm_differences: dict[str, int] = field(default_factory=dict)  # reporter (qemu-bridge)
    fault_seconds: dict[str, LatencyHistogram] = field(
        default_factory=lambda: {a.value: LatencyHistogram() for a in Access}
    )
    reservation_seconds: LatencyHistogram = field(default_factory=LatencyHistogram)
    migrations: dict[tuple[str, str], int] = field(default_factory=dict)  # (role, outcome)
    migration_bytes: dict[str, int] = field(default_factory=dict)  # role: bytes on the wire
    migration_rounds: int = 0  # pre-copy rounds started after the first
    # Durations from start (source) or admission (destination) to the end, by (role, outcome),
    # and of each phase, by (role, phase).
    migration_seconds: dict[tuple[str, str], DurationHistogram] = field(default_factory=dict)
    migration_phase_seconds: dict[tuple[str, str], DurationHistogram] = field(default_factory=dict)

    @staticmethod
    def observe(table: dict[_K, DurationHistogram], key: _K, seconds: float) -> None:
        """Count ``seconds`` in ``table[key]`` (histograms appear on first use)."""
        histogram = table.get(key)
        if histogram is None:
            histogram = table[key] = DurationHistogram()
        histogram.observe(max(0.0, seconds))

    def to_doc(self) -> dict[str, object]:
        """A JSON-serialisable form (tuple keys become lists)."""
        doc: dict[str, object] = {}
        for name, value in vars(self).items():
            if isinstance(value, LatencyHistogram):
                doc[name] = {"counts": value.counts, "sum_seconds": value.sum_seconds}
            elif isinstance(value, dict):
                doc[name] = [
                    [*(k if isinstance(k, tuple) else (k,)), _plain(v)] for k, v in value.items()
                ]
            else:
                doc[name] = value
        return doc

    def load_doc(self, doc: dict[str, Any]) -> None:
        """Set every counter from :meth:`to_doc` output (in place: the model holds this object)."""
        for name, value in doc.items():
            current = getattr(self, name)
            if isinstance(current, LatencyHistogram):
                setattr(self, name, type(current)(list(value["counts"]), value["sum_seconds"]))
            elif isinstance(current, dict):
                current.clear()
                kind = _HISTOGRAM_TABLES.get(name)
                for *key, v in value:
                    k = tuple(key) if len(key) > 1 else key[0]
                    if kind is None:
                        current[k] = v
                    elif isinstance(v, dict) and len(v["counts"]) == len(kind.bounds) + 1:
                        current[k] = kind(list(v["counts"]), v["sum_seconds"])
                    # else: a table of an older format (summed seconds): not restorable
            else:
                setattr(self, name, value)

    @staticmethod
    def add(table: dict[_K, int], key: _K, n: int = 1) -> None:
        """Add ``n`` to ``table[key]`` (keys appear on first use)."""
        if n:
            table[key] = table.get(key, 0) + int(n)


# The counter tables whose values are histograms, and of which kind.
_HISTOGRAM_TABLES: dict[str, type[LatencyHistogram]] = {
    "fault_seconds": LatencyHistogram,
    "migration_seconds": DurationHistogram,
    "migration_phase_seconds": DurationHistogram,
}

# Cache maintenance kinds (docs/domain.md, "MTE and tag storage").
DCACHE_INVALIDATE = "dcache_invalidate"  # over the tag block, when it is reserved
TAG_CACHE_INVALIDATE = "tag_cache_invalidate"  # over every tagged page that is freed


@dataclass(frozen=True)
class PageExtent:
    """A run of host pages in the same state with the same owner and consecutive gfns."""

    pfn_start: int
    count: int
    state: PageState
    vm_id: str = ""  # "" when the pages have no owner
    gfn_start: int = 0  # guest frame number of the first page (gpa / page size)


@dataclass(frozen=True)
class ReservedTagBlock:
    region: str
    tag_pfn_start: int
    nr_pages: int
    refcount: int  # tagged data pages this block describes


@dataclass(frozen=True)
class MappingRun:
    """Consecutive guest frames of one VM mapped to consecutive host frames."""

    vm_id: str
    gfn_start: int
    pfn_start: int
    count: int
    tagged: bool


@dataclass(frozen=True)
class HostExport:
    page_extents: tuple[PageExtent, ...]
    reserved_tag_blocks: tuple[ReservedTagBlock, ...]
    mapping_runs: tuple[MappingRun, ...]
