"""The whole-array ``Host.export_state`` the chunked export replaced: a test oracle.

``hostd.model.export`` builds the export a chunk of pages at a time to bound its memory; this
is the export as it was before, over whole arrays. The tests expect the same records.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hostd.model.physmem import PAGE_STATE_OF_FLAG, TG_TAGGED, TS_RESERVED
from hostd.model.types import HostExport, MappingRun, PageExtent, ReservedTagBlock

if TYPE_CHECKING:
    from hostd.model.host import Host


def export_state(host: Host) -> HostExport:
    """Every host page extent, reserved tag block and VM mapping run."""
    mem = host.mem
    n = mem.nr_pages
    gfn = np.full(n, -1, dtype=np.int64)
    mapping_runs: list[MappingRun] = []
    for vm in sorted(host.vms.values(), key=lambda v: v.vm_id):
        offs = np.flatnonzero(vm.stage2).astype(np.int64)
        pages = vm.stage2[offs].astype(np.int64) - 1
        gfns = vm.gfn_of_offset(offs)
        gfn[pages] = gfns
        tagged = mem.flags[pages] == TG_TAGGED
        brk = (
            np.flatnonzero(
                (np.diff(offs) != 1) | (np.diff(pages) != 1) | (tagged[1:] != tagged[:-1])
            )
            + 1
        )
        starts = np.concatenate(([0], brk)) if offs.size else brk
        ends = np.concatenate((brk, [offs.size])) if offs.size else brk
        pfns = mem.pfn_of(pages[starts]) if starts.size else starts
        for s, e, pfn in zip(starts.tolist(), ends.tolist(), pfns.tolist(), strict=False):
            mapping_runs.append(MappingRun(vm.vm_id, int(gfns[s]), pfn, e - s, bool(tagged[s])))
    state = mem.flags
    owner = mem.owner
    idx = np.arange(1, n)
    brk = (
        np.flatnonzero(
            (state[1:] != state[:-1])
            | (owner[1:] != owner[:-1])
            | ((gfn[1:] != gfn[:-1] + 1) & (gfn[1:] >= 0))
            | np.isin(idx, [s.start for s in mem.segments])
        )
        + 1
    )
    starts = np.concatenate(([0], brk))
    ends = np.concatenate((brk, [n]))
    pfns = mem.pfn_of(starts)
    names = {vm.slot: vm.vm_id for vm in host.vms.values()}
    extents = tuple(
        PageExtent(
            pfn_start=pfn,
            count=e - s,
            state=PAGE_STATE_OF_FLAG[int(state[s])],
            vm_id=names.get(int(owner[s]), ""),
            gfn_start=max(int(gfn[s]), 0),
        )
        for s, e, pfn in zip(starts.tolist(), ends.tolist(), pfns.tolist(), strict=False)
    )
    blocks: list[ReservedTagBlock] = []
    for reg in mem.regions:
        first_pages = reg.tag_pages(np.arange(reg.nr_blocks))[:, 0]
        reserved = np.flatnonzero(mem.flags[first_pages] == TS_RESERVED)
        tag_pfns = mem.pfn_of(first_pages[reserved]) if reserved.size else reserved
        blocks.extend(
            ReservedTagBlock(reg.name, pfn, reg.block_pages, int(reg.refcount[b]))
            for b, pfn in zip(reserved.tolist(), tag_pfns.tolist(), strict=False)
        )
    return HostExport(extents, tuple(blocks), tuple(mapping_runs))
