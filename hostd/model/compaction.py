"""Page migration on the host: compact a tag region, and move guest pages off a host range.

Both move guest pages to other host pages the way the kernel's migration does (DOMAIN.md §6):
the guest keeps its contents and tags, the destination's tag storage is reserved *before* the
tags are written there, and the source's is released after (when its last tagged page goes).
Every move is counted in ``HostCounters.page_migrations`` by reason.

* :meth:`HostPageMigration.compact_tag_region` — like ``alloc_contig_range()`` over a region's
  tag storage plus the kernel's compaction: lent data leaves the tag storage (evacuation), then
  tagged pages of the emptiest tag blocks move into free pages of fuller ones, so that whole
  tag blocks become free to lend or to reserve.
* :meth:`HostPageMigration.evacuate_host_range` — ``offline_pages()``: isolate the range's free
  pages, move every guest page out, release the isolation.

Neither ever fails half-way: each batch of moves is all or nothing, and when there is no room
the operation stops and says how far it got.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from hostd.model.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from hostd.model.events import EVENT_PAGES_MOVED, Event
from hostd.model.physmem import (
    KIND_TAG_STORAGE,
    KIND_TAGGABLE,
    KIND_UNTAGGABLE,
    NO_OWNER,
    POOL_MTE_CAPABLE,
    TG_FREE,
    TG_TAGGED,
    TS_LENT,
    USE_DATA,
    USE_TAGGED,
    PhysicalMemory,
    TagRegion,
)
from hostd.model.types import HostCounters, MigrationReason

if TYPE_CHECKING:
    from hostd.model.vm import Vm

IndexArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class CompactionResult:
    """What a compaction of one tag region did, and what it could not do."""

    region: str
    evacuated_pages: int  # lent data moved out of the region's tag storage
    lent_pages_left: int  # lent pages that found no room elsewhere
    compacted_pages: int  # tagged pages moved into fuller tag blocks
    tag_blocks_freed: int
    tag_blocks_reserved: int  # after
    tag_blocks_min_needed: int  # fewest blocks the region's tagged pages could use

    @property
    def complete(self) -> bool:
        return self.lent_pages_left == 0


@dataclass(frozen=True)
class EvacuationResult:
    """What moving guest pages off a host range did; ``pages_left`` > 0 means it stopped."""

    pfn_start: int
    nr_pages: int
    moved_pages: int
    pages_left: int  # guest pages still in the range (no room elsewhere)
    stopped_reason: str  # "" when complete

    @property
    def complete(self) -> bool:
        return self.pages_left == 0


class HostPageMigration:
    """Host page migration operations of :class:`~hostd.model.host.Host` (mixed into it)."""

    if TYPE_CHECKING:
        mem: PhysicalMemory
        counters: HostCounters
        _by_slot: dict[int, Vm]

        def _emit(self, event: Event) -> None: ...

    # ------------------------------------------------------------- helpers

    def _gfn_offsets_of(self, pages: IndexArray) -> tuple[IndexArray, IndexArray]:
        """Owner slot and stage-2 offset of mapped guest pages (reverse map from stage-2)."""
        owners = self.mem.owner[pages].astype(np.int64)
        offs = np.full(pages.size, -1, np.int64)
        for slot in np.unique(owners).tolist():
            vm = self._by_slot[int(slot)]
            mapped = np.flatnonzero(vm.stage2).astype(np.int64)
            host_pages = vm.stage2[mapped].astype(np.int64) - 1
            order = np.argsort(host_pages)
            sel = owners == slot
            pos = np.searchsorted(host_pages[order], pages[sel])
            offs[sel] = mapped[order][pos]
        return owners, offs

    def _move_pages(
        self,
        src: IndexArray,
        dst: IndexArray,
        owners: IndexArray,
        offs: IndexArray,
        *,
        isolate: bool = False,
    ) -> None:
        """Point guest pages at ``dst`` (already claimed, their tag blocks reserved), move the
        tags, then free ``src`` — which releases tag blocks that lost their last tagged page.
        With ``isolate`` the source pages stay taken (ownerless data) instead of free."""
        self.mem.tags.move(src, dst)
        for slot in np.unique(owners).tolist():
            sel = owners == slot
            vm = self._by_slot[int(slot)]
            vm.stage2[offs[sel]] = (dst[sel] + 1).astype(np.uint32)
            # A migrated page leaves its folio: the THP is split, as on a fault replay.
            vm.split_folios(offs[sel])
        if isolate:
            self.mem.owner[src] = NO_OWNER
            self.mem._set_flags(src, use=USE_DATA)
        else:
            self.mem.free(src)

    def _count_moves(self, reason: MigrationReason, n: int) -> None:
        if n:
            self.counters.add(self.counters.page_migrations, reason.value, n)
            self._emit(Event(EVENT_PAGES_MOVED, count=n, detail={"reason": reason.value}))

    def _free_outside(self, need: int, kinds: tuple[int, ...]) -> IndexArray:
        """Up to ``need`` free pages of segments of ``kinds``, in that order (never tag
        storage, so that moved data does not land in what is being freed)."""
        mem = self.mem
        found: list[IndexArray] = []
        got = 0
        for kind in kinds:
            for seg in mem.segments:
                if seg.kind != kind or got >= need:
                    continue
                take = mem._first_free(seg, need - got)
                found.append(take)
                got += take.size
        return np.concatenate(found) if found else np.empty(0, np.int64)

    # ------------------------------------------------------------- compaction

    def _region(self, name: str) -> TagRegion:
        for reg in self.mem.regions:
            if reg.name == name:
                return reg
        raise NotFoundError(f"no tag region {name!r}", reason="REGION_NOT_FOUND", region=name)

    def compact_tag_region(self, region: str) -> CompactionResult:
        """Free whole tag blocks of ``region``: move lent data out of its tag storage, then
        pack tagged pages of the emptiest reserved blocks into free pages of fuller ones.
        What any VM sees (layout, mapped and tagged bytes, tag contents) does not change."""
        reg = self._region(region)
        mem = self.mem
        if mem.static:
            raise FailedPreconditionError(
                "tag storage is a static carve-out: nothing to compact",
                reason="STATIC_TAG_STORAGE",
                region=region,
            )
        reserved_before = reg.nr_reserved
        # 1. Lent data out of tag storage (to untaggable memory first, then taggable).
        lent = np.flatnonzero(mem.flags[reg.tag.start : reg.tag.end] == TS_LENT) + reg.tag.start
        evacuated = 0
        if lent.size:
            owners = mem.owner[lent].astype(np.int64)
            gfns = mem.ts_gfn[mem._ts_slot(lent)].astype(np.int64)
            # MTE guests tagged at fault keep their data on taggable memory (POOL_MTE_CAPABLE).
            is_mte = mem.owner_pool[owners] == POOL_MTE_CAPABLE
            for mask, kinds in (
                (is_mte, (KIND_TAGGABLE,)),
                (~is_mte, (KIND_UNTAGGABLE, KIND_TAGGABLE)),
            ):
                src = lent[mask]
                dst = self._free_outside(src.size, kinds)
                n = dst.size
                if n == 0:
                    continue
                mem._claim(dst, USE_DATA, mem.owner[src[:n]], None)
                self._move_pages(src[:n], dst, owners[mask][:n], gfns[mask][:n])
                evacuated += n
            self._count_moves(MigrationReason.EVACUATION, evacuated)
            mem.counters.add(mem.counters.evacuated_pages, reg.name, evacuated)
        lent_left = int(lent.size - evacuated)
        # 2. Pack: the emptiest blocks give up their tagged pages while the others have room,
        # fullest first. Each pass empties (and releases) at least one block; passes repeat
        # until none can be emptied, so a second compaction finds nothing to do.
        compacted = 0
        while (moved := self._pack_once(reg)) > 0:
            compacted += moved
        self._count_moves(MigrationReason.COMPACTION, compacted)
        return CompactionResult(
            region=reg.name,
            evacuated_pages=evacuated,
            lent_pages_left=lent_left,
            compacted_pages=compacted,
            tag_blocks_freed=max(0, reserved_before - reg.nr_reserved),
            tag_blocks_reserved=reg.nr_reserved,
            tag_blocks_min_needed=mem.min_blocks_needed(reg),
        )

    def _pack_once(self, reg: TagRegion) -> int:
        """Empty the longest prefix of the emptiest reserved blocks whose tagged pages fit in
        the free data pages of the other blocks; returns the pages moved (0: nothing fits)."""
        mem = self.mem
        used = np.flatnonzero(reg.refcount > 0)
        if used.size < 2:
            return 0
        # A block describing a pinned VM's tagged page cannot be emptied (long-term pinned
        # pages do not migrate); it can still take pages in.
        span_used = reg.data_pages(used)
        pinned = (mem.pinned_owner[mem.owner[span_used]] & (mem.flags[span_used] == TG_TAGGED)).any(
            axis=1
        )
        fixed = used[pinned]
        movable = used[~pinned]
        order = movable[np.argsort(reg.refcount[movable], kind="stable")]
        rc = reg.refcount[order].astype(np.int64)
        free = reg.span_free[order].astype(np.int64)
        moved_cum = np.cumsum(rc)
        # Free pages in the blocks kept after k (the pinned blocks are always kept).
        room_after = int(reg.span_free[fixed].sum()) + free.sum() - np.cumsum(free)
        fits = moved_cum <= room_after
        k = int(np.argmin(fits)) if not fits.all() else fits.size
        if k == 0:
            return 0
        victims, keep = order[:k], np.concatenate([order[k:][::-1], fixed])
        span = reg.data_pages(victims).ravel()
        src = span[mem.flags[span] == TG_TAGGED]
        room = reg.data_pages(keep).ravel()
        dst = room[mem.flags[room] == TG_FREE][: src.size]
        owners, offs = self._gfn_offsets_of(src)
        # The kept blocks are reserved: claiming their free pages reserves nothing new.
        pending = mem._claim(dst, USE_TAGGED, mem.owner[src], None)
        assert not pending, "compaction target blocks must already be reserved"
        self._move_pages(src, dst, owners, offs)
        return int(src.size)

    # ------------------------------------------------------------- offlining

    def evacuate_host_range(self, pfn_start: int, nr_pages: int) -> EvacuationResult:
        """Move every guest page off host pages ``[pfn_start, pfn_start + nr_pages)`` (before
        that memory is offlined). Tagged pages go to other taggable pages with their tags; tag
        storage is not offlined this way (compact its region instead)."""
        mem = self.mem
        lo = self._dense_index(pfn_start, nr_pages)
        hi = lo + nr_pages
        seg = mem.segments[int(mem.segment_of(np.array([lo]))[0])]
        if seg.kind == KIND_TAG_STORAGE:
            raise FailedPreconditionError(
                f"pfn {pfn_start:#x} is tag storage ({seg.name}): compact the tag region instead",
                reason="RANGE_IS_TAG_STORAGE",
                pfn_start=pfn_start,
            )
        fl = mem.flags[lo:hi]
        # Isolate (MIGRATE_ISOLATE): the range's free pages are taken for the duration, so no
        # destination lands inside it.
        iso = np.flatnonzero(fl == seg.free_flag).astype(np.int64) + lo
        mem._claim(iso, USE_DATA, NO_OWNER, None)
        owned = np.flatnonzero(mem.owner[lo:hi] != NO_OWNER).astype(np.int64) + lo
        moved, stopped = 0, ""
        try:
            moved, stopped = self._evacuate_pages(owned)
        finally:
            # Moved-from pages stayed isolated too: release them with the rest.
            taken = np.flatnonzero(mem.owner[lo:hi] == NO_OWNER).astype(np.int64) + lo
            taken = taken[mem.flags[taken] != seg.free_flag]
            mem.free(taken)
        self._count_moves(MigrationReason.OFFLINING, moved)
        return EvacuationResult(pfn_start, nr_pages, moved, int(owned.size - moved), stopped)

    def _dense_index(self, pfn_start: int, nr_pages: int) -> int:
        mem = self.mem
        if nr_pages <= 0:
            raise InvalidArgumentError("nr_pages", nr_pages, "must be positive")
        for seg in mem.segments:
            if seg.base_pfn <= pfn_start < seg.base_pfn + seg.nr_pages:
                if pfn_start + nr_pages > seg.base_pfn + seg.nr_pages:
                    raise InvalidArgumentError(
                        "nr_pages", nr_pages, f"range runs past the end of {seg.name}"
                    )
                return seg.start + pfn_start - seg.base_pfn
        raise InvalidArgumentError("pfn_start", pfn_start, "not in any memory range of the host")

    def _evacuate_pages(self, owned: IndexArray) -> tuple[int, str]:
        """Move ``owned`` pages elsewhere in batches (untagged data, then tagged pages per VM);
        stop at the first batch that does not fit."""
        mem = self.mem
        if owned.size == 0:
            return 0, ""
        tagged = mem.flags[owned] == TG_TAGGED
        owners, offs = self._gfn_offsets_of(owned)
        pools = mem.owner_pool[owners]
        # Long-term pinned pages (VFIO) cannot migrate: the kernel's offlining fails -EBUSY.
        pinned = mem.pinned_owner[owners]
        movable = ~pinned
        moved = 0
        # Each batch is all or nothing: untagged data by where its owner's pages may live
        # (POOL_*), then the tagged pages of each VM.
        batches: list[tuple[npt.NDArray[np.bool_], bool, int]] = [
            (~tagged & movable & (pools == p), False, p)
            for p in np.unique(pools[~tagged & movable]).tolist()
        ]
        batches += [
            (tagged & movable & (owners == s), True, 0)
            for s in np.unique(owners[tagged & movable]).tolist()
        ]
        for mask, is_tagged, pool in batches:
            src = owned[mask]
            if src.size == 0:
                continue
            try:
                if is_tagged:
                    slot = int(owners[mask][0])
                    dst, _, _ = mem.alloc_tagged(src.size, slot, offs[mask])
                else:
                    dst = mem.alloc_untagged(
                        src.size,
                        mem.owner[src],
                        offs[mask],
                        pool=pool,
                    )
            except ResourceExhaustedError as e:
                return moved, f"{e.resource}: {e.message}"
            self._move_pages(src, dst, owners[mask], offs[mask], isolate=True)
            moved += int(src.size)
        if pinned.any():
            return moved, f"pinned: {int(pinned.sum())} pages of VMs with passthrough devices"
        return moved, ""
