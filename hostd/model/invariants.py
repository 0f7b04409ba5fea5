"""The invariants of a host's state, checked from scratch (O(host pages) time).

:func:`check` recomputes every derived count from the page flags and the VMs' stage-2 maps
and compares; it returns one sentence per violation and an empty list when the state is sound.

It reads the state in chunks of :data:`CHECK_CHUNK_PAGES` pages (host pages, guest pages or
whole tag blocks) and keeps only small accumulators between chunks: per-block counts are
compared with the region's arrays chunk by chunk, offending pages are kept as a count and the
first few examples. The one whole-host structure is a pair of bitmaps (a quarter of a byte per
host page) that find pages mapped twice or not at all. So a check needs a few MiB beside the
state whatever the host's size: it runs in a forked copy-on-write child (``hostd.cow``), and
a whole-host temporary there costs as much real memory as the same temporary in the daemon.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from hostd.model.physmem import (
    KIND_TAG_STORAGE,
    KIND_UNTAGGABLE,
    NR_FLAGS,
    POOL_MTE_CAPABLE,
    POOL_NOT_CMA,
    TG_FREE,
    TG_TAGGED,
    TS_FREE,
    TS_LENT,
    TS_RESERVED,
    USE_DATA,
    USE_TAGGED,
    VALID_FLAGS,
    IndexArray,
)
from hostd.model.types import TagPolicy

if TYPE_CHECKING:
    from hostd.model.host import Host
    from hostd.model.physmem import TagRegion
    from hostd.model.vm import Vm

# Cap on how many offending pages one sentence names.
_EXAMPLES = 3
# Pages read per step. The temporaries of a step are a few tens of bytes per page: 2^16 pages
# keep them to a few MiB, and a step is still long enough that numpy's per-call cost (some
# 30 calls of a few microseconds per step) stays a few percent of the work.
CHECK_CHUNK_PAGES = 1 << 16
_NR_SLOTS = 1 << 16


class _Found:
    """Offending indices met so far, in the order met: how many and the first few."""

    def __init__(self) -> None:
        self.count = 0
        self.first: list[int] = []

    def add(self, idx: npt.NDArray[np.integer]) -> None:
        self.count += int(idx.size)
        if len(self.first) < _EXAMPLES and idx.size:
            self.first += idx[: _EXAMPLES - len(self.first)].tolist()

    def __bool__(self) -> bool:
        return self.count > 0

    def pages(self) -> str:
        shown = ", ".join(str(i) for i in self.first)
        return f"{self.count} page(s), e.g. index {shown}"


def _steps(start: int, end: int) -> Iterator[tuple[int, int]]:
    """``[a, b)`` steps covering ``[start, end)``; every inner edge a multiple of 8 (the
    bitmaps below are addressed by byte)."""
    step = max(8, CHECK_CHUNK_PAGES & ~7)
    a = start
    while a < end:
        b = min(end, (a // step + 1) * step)
        yield a, b
        a = b


class _PageBitmap:
    """One bit per host page."""

    def __init__(self, nr_pages: int) -> None:
        self.bits = np.zeros((nr_pages + 7) // 8, dtype=np.uint8)

    def test_and_set(self, pages: IndexArray) -> IndexArray:
        """Set the bits of sorted, distinct ``pages``; returns those that were set already."""
        if pages.size == 0:
            return pages
        byte = pages >> 3
        bit = np.left_shift(np.uint8(1), (pages & 7).astype(np.uint8))
        already = pages[(self.bits[byte] & bit) != 0]
        # Distinct sorted pages: the bits of one byte are distinct, so OR-reducing each byte's
        # run sets them all in one write per byte.
        starts = np.flatnonzero(np.concatenate(([True], byte[1:] != byte[:-1])))
        self.bits[byte[starts]] |= np.bitwise_or.reduceat(bit, starts)
        return already

    def read(self, a: int, b: int) -> npt.NDArray[np.bool_]:
        """Bits of pages ``[a, b)``; ``a`` a multiple of 8."""
        raw = np.unpackbits(self.bits[a >> 3 : (b + 7) >> 3], bitorder="little")
        return raw[: b - a].view(bool)


def _plugged(vm: Vm, o0: int, o1: int) -> npt.NDArray[np.bool_]:
    """Which stage-2 offsets ``[o0, o1)`` are plugged guest memory (``Vm.plugged_offsets``
    without a whole-guest index array)."""
    ps = vm.page_size
    mask = np.zeros(o1 - o0, dtype=bool)
    for d in vm.devices.values():
        base = vm.gfn_offset(d.gpa)
        lo, hi = max(base, o0), min(base + d.size_bytes // ps, o1)
        if lo >= hi:
            continue
        if not d.is_virtio_mem:
            mask[lo - o0 : hi - o0] = True
            continue
        per = d.block_size_bytes // ps
        first, last = (lo - base) // per, (hi - 1 - base) // per
        runs = np.repeat(d.plugged[first : last + 1], per)
        skip = lo - base - first * per
        mask[lo - o0 : hi - o0] = runs[skip : skip + hi - lo]
    return mask


def _device_steps(vm: Vm) -> Iterator[tuple[int, int]]:
    """Steps over the stage-2 offsets of each device in device order (the order of
    ``Vm.plugged_offsets``)."""
    ps = vm.page_size
    for d in vm.devices.values():
        base = vm.gfn_offset(d.gpa)
        yield from _steps(base, min(base + d.size_bytes // ps, vm.stage2.size))


def _mapped(vm: Vm, o0: int, o1: int) -> tuple[IndexArray, IndexArray]:
    """Mapped offsets in ``[o0, o1)`` and their host pages."""
    s2 = vm.stage2[o0:o1]
    at = np.flatnonzero(s2)
    return at + o0, s2[at].astype(np.int64) - 1


def check(host: Host) -> list[str]:
    """Every violated invariant of ``host``, as a sentence."""
    out = _check_pages(host)
    out += _check_regions(host)
    out += _check_stage2(host)
    out += host.migration_invariants()
    out += check_pinned(host)
    out += check_owner_pools(host)
    out += check_folios(host)
    return out


def _check_pages(host: Host) -> list[str]:
    """Pages: each holds a value its range allows, per-state totals add up; data and tagged
    pages have a live owner, free and reserved pages none."""
    mem = host.mem
    out: list[str] = []
    flags = mem.flags
    for seg in mem.segments:
        valid = np.zeros(256, dtype=bool)
        valid[list(VALID_FLAGS[seg.kind])] = True
        bad = _Found()
        counts = np.zeros(NR_FLAGS, dtype=np.int64)
        overflow = False
        first_free: int | None = None
        for a, b in _steps(seg.start, seg.end):
            f = flags[a:b]
            bad.add(np.flatnonzero(~valid[f]) + a)
            c = np.bincount(f, minlength=NR_FLAGS)
            overflow |= c.size > NR_FLAGS
            counts += c[:NR_FLAGS]
            below_hint = seg.start + seg.hint - a
            if first_free is None and below_hint > 0:
                free = np.flatnonzero(f[:below_hint] == seg.free_flag)
                if free.size:
                    first_free = a - seg.start + int(free[0])
        if bad:
            out.append(f"{seg.name}: flags invalid for its kind: {bad.pages()}")
        if overflow or not np.array_equal(counts, mem.seg_counts[seg.index]):
            out.append(f"{seg.name}: per-state page totals drifted from the page flags")
        if first_free is not None:
            out.append(f"{seg.name}: free-page hint {seg.hint} skips free page {first_free}")
    if int(mem.seg_counts.sum()) != mem.nr_pages:
        out.append("per-state page totals do not add up to the host size")

    live = np.zeros(_NR_SLOTS, dtype=bool)
    for vm in host.vms.values():
        live[vm.slot] = True
    stray = _Found()
    orphan = _Found()
    for a, b in _steps(0, mem.nr_pages):
        use = flags[a:b] & 3
        owned = (use == USE_DATA) | (use == USE_TAGGED)
        o = mem.owner[a:b]
        stray.add(np.flatnonzero(~owned & (o != 0)) + a)
        orphan.add(np.flatnonzero(owned & ~live[o]) + a)
    if stray:
        out.append(f"free or reserved pages with an owner: {stray.pages()}")
    if orphan:
        out.append(f"data pages without a live owner VM: {orphan.pages()}")
    return out


def _check_regions(host: Host) -> list[str]:
    out: list[str] = []
    for reg in host.mem.regions:
        out += _check_region(host, reg)
    return out


def _check_region(host: Host, reg: TagRegion) -> list[str]:
    """Tag region: refcounts, reservation, lent and free counts, block by block."""
    mem = host.mem
    flags = mem.flags
    drifted, partly, unreserved_tagged, idle_reserved = _Found(), _Found(), _Found(), _Found()
    all_reserved = True
    ts_free = lent_drift = free_drift = False
    nr_reserved = nr_partial = 0
    first_partial: int | None = None
    first_free: int | None = None
    step = max(1, CHECK_CHUNK_PAGES // reg.span_pages)
    for b0 in range(0, reg.nr_blocks, step):
        b1 = min(reg.nr_blocks, b0 + step)
        d = flags[reg.data.start + b0 * reg.span_pages : reg.data.start + b1 * reg.span_pages]
        d = d.reshape(b1 - b0, reg.span_pages)
        t = flags[reg.tag.start + b0 * reg.block_pages : reg.tag.start + b1 * reg.block_pages]
        t = t.reshape(b1 - b0, reg.block_pages)
        tagged = np.count_nonzero(d == TG_TAGGED, axis=1)
        drifted.add(np.flatnonzero(tagged != reg.refcount[b0:b1]) + b0)
        t_reserved = t == TS_RESERVED
        reserved = t_reserved.all(axis=1)
        partly.add(np.flatnonzero(t_reserved.any(axis=1) & ~reserved) + b0)
        unreserved_tagged.add(np.flatnonzero((tagged > 0) & ~reserved) + b0)
        all_reserved &= bool(reserved.all())
        idle_reserved.add(np.flatnonzero(reserved & (tagged == 0)) + b0)
        nr_reserved += int(np.count_nonzero(reserved))
        lent_drift |= not np.array_equal(np.count_nonzero(t == TS_LENT, axis=1), reg.lent[b0:b1])
        span_free = np.count_nonzero(d == TG_FREE, axis=1)
        free_drift |= not np.array_equal(span_free, reg.span_free[b0:b1])
        partial = np.flatnonzero((tagged > 0) & (span_free > 0))
        nr_partial += partial.size
        if first_partial is None and partial.size:
            first_partial = b0 + int(partial[0])
        with_free = np.flatnonzero(span_free > 0)
        if first_free is None and with_free.size:
            first_free = b0 + int(with_free[0])
        ts_free |= bool((t == TS_FREE).any())

    out: list[str] = []
    name = reg.name
    if drifted:
        out.append(f"{name}: refcount differs from tagged pages in blocks {drifted.first}")
    if partly:
        out.append(f"{name}: blocks partly reserved: {partly.first}")
    if unreserved_tagged:
        out.append(
            f"{name}: tagged pages whose tag block is not reserved, blocks "
            f"{unreserved_tagged.first}"
        )
    if mem.static:
        if not all_reserved:
            out.append(f"{name}: static carve-out with unreserved tag blocks")
    elif idle_reserved:
        out.append(f"{name}: reserved blocks describing no tagged page: {idle_reserved.first}")
    if nr_reserved != reg.nr_reserved:
        out.append(f"{name}: reserved block count {reg.nr_reserved} != {nr_reserved}")
    if lent_drift:
        out.append(f"{name}: lent page counts drifted")
    if free_drift:
        out.append(f"{name}: free page counts per block drifted")
    if nr_partial != reg.nr_partial:
        out.append(f"{name}: partial block count {reg.nr_partial} != {nr_partial}")
    if first_partial is not None and first_partial < reg.partial_hint:
        out.append(f"{name}: partial-block hint skips a partial block")
    if first_free is not None and first_free < reg.free_hint:
        out.append(f"{name}: free-block hint skips a block with free pages")
    if mem.static and ts_free:
        out.append(f"{name}: static carve-out with free tag storage")
    return out


def _check_stage2(host: Host) -> list[str]:
    """Stage-2 maps: one owner per page, both directions agree, mapped means plugged; tags
    live only on tagged pages."""
    mem = host.mem
    flags = mem.flags
    out: list[str] = []
    # Pages per owner slot, for comparing with what each VM maps.
    owned_by = np.zeros(_NR_SLOTS, dtype=np.int64)
    for a, b in _steps(0, mem.nr_pages):
        owned_by += np.bincount(mem.owner[a:b], minlength=_NR_SLOTS)
    seen = _PageBitmap(mem.nr_pages)
    twice = _PageBitmap(mem.nr_pages)
    for vm in host.vms.values():
        if vm.stage2.size and int(vm.stage2.max()) - 1 >= mem.nr_pages:
            out.append(f"VM {vm.vm_id}: stage-2 map points past the end of host memory")
            continue
        wrong_owner = _Found()
        nr_mapped = nr_tagged = nr_outside = nr_plugged = 0
        untaggable = reverse_differs = False
        for o0, o1 in _steps(0, vm.stage2.size):
            offs, pages = _mapped(vm, o0, o1)
            in_order = pages.size < 2 or bool((pages[1:] > pages[:-1]).all())
            ordered = pages if in_order else np.sort(pages)
            distinct = ordered
            if not in_order:
                again = ordered[1:] == ordered[:-1]
                if again.any():
                    twice.test_and_set(np.unique(ordered[1:][again]))
                    distinct = np.unique(ordered)
            if distinct.size:
                already = seen.test_and_set(distinct)
                if already.size:
                    twice.test_and_set(already)
            wrong_owner.add(pages[mem.owner[pages] != vm.slot])
            nr_mapped += pages.size
            plugged = _plugged(vm, o0, o1)
            nr_plugged += int(np.count_nonzero(plugged))
            nr_outside += int(np.count_nonzero(~plugged[offs - o0]))
            f = flags[pages]
            nr_tagged += int(np.count_nonzero(f == TG_TAGGED))
            kinds = f >> 2
            untaggable |= bool((kinds == KIND_UNTAGGABLE).any())
            ts = kinds == KIND_TAG_STORAGE
            if ts.any():
                back = mem.ts_gfn[mem._ts_slot(pages[ts])]
                reverse_differs |= not np.array_equal(back.astype(np.int64), offs[ts])
        if wrong_owner:
            out.append(f"VM {vm.vm_id}: mapped pages owned by someone else: {wrong_owner.pages()}")
        nr_owned = int(owned_by[vm.slot])
        if nr_owned != nr_mapped:
            out.append(f"VM {vm.vm_id}: owns {nr_owned} pages but maps {nr_mapped}")
        if nr_outside:
            out.append(f"VM {vm.vm_id}: {nr_outside} mapped page(s) outside plugged memory")
        if vm.mapped_pages != nr_mapped or vm.tagged_pages != nr_tagged:
            out.append(
                f"VM {vm.vm_id}: accounting says {vm.mapped_pages} mapped / {vm.tagged_pages} "
                f"tagged, pages say {nr_mapped} / {nr_tagged}"
            )
        mte = vm.config.mte_enabled
        if not mte and nr_tagged:
            out.append(f"VM {vm.vm_id}: non-MTE VM holds {nr_tagged} tagged pages")
        # ON_TAG_ACCESS maps untagged pages NoTagAccess, which untaggable RAM allows.
        tagged_on_fault = mte and vm.config.tag_policy is not TagPolicy.ON_TAG_ACCESS
        if tagged_on_fault and untaggable:
            out.append(f"VM {vm.vm_id}: MTE guest memory on untaggable RAM")
        if tagged_on_fault and nr_tagged != nr_mapped:
            out.append(f"VM {vm.vm_id}: {vm.config.tag_policy.value} VM with untagged pages")
        eager = mte and vm.config.tag_policy is TagPolicy.EAGER
        # Memory an EAGER VM gave back (discarded) is faulted in again later, like ON_FAULT's.
        if eager and vm.discarded_pages == 0 and nr_tagged != nr_plugged:
            out.append(f"VM {vm.vm_id}: EAGER VM with plugged memory not backed tagged")
        if reverse_differs:
            out.append(f"VM {vm.vm_id}: tag storage reverse map disagrees with the stage-2 map")

    more_than_once = _Found()
    unmapped = _Found()
    for a, b in _steps(0, mem.nr_pages):
        more_than_once.add(np.flatnonzero(twice.read(a, b)) + a)
        use = flags[a:b] & 3
        owned = (use == USE_DATA) | (use == USE_TAGGED)
        unmapped.add(np.flatnonzero(owned & ~seen.read(a, b)) + a)
    if more_than_once:
        out.append(f"pages mapped more than once: {more_than_once.pages()}")
    if unmapped:
        out.append(f"owned pages that no VM maps: {unmapped.pages()}")

    tag_pages = mem.tags.pages
    untagged = _Found()
    for a, b in _steps(0, tag_pages.size):
        pages = tag_pages[a:b]
        untagged.add(pages[flags[pages] != TG_TAGGED])
    if untagged:
        out.append(f"tags stored for untagged pages: {untagged.pages()}")
    return out


def check_folios(host: Host) -> list[str]:
    """A folio marked huge is mapped whole to one physically contiguous run of host pages,
    aligned to the folio size in pfn space, all in the same state."""
    mem = host.mem
    out: list[str] = []
    for vm in host.vms.values():
        fp = vm.folio_pages
        if fp == 1:
            if vm.huge.any():
                out.append(f"VM {vm.vm_id}: small-page VM with huge folios")
            continue
        whole = contiguous = aligned = uniform = True
        step = max(1, CHECK_CHUNK_PAGES // fp)
        for f0 in range(0, vm.huge.size, step):
            folios = np.flatnonzero(vm.huge[f0 : f0 + step]).astype(np.int64) + f0
            if folios.size == 0:
                continue
            s2 = vm.stage2[folios[:, None] * fp + np.arange(fp)].astype(np.int64)
            if not s2.all():
                whole = False
                break
            pages = s2 - 1
            contiguous &= bool((np.diff(pages, axis=1) == 1).all())
            aligned &= not (mem.pfn_of(pages[:, 0]) % fp).any()
            fl = mem.flags[pages]
            uniform &= bool((fl == fl[:, :1]).all())
        if not whole:
            out.append(f"VM {vm.vm_id}: huge folios not mapped whole")
            continue
        if not contiguous:
            out.append(f"VM {vm.vm_id}: huge folios not physically contiguous")
        if not aligned:
            out.append(f"VM {vm.vm_id}: huge folios not aligned to their size")
        if not uniform:
            out.append(f"VM {vm.vm_id}: huge folios with pages in different states")
    return out


def check_pinned(host: Host) -> list[str]:
    """A pinned VM has all of its plugged memory backed (VFIO pins it when it appears), none of
    it in tag storage (pinning migrates pages out of CMA first), and nothing discarded."""
    mem = host.mem
    out: list[str] = []
    for vm in host.vms.values():
        if not vm.config.pinned:
            continue
        unbacked = 0
        in_cma = _Found()
        for o0, o1 in _device_steps(vm):
            s2 = vm.stage2[o0:o1][_plugged(vm, o0, o1)]
            unbacked += int(np.count_nonzero(s2 == 0))
            pages = s2[s2 != 0].astype(np.int64) - 1
            in_cma.add(pages[(mem.flags[pages] >> 2) == KIND_TAG_STORAGE])
        if unbacked:
            out.append(f"VM {vm.vm_id}: pinned VM with {unbacked} plugged pages unbacked")
        if in_cma:
            out.append(f"VM {vm.vm_id}: pinned memory in lent tag storage: {in_cma.pages()}")
        if vm.discarded_pages:
            out.append(f"VM {vm.vm_id}: pinned VM with {vm.discarded_pages} discarded pages")
        if not mem.pinned_owner[vm.slot]:
            out.append(f"VM {vm.vm_id}: pinned VM not marked pinned for the allocator")
    return out


def check_owner_pools(host: Host) -> list[str]:
    """Every VM's allocator pool is the one its config calls for, and no live slot's pages sit
    where its pool does not allow."""
    mem = host.mem
    out: list[str] = []
    for vm in host.vms.values():
        pool = int(mem.owner_pool[vm.slot])
        if pool != host._untagged_pool(vm.config):
            out.append(f"VM {vm.vm_id}: allocator pool {pool} does not match its config")
            continue
        if pool not in (POOL_NOT_CMA, POOL_MTE_CAPABLE):
            continue
        # The VM's pages are its mapped pages (check() compares them with the owners).
        forbidden = KIND_TAG_STORAGE if pool == POOL_NOT_CMA else KIND_UNTAGGABLE
        misplaced = False
        for o0, o1 in _steps(0, vm.stage2.size):
            _, pages = _mapped(vm, o0, o1)
            kinds = mem.flags[pages[pages < mem.nr_pages]] >> 2
            if (kinds == forbidden).any():
                misplaced = True
                break
        if misplaced and pool == POOL_NOT_CMA:
            out.append(f"VM {vm.vm_id}: pages in tag storage against its pool")
        if misplaced and pool == POOL_MTE_CAPABLE:
            out.append(f"VM {vm.vm_id}: pages on untaggable RAM against its pool")
    return out
