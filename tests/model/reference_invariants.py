"""The whole-array invariant check the chunked one replaced: a test oracle.

``hostd.model.invariants`` reads the host in chunks to bound a check's memory; this is the
check as it was before, over whole arrays (simple, and O(host pages) in temporaries). The
tests run both on sound and corrupted hosts and expect the same sentences.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hostd.model.physmem import (
    KIND_TAG_STORAGE,
    NR_FLAGS,
    TG_FREE,
    TG_TAGGED,
    TS_FREE,
    TS_LENT,
    TS_RESERVED,
    USE_DATA,
    USE_TAGGED,
    VALID_FLAGS,
)
from hostd.model.types import TagPolicy

if TYPE_CHECKING:
    from hostd.model.host import Host

# Cap on how many offending pages one sentence names.
_EXAMPLES = 3


def _examples(idx: np.ndarray) -> str:
    shown = ", ".join(str(int(i)) for i in idx[:_EXAMPLES])
    return f"{idx.size} page(s), e.g. index {shown}"


def check(host: Host) -> list[str]:
    """Every violated invariant of ``host``, as a sentence."""
    mem = host.mem
    out: list[str] = []
    flags = mem.flags
    owner = mem.owner

    # Pages: each holds a value its range allows; per-state totals add up.
    for seg in mem.segments:
        f = flags[seg.start : seg.end]
        bad = ~np.isin(f, VALID_FLAGS[seg.kind])
        if bad.any():
            where = _examples(np.flatnonzero(bad) + seg.start)
            out.append(f"{seg.name}: flags invalid for its kind: {where}")
        counts = np.bincount(f, minlength=NR_FLAGS)
        if not np.array_equal(counts, mem.seg_counts[seg.index]):
            out.append(f"{seg.name}: per-state page totals drifted from the page flags")
        first_free = np.flatnonzero(f == seg.free_flag)
        if first_free.size and first_free[0] < seg.hint:
            out.append(
                f"{seg.name}: free-page hint {seg.hint} skips free page {int(first_free[0])}"
            )
    if int(mem.seg_counts.sum()) != mem.nr_pages:
        out.append("per-state page totals do not add up to the host size")

    # Owners: data and tagged pages have a live owner, free and reserved pages none.
    use = flags & 3
    owned = (use == USE_DATA) | (use == USE_TAGGED)
    live = np.zeros(1 << 16, dtype=bool)
    for vm in host.vms.values():
        live[vm.slot] = True
    if (owner[~owned] != 0).any():
        out.append(
            "free or reserved pages with an owner: "
            f"{_examples(np.flatnonzero(~owned & (owner != 0)))}"
        )
    orphan = owned & ~live[owner]
    if orphan.any():
        out.append(f"data pages without a live owner VM: {_examples(np.flatnonzero(orphan))}")

    # Tag regions: refcounts, reservation, lent and free counts.
    for reg in mem.regions:
        d = flags[reg.data.start : reg.data.end].reshape(reg.nr_blocks, reg.span_pages)
        t = flags[reg.tag.start : reg.tag.end].reshape(reg.nr_blocks, reg.block_pages)
        tagged = (d == TG_TAGGED).sum(axis=1)
        if not np.array_equal(tagged, reg.refcount):
            drifted = np.flatnonzero(tagged != reg.refcount)
            out.append(
                f"{reg.name}: refcount differs from tagged pages in blocks "
                f"{drifted[:_EXAMPLES].tolist()}"
            )
        reserved = (t == TS_RESERVED).all(axis=1)
        partly = (t == TS_RESERVED).any(axis=1) & ~reserved
        if partly.any():
            out.append(
                f"{reg.name}: blocks partly reserved: {np.flatnonzero(partly)[:_EXAMPLES].tolist()}"
            )
        unreserved_tagged = (tagged > 0) & ~reserved
        if unreserved_tagged.any():
            out.append(
                f"{reg.name}: tagged pages whose tag block is not reserved, blocks "
                f"{np.flatnonzero(unreserved_tagged)[:_EXAMPLES].tolist()}"
            )
        if mem.static:
            if not reserved.all():
                out.append(f"{reg.name}: static carve-out with unreserved tag blocks")
        elif (reserved & (tagged == 0)).any():
            out.append(
                f"{reg.name}: reserved blocks describing no tagged page: "
                f"{np.flatnonzero(reserved & (tagged == 0))[:_EXAMPLES].tolist()}"
            )
        if int(reserved.sum()) != reg.nr_reserved:
            out.append(
                f"{reg.name}: reserved block count {reg.nr_reserved} != {int(reserved.sum())}"
            )
        if not np.array_equal((t == TS_LENT).sum(axis=1), reg.lent):
            out.append(f"{reg.name}: lent page counts drifted")
        span_free = (d == TG_FREE).sum(axis=1)
        if not np.array_equal(span_free, reg.span_free):
            out.append(f"{reg.name}: free page counts per block drifted")
        partial = (tagged > 0) & (span_free > 0)
        if int(partial.sum()) != reg.nr_partial:
            out.append(f"{reg.name}: partial block count {reg.nr_partial} != {int(partial.sum())}")
        if partial.any() and np.flatnonzero(partial)[0] < reg.partial_hint:
            out.append(f"{reg.name}: partial-block hint skips a partial block")
        if (span_free > 0).any() and np.flatnonzero(span_free > 0)[0] < reg.free_hint:
            out.append(f"{reg.name}: free-block hint skips a block with free pages")
        if mem.static and (t == TS_FREE).any():
            out.append(f"{reg.name}: static carve-out with free tag storage")

    # Stage-2 maps: one owner per page, both directions agree, mapped means plugged.
    seen = np.zeros(mem.nr_pages, dtype=np.uint8)
    for vm in host.vms.values():
        offs = np.flatnonzero(vm.stage2)
        pages = vm.stage2[offs].astype(np.int64) - 1
        if pages.size and (pages.max() >= mem.nr_pages):
            out.append(f"VM {vm.vm_id}: stage-2 map points past the end of host memory")
            continue
        np.add.at(seen, pages, 1)
        wrong_owner = owner[pages] != vm.slot
        if wrong_owner.any():
            out.append(
                f"VM {vm.vm_id}: mapped pages owned by someone else: "
                f"{_examples(pages[wrong_owner])}"
            )
        nr_owned = int(np.count_nonzero(owner == vm.slot))
        if nr_owned != pages.size:
            out.append(f"VM {vm.vm_id}: owns {nr_owned} pages but maps {pages.size}")
        plugged = np.zeros(vm.stage2.size, dtype=bool)
        plugged[vm.plugged_offsets()] = True
        if not plugged[offs].all():
            nr_outside = int((~plugged[offs]).sum())
            out.append(f"VM {vm.vm_id}: {nr_outside} mapped page(s) outside plugged memory")
        nr_tagged = int(np.count_nonzero(flags[pages] == TG_TAGGED))
        if vm.mapped_pages != pages.size or vm.tagged_pages != nr_tagged:
            out.append(
                f"VM {vm.vm_id}: accounting says {vm.mapped_pages} mapped / {vm.tagged_pages} "
                f"tagged, pages say {pages.size} / {nr_tagged}"
            )
        if not vm.config.mte_enabled and nr_tagged:
            out.append(f"VM {vm.vm_id}: non-MTE VM holds {nr_tagged} tagged pages")
        # ON_TAG_ACCESS maps untagged pages NoTagAccess, which untaggable RAM allows.
        if vm.config.mte_enabled and vm.config.tag_policy is not TagPolicy.ON_TAG_ACCESS:
            kinds = flags[pages] >> 2
            if (kinds == 0).any():
                out.append(f"VM {vm.vm_id}: MTE guest memory on untaggable RAM")
        tagged_on_fault = vm.config.mte_enabled and vm.config.tag_policy is not (
            TagPolicy.ON_TAG_ACCESS
        )
        if tagged_on_fault and nr_tagged != pages.size:
            out.append(f"VM {vm.vm_id}: {vm.config.tag_policy.value} VM with untagged pages")
        eager = vm.config.mte_enabled and vm.config.tag_policy is TagPolicy.EAGER
        # Memory an EAGER VM gave back (discarded) is faulted in again later, like ON_FAULT's.
        if eager and vm.discarded_pages == 0 and nr_tagged != int(plugged.sum()):
            out.append(f"VM {vm.vm_id}: EAGER VM with plugged memory not backed tagged")
        ts = (flags[pages] >> 2) == KIND_TAG_STORAGE
        if ts.any():
            back = mem.ts_gfn[mem._ts_slot(pages[ts])]
            if not np.array_equal(back.astype(np.int64), offs[ts]):
                out.append(f"VM {vm.vm_id}: tag storage reverse map disagrees with the stage-2 map")
    if (seen > 1).any():
        out.append(f"pages mapped more than once: {_examples(np.flatnonzero(seen > 1))}")
    if (owned & (seen == 0)).any():
        out.append(f"owned pages that no VM maps: {_examples(np.flatnonzero(owned & (seen == 0)))}")

    # Tags live only on tagged pages.
    tag_pages = mem.tags.pages
    if tag_pages.size and (flags[tag_pages] != TG_TAGGED).any():
        out.append(
            f"tags stored for untagged pages: {_examples(tag_pages[flags[tag_pages] != TG_TAGGED])}"
        )
    out += host.migration_invariants()
    out += check_pinned(host)
    out += check_owner_pools(host)
    out += check_folios(host)
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
        folios = np.flatnonzero(vm.huge).astype(np.int64)
        if folios.size == 0:
            continue
        s2 = vm.stage2[folios[:, None] * fp + np.arange(fp)].astype(np.int64)
        if not s2.all():
            out.append(f"VM {vm.vm_id}: huge folios not mapped whole")
            continue
        pages = s2 - 1
        if not (np.diff(pages, axis=1) == 1).all():
            out.append(f"VM {vm.vm_id}: huge folios not physically contiguous")
        if (mem.pfn_of(pages[:, 0]) % fp).any():
            out.append(f"VM {vm.vm_id}: huge folios not aligned to their size")
        fl = mem.flags[pages]
        if not (fl == fl[:, :1]).all():
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
        plugged = vm.plugged_offsets()
        s2 = vm.stage2[plugged]
        if not s2.all():
            out.append(
                f"VM {vm.vm_id}: pinned VM with {int((s2 == 0).sum())} plugged pages unbacked"
            )
        pages = s2[s2 != 0].astype(np.int64) - 1
        in_cma = (mem.flags[pages] >> 2) == KIND_TAG_STORAGE
        if in_cma.any():
            out.append(
                f"VM {vm.vm_id}: pinned memory in lent tag storage: {_examples(pages[in_cma])}"
            )
        if vm.discarded_pages:
            out.append(f"VM {vm.vm_id}: pinned VM with {vm.discarded_pages} discarded pages")
        if not mem.pinned_owner[vm.slot]:
            out.append(f"VM {vm.vm_id}: pinned VM not marked pinned for the allocator")
    return out


def check_owner_pools(host: Host) -> list[str]:
    """Every VM's allocator pool is the one its config calls for, and no live slot's pages sit
    where its pool does not allow."""
    from hostd.model.physmem import KIND_UNTAGGABLE, POOL_MTE_CAPABLE, POOL_NOT_CMA

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
        s2 = vm.stage2[vm.stage2 != 0].astype(np.int64) - 1
        kinds = mem.flags[s2[s2 < mem.nr_pages]] >> 2
        if pool == POOL_NOT_CMA and (kinds == KIND_TAG_STORAGE).any():
            out.append(f"VM {vm.vm_id}: pages in tag storage against its pool")
        if pool == POOL_MTE_CAPABLE and (kinds == KIND_UNTAGGABLE).any():
            out.append(f"VM {vm.vm_id}: pages on untaggable RAM against its pool")
    return out
