"""Live migration of a guest between two hosts: the protocol's rules, apart from the VMM.

Cloud Hypervisor keeps its migration protocol (``vm-migration``) apart from the VMM and reaches
the VM through a few traits; here the protocol reaches :class:`~hostd.model.host.Host` through
:class:`HostMigration` (a mixin of ``Host``) and a handful of hooks that ``Host`` calls:

* :meth:`HostMigration._migration_mark_dirty` — a fault, tag write, plug or discard changed
  pages of a VM whose migration is tracking dirty pages (KVM's dirty log, per page).
* :meth:`HostMigration._migration_refuse_io` — faults and tag writes of a paused (or not yet
  committed incoming) VM are refused with FAILED_PRECONDITION naming the phase.
* :meth:`HostMigration._migration_refuse_config` — memory devices of a migrating VM cannot be
  added, removed or resized (QEMU blocks ``device_add`` during migration).
* :meth:`HostMigration._migration_busy` — virtio-mem requests answer BUSY while a VM migrates,
  as QEMU's virtio-mem does (``virtio_mem_is_busy()``); Linux retries later.

Both hosts run a model; a client drives them (the hosts never talk to each other)::

    source                                  destination
    start_migration -> MigrationManifest -> admit_migration   (reserves everything, or refuses)
    read_migration_chunk -> TagChunk     -> write_migration_chunk   (repeat; round 1 = all pages)
    next_migration_round (dirty pages)   ...                        (pre-copy rounds)
    pause_migration, next_migration_round, chunks ...               (final round, guest paused)
    handover_migration                   -> commit_migration        (destination owns the VM)
    complete_migration                                              (source releases the VM)

Abort (:meth:`HostMigration.abort_migration`) from either side before the handover returns that
side to its state before the migration. Deadlines are wall-clock seconds passed in by the caller
(the model keeps no clock): :meth:`HostMigration.expire_migrations` aborts an incoming migration
whose lease ran out and resumes an outgoing VM whose client fell silent. After the handover the
source never resumes by itself: the destination may already run the VM (two-phase commit with
the source as the participant in doubt), so only ``complete`` or an explicit ``abort`` end it.

Tags on the wire (DOMAIN.md §6, the 2021 QEMU RFC sent ``PAGE_SIZE/16`` bytes per page): a
chunk carries one bit per page for "mapped", "tagged" and "tags not all zero", and packed 4-bit
tags (``page_size / 32`` bytes) only for pages whose tags are not all zero, with a CRC-32.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from hostd.model.errors import (
    RESOURCE_MEMORY,
    RESOURCE_TAGGABLE_MEMORY,
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    TagStoreError,
)
from hostd.model.events import EVENT_MIGRATION_PHASE, Event
from hostd.model.physmem import TG_FREE, TG_TAGGED, as_slice
from hostd.model.types import (
    BOOT_RAM_GPA,
    MTE_GRANULE_BYTES,
    Access,
    MemoryDeviceKind,
    TagPolicy,
    VmConfig,
)
from hostd.model.vm import MemoryDevice, Vm

if TYPE_CHECKING:
    from collections.abc import Mapping

    from hostd.model.physmem import PhysicalMemory
    from hostd.model.types import HostCounters, VmStatus

IndexArray = npt.NDArray[np.int64]

# One chunk describes at most this many guest pages, and carries at most this many bytes of
# packed tags (whichever comes first): bounded like s390x's storage-key chunks, and with its
# bitmaps (at most 4 x 32 KiB, plus 256 KiB for a sparse window) under gRPC's default 4 MiB
# message limit. Fewer, larger chunks mean fewer round trips for the same bytes.
CHUNK_MAX_PAGES = 1 << 18
CHUNK_MAX_TAG_BYTES = 2 << 20
MAX_DEADLINE_SECONDS = 24 * 3600.0
# Guest memory a manifest may describe (the model's own limit on a VM, 4 TiB).
MAX_MANIFEST_GUEST_BYTES = 4 << 40


class MigrationRole(enum.Enum):
    """Which side of a migration this host is."""

    OUTGOING = "OUTGOING"
    INCOMING = "INCOMING"


class MigrationPhase(enum.Enum):
    """Where a migration is, on one host."""

    PRECOPY = "PRECOPY"  # source: VM runs, dirty pages tracked and resent
    PAUSED = "PAUSED"  # source: VM paused for the final round
    HANDOVER = "HANDOVER"  # source: everything sent; waits for complete (never resumes alone)
    INCOMING = "INCOMING"  # destination: admitted, receiving under a lease


class MigrationOutcome(enum.Enum):
    """How a migration ended on one host (counted per role)."""

    COMPLETED = "completed"  # source released the VM / destination committed it
    ABORTED = "aborted"  # either side called abort
    EXPIRED = "expired"  # lease ran out (destination) or client fell silent (source)
    REFUSED = "refused"  # destination refused admission


@dataclass(frozen=True)
class DeviceManifest:
    """One memory device of a migrating VM, as the destination must recreate it."""

    device_id: str
    kind: MemoryDeviceKind
    gpa: int
    size_bytes: int
    block_size_bytes: int = 0
    requested_size_bytes: int = 0
    usable_region_size_bytes: int = 0
    plugged: bytes = b""  # virtio-mem: the plugged-block bitmap (np.packbits, big-endian bits)
    prealloc: bool = False  # virtio-mem: QEMU's prealloc property


@dataclass(frozen=True)
class MigrationManifest:
    """What the source sends before anything moves: enough for the destination to decide.

    ``mapped`` and ``tagged`` are zlib-compressed bitmaps over the VM's stage-2 map (one bit per
    guest page from boot RAM's gpa): guests map memory in long runs, which compress to little.
    """

    migration_id: str
    config: VmConfig
    page_size_bytes: int
    devices: tuple[DeviceManifest, ...]
    mapped: bytes
    tagged: bytes
    mapped_bytes: int
    tagged_bytes: int
    plugged_bytes: int


@dataclass(frozen=True)
class TagChunk:
    """A bounded piece of one round: the state of some guest pages of the window
    ``[first_gfn_offset, first_gfn_offset + span_pages)`` of the stage-2 map.

    ``present`` marks which pages of the window the chunk describes; ``mapped``, ``tagged`` and
    ``nonzero`` have one bit per described page, ``tags`` the packed 4-bit tags of each page with
    a ``nonzero`` bit, in page order. ``checksum`` is the CRC-32 of everything else.
    """

    seq: int
    round: int
    first_gfn_offset: int
    span_pages: int
    present: bytes
    mapped: bytes
    tagged: bytes
    nonzero: bytes
    tags: bytes
    checksum: int

    def header(self) -> bytes:
        return struct.pack("<QQQQ", self.seq, self.round, self.first_gfn_offset, self.span_pages)

    def compute_checksum(self) -> int:
        crc = zlib.crc32(self.header())
        for part in (self.present, self.mapped, self.tagged, self.nonzero, self.tags):
            crc = zlib.crc32(struct.pack("<Q", len(part)), crc)
            crc = zlib.crc32(part, crc)
        return crc

    @property
    def wire_bytes(self) -> int:
        """Bytes this chunk costs on the wire (bitmaps, tags, header and checksum)."""
        return (
            32
            + 4
            + len(self.present)
            + len(self.mapped)
            + len(self.tagged)
            + len(self.nonzero)
            + len(self.tags)
        )


@dataclass(frozen=True)
class MigrationStatus:
    """A read-only view of one migration on one host."""

    migration_id: str
    vm_id: str
    role: MigrationRole
    phase: MigrationPhase
    round: int
    round_pages_left: int  # source: pages of the current round not sent yet
    dirty_pages: int  # source: pages changed since the current round started
    chunks: int
    wire_bytes: int  # sent (source) or received (destination)
    tag_bytes: int  # packed tag bytes among them
    deadline: float  # source: resumes after it; destination: the lease


@dataclass(frozen=True)
class MigrationReport:
    """What completing or committing did (for the caller's logs and the client's summary)."""

    migration_id: str
    vm_id: str
    rounds: int
    wire_bytes: int
    tag_bytes: int
    mapped_bytes: int
    tagged_bytes: int


@dataclass(eq=False)
class MigrationState:
    """The persisted state of one migration on one host (``Host.migrations[vm_id]``)."""

    migration_id: str
    vm_id: str
    role: MigrationRole
    phase: MigrationPhase
    deadline: float
    timeout_seconds: float
    started_at: float = 0.0
    phase_started_at: float = 0.0
    round: int = 1
    chunks: int = 0
    wire_bytes: int = 0
    tag_bytes: int = 0
    # Source: pages changed since the round started (None on the destination).
    dirty: npt.NDArray[np.bool_] | None = None
    # Source: stage-2 offsets of the current round, and how many of them were sent.
    round_offs: IndexArray = field(default_factory=lambda: np.empty(0, np.int64))
    cursor: int = 0
    # Destination: tags received, applied at commit (the latest state of a page wins): the
    # offsets of tagged pages, which of them have non-zero tags, and those pages' rows.
    staged_offs: list[IndexArray] = field(default_factory=list)
    staged_nonzero: list[npt.NDArray[np.bool_]] = field(default_factory=list)
    staged_rows: list[npt.NDArray[np.uint8]] = field(default_factory=list)
    # Destination: plugged pages the source has not mapped, backed at admission so that the
    # lease holds them (None on the source). A chunk that describes a page settles it; what is
    # still held at commit the source never mapped, and goes back to the host.
    held: npt.NDArray[np.bool_] | None = None

    def status(self) -> MigrationStatus:
        return MigrationStatus(
            migration_id=self.migration_id,
            vm_id=self.vm_id,
            role=self.role,
            phase=self.phase,
            round=self.round,
            round_pages_left=int(self.round_offs.size - self.cursor),
            dirty_pages=int(self.dirty.sum()) if self.dirty is not None else 0,
            chunks=self.chunks,
            wire_bytes=self.wire_bytes,
            tag_bytes=self.tag_bytes,
            deadline=self.deadline,
        )


# ----------------------------------------------------------------- wire helpers


def pack_tags(rows: npt.NDArray[np.uint8]) -> bytes:
    """One-tag-per-byte rows (``KVM_ARM_MTE_COPY_TAGS`` layout) to 4 bits per granule."""
    # Each pair of tags read as one little-endian 16-bit word ``lo + 256 * hi``: since tags are
    # 0..15, the low byte of ``w | w >> 4`` is ``lo | hi << 4``. Contiguous passes, not strided.
    pairs = np.ascontiguousarray(rows).view("<u2")
    return (pairs | (pairs >> 4)).astype(np.uint8).tobytes()


def unpack_tags(data: bytes, nr_pages: int, tags_per_page: int) -> npt.NDArray[np.uint8]:
    """The inverse of :func:`pack_tags`: ``(nr_pages, tags_per_page)`` one tag per byte."""
    packed = np.frombuffer(data, np.uint8).reshape(nr_pages, tags_per_page // 2)
    rows = np.empty((nr_pages, tags_per_page), np.uint8)
    rows[:, 0::2] = packed & 0xF
    rows[:, 1::2] = packed >> 4
    return rows


def _bits(mask: npt.NDArray[np.bool_]) -> bytes:
    return np.packbits(mask).tobytes()


def _unbits(data: bytes, n: int, field_name: str) -> npt.NDArray[np.bool_]:
    if len(data) != -(-n // 8):
        raise InvalidArgumentError(field_name, f"{len(data)} bytes", f"expected {-(-n // 8)}")
    return np.unpackbits(np.frombuffer(data, np.uint8), count=n).astype(bool)


def _check_deadline(field_name: str, seconds: float) -> None:
    if not 0 < seconds <= MAX_DEADLINE_SECONDS:
        raise InvalidArgumentError(field_name, seconds, f"must be in (0, {MAX_DEADLINE_SECONDS}]")


# ----------------------------------------------------------------- the protocol


class HostMigration:
    """Migration operations of :class:`~hostd.model.host.Host` (mixed into it).

    Every operation is one model call: it completes keeping every invariant, or raises a
    :class:`~hostd.model.errors.TagStoreError` having changed nothing.
    """

    migrations: dict[str, MigrationState]

    if TYPE_CHECKING:
        # What the protocol uses of Host: the seam, declared for the type checker.
        mem: PhysicalMemory
        counters: HostCounters

        @property
        def page_size(self) -> int: ...
        @property
        def vms(self) -> Mapping[str, Vm]: ...
        def _vm(self, vm_id: str) -> Vm: ...
        def _emit(self, event: Event) -> None: ...
        def _fault(self, vm: Vm, offs: IndexArray, access: Access) -> Any: ...
        def _unmap(self, vm: Vm, offs: IndexArray) -> None: ...
        def _back(self, vm: Vm, offs: IndexArray) -> None: ...
        @staticmethod
        def _untagged_pool(config: VmConfig) -> int: ...
        def create_vm(self, config: VmConfig) -> VmStatus: ...
        def destroy_vm(self, vm_id: str) -> VmStatus: ...
        def _release_vm(self, vm: Vm) -> None: ...

    # ------------------------------------------------------------- hooks Host calls

    def _migration_mark_dirty(self, vm: Vm, offs: IndexArray | slice) -> None:
        m = self.migrations.get(vm.vm_id)
        if m is not None and m.dirty is not None:
            m.dirty[offs] = True

    def _migration_refuse_io(self, vm: Vm, what: str) -> None:
        m = self.migrations.get(vm.vm_id)
        if m is not None and m.phase is not MigrationPhase.PRECOPY:
            raise FailedPreconditionError(
                f"VM {vm.vm_id!r} is migrating (phase {m.phase.value}): {what} refused",
                reason="VM_MIGRATION_PHASE",
                vm_id=vm.vm_id,
                phase=m.phase.value,
                migration_id=m.migration_id,
            )

    def _migration_refuse_config(self, vm: Vm, what: str) -> None:
        m = self.migrations.get(vm.vm_id)
        if m is not None:
            raise FailedPreconditionError(
                f"VM {vm.vm_id!r} is migrating (phase {m.phase.value}): {what} refused",
                reason="VM_MIGRATING",
                vm_id=vm.vm_id,
                phase=m.phase.value,
                migration_id=m.migration_id,
            )

    def _migration_busy(self, vm: Vm) -> bool:
        return vm.vm_id in self.migrations

    # ------------------------------------------------------------- lookups

    def _migration(self, vm_id: str, migration_id: str) -> MigrationState:
        m = self.migrations.get(vm_id)
        if m is None or m.migration_id != migration_id:
            raise NotFoundError(
                f"no migration {migration_id!r} of VM {vm_id!r} on this host",
                reason="MIGRATION_NOT_FOUND",
                vm_id=vm_id,
                migration_id=migration_id,
            )
        return m

    def _require_phase(self, m: MigrationState, *phases: MigrationPhase) -> None:
        if m.phase not in phases:
            raise FailedPreconditionError(
                f"migration {m.migration_id!r} is in phase {m.phase.value}, "
                f"not {'/'.join(p.value for p in phases)}",
                reason="MIGRATION_WRONG_PHASE",
                migration_id=m.migration_id,
                phase=m.phase.value,
            )

    def _phase_event(self, m: MigrationState, phase: str) -> None:
        self._emit(
            Event(
                EVENT_MIGRATION_PHASE,
                vm_id=m.vm_id,
                count=m.round,
                detail={
                    "migration_id": m.migration_id,
                    "role": m.role.value,
                    "phase": phase,
                },
            )
        )

    def _complete(
        self, m: MigrationState, vm: Vm, role: MigrationRole, now: float | None
    ) -> MigrationReport:
        """End ``m`` as completed on this side (its bytes counted for ``role``); the report of
        what the VM holds now, the same on both sides."""
        report = MigrationReport(
            m.migration_id,
            vm.vm_id,
            m.round,
            m.wire_bytes,
            m.tag_bytes,
            vm.mapped_pages * self.page_size,
            vm.tagged_pages * self.page_size,
        )
        self.counters.add(self.counters.migration_bytes, role.value, m.wire_bytes)
        self._end_migration(m, MigrationOutcome.COMPLETED, now)
        return report

    def _end_migration(
        self, m: MigrationState, outcome: MigrationOutcome, now: float | None
    ) -> None:
        del self.migrations[m.vm_id]
        c = self.counters
        key = (m.role.value, outcome.value)
        c.add(c.migrations, key)
        if now is not None:
            c.observe(c.migration_seconds, key, now - m.started_at)
            self._phase_ended(m, now)
        self._phase_event(m, outcome.value.upper())

    def _phase_ended(self, m: MigrationState, now: float) -> None:
        """Count how long ``m`` spent in its current phase; the next one starts ``now``."""
        c = self.counters
        c.observe(
            c.migration_phase_seconds, (m.role.value, m.phase.value), now - m.phase_started_at
        )
        m.phase_started_at = now

    def get_migration(self, vm_id: str) -> MigrationStatus:
        """The migration of ``vm_id`` on this host (NOT_FOUND if none)."""
        m = self.migrations.get(vm_id)
        if m is None:
            raise NotFoundError(
                f"VM {vm_id!r} is not migrating on this host",
                reason="MIGRATION_NOT_FOUND",
                vm_id=vm_id,
            )
        return m.status()

    # ------------------------------------------------------------- source

    def start_migration(
        self, vm_id: str, migration_id: str, now: float, timeout_seconds: float
    ) -> MigrationManifest:
        """Start an outgoing migration: the VM keeps running, its changes are now tracked, and
        the manifest describes what the destination must reserve. Round 1 sends every mapped
        page. If no call of this migration arrives for ``timeout_seconds`` before the handover,
        :meth:`expire_migrations` resumes the VM."""
        vm = self._vm(vm_id)
        _check_migration_id(migration_id)
        _check_deadline("timeout_seconds", timeout_seconds)
        self._migration_refuse_config(vm, "starting another migration")
        mapped = vm.stage2 != 0
        offs = np.flatnonzero(mapped).astype(np.int64)
        tagged = np.zeros(vm.stage2.size, dtype=bool)
        tagged[offs] = self.mem.flags[vm.stage2[offs].astype(np.int64) - 1] == TG_TAGGED
        devices = tuple(
            DeviceManifest(
                d.device_id,
                d.kind,
                d.gpa,
                d.size_bytes,
                d.block_size_bytes,
                d.requested_size_bytes,
                d.usable_region_size_bytes,
                _bits(d.plugged) if d.is_virtio_mem else b"",
                d.prealloc,
            )
            for d in sorted(vm.devices.values(), key=lambda d: d.gpa)
        )
        ps = self.page_size
        m = MigrationState(
            migration_id,
            vm_id,
            MigrationRole.OUTGOING,
            MigrationPhase.PRECOPY,
            now + timeout_seconds,
            timeout_seconds,
            started_at=now,
            phase_started_at=now,
            dirty=np.zeros(vm.stage2.size, dtype=bool),
            round_offs=offs,
        )
        self.migrations[vm_id] = m
        self._phase_event(m, m.phase.value)
        return MigrationManifest(
            migration_id=migration_id,
            config=vm.config,
            page_size_bytes=ps,
            devices=devices,
            mapped=zlib.compress(_bits(mapped), 1),
            tagged=zlib.compress(_bits(tagged), 1),
            mapped_bytes=vm.mapped_pages * ps,
            tagged_bytes=vm.tagged_pages * ps,
            plugged_bytes=sum(d.plugged_bytes for d in vm.devices.values()),
        )

    def read_migration_chunk(self, vm_id: str, migration_id: str, now: float) -> TagChunk | None:
        """The next chunk of the current round, or None when the round is fully sent.

        A chunk describes pages as they are *now*; a page that changes after it was read is
        marked dirty again and goes in the next round."""
        m = self._migration(vm_id, migration_id)
        self._require_phase(m, MigrationPhase.PRECOPY, MigrationPhase.PAUSED)
        m.deadline = now + m.timeout_seconds
        if m.cursor >= m.round_offs.size:
            return None
        vm = self._vm(vm_id)
        mem = self.mem
        ps = self.page_size
        packed_per_page = ps // MTE_GRANULE_BYTES // 2
        offs = m.round_offs[m.cursor : m.cursor + CHUNK_MAX_PAGES]
        # Bound the window too, so that the present bitmap stays small on sparse rounds.
        offs = offs[: np.searchsorted(offs, offs[0] + 8 * CHUNK_MAX_PAGES)]
        first = int(offs[0])
        # A round's offsets rise, so a window they fill is one run (all of a round 1 whose
        # guest is mapped throughout): read it as a slice, with no gather.
        run = int(offs[-1]) - first + 1 == offs.size
        s2 = (vm.stage2[first : first + offs.size] if run else vm.stage2[offs]).astype(np.int64)
        is_mapped = s2 != 0
        is_tagged = np.zeros(offs.size, dtype=bool)
        is_tagged[is_mapped] = mem.flags[s2[is_mapped] - 1] == TG_TAGGED
        tagged_idx = np.flatnonzero(is_tagged)
        # Only tagged pages can have tags to send: stop looking where the tagged pages alone
        # could fill the chunk four times over, so that a densely tagged window does not search
        # the tag store for pages that the byte bound then cuts off (a chunk of a window whose
        # tagged pages are mostly all-zero just ends sooner).
        enough = 4 * CHUNK_MAX_TAG_BYTES // packed_per_page
        if tagged_idx.size > enough:
            end = int(tagged_idx[enough])
            offs, s2, is_mapped, is_tagged = offs[:end], s2[:end], is_mapped[:end], is_tagged[:end]
            tagged_idx = tagged_idx[:enough]
        # The tag store keeps only pages with a non-zero tag: which pages those are is a
        # lookup, and the same lookup finds their rows.
        pos, stored = mem.tags.locate(s2[tagged_idx] - 1)
        # Cut before the page whose packed tags would exceed the chunk's byte bound (a chunk
        # has at least one page).
        nonzero_idx = tagged_idx[stored]
        max_rows = CHUNK_MAX_TAG_BYTES // packed_per_page
        if nonzero_idx.size > max_rows:
            cut = max(1, int(nonzero_idx[max_rows]))
            offs, is_mapped, is_tagged = offs[:cut], is_mapped[:cut], is_tagged[:cut]
            keep = tagged_idx < cut
            pos, stored = pos[keep], stored[keep]
            nonzero_idx = nonzero_idx[nonzero_idx < cut]
        nonzero_all = np.zeros(offs.size, dtype=bool)
        nonzero_all[nonzero_idx] = True
        nonzero_t = nonzero_all[is_tagged]
        rows = mem.tags.rows_at(as_slice(pos[stored]))
        span = int(offs[-1]) - first + 1
        if run:
            present = np.ones(span, dtype=bool)
        else:
            present = np.zeros(span, dtype=bool)
            present[offs - first] = True
        chunk = TagChunk(
            seq=m.chunks,
            round=m.round,
            first_gfn_offset=first,
            span_pages=span,
            present=_bits(present),
            mapped=_bits(is_mapped),
            tagged=_bits(is_tagged[is_mapped]),
            nonzero=_bits(nonzero_t),
            tags=pack_tags(rows),
            checksum=0,
        )
        chunk = _with_checksum(chunk)
        m.cursor += offs.size
        m.chunks += 1
        m.wire_bytes += chunk.wire_bytes
        m.tag_bytes += len(chunk.tags)
        return chunk

    def next_migration_round(self, vm_id: str, migration_id: str, now: float) -> int:
        """Start the next round with the pages dirtied since the last one; returns its size in
        pages (0: the destination is up to date). The current round must be fully sent."""
        m = self._migration(vm_id, migration_id)
        self._require_phase(m, MigrationPhase.PRECOPY, MigrationPhase.PAUSED)
        if m.cursor < m.round_offs.size:
            raise FailedPreconditionError(
                f"round {m.round} still has {m.round_offs.size - m.cursor} pages to send",
                reason="MIGRATION_ROUND_NOT_SENT",
                migration_id=migration_id,
                round=m.round,
            )
        assert m.dirty is not None
        m.deadline = now + m.timeout_seconds
        m.round_offs = np.flatnonzero(m.dirty).astype(np.int64)
        m.dirty[:] = False
        m.cursor = 0
        m.round += 1
        self.counters.migration_rounds += 1
        return int(m.round_offs.size)

    def pause_migration(self, vm_id: str, migration_id: str, now: float) -> MigrationStatus:
        """Pause the guest for the final round: from now on its faults and tag writes are
        refused (FAILED_PRECONDITION), so the dirty set can only shrink to empty."""
        m = self._migration(vm_id, migration_id)
        self._require_phase(m, MigrationPhase.PRECOPY)
        self._phase_ended(m, now)
        m.phase = MigrationPhase.PAUSED
        m.deadline = now + m.timeout_seconds
        self._phase_event(m, m.phase.value)
        return m.status()

    def handover_migration(self, vm_id: str, migration_id: str, now: float) -> MigrationStatus:
        """Everything is sent: the source gives up the right to resume the VM by itself (the
        destination may commit at any moment now). Needs PAUSED, the round sent, nothing dirty."""
        m = self._migration(vm_id, migration_id)
        self._require_phase(m, MigrationPhase.PAUSED)
        assert m.dirty is not None
        left = int(m.round_offs.size - m.cursor) + int(m.dirty.sum())
        if left:
            raise FailedPreconditionError(
                f"{left} pages of VM {vm_id!r} are not sent yet",
                reason="MIGRATION_ROUND_NOT_SENT",
                migration_id=migration_id,
                nr_pages=left,
            )
        self._phase_ended(m, now)
        m.phase = MigrationPhase.HANDOVER
        m.deadline = now + m.timeout_seconds
        self._phase_event(m, m.phase.value)
        return m.status()

    def complete_migration(
        self, vm_id: str, migration_id: str, now: float | None = None
    ) -> MigrationReport:
        """The destination committed: release every page, tag and tag block of the VM.
        ``now`` (if given) ends the migration's duration."""
        m = self._migration(vm_id, migration_id)
        self._require_phase(m, MigrationPhase.HANDOVER)
        vm = self._vm(vm_id)
        report = self._complete(m, vm, MigrationRole.OUTGOING, now)
        self._release_vm(vm)
        return report

    # ------------------------------------------------------------- destination

    def admit_migration(
        self, manifest: MigrationManifest, now: float, lease_seconds: float
    ) -> MigrationStatus:
        """Admit an incoming VM, or refuse before anything moves.

        Admission creates the VM (phase INCOMING: it does not run here yet) with the source's
        layout, and backs every page the source has mapped — tagged pages with reserved tag
        storage — through the host's own fault path, so that tags can later be written without
        any allocation. Plugged pages the source has not mapped are backed too, as the VM's
        policy backs a fault, so that the lease holds them (``MigrationState.held``); commit
        gives back those the source never mapped, abort and expiry everything.
        Refusal is RESOURCE_EXHAUSTED naming the resource and how many bytes are short. The
        lease ends the incoming migration (:meth:`expire_migrations`) unless renewed by
        every call of the migration."""
        cfg = manifest.config
        _check_migration_id(manifest.migration_id)
        _check_deadline("lease_seconds", lease_seconds)
        if manifest.page_size_bytes != self.page_size:
            raise FailedPreconditionError(
                f"source page size {manifest.page_size_bytes:#x} differs from this host's "
                f"{self.page_size:#x}",
                reason="PAGE_SIZE_MISMATCH",
                page_size_bytes=manifest.page_size_bytes,
            )
        if cfg.vm_id in self.vms:
            raise AlreadyExistsError(
                f"VM {cfg.vm_id!r} exists on this host",
                reason="VM_ALREADY_EXISTS",
                vm_id=cfg.vm_id,
            )
        for name, value in (
            ("boot_memory_bytes", cfg.boot_memory_bytes),
            ("max_memory_bytes", cfg.max_memory_bytes),
        ):
            # Checked again by create_vm; here so that no bitmap is sized from a wild value.
            if not 0 < value <= MAX_MANIFEST_GUEST_BYTES and not (name[0] == "m" and value == 0):
                raise InvalidArgumentError(name, value, f"must be 1..{MAX_MANIFEST_GUEST_BYTES:#x}")
        span = (Vm.device_area(cfg)[1] - BOOT_RAM_GPA) // self.page_size
        nbytes = -(-span // 8)
        mapped = _unbits(_inflate(manifest.mapped, "mapped", nbytes), span, "mapped")
        tagged = _unbits(_inflate(manifest.tagged, "tagged", nbytes), span, "tagged")
        if (tagged & ~mapped).any():
            raise InvalidArgumentError("tagged", "bitmap", "marks pages that are not mapped")
        try:
            self._admission_check(manifest, mapped, tagged)
        except ResourceExhaustedError:
            self.counters.add(self.counters.migrations, (MigrationRole.INCOMING.value, "refused"))
            raise
        self.create_vm(cfg)
        vm = self._vm(cfg.vm_id)
        try:
            self._recreate_devices(vm, manifest)
            plugged = np.zeros(span, dtype=bool)
            plugged[vm.plugged_offsets()] = True
            if (mapped & ~plugged).any():
                raise InvalidArgumentError("mapped", "bitmap", "marks pages that are not plugged")
            self._back_pages(vm, np.flatnonzero(mapped & ~tagged), np.flatnonzero(tagged))
            # Every other plugged page is backed too, as the VM's policy would back it at a
            # fault (taggable and reserved for an MTE guest tagged at fault): the source's guest
            # may touch any of them during pre-copy, and the lease must hold what a chunk will
            # need, or a second admission or another VM's faults could take it meanwhile. An
            # EAGER VM's boot RAM is already backed by create_vm.
            held = plugged & ~mapped
            to_back = np.flatnonzero(held & (vm.stage2 == 0)).astype(np.int64)
            if to_back.size:
                self._back(vm, to_back)
        except TagStoreError as error:
            self.destroy_vm(cfg.vm_id)
            self.counters.add(self.counters.migrations, (MigrationRole.INCOMING.value, "refused"))
            if isinstance(error, ResourceExhaustedError):
                raise _shortfall(error, manifest) from None
            raise
        m = MigrationState(
            manifest.migration_id,
            cfg.vm_id,
            MigrationRole.INCOMING,
            MigrationPhase.INCOMING,
            now + lease_seconds,
            lease_seconds,
            started_at=now,
            phase_started_at=now,
            held=held,
        )
        self.migrations[cfg.vm_id] = m
        self._phase_event(m, m.phase.value)
        return m.status()

    def _admission_check(
        self,
        manifest: MigrationManifest,
        mapped: npt.NDArray[np.bool_],
        tagged: npt.NDArray[np.bool_],
    ) -> None:
        """Refuse, before anything changes, when the pages the lease must hold cannot fit: every
        plugged page, tagged (with tag storage) where the source has it tagged or the policy
        tags at fault, untagged otherwise, from the pool the VM's untagged pages may use."""
        ps = self.page_size
        mem = self.mem
        cfg = manifest.config
        nr_tagged = int(tagged.sum())
        nr_untagged = int(mapped.sum()) - nr_tagged
        nr_held = max(0, manifest.plugged_bytes // ps - nr_tagged - nr_untagged)
        tagged_at_fault = cfg.mte_enabled and cfg.tag_policy is not TagPolicy.ON_TAG_ACCESS
        need_tagged = nr_tagged + (nr_held if tagged_at_fault else 0)
        need_untagged = nr_untagged + (0 if tagged_at_fault else nr_held)
        if need_tagged:
            _require(RESOURCE_TAGGABLE_MEMORY, need_tagged, mem.free_pages(TG_FREE), ps)
        # Taggable memory is in every pool, so tagged pages count against the pool too.
        pool_pages = mem.untagged_capacity(self._untagged_pool(cfg))
        _require(RESOURCE_MEMORY, need_tagged + need_untagged, pool_pages, ps)

    def _recreate_devices(self, vm: Vm, manifest: MigrationManifest) -> None:
        """The source's memory devices at the source's addresses (not re-placed: a layout with
        holes from removed devices must come out the same)."""
        ps = self.page_size
        area_start, area_end = Vm.device_area(vm.config)
        for d in manifest.devices:
            if d.kind is MemoryDeviceKind.BOOT_RAM:
                if d.size_bytes != vm.boot_ram.size_bytes or d.gpa != vm.boot_ram.gpa:
                    raise InvalidArgumentError("devices", d.device_id, "boot RAM differs")
                continue
            if (
                d.gpa % ps
                or d.size_bytes <= 0
                or d.size_bytes % ps
                or d.gpa < area_start
                or d.gpa + d.size_bytes > area_end
                or vm.device_at(d.gpa) is not None
                or d.device_id in vm.devices
            ):
                raise InvalidArgumentError(
                    "devices", d.device_id, "outside the device area, misaligned or overlapping"
                )
            dev = MemoryDevice(
                d.device_id,
                d.kind,
                d.gpa,
                d.size_bytes,
                d.block_size_bytes,
                d.requested_size_bytes,
                d.usable_region_size_bytes,
                d.prealloc,
            )
            if dev.is_virtio_mem:
                bs = d.block_size_bytes
                if bs < ps or bs & (bs - 1) or d.size_bytes % bs or d.gpa % bs:
                    raise InvalidArgumentError("block_size", bs, "not a power of two dividing it")
                for name, value in (
                    ("requested_size", d.requested_size_bytes),
                    ("usable_region_size", d.usable_region_size_bytes),
                ):
                    if value % bs or value > d.size_bytes:
                        raise InvalidArgumentError(name, value, "not blocks of the region")
                dev.plugged = _unbits(d.plugged, d.size_bytes // bs, "plugged")
            vm.devices[dev.device_id] = dev

    def _back_pages(self, vm: Vm, untagged: IndexArray, tagged: IndexArray) -> None:
        """Map guest pages through the fault path, as the VM's policy maps them."""
        if tagged.size:
            self._fault(vm, tagged.astype(np.int64), Access.TAG)
        if untagged.size:
            self._fault(vm, untagged.astype(np.int64), Access.WRITE)

    def write_migration_chunk(
        self, vm_id: str, migration_id: str, chunk: TagChunk, now: float
    ) -> MigrationStatus:
        """Verify and apply one chunk: pages are mapped, tagged or dropped as the source has
        them now (tag storage is reserved here, before any tag is written), and the tags are
        staged until commit. A chunk already applied (same ``seq``) is acknowledged again
        without effect, so that a client may resend after a lost reply."""
        m = self._migration(vm_id, migration_id)
        self._require_phase(m, MigrationPhase.INCOMING)
        if chunk.checksum != chunk.compute_checksum():
            raise InvalidArgumentError(
                "checksum",
                chunk.checksum,
                f"chunk {chunk.seq} is damaged (CRC-32 is {chunk.compute_checksum():#x})",
                reason="MIGRATION_CHUNK_CHECKSUM",
            )
        if chunk.seq < m.chunks:
            m.deadline = now + m.timeout_seconds
            return m.status()
        if chunk.seq != m.chunks:
            raise FailedPreconditionError(
                f"chunk {chunk.seq} arrived, expected {m.chunks}",
                reason="MIGRATION_CHUNK_OUT_OF_ORDER",
                migration_id=migration_id,
                seq=chunk.seq,
            )
        vm = self._vm(vm_id)
        offs, want_mapped, want_tagged, nonzero, rows = self._decode_chunk(vm, chunk)
        s2 = vm.stage2[offs].astype(np.int64)
        have_mapped = s2 != 0
        have_tagged = np.zeros(offs.size, dtype=bool)
        have_tagged[have_mapped] = self.mem.flags[s2[have_mapped] - 1] == TG_TAGGED
        # Drop what the source dropped, and pages whose taggedness went back (a discard and a
        # fresh fault on the source); then map what is missing, as the source maps it.
        drop = have_mapped & (~want_mapped | (have_tagged & ~want_tagged))
        # New pages first: their allocation is the step that can be refused, and then nothing
        # has changed yet. Pages the source discarded and faulted again (rare) are re-mapped
        # after they are dropped.
        fresh = ~have_mapped
        self._back_pages(
            vm,
            offs[fresh & want_mapped & ~want_tagged],
            offs[want_tagged & ~have_tagged & ~drop],
        )
        self._unmap(vm, offs[drop])
        self._back_pages(vm, offs[drop & want_mapped & ~want_tagged], offs[drop & want_tagged])
        if m.held is not None:
            m.held[offs] = False  # the source's state of these pages is known now
        m.staged_offs.append(offs[want_tagged])
        m.staged_nonzero.append(nonzero)
        m.staged_rows.append(rows)
        m.chunks += 1
        m.round = max(m.round, chunk.round)
        m.wire_bytes += chunk.wire_bytes
        m.tag_bytes += len(chunk.tags)
        m.deadline = now + m.timeout_seconds
        return m.status()

    def _decode_chunk(
        self, vm: Vm, chunk: TagChunk
    ) -> tuple[
        IndexArray,
        npt.NDArray[np.bool_],
        npt.NDArray[np.bool_],
        npt.NDArray[np.bool_],
        npt.NDArray[np.uint8],
    ]:
        span = chunk.span_pages
        if not 0 < span <= 8 * CHUNK_MAX_PAGES or chunk.first_gfn_offset < 0:
            raise InvalidArgumentError("span_pages", span, "window outside the chunk bounds")
        if chunk.first_gfn_offset + span > vm.stage2.size:
            raise InvalidArgumentError(
                "first_gfn_offset", chunk.first_gfn_offset, "window beyond the VM's guest memory"
            )
        present = _unbits(chunk.present, span, "present")
        offs = np.flatnonzero(present).astype(np.int64) + chunk.first_gfn_offset
        want_mapped = _unbits(chunk.mapped, offs.size, "mapped")
        tagged_of_mapped = _unbits(chunk.tagged, int(want_mapped.sum()), "tagged")
        want_tagged = np.zeros(offs.size, dtype=bool)
        want_tagged[want_mapped] = tagged_of_mapped
        nonzero = _unbits(chunk.nonzero, int(want_tagged.sum()), "nonzero")
        tpp = self.page_size // MTE_GRANULE_BYTES
        nr_nonzero = int(nonzero.sum())
        if len(chunk.tags) != nr_nonzero * tpp // 2:
            raise InvalidArgumentError(
                "tags", f"{len(chunk.tags)} bytes", f"expected {nr_nonzero * tpp // 2}"
            )
        if want_tagged.any() and not vm.config.mte_enabled:
            raise InvalidArgumentError("tagged", "bitmap", "a non-MTE VM has no tagged pages")
        if want_mapped.any():
            mapped_offs = offs[want_mapped]
            gpas = vm.gfn_of_offset(mapped_offs) * self.page_size
            lo, hi = int(gpas.min()), int(gpas.max()) + self.page_size
            mask = vm.plugged_mask(lo, (hi - lo) // self.page_size)
            if not mask[(gpas - lo) // self.page_size].all():
                raise InvalidArgumentError("mapped", "bitmap", "marks pages that are not plugged")
        return offs, want_mapped, want_tagged, nonzero, unpack_tags(chunk.tags, nr_nonzero, tpp)

    def commit_migration(
        self, vm_id: str, migration_id: str, now: float | None = None
    ) -> MigrationReport:
        """The destination owns the VM from now on: staged tags are written (their storage was
        reserved when the pages were mapped) and the VM runs here."""
        m = self._migration(vm_id, migration_id)
        self._require_phase(m, MigrationPhase.INCOMING)
        vm = self._vm(vm_id)
        if m.held is not None:
            # Held pages no chunk described: the source never mapped them, so neither does
            # the VM here (its plugged blocks are backed as on any host from now on).
            self._unmap(vm, np.flatnonzero(m.held).astype(np.int64))
            m.held = None
        if m.staged_offs:
            offs = np.concatenate(m.staged_offs)
            nonzero = np.concatenate(m.staged_nonzero)
            # The latest state of a page wins: the last occurrence of each offset (pages dropped
            # or untagged later are not tagged now); pages whose last state is all-zero tags
            # need no write (fresh tagged pages read as zero). Offsets that only ever rise (one
            # round of chunks, in order: the usual case) occur once each, with no sort.
            if offs.size > 1 and not bool((offs[1:] > offs[:-1]).all()):
                order = np.argsort(offs, kind="stable")
                later = np.zeros(offs.size, dtype=bool)
                later[order[:-1]] = offs[order[1:]] == offs[order[:-1]]
                pick = ~later & nonzero
            else:
                pick = nonzero
            s2 = vm.stage2[offs[pick]].astype(np.int64)
            still = s2 != 0
            pages = s2[still] - 1
            is_tagged = self.mem.flags[pages] == TG_TAGGED
            used = (np.cumsum(nonzero) - 1)[pick][still][is_tagged]
            nr_rows = sum(r.shape[0] for r in m.staged_rows)
            # Every staged row, in order (the usual case): the blocks go to the tag store as
            # they are, copied once there; else the rows still wanted are picked out.
            chosen = (
                m.staged_rows if used.size == nr_rows else [np.concatenate(m.staged_rows)[used]]
            )
            self.mem.tags.write_nonzero(pages[is_tagged], chosen)
        m.staged_offs, m.staged_nonzero, m.staged_rows = [], [], []
        return self._complete(m, vm, MigrationRole.INCOMING, now)

    # ------------------------------------------------------------- either side

    def abort_migration(
        self, vm_id: str, migration_id: str, now: float | None = None
    ) -> MigrationStatus:
        """Undo a migration on this host: the source resumes the VM as it is (it never stopped
        owning it), the destination drops the incoming VM and everything reserved for it."""
        m = self._migration(vm_id, migration_id)
        status = m.status()
        self._abort(m, MigrationOutcome.ABORTED, now)
        return status

    def _abort(self, m: MigrationState, outcome: MigrationOutcome, now: float | None) -> None:
        self._end_migration(m, outcome, now)
        if m.role is MigrationRole.INCOMING:
            self.destroy_vm(m.vm_id)

    def expire_migrations(self, now: float) -> list[MigrationStatus]:
        """End every migration whose deadline passed: a destination's lease ran out (the
        incoming VM is dropped) or a source heard nothing (the VM resumes). A source past its
        handover waits for ``complete`` or ``abort``: the destination may own the VM."""
        ended: list[MigrationStatus] = []
        for m in list(self.migrations.values()):
            if m.deadline < now and m.phase is not MigrationPhase.HANDOVER:
                ended.append(m.status())
                self._abort(m, MigrationOutcome.EXPIRED, now)
        return ended

    def next_migration_deadline(self) -> float | None:
        """The earliest deadline :meth:`expire_migrations` would act on (None: nothing to do)."""
        due = [
            m.deadline for m in self.migrations.values() if m.phase is not MigrationPhase.HANDOVER
        ]
        return min(due) if due else None

    def migration_invariants(self) -> list[str]:
        """Violated invariants of the migrations, as sentences (part of check_invariants)."""
        out: list[str] = []
        for vm_id, m in self.migrations.items():
            vm = self.vms.get(vm_id)
            if vm is None or m.vm_id != vm_id:
                out.append(f"migration {m.migration_id!r}: VM {vm_id!r} does not exist")
                continue
            if (m.role is MigrationRole.OUTGOING) != (m.phase is not MigrationPhase.INCOMING):
                out.append(f"migration {m.migration_id!r}: phase {m.phase.value} for {m.role}")
            if m.dirty is not None and m.dirty.size != vm.stage2.size:
                out.append(f"migration {m.migration_id!r}: dirty bitmap of the wrong size")
            if m.round_offs.size and int(m.round_offs.max()) >= vm.stage2.size:
                out.append(f"migration {m.migration_id!r}: round beyond the guest's memory")
            if not 0 <= m.cursor <= m.round_offs.size:
                out.append(f"migration {m.migration_id!r}: cursor {m.cursor} out of its round")
            if m.held is not None:
                if m.held.size != vm.stage2.size:
                    out.append(f"migration {m.migration_id!r}: held bitmap of the wrong size")
                elif not (vm.stage2[m.held] != 0).all():
                    out.append(f"migration {m.migration_id!r}: a held page is not backed")
        return out

    # ------------------------------------------------------------- persistence

    def _migrations_doc(self, arrays: dict[str, npt.NDArray[Any]]) -> list[dict[str, Any]]:
        docs = []
        for i, m in enumerate(self.migrations.values()):
            doc = {
                "index": i,
                "migration_id": m.migration_id,
                "vm_id": m.vm_id,
                "role": m.role.value,
                "phase": m.phase.value,
                "deadline": m.deadline,
                "timeout_seconds": m.timeout_seconds,
                "started_at": m.started_at,
                "phase_started_at": m.phase_started_at,
                "round": m.round,
                "chunks": m.chunks,
                "wire_bytes": m.wire_bytes,
                "tag_bytes": m.tag_bytes,
                "cursor": m.cursor,
            }
            if m.dirty is not None:
                arrays[f"mig{i}_dirty"] = m.dirty.copy()
            arrays[f"mig{i}_round_offs"] = m.round_offs.copy()
            if m.held is not None:
                arrays[f"mig{i}_held"] = m.held.copy()
            if m.staged_offs:
                arrays[f"mig{i}_staged_offs"] = np.concatenate(m.staged_offs)
                arrays[f"mig{i}_staged_nonzero"] = np.concatenate(m.staged_nonzero)
                arrays[f"mig{i}_staged_rows"] = np.concatenate(m.staged_rows)
            docs.append(doc)
        return docs

    def _restore_migrations(
        self, docs: list[dict[str, Any]], arrays: dict[str, npt.NDArray[Any]]
    ) -> None:
        for d in docs:
            i = d["index"]
            m = MigrationState(
                d["migration_id"],
                d["vm_id"],
                MigrationRole(d["role"]),
                MigrationPhase(d["phase"]),
                float(d["deadline"]),
                float(d["timeout_seconds"]),
                started_at=float(d.get("started_at", 0.0)),
                phase_started_at=float(d.get("phase_started_at", d.get("started_at", 0.0))),
                round=d["round"],
                chunks=d["chunks"],
                wire_bytes=d["wire_bytes"],
                tag_bytes=d["tag_bytes"],
                cursor=d["cursor"],
            )
            if f"mig{i}_dirty" in arrays:
                m.dirty = arrays[f"mig{i}_dirty"].astype(bool)
            m.round_offs = arrays[f"mig{i}_round_offs"].astype(np.int64)
            if f"mig{i}_held" in arrays:
                m.held = arrays[f"mig{i}_held"].astype(bool)
            if f"mig{i}_staged_offs" in arrays:
                m.staged_offs = [arrays[f"mig{i}_staged_offs"].astype(np.int64)]
                m.staged_nonzero = [arrays[f"mig{i}_staged_nonzero"].astype(bool)]
                m.staged_rows = [arrays[f"mig{i}_staged_rows"].astype(np.uint8)]
            self.migrations[m.vm_id] = m


def _check_migration_id(migration_id: str) -> None:
    if not isinstance(migration_id, str) or not 0 < len(migration_id) <= 64:
        raise InvalidArgumentError("migration_id", migration_id, "must be 1-64 characters")


def _inflate(data: bytes, field_name: str, expected: int) -> bytes:
    """Decompress a bitmap of ``expected`` bytes; never inflates beyond one byte more."""
    try:
        out = zlib.decompressobj().decompress(data, expected + 1)
    except zlib.error:
        raise InvalidArgumentError(field_name, f"{len(data)} bytes", "not a zlib stream") from None
    if len(out) != expected:
        raise InvalidArgumentError(
            field_name, f"{len(out)}+ bytes inflated", f"expected {expected} bytes"
        )
    return out


def _with_checksum(chunk: TagChunk) -> TagChunk:
    return replace(chunk, checksum=chunk.compute_checksum())


def _require(resource: str, need_pages: int, available_pages: int, page_size: int) -> None:
    if available_pages < need_pages:
        raise ResourceExhaustedError(
            resource,
            f"admitting the VM needs {need_pages * page_size:#x} bytes of {resource}, "
            f"{available_pages * page_size:#x} available: "
            f"short by {(need_pages - available_pages) * page_size:#x} bytes",
            needed_bytes=need_pages * page_size,
            available_bytes=available_pages * page_size,
            short_bytes=(need_pages - available_pages) * page_size,
        )


def _shortfall(error: ResourceExhaustedError, manifest: MigrationManifest) -> TagStoreError:
    """A refusal found while backing pages, restated for the migration (what is short)."""
    meta = dict(error.metadata)
    return ResourceExhaustedError(
        error.resource,
        f"cannot admit VM {manifest.config.vm_id!r}: {error.message}",
        vm_id=manifest.config.vm_id,
        **{k: v for k, v in meta.items() if k != "resource"},
    )
