"""Host physical memory: page flags, tag regions and tag blocks (the CMA-sized core).

State is a few flat arrays over a dense *page index* (the host pages of every range, in
physical order, with no holes): one flags byte and one owner per page, and a reverse map only
for tag storage pages (the only pages that are ever evacuated by owner). Everything else —
per-block refcounts, lent and free counts, per-segment totals — is derived, maintained in one
place (:meth:`PhysicalMemory._set_flags`) and recomputed on restore.

A flags byte is ``kind << 2 | use``. ``kind`` never changes (it is the range the page lives
in); ``use`` is free / data / tagged / reserved. Lent tag storage is tag-storage kind + data use.

Allocation API (all vectorised, no loop per page):

* :meth:`alloc_untagged` — movable data; outside tag storage first, then lends tag storage.
* :meth:`alloc_tagged` — taggable pages whose tag blocks get reserved (evacuating lent data).
* :meth:`make_tagged` — turn mapped untagged pages tagged in place where their blocks allow.
* :meth:`free` — release pages, their tags and the tag blocks they held.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from hostd.model.errors import (
    RESOURCE_MEMORY,
    RESOURCE_TAG_STORAGE,
    RESOURCE_TAGGABLE_MEMORY,
    ResourceExhaustedError,
)
from hostd.model.events import (
    EVENT_EVACUATION,
    EVENT_TAG_BLOCKS_RELEASED,
    EVENT_TAG_BLOCKS_RESERVED,
    EVENT_TAG_RESERVE_FAILED,
    Event,
)
from hostd.model.tags import TagContents
from hostd.model.topology import HostTopology
from hostd.model.types import (
    DCACHE_INVALIDATE,
    TAG_CACHE_INVALIDATE,
    TAG_STORAGE_RATIO,
    HostCounters,
    MemoryUsage,
    MigrationReason,
    PageState,
    Placement,
    TagStorageMode,
)

IndexArray = npt.NDArray[np.int64]

KIND_UNTAGGABLE, KIND_TAGGABLE, KIND_TAG_STORAGE = 0, 1, 2
USE_FREE, USE_DATA, USE_TAGGED, USE_RESERVED = 0, 1, 2, 3
UT_FREE, UT_DATA = 0, 1
TG_FREE, TG_DATA, TG_TAGGED = 4, 5, 6
TS_FREE, TS_LENT, TS_RESERVED = 8, 9, 11
NR_FLAGS = 16
# Flag values each kind of range may hold.
VALID_FLAGS = {
    KIND_UNTAGGABLE: (UT_FREE, UT_DATA),
    KIND_TAGGABLE: (TG_FREE, TG_DATA, TG_TAGGED),
    KIND_TAG_STORAGE: (TS_FREE, TS_LENT, TS_RESERVED),
}
# Exported page state of each flag value.
PAGE_STATE_OF_FLAG = {
    UT_FREE: PageState.FREE,
    UT_DATA: PageState.DATA,
    TG_FREE: PageState.FREE,
    TG_DATA: PageState.DATA,
    TG_TAGGED: PageState.TAGGED,
    TS_FREE: PageState.TAG_FREE,
    TS_LENT: PageState.TAG_LENT,
    TS_RESERVED: PageState.TAG_RESERVED,
}
# Where an owner's untagged pages may live, in the order they are tried (see alloc_untagged).
POOL_ANY = 0  # untaggable, taggable, then lent tag storage: a non-MTE guest
POOL_MTE_CAPABLE = 1  # taggable, then lent tag storage: an MTE guest tagged at fault
POOL_TAGGABLE_FIRST = 2  # taggable, untaggable, lent tag storage: ON_TAG_ACCESS (NoTagAccess)
POOL_NOT_CMA = 3  # untaggable, then taggable, never tag storage: long-term pinned memory
_POOL_KINDS = {
    POOL_ANY: (KIND_UNTAGGABLE, KIND_TAGGABLE, KIND_TAG_STORAGE),
    POOL_MTE_CAPABLE: (KIND_TAGGABLE, KIND_TAG_STORAGE),
    POOL_TAGGABLE_FIRST: (KIND_TAGGABLE, KIND_UNTAGGABLE, KIND_TAG_STORAGE),
    POOL_NOT_CMA: (KIND_UNTAGGABLE, KIND_TAGGABLE),
}
# Reserving a tag block is retried this many times with other pages (v2/v3: 3 tries).
RESERVE_TRIES = 3
# Smallest window a free-page scan looks at; scans grow geometrically from a hint.
SCAN_WINDOW_MIN = 1 << 14
SCAN_WINDOW_MAX = 1 << 20
NO_OWNER = 0
# Pages per step when counts are rebuilt from the flags: bounds the temporaries of a restore.
REBUILD_CHUNK_PAGES = 1 << 18


@dataclass(eq=False)
class Segment:
    """A physically contiguous range of one kind, mapped to dense page indices."""

    index: int
    kind: int
    name: str
    base_pfn: int
    start: int  # first dense page index
    nr_pages: int
    region: int = -1  # tag region index for taggable / tag storage segments
    ts_offset: int = 0  # tag storage segments: offset into the tag reverse map
    hint: int = 0  # no free page below start + hint

    @property
    def end(self) -> int:
        return self.start + self.nr_pages

    @property
    def free_flag(self) -> int:
        return self.kind << 2


@dataclass(eq=False)
class TagRegion:
    """A tagged data segment and the tag storage segment that describes it."""

    index: int
    name: str
    data: Segment
    tag: Segment
    block_pages: int
    span_pages: int  # data pages described by one tag block: 32 * block_pages
    nr_blocks: int
    refcount: npt.NDArray[np.int32] = field(repr=False)  # tagged pages in the block's span
    lent: npt.NDArray[np.int32] = field(repr=False)  # lent tag pages in the block
    span_free: npt.NDArray[np.int32] = field(repr=False)  # free data pages in the span
    nr_reserved: int = 0
    nr_partial: int = 0  # blocks with refcount > 0 and free data pages in their span
    partial_hint: int = 0  # no partial block below this
    last_partial: int = 0  # the block that most recently became partial (a guess, checked)
    free_hint: int = 0  # no block with a free data page below this

    def block_of_data(self, idx: IndexArray) -> IndexArray:
        """Tag block of data pages: ``rounddown((p - R.start) // 32, block_pages)``."""
        if self.span_pages & (self.span_pages - 1) == 0:
            return (idx - self.data.start) >> (self.span_pages.bit_length() - 1)
        return (idx - self.data.start) // self.span_pages

    def tag_pages(self, blocks: IndexArray) -> IndexArray:
        """Tag page indices of ``blocks``, shape ``(len(blocks), block_pages)``."""
        return self.tag.start + blocks[:, None] * self.block_pages + np.arange(self.block_pages)

    def data_pages(self, blocks: IndexArray) -> IndexArray:
        """Data page indices described by ``blocks``, shape ``(len(blocks), span_pages)``."""
        return self.data.start + blocks[:, None] * self.span_pages + np.arange(self.span_pages)


def require_pages(resource: str, what: str, need: int, available: int) -> None:
    """Refuse, before anything changes, an allocation of ``need`` pages when fewer are free."""
    if available < need:
        raise ResourceExhaustedError(
            resource,
            f"need {need} {what}, {available} available",
            nr_pages=need,
            available_pages=available,
        )


def as_slice(idx: IndexArray) -> IndexArray | slice:
    """``idx`` as a slice when it is exactly one ascending run (fresh allocations usually
    are), so that reads and writes avoid fancy indexing."""
    n = idx.size
    if n == 0:
        return idx
    first, last = int(idx[0]), int(idx[-1])
    # count_nonzero rather than all(): half the cost on the few hundred entries of a fault.
    if last - first + 1 != n or (n > 2 and np.count_nonzero(idx[1:] <= idx[:-1])):
        return idx
    return slice(first, last + 1)


def _sum_by_block(
    blocks: IndexArray, weights: npt.NDArray[np.int64]
) -> tuple[IndexArray, npt.NDArray[np.int32]]:
    """Distinct blocks of a batch of pages and the sum of ``weights`` over each.

    A batch covers a bounded block range, so a bincount over that range beats sorting.
    """
    if blocks.size == 0:
        return blocks, np.empty(0, np.int32)
    b0 = int(blocks.min())
    sums = np.bincount(blocks - b0, weights=weights)
    present = np.bincount(blocks - b0).nonzero()[0]
    return present + b0, sums[present].astype(np.int32)


class PhysicalMemory:
    """Pages, tag blocks and the allocator of one host. Not thread-safe: one owner."""

    def __init__(
        self,
        topology: HostTopology,
        placement: Placement,
        counters: HostCounters,
        emit: Callable[[Event], None],
        listened: Callable[[], bool] = lambda: True,
    ) -> None:
        self.topology = topology
        self.placement = placement
        self.static = topology.tag_storage_mode is TagStorageMode.STATIC
        self.page_size = topology.page_size_bytes
        self.counters = counters
        self._emit = emit
        # Whether anyone receives events: a hot path builds its event only then.
        self._listened = listened
        # Called with (owner slot, gfn offsets, new page indices) when guest pages move.
        self.on_remap: Callable[[int, IndexArray, IndexArray], None] = lambda *_: None
        # Per owner slot: where its untagged pages may live (POOL_*), and whether its memory is
        # long-term pinned (never migrated, so never evacuated).
        self.owner_pool = np.zeros(1 << 16, dtype=np.uint8)
        self.pinned_owner = np.zeros(1 << 16, dtype=bool)

        ps = self.page_size
        spans: list[tuple[int, int, int, int, int]] = []  # base, size, kind, region, sub-index
        for i, r in enumerate(topology.tag_regions):
            spans.append((r.memory_base, r.memory_size_bytes, KIND_TAGGABLE, i, i))
            spans.append((r.tag_base, r.tag_size_bytes, KIND_TAG_STORAGE, i, i))
        for i, u in enumerate(topology.untagged_ranges):
            spans.append((u.base, u.size_bytes, KIND_UNTAGGABLE, -1, i))
        spans.sort()
        self.segments: list[Segment] = []
        start = 0
        ts_offset = 0
        for base, size, kind, region, sub in spans:
            name = f"untagged{sub}" if kind == KIND_UNTAGGABLE else f"tag{region}"
            seg = Segment(len(self.segments), kind, name, base // ps, start, size // ps, region)
            if kind == KIND_TAG_STORAGE:
                seg.ts_offset = ts_offset
                ts_offset += seg.nr_pages
            self.segments.append(seg)
            start += seg.nr_pages
        self.nr_pages = start
        self._seg_starts = np.array([s.start for s in self.segments], dtype=np.int64)
        self._seg_start_list = [s.start for s in self.segments]

        self.regions: list[TagRegion] = []
        for i, r in enumerate(topology.tag_regions):
            data = next(s for s in self.segments if s.kind == KIND_TAGGABLE and s.region == i)
            tag = next(s for s in self.segments if s.kind == KIND_TAG_STORAGE and s.region == i)
            bp = r.block_pages(ps)
            nr_blocks = tag.nr_pages // bp
            self.regions.append(
                TagRegion(
                    i,
                    f"tag{i}",
                    data,
                    tag,
                    bp,
                    bp * TAG_STORAGE_RATIO,
                    nr_blocks,
                    np.zeros(nr_blocks, np.int32),
                    np.zeros(nr_blocks, np.int32),
                    np.full(nr_blocks, bp * TAG_STORAGE_RATIO, np.int32),
                )
            )

        self.flags = np.zeros(self.nr_pages, dtype=np.uint8)
        self.owner = np.zeros(self.nr_pages, dtype=np.uint16)
        self.ts_gfn = np.zeros(ts_offset, dtype=np.uint32)
        self.seg_counts = np.zeros((len(self.segments), NR_FLAGS), dtype=np.int64)
        for seg in self.segments:
            self.flags[seg.start : seg.end] = seg.free_flag
            self.seg_counts[seg.index, seg.free_flag] = seg.nr_pages
        self.tags = TagContents(ps)
        if self.static:
            # The baseline: every tag block is reserved at boot and never lent.
            for reg in self.regions:
                self.flags[reg.tag.start : reg.tag.end] = TS_RESERVED
                self.seg_counts[reg.tag.index, TS_FREE] = 0
                self.seg_counts[reg.tag.index, TS_RESERVED] = reg.tag.nr_pages
                reg.nr_reserved = reg.nr_blocks

    # ----------------------------------------------------------------- unit conversions

    def pfn_of(self, idx: IndexArray) -> IndexArray:
        """Physical pfn of dense page indices."""
        seg = np.searchsorted(self._seg_starts, idx, side="right") - 1
        base = np.array([s.base_pfn - s.start for s in self.segments], dtype=np.int64)
        return idx + base[seg]

    def segment_of(self, idx: IndexArray) -> npt.NDArray[np.intp]:
        return np.searchsorted(self._seg_starts, idx, side="right") - 1

    def bytes_of(self, nr_pages: int) -> int:
        return int(nr_pages) * self.page_size

    # ----------------------------------------------------------------- the one state writer

    def _segment_at(self, page: int) -> Segment:
        return self.segments[bisect.bisect_right(self._seg_start_list, page) - 1]

    def _groups(self, idx: IndexArray) -> Iterator[tuple[Segment, IndexArray | slice]]:
        """The segments ``idx`` touches, with a selector of its entries in each."""
        lo, hi = int(idx.min()), int(idx.max())
        first = int(np.searchsorted(self._seg_starts, lo, side="right")) - 1
        if hi < self.segments[first].end:
            # Nearly every call stays in one segment: no per-page segment lookup.
            yield self.segments[first], slice(None)
            return
        if bool((idx[1:] >= idx[:-1]).all()):
            # Sorted (a large allocation, or a VM's pages freed in guest order, as they were
            # allocated): each segment's entries are one run, found by a search per boundary.
            last = int(np.searchsorted(self._seg_starts, hi, side="right")) - 1
            cuts = np.searchsorted(idx, self._seg_starts[first + 1 : last + 1]).tolist()
            for k, (a, b) in enumerate(zip([0, *cuts], [*cuts, idx.size], strict=True), first):
                if a < b:
                    yield self.segments[k], slice(a, b)
            return
        seg = self.segment_of(idx)
        for s in np.flatnonzero(np.bincount(seg, minlength=len(self.segments))):
            yield self.segments[int(s)], seg == s

    def _set_flags(
        self,
        idx: IndexArray,
        new: int | npt.NDArray[np.uint8] | None = None,
        *,
        use: int | None = None,
    ) -> list[tuple[TagRegion, IndexArray]]:
        """Set page flags (``new``, or the page's kind with ``use``) and keep every derived
        count in step: per-segment totals, free hints, per-block refcount / free / lent.

        Returns, per region, the tag blocks that now describe tagged pages but are not
        reserved yet: the caller must reserve them (or undo the change). Blocks that lost
        their last tagged page are released here.
        """
        if idx.size == 0:
            return []
        pending: list[tuple[TagRegion, IndexArray]] = []
        run = as_slice(idx)
        groups: list[tuple[Segment, IndexArray | slice]]
        if isinstance(run, slice) and run.stop <= self._segment_at(run.start).end:
            # One run of pages in one segment (a fresh allocation): no search over the pages.
            groups = [(self._segment_at(run.start), slice(None))]
        else:
            groups = list(self._groups(idx))
        for seg, sel in groups:
            if isinstance(sel, slice) and sel == slice(None):
                i, at = idx, run
            else:
                i = idx[sel]
                at = as_slice(i)
            # A slice gives a view: keep the old flags apart from the write below.
            o = self.flags[at].copy() if isinstance(at, slice) else self.flags[at]
            if use is not None:
                n: int | npt.NDArray[np.uint8] = seg.kind << 2 | use
            elif isinstance(new, np.ndarray) and new.ndim:
                n = new[sel]
            else:
                n = int(new)  # type: ignore[arg-type]
            o_first = int(o[0])
            # A batch whose pages were all in one state (the common case) needs no per-page
            # deltas: every page contributes the same one.
            uniform = isinstance(n, int) and not np.count_nonzero(o != o_first)
            counts = self.seg_counts[seg.index]
            if uniform:
                counts[o_first] -= i.size
                counts[n] += i.size
            else:
                counts -= np.bincount(o, minlength=NR_FLAGS)
                if isinstance(n, int):
                    counts[n] += i.size
                else:
                    counts += np.bincount(n, minlength=NR_FLAGS)
            self.flags[at] = n
            if uniform:
                if o_first != seg.free_flag and n == seg.free_flag:
                    seg.hint = min(seg.hint, int(i.min()) - seg.start)
            else:
                freed = (o != seg.free_flag) & (n == seg.free_flag)
                if np.any(freed):
                    seg.hint = min(seg.hint, int(i[freed].min()) - seg.start)
            if seg.kind == KIND_TAGGABLE:
                reg = self.regions[seg.region]
                d_free: int | IndexArray
                d_rc: int | IndexArray
                if uniform:
                    d_free = int(n == TG_FREE) - int(o_first == TG_FREE)
                    d_rc = int(n == TG_TAGGED) - int(o_first == TG_TAGGED)
                    if d_free == 0 and d_rc == 0:
                        continue
                else:
                    d_free = np.asarray(n == TG_FREE, dtype=np.int64) - (o == TG_FREE)
                    d_rc = np.asarray(n == TG_TAGGED, dtype=np.int64) - (o == TG_TAGGED)
                if isinstance(at, slice) and uniform:
                    # One run of pages: the pages per block follow from its two ends.
                    page_blocks: IndexArray | tuple[int, int] = (
                        at.start - seg.start,
                        at.stop - seg.start,
                    )
                else:
                    page_blocks = reg.block_of_data(i)
                newly = self._adjust_blocks(reg, page_blocks, d_rc, d_free)
                if newly.size:
                    pending.append((reg, newly))
            elif seg.kind == KIND_TAG_STORAGE:
                reg = self.regions[seg.region]
                if uniform and (n == TS_LENT) == (o_first == TS_LENT):
                    continue  # e.g. free -> reserved: no lent count moves
                d_lent = np.asarray(n == TS_LENT, dtype=np.int64) - (o == TS_LENT)
                if np.any(d_lent):
                    blocks, sums = _sum_by_block((i - seg.start) // reg.block_pages, d_lent)
                    reg.lent[blocks] += sums
        return pending

    def _adjust_blocks(
        self,
        reg: TagRegion,
        page_blocks: IndexArray | tuple[int, int],
        d_rc: int | IndexArray,
        d_free: int | IndexArray,
    ) -> IndexArray:
        """Apply per-page refcount / free deltas (one per page, or one for all) to their
        blocks; release emptied blocks and return the blocks that became referenced.

        ``page_blocks`` is the block of every page, or ``(lo, hi)``: one run of data pages
        (offsets in the segment) sharing scalar deltas."""
        if isinstance(page_blocks, tuple):
            # Pages [lo, hi) of the data segment, one delta for all: count them per block.
            lo, hi = page_blocks
            span = reg.span_pages
            blocks = np.arange(lo // span, (hi - 1) // span + 1, dtype=np.int64)
            per = np.minimum(hi, (blocks + 1) * span) - np.maximum(lo, blocks * span)
            assert isinstance(d_rc, int) and isinstance(d_free, int)
            sum_rc = (per * d_rc).astype(np.int32)
            sum_free = (per * d_free).astype(np.int32)
        else:
            b0 = int(page_blocks.min())
            rel = page_blocks - b0
            per_block = np.bincount(rel)
            present = np.flatnonzero(per_block)
            blocks = present + b0
            sums = []
            for d in (d_rc, d_free):
                if isinstance(d, int):
                    sums.append(per_block[present].astype(np.int32) * np.int32(d))
                else:
                    sums.append(np.bincount(rel, weights=d)[present].astype(np.int32))
            sum_rc, sum_free = sums
        rc_old = reg.refcount[blocks]
        free_old = reg.span_free[blocks]
        rc_new = rc_old + sum_rc
        free_new = free_old + sum_free
        reg.refcount[blocks] = rc_new
        reg.span_free[blocks] = free_new
        partial_old = (rc_old > 0) & (free_old > 0)
        partial_new = (rc_new > 0) & (free_new > 0)
        reg.nr_partial += int(np.count_nonzero(partial_new)) - int(np.count_nonzero(partial_old))
        became_partial = partial_new & ~partial_old
        if became_partial.any():
            newly_partial = blocks[became_partial]
            reg.partial_hint = min(reg.partial_hint, int(newly_partial.min()))
            reg.last_partial = int(newly_partial.max())
        # Which way the counts can move decides what can happen: an allocation only raises
        # refcounts and lowers free counts, a free does the opposite. Skip what cannot occur.
        frees_may_rise = not (isinstance(d_free, int) and d_free <= 0)
        rc_may_fall = not (isinstance(d_rc, int) and d_rc >= 0)
        rc_may_rise = not (isinstance(d_rc, int) and d_rc <= 0)
        if frees_may_rise:
            got_free = (free_new > 0) & (free_old == 0)
            if got_free.any():
                reg.free_hint = min(reg.free_hint, int(blocks[got_free].min()))
        if self.static:
            return blocks[:0]
        if rc_may_fall:
            released = blocks[(rc_new == 0) & (rc_old > 0)]
            if released.size:
                self._release_blocks(reg, released)
        if not rc_may_rise:
            return blocks[:0]
        return blocks[(rc_new > 0) & (rc_old == 0)]

    def _claim(
        self,
        idx: IndexArray,
        use: int,
        owner: int | npt.NDArray[np.uint16],
        gfn_offs: IndexArray | None,
    ) -> list[tuple[TagRegion, IndexArray]]:
        """Give free pages an owner and a use; record the gfn of pages in tag storage."""
        self.owner[as_slice(idx)] = owner
        if gfn_offs is not None and idx.size:
            for seg, sel in self._groups(idx):
                if seg.kind == KIND_TAG_STORAGE:
                    self.ts_gfn[idx[sel] - seg.start + seg.ts_offset] = gfn_offs[sel]
        return self._set_flags(idx, use=use)

    def _ts_slot(self, idx: IndexArray) -> IndexArray:
        """Offsets into the tag storage reverse map of tag storage page indices."""
        seg = self.segment_of(idx)
        adj = np.array([s.ts_offset - s.start for s in self.segments], dtype=np.int64)
        return idx + adj[seg]

    # ----------------------------------------------------------------- free page search

    def _first_free(self, seg: Segment, need: int, skip: IndexArray | None = None) -> IndexArray:
        """Up to ``need`` free pages of ``seg`` in physical order, scanning from its hint."""
        found: list[IndexArray] = []
        got = 0
        pos = seg.start + seg.hint
        window = max(SCAN_WINDOW_MIN, 2 * need)
        first_free: int | None = None
        while got < need and pos < seg.end:
            hi = min(seg.end, pos + window)
            hits = np.flatnonzero(self.flags[pos:hi] == seg.free_flag) + pos
            if first_free is None and hits.size:
                first_free = int(hits[0])
            if skip is not None and hits.size:
                hits = hits[~np.isin(hits, skip)]
            take = hits[: need - got]
            found.append(take)
            got += take.size
            pos = hi
            # Grow over sparse ranges, but not without bound: a window's hits (8 bytes each)
            # are kept until the end, and a whole-segment window would be a temporary of
            # several bytes per host page.
            window = min(2 * window, max(SCAN_WINDOW_MAX, 2 * need))
        if first_free is None:
            seg.hint = pos - seg.start
        else:
            seg.hint = first_free - seg.start
        return np.concatenate(found) if found else np.empty(0, np.int64)

    def free_pages(self, flag: int) -> int:
        return int(self.seg_counts[:, flag].sum())

    # ----------------------------------------------------------------- untagged allocation

    def untagged_capacity(self, pool: int) -> int:
        """Free pages an owner of ``pool`` could get for untagged data."""
        return sum(int(self.seg_counts[s.index, s.free_flag]) for s in self._pool_segments(pool))

    def _pool_segments(self, pool: int) -> list[Segment]:
        kinds = _POOL_KINDS[pool]
        if self.static:
            kinds = tuple(k for k in kinds if k != KIND_TAG_STORAGE)
        return [s for k in kinds for s in self.segments if s.kind == k]

    def alloc_untagged(
        self,
        n: int,
        owner: int | npt.NDArray[np.uint16],
        gfn_offs: IndexArray,
        *,
        pool: int,
    ) -> IndexArray:
        """Allocate ``n`` pages of movable untagged data from the ranges ``pool`` allows, in
        its order (``POOL_*``). Free tag storage taken here is thereby *lent* (dynamic mode
        only). Raises ResourceExhaustedError("memory") with nothing changed.
        """
        if n == 0:
            return np.empty(0, np.int64)
        pools = self._pool_segments(pool)
        available = sum(int(self.seg_counts[s.index, s.free_flag]) for s in pools)
        require_pages(RESOURCE_MEMORY, "free pages for untagged data", n, available)
        picked: list[IndexArray] = []
        got = 0
        for seg in pools:
            if got == n:
                break
            take = self._first_free(seg, n - got)
            picked.append(take)
            got += take.size
        idx = np.concatenate(picked)
        self._claim(idx, USE_DATA, owner, gfn_offs)
        return idx

    # ----------------------------------------------------------------- huge folios

    def _free_folios(
        self,
        seg: Segment,
        nr: int,
        folio_pages: int,
        skip: IndexArray | None,
        keep: Callable[[IndexArray], npt.NDArray[np.bool_]] | None = None,
    ) -> IndexArray:
        """First indices of up to ``nr`` wholly free folios of ``seg``: ``folio_pages``
        physically contiguous pages aligned to ``folio_pages`` in pfn space, scanned from the
        segment's free hint in growing windows (vectorised per window)."""
        fp = folio_pages
        # First folio boundary at or above the hint, in dense indices (pfn-aligned).
        lead = (-seg.base_pfn) % fp
        first = seg.start + lead + -(-max(seg.hint - lead, 0) // fp) * fp
        found: list[IndexArray] = []
        got = 0
        pos = first
        window = max(SCAN_WINDOW_MIN, 4 * nr * fp) // fp * fp
        while got < nr and pos + fp <= seg.end:
            hi = min(seg.end, pos + window)
            k = (hi - pos) // fp
            if k == 0:
                break
            free = (self.flags[pos : pos + k * fp] == seg.free_flag).reshape(k, fp).all(axis=1)
            starts = np.flatnonzero(free).astype(np.int64) * fp + pos
            if skip is not None and skip.size and starts.size:
                starts = starts[~np.isin(starts, skip)]
            if keep is not None and starts.size:
                starts = starts[keep(starts)]
            take = starts[: nr - got]
            found.append(take)
            got += take.size
            pos += k * fp
            window *= 2
        return np.concatenate(found) if found else np.empty(0, np.int64)

    def _unlent_folio_test(
        self, seg: Segment, folio_pages: int
    ) -> Callable[[IndexArray], npt.NDArray[np.bool_]]:
        """A filter of folio starts (in taggable segment ``seg``) whose tag blocks hold no lent
        data."""
        reg = self.regions[seg.region]
        nb = max(folio_pages // reg.span_pages, 1)

        def unlent(starts: IndexArray) -> npt.NDArray[np.bool_]:
            first = (starts - reg.data.start) // reg.span_pages
            blocks = first[:, None] + np.arange(nb)
            return ~(reg.lent[np.minimum(blocks, reg.nr_blocks - 1)] > 0).any(axis=1)

        return unlent

    def alloc_folios(
        self,
        nr_folios: int,
        folio_pages: int,
        owner: int,
        gfn_offs: IndexArray,
        *,
        tagged: bool,
        pool: int,
    ) -> tuple[IndexArray, int]:
        """Allocate ``nr_folios`` huge folios (physically contiguous, aligned runs of
        ``folio_pages`` pages) for guest offsets ``gfn_offs`` (folio after folio), tagged or
        untagged (from ``pool``'s ranges). A tagged folio's tag storage is a contiguous run of
        blocks, reserved as a whole (the series reserves by ``folio_order``); a folio whose
        blocks cannot be reserved is given up for another (RESERVE_TRIES).

        Returns ``(pages, tag blocks reserved)``; raises ResourceExhaustedError, with no page
        left allocated, when fragmentation (or a lack of memory or tag storage) leaves too few
        folios: THP then falls back to small pages, hugetlb fails.
        """
        fp = folio_pages
        empty = np.empty(0, np.int64)
        if nr_folios == 0:
            return empty, 0
        if tagged:
            segments = [r.data for r in self.regions]
            resource = RESOURCE_TAG_STORAGE
        else:
            segments = self._pool_segments(pool)
            resource = RESOURCE_MEMORY
        got: list[IndexArray] = []
        nr_got = 0
        reserved = 0
        skip = empty
        for _ in range(RESERVE_TRIES if tagged else 1):
            starts: list[IndexArray] = []
            need = nr_folios - nr_got
            passes: list[bool] = [False]
            if tagged and self.placement is Placement.TAG_BLOCK_AWARE:
                # Folios whose tag blocks hold no lent data first: reserving them needs no
                # evacuation (the fast path); the others only when those run out.
                passes = [True, False]
            for unlent_only in passes:
                for seg in segments:
                    if need <= 0:
                        break
                    keep = self._unlent_folio_test(seg, fp) if unlent_only else None
                    taken = np.concatenate([skip, *starts]) if starts else skip
                    take = self._free_folios(seg, need, fp, taken, keep)
                    starts.append(take)
                    need -= take.size
            if need > 0:
                break
            first = np.concatenate(starts)
            cand = (first[:, None] + np.arange(fp)).ravel()
            if not tagged:
                self._claim(cand, USE_DATA, owner, gfn_offs[nr_got * fp : nr_got * fp + cand.size])
                got.append(cand)
                nr_got = nr_folios
                break
            pending = self._claim(cand, USE_TAGGED, owner, None)
            bad = np.zeros(cand.size, dtype=bool)
            for reg, blocks in pending:
                ok = self._reserve_blocks(reg, blocks)
                reserved += int(ok.sum())
                failed = blocks[~ok]
                if failed.size:
                    in_reg = (cand >= reg.data.start) & (cand < reg.data.end)
                    bad |= in_reg & np.isin(reg.block_of_data(cand), failed)
            bad_folio = bad.reshape(-1, fp).any(axis=1)
            if bad_folio.any():
                drop = (first[bad_folio][:, None] + np.arange(fp)).ravel()
                self.owner[drop] = NO_OWNER
                self._set_flags(drop, TG_FREE)
                skip = np.union1d(skip, first[bad_folio])
            good = (first[~bad_folio][:, None] + np.arange(fp)).ravel()
            got.append(good)
            nr_got += int((~bad_folio).sum())
            if nr_got == nr_folios:
                break
        pages = np.concatenate(got) if got else empty
        if nr_got < nr_folios:
            self.free(pages)
            raise ResourceExhaustedError(
                resource,
                f"no {nr_folios} free aligned folio(s) of {fp} pages",
                nr_folios=nr_folios,
                folio_pages=fp,
            )
        return pages, reserved

    # ----------------------------------------------------------------- tagged allocation

    def alloc_tagged(self, n: int, owner: int, gfn_offs: IndexArray) -> tuple[IndexArray, int, int]:
        """Allocate ``n`` taggable pages and reserve the tag blocks that describe them.

        Returns ``(pages, tag blocks reserved, replays)``. A page whose block cannot be
        reserved (its lent data cannot be evacuated) is given up for another one, and the
        guest fault that wanted it is replayed; after RESERVE_TRIES rounds the call fails with
        ResourceExhaustedError and leaves no page allocated.
        """
        empty = np.empty(0, np.int64)
        if n == 0:
            return empty, 0, 0
        require_pages(RESOURCE_TAGGABLE_MEMORY, "free taggable pages", n, self.free_pages(TG_FREE))
        got: list[IndexArray] = []
        nr_got = 0
        excluded: dict[int, IndexArray] = {}
        reserved = replays = 0
        for _ in range(RESERVE_TRIES):
            need = n - nr_got
            cand = self._pick_tagged(need, excluded)
            if cand.size < need:
                break
            pending = self._claim(cand, USE_TAGGED, owner, None)
            bad = None
            for reg, blocks in pending:
                ok = self._reserve_blocks(reg, blocks)
                nr_ok = int(np.count_nonzero(ok))
                reserved += nr_ok
                if nr_ok == blocks.size:
                    continue  # the usual case: nothing to give up
                failed = blocks[~ok]
                excluded[reg.index] = np.union1d(excluded.get(reg.index, empty), failed)
                in_reg = (cand >= reg.data.start) & (cand < reg.data.end)
                if bad is None:
                    bad = np.zeros(cand.size, dtype=bool)
                bad |= in_reg & np.isin(reg.block_of_data(cand), failed)
            good = cand
            if bad is not None and bad.any():
                self.owner[cand[bad]] = NO_OWNER
                self._set_flags(cand[bad], TG_FREE)
                replays += int(bad.sum())
                good = cand[~bad]
            got.append(good)
            nr_got += good.size
            if nr_got == n:
                break
        pages = got[0] if len(got) == 1 else np.concatenate(got) if got else empty
        if nr_got < n:
            self.free(pages)
            raise ResourceExhaustedError(
                RESOURCE_TAG_STORAGE,
                f"could not reserve tag storage for {n} pages after {RESERVE_TRIES} tries",
                nr_pages=n,
            )
        if replays:
            self.counters.add(
                self.counters.page_migrations, MigrationReason.RESERVE_FAILED.value, replays
            )
            self.counters.fault_replays += replays
        return pages, reserved, replays

    def _pick_tagged(self, need: int, excluded: dict[int, IndexArray]) -> IndexArray:
        if self.placement is Placement.NAIVE:
            return self._pick_first_fit(need, excluded)
        return self._pick_block_aware(need, excluded)

    def _pick_first_fit(self, need: int, excluded: dict[int, IndexArray]) -> IndexArray:
        picked: list[IndexArray] = []
        got = 0
        for reg in self.regions:
            if got == need:
                break
            skip = None
            if reg.index in excluded:
                skip = reg.data_pages(excluded[reg.index]).ravel()
            take = self._first_free(reg.data, need - got, skip)
            picked.append(take)
            got += take.size
        return np.concatenate(picked) if picked else np.empty(0, np.int64)

    def _pick_block_aware(self, need: int, excluded: dict[int, IndexArray]) -> IndexArray:
        """Fill reserved blocks first, then blocks whose tag storage is free, then lent ones."""
        chosen: list[tuple[TagRegion, IndexArray]] = []
        remaining = need
        # Pass 1: blocks already reserved that still describe free data pages.
        for reg in self.regions:
            if remaining <= 0:
                break
            if reg.nr_partial == 0:
                continue
            lp = reg.last_partial
            if reg.nr_partial == 1 and reg.refcount[lp] > 0 and reg.span_free[lp] > 0:
                # The usual case: the one block the last allocation left partly used (it is
                # the only partial block, so it is also the lowest).
                blocks = np.array([lp], dtype=np.int64)
                reg.partial_hint = lp
            else:
                blocks, first_hit, _ = self._scan_blocks(
                    reg, reg.partial_hint, lambda r, c: r.refcount[c] > 0, remaining, reg.nr_partial
                )
                reg.partial_hint = first_hit
            chosen.append((reg, blocks))
            remaining -= int(reg.span_free[blocks].sum())
        # Pass 2: unreserved blocks whose tag storage holds no lent data (fast path), keeping
        # the lent ones seen on the way for pass 3.
        lent_seen: list[tuple[TagRegion, IndexArray]] = []
        for reg in self.regions:
            if remaining <= 0:
                break
            excl = excluded.get(reg.index)
            fresh = self._fresh_blocks_at_hint(reg, remaining, excl)
            if fresh is not None:
                if not chosen and fresh.size * reg.span_pages >= need:
                    # The bump allocation alone: its blocks are one run of wholly free pages.
                    first = reg.data.start + int(fresh[0]) * reg.span_pages
                    return np.arange(first, first + need, dtype=np.int64)
                chosen.append((reg, fresh))
                remaining -= fresh.size * reg.span_pages
                continue

            def unreserved(
                r: TagRegion, c: IndexArray, excl: IndexArray | None = excl
            ) -> npt.NDArray[np.bool_]:
                m = r.refcount[c] == 0
                if excl is not None and excl.size:
                    m &= ~np.isin(c, excl)
                return m

            blocks, _, first_free = self._scan_blocks(
                reg, reg.free_hint, unreserved, remaining, None, lent_out=lent_seen
            )
            reg.free_hint = first_free
            chosen.append((reg, blocks))
            remaining -= int(reg.span_free[blocks].sum())
        # Pass 3: blocks whose tag storage is lent: reserving them evacuates data.
        for reg, blocks in lent_seen:
            if remaining <= 0:
                break
            counts = np.cumsum(reg.span_free[blocks])
            cut = int(np.searchsorted(counts, remaining)) + 1
            take = blocks[:cut]
            chosen.append((reg, take))
            remaining -= int(reg.span_free[take].sum())

        pages: list[IndexArray] = []
        got = 0
        for reg, blocks in chosen:
            if got >= need or blocks.size == 0:
                continue
            if bool((reg.span_free[blocks] == reg.span_pages).all()):
                free = reg.data_pages(blocks).ravel()[: need - got]
            else:
                span = reg.data_pages(blocks).ravel()
                free = span[self.flags[span] == TG_FREE][: need - got]
            pages.append(free)
            got += free.size
        return np.concatenate(pages) if pages else np.empty(0, np.int64)

    def _fresh_blocks_at_hint(
        self, reg: TagRegion, need_pages: int, excl: IndexArray | None
    ) -> IndexArray | None:
        """The blocks right at the free-block hint, if they are wholly free and their tag
        storage is free too: on a host with free memory most faults take these, and taking
        them needs no scan (a bump allocation)."""
        # The hint is a lower bound that lags the last allocation: advance it first.
        ahead = np.flatnonzero(reg.span_free[reg.free_hint : reg.free_hint + 256])
        if ahead.size == 0:
            return None
        reg.free_hint += int(ahead[0])
        first = reg.free_hint
        if reg.refcount[first] > 0:
            # The last allocation's partly used block: pass 1 has taken its free pages.
            first += 1
        last = min(reg.nr_blocks, first + -(-need_pages // reg.span_pages))
        if first >= last:
            return None
        if (
            int(reg.span_free[first:last].min()) != reg.span_pages
            or reg.refcount[first:last].any()
            or reg.lent[first:last].any()
            or (excl is not None and bool(((excl >= first) & (excl < last)).any()))
        ):
            return None
        return np.arange(first, last, dtype=np.int64)

    def _scan_blocks(
        self,
        reg: TagRegion,
        start: int,
        keep: Callable[[TagRegion, IndexArray], npt.NDArray[np.bool_]],
        need_pages: int,
        max_blocks: int | None,
        *,
        lent_out: list[tuple[TagRegion, IndexArray]] | None = None,
    ) -> tuple[IndexArray, int, int]:
        """Blocks from ``start`` on with free data pages that ``keep`` accepts, until they
        hold ``need_pages`` free data pages.

        Returns them, the first block accepted and the first block with any free data page
        (each the end of the scanned range if there was none): the new scan hints. With
        ``lent_out``, blocks whose tag storage is lent are left out and collected there.
        """
        found: list[IndexArray] = []
        lent_found: list[IndexArray] = []
        got = nr = 0
        first: int | None = None
        first_free: int | None = None
        pos = start
        window = max(SCAN_WINDOW_MIN // reg.span_pages, 64, 2 * need_pages // reg.span_pages)
        while pos < reg.nr_blocks and got < need_pages:
            if max_blocks is not None and nr >= max_blocks:
                break
            hi = min(reg.nr_blocks, pos + window)
            # Every block either pass wants has a free data page: filter that short list.
            cand = np.flatnonzero(reg.span_free[pos:hi]) + pos
            if cand.size:
                if first_free is None:
                    first_free = int(cand[0])
                hits = cand[keep(reg, cand)]
                if hits.size and first is None:
                    first = int(hits[0])
                if lent_out is not None and hits.size:
                    is_lent = reg.lent[hits] > 0
                    if is_lent.any():
                        lent_found.append(hits[is_lent])
                        hits = hits[~is_lent]
                if hits.size:
                    counts = np.cumsum(reg.span_free[hits])
                    cut = int(np.searchsorted(counts, need_pages - got)) + 1
                    hits = hits[:cut]
                    found.append(hits)
                    got += int(counts[min(cut, counts.size) - 1])
                    nr += hits.size
            pos = hi
            window *= 2
        if lent_out is not None and lent_found:
            lent_out.append((reg, np.concatenate(lent_found)))
        blocks = np.concatenate(found) if found else np.empty(0, np.int64)
        return blocks, pos if first is None else first, pos if first_free is None else first_free

    # ----------------------------------------------------------------- reservation

    def _reserve_blocks(self, reg: TagRegion, blocks: IndexArray) -> npt.NDArray[np.bool_]:
        """Reserve tag ``blocks`` (unreserved, now describing tagged pages).

        Free blocks are taken at once (the fast path). Lent pages are evacuated first: their
        guest pages move to other untagged memory. Blocks whose data has nowhere to go fail.
        Returns which blocks were reserved.
        """
        t0 = time.perf_counter()
        run = as_slice(blocks)
        if isinstance(run, slice):
            lo = reg.tag.start + run.start * reg.block_pages
            hi = reg.tag.start + run.stop * reg.block_pages
            if not np.count_nonzero(self.flags[lo:hi] != TS_FREE):
                # A run of blocks whose tag storage is all free (a fresh allocation's): no
                # lent data to look for, one run of tag pages to claim.
                self._set_flags(np.arange(lo, hi, dtype=np.int64), TS_RESERVED)
                return self._count_reserved(reg, blocks, np.ones(blocks.size, dtype=bool), 0, t0)
        tag_idx = reg.tag_pages(blocks)
        fl = self.flags[tag_idx]
        # Claim the free tag pages first so that evacuated data cannot land in them.
        self._set_flags(tag_idx[fl == TS_FREE], TS_RESERVED)
        lent_mask = fl == TS_LENT
        ok = np.ones(blocks.size, dtype=bool)
        evacuated = 0
        if lent_mask.any():
            lent_owner = np.where(lent_mask, self.owner[tag_idx], 0)
            need_any = lent_mask.sum(axis=1)
            need_mte = (lent_mask & (self.owner_pool[lent_owner] == POOL_MTE_CAPABLE)).sum(axis=1)
            cap_mte = self.free_pages(TG_FREE) + self.free_pages(TS_FREE)
            cap_any = cap_mte + self.free_pages(UT_FREE)
            # Only blocks with lent data draw on the room to evacuate into; a block that needs
            # no evacuation is reserved whatever happens to the others.
            ok = (np.cumsum(need_any) <= cap_any) & (np.cumsum(need_mte) <= cap_mte)
            # A pinned page cannot be migrated: alloc_contig_range() fails with -EBUSY, and the
            # caller tries other blocks (RESERVE_TRIES).
            ok &= ~(lent_mask & self.pinned_owner[lent_owner]).any(axis=1)
            ok |= need_any == 0
            src = tag_idx[ok][lent_mask[ok]]
            evacuated = int(src.size)
            if evacuated:
                self._evacuate(src)
            failed = ~ok
            if failed.any():
                rows = tag_idx[failed]
                self._set_flags(rows[fl[failed] == TS_FREE], TS_FREE)
        return self._count_reserved(reg, blocks, ok, evacuated, t0)

    def _count_reserved(
        self,
        reg: TagRegion,
        blocks: IndexArray,
        ok: npt.NDArray[np.bool_],
        evacuated: int,
        t0: float,
    ) -> npt.NDArray[np.bool_]:
        """Count and publish a reservation of ``blocks`` (``ok``: those reserved); returns
        ``ok``."""
        nr_ok = int(np.count_nonzero(ok))
        bytes_inval = nr_ok * reg.block_pages * self.page_size
        c = self.counters
        c.add(c.tag_blocks_reserved, reg.name, nr_ok)
        c.add(c.cache_maintenance_bytes, DCACHE_INVALIDATE, bytes_inval)
        reg.nr_reserved += nr_ok
        nr_failed = blocks.size - nr_ok
        if nr_failed:
            c.add(c.tag_block_reserve_failures, reg.name, nr_failed)
            self._emit(Event(EVENT_TAG_RESERVE_FAILED, region=reg.name, count=nr_failed))
        if evacuated:
            c.add(c.evacuated_pages, reg.name, evacuated)
            c.add(c.page_migrations, MigrationReason.EVACUATION.value, evacuated)
            self._emit(Event(EVENT_EVACUATION, region=reg.name, count=evacuated))
        if nr_ok:
            c.reservation_seconds.observe(time.perf_counter() - t0)
        if nr_ok and self._listened():
            self._emit(
                Event(
                    EVENT_TAG_BLOCKS_RESERVED,
                    region=reg.name,
                    count=nr_ok,
                    seconds=time.perf_counter() - t0,
                )
            )
        return ok

    def _evacuate(self, src: IndexArray) -> None:
        """Move the lent data in tag storage pages ``src`` elsewhere; ``src`` become reserved."""
        owners = self.owner[src]
        gfns = self.ts_gfn[self._ts_slot(src)].astype(np.int64)
        pools = self.owner_pool[owners]
        dst = np.empty_like(src)
        for pool in np.unique(pools).tolist():
            mask = pools == pool
            dst[mask] = self.alloc_untagged(int(mask.sum()), owners[mask], gfns[mask], pool=pool)
        # Tags go before the source is given up (a no-op for untagged data, kept for order).
        self.tags.move(src, dst)
        for slot in np.unique(owners):
            m = owners == slot
            self.on_remap(int(slot), gfns[m], dst[m])
        self.owner[src] = NO_OWNER
        self._set_flags(src, TS_RESERVED)

    def _release_blocks(self, reg: TagRegion, blocks: IndexArray) -> None:
        """Give tag ``blocks`` (no tagged page left) back to the allocator."""
        tag_idx = reg.tag_pages(blocks)
        was_reserved = self.flags[tag_idx[:, 0]] == TS_RESERVED
        blocks, tag_idx = blocks[was_reserved], tag_idx[was_reserved]
        if blocks.size == 0:
            return
        self._set_flags(tag_idx.ravel(), TS_FREE)
        reg.nr_reserved -= blocks.size
        c = self.counters
        c.add(c.tag_blocks_released, reg.name, blocks.size)
        self._emit(Event(EVENT_TAG_BLOCKS_RELEASED, region=reg.name, count=int(blocks.size)))

    # ----------------------------------------------------------------- conversions of use

    def make_tagged(self, idx: IndexArray) -> tuple[IndexArray, int]:
        """Turn mapped untagged pages in taggable ranges tagged, in place.

        Returns the pages whose tag blocks could not be reserved (left untagged: the caller
        migrates them) and the number of blocks reserved.
        """
        pending = self._set_flags(idx, TG_TAGGED)
        bad = np.zeros(idx.size, dtype=bool)
        reserved = 0
        for reg, blocks in pending:
            ok = self._reserve_blocks(reg, blocks)
            reserved += int(ok.sum())
            failed = blocks[~ok]
            if failed.size:
                in_reg = (idx >= reg.data.start) & (idx < reg.data.end)
                bad |= in_reg & np.isin(reg.block_of_data(idx), failed)
        if bad.any():
            self._set_flags(idx[bad], TG_DATA)
        return idx[bad], reserved

    def free(self, idx: IndexArray) -> None:
        """Free pages: their tags are discarded and tag blocks they held are released.

        The tag cache is invalidated over every freed tagged page, whether or not its block is
        released with it (the series' ``PAGE_SIZE << order`` per freed tagged folio).
        """
        if idx.size == 0:
            return
        self.tags.discard(idx)
        self.owner[idx] = NO_OWNER
        tagged_before = int(self.seg_counts[:, TG_TAGGED].sum())
        self._set_flags(idx, use=USE_FREE)
        nr_tagged = tagged_before - int(self.seg_counts[:, TG_TAGGED].sum())
        self.counters.add(
            self.counters.cache_maintenance_bytes, TAG_CACHE_INVALIDATE, nr_tagged * self.page_size
        )

    # ----------------------------------------------------------------- views

    def usage(self, segments: list[Segment] | None = None) -> MemoryUsage:
        counts = (
            self.seg_counts if segments is None else self.seg_counts[[s.index for s in segments]]
        )
        c = counts.sum(axis=0)
        b = self.bytes_of
        return MemoryUsage(
            free_bytes=b(c[UT_FREE] + c[TG_FREE]),
            data_bytes=b(c[UT_DATA] + c[TG_DATA]),
            tagged_bytes=b(c[TG_TAGGED]),
            tag_reserved_bytes=b(c[TS_RESERVED]),
            tag_lent_bytes=b(c[TS_LENT]),
            tag_free_bytes=b(c[TS_FREE]),
        )

    def tagged_pages(self, reg: TagRegion) -> int:
        return int(self.seg_counts[reg.data.index, TG_TAGGED])

    def min_blocks_needed(self, reg: TagRegion) -> int:
        """Fewest tag blocks that could describe the region's tagged pages."""
        return -(-self.tagged_pages(reg) // reg.span_pages)

    # ----------------------------------------------------------------- restore

    def rebuild_derived(self) -> None:
        """Recompute every derived count from the flags (after a restore).

        In chunks of about :data:`REBUILD_CHUNK_PAGES` pages: a whole-host temporary would cost
        more memory than the state itself on a large host (the daemon's restart is bounded).
        """
        self.seg_counts = np.zeros((len(self.segments), NR_FLAGS), dtype=np.int64)
        for s in self.segments:
            counts = self.seg_counts[s.index]
            # Counting the few values a range may hold is several times faster than bincount;
            # bincount only if something else is there (the invariant check will say what).
            for start in range(s.start, s.end, REBUILD_CHUNK_PAGES):
                chunk = self.flags[start : min(start + REBUILD_CHUNK_PAGES, s.end)]
                for flag in VALID_FLAGS[s.kind]:
                    counts[flag] += np.count_nonzero(chunk == flag)
            if int(counts.sum()) != s.nr_pages:
                counts[:] = 0
                for start in range(s.start, s.end, REBUILD_CHUNK_PAGES):
                    chunk = self.flags[start : min(start + REBUILD_CHUNK_PAGES, s.end)]
                    counts += np.bincount(chunk, minlength=NR_FLAGS)
            s.hint = 0
        for reg in self.regions:
            d = self.flags[reg.data.start : reg.data.end].reshape(reg.nr_blocks, reg.span_pages)
            t = self.flags[reg.tag.start : reg.tag.end].reshape(reg.nr_blocks, reg.block_pages)
            reg.refcount = np.empty(reg.nr_blocks, np.int32)
            reg.span_free = np.empty(reg.nr_blocks, np.int32)
            reg.lent = np.empty(reg.nr_blocks, np.int32)
            step = max(1, REBUILD_CHUNK_PAGES // reg.span_pages)
            for b in range(0, reg.nr_blocks, step):
                blocks = slice(b, b + step)
                reg.refcount[blocks] = np.count_nonzero(d[blocks] == TG_TAGGED, axis=1)
                reg.span_free[blocks] = np.count_nonzero(d[blocks] == TG_FREE, axis=1)
                reg.lent[blocks] = np.count_nonzero(t[blocks] == TS_LENT, axis=1)
            reg.nr_reserved = int((t[:, 0] == TS_RESERVED).sum())
            reg.nr_partial = int(((reg.refcount > 0) & (reg.span_free > 0)).sum())
            reg.partial_hint = 0
            reg.free_hint = 0
