"""The host's state as extents, reserved tag blocks and mapping runs, produced in chunks.

``ExportState`` runs in a forked copy-on-write child (``hostd.cow``), where every temporary is
real memory: the export is therefore built a chunk of :data:`EXPORT_CHUNK_PAGES` pages at a
time and handed on chunk by chunk, never as whole-host arrays. A page extent needs the guest
frame of each page, which only the VMs' stage-2 maps know (there is no reverse map outside
tag storage): it is rebuilt for one group of pages at a time (at most an eighth of the host,
4 bytes per page of the group) by a scan of every stage-2 map, so the child needs about half a
byte per host page at most, and the maps are scanned at most 8 times.

The wire format announces the number of records before the records; :func:`stream` counts
them in a first pass and keeps that pass's records when they are few (the usual case: a
populated host has few extents), else produces them again.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from hostd.model.physmem import PAGE_STATE_OF_FLAG, TG_TAGGED, TS_RESERVED
from hostd.model.types import MappingRun, PageExtent, ReservedTagBlock
from hostd.model.vm import BOOT_RAM_GPA

if TYPE_CHECKING:
    from hostd.model.host import Host
    from hostd.model.vm import Vm

T = TypeVar("T")

# Pages (or stage-2 offsets) read per step.
EXPORT_CHUNK_PAGES = 1 << 16
# Records handed on at a time: a record costs a few hundred bytes, far more than a page.
EXPORT_RECORDS_PER_CHUNK = 4096
# The guest-frame map of a group costs 4 bytes per page: groups of an eighth of the host.
_GROUPS = 8
# Records of the counting pass kept for sending (a record costs a few hundred bytes): at least
# this many, or one per 2048 host pages.
EXPORT_KEEP_RECORDS = 4096


def _steps(start: int, end: int, step: int) -> Iterator[tuple[int, int]]:
    for a in range(start, end, step):
        yield a, min(a + step, end)


def _sorted_vms(host: Host) -> list[Vm]:
    return sorted(host.vms.values(), key=lambda v: v.vm_id)


def _offsets_of_pages(host: Host, g0: int, g1: int) -> np.ndarray:
    """Stage-2 offset + 1 of each page in ``[g0, g1)`` (0: not mapped). A page mapped twice
    (a broken state) gets the offset of the VM last in id order."""
    inv = np.zeros(g1 - g0, dtype=np.uint32)
    size = np.uint32(g1 - g0)
    for vm in _sorted_vms(host):
        for o0, o1 in _steps(0, vm.stage2.size, EXPORT_CHUNK_PAGES):
            # stage2 holds page + 1; unsigned arithmetic wraps everything below g0 (and 0,
            # unmapped) far above the group.
            rel = vm.stage2[o0:o1] - np.uint32(g0 + 1)
            at = np.flatnonzero(rel < size)
            inv[rel[at]] = at + (o0 + 1)
    return inv


def page_extents(host: Host) -> Iterator[list[PageExtent]]:
    """Runs of host pages in the same state with the same owner and consecutive guest
    frames, in pfn order, a chunk at a time."""
    mem = host.mem
    n = mem.nr_pages
    if n == 0:
        return
    names = {vm.slot: vm.vm_id for vm in host.vms.values()}
    # Vm.gfn_of_offset, the same for every VM.
    gfn_base = BOOT_RAM_GPA // mem.page_size
    seg_starts = np.array([s.start for s in mem.segments], dtype=np.int64)
    step = EXPORT_CHUNK_PAGES
    group = -(-max(step, -(-n // _GROUPS)) // step) * step
    # The extent still open at the end of the previous chunk, and its guest frame (kept: the
    # group that knew it may be gone).
    open_start, open_gfn = 0, -1
    for g0, g1 in _steps(0, n, group):
        # One page before the group too: a chunk compares each page with the one before.
        lo = max(g0 - 1, 0)
        inv = _offsets_of_pages(host, lo, g1)
        if g0 == 0:
            open_gfn = int(inv[0]) - 1 + gfn_base if inv[0] else -1
        for a, b in _steps(g0, g1, step):
            a0 = max(a - 1, 0)
            f, o, v = mem.flags[a0:b], mem.owner[a0:b], inv[a0 - lo : b - lo]
            # A mapped page after an unmapped one starts an extent; after a mapped one, unless
            # its guest frame follows (guest frames are stage-2 offsets plus a constant).
            brk = (f[1:] != f[:-1]) | (o[1:] != o[:-1])
            brk |= (v[1:] != 0) & ((v[1:] != v[:-1] + 1) | (v[:-1] == 0))
            at = np.flatnonzero(brk) + (a0 + 1)
            seg = seg_starts[(seg_starts > a0) & (seg_starts < b)]
            if seg.size:
                at = np.union1d(at, seg)
            if at.size == 0:
                continue
            for i in range(0, at.size, EXPORT_RECORDS_PER_CHUNK):
                part = at[i : i + EXPORT_RECORDS_PER_CHUNK]
                part_inv = inv[part - lo].astype(np.int64)
                gfns = np.where(part_inv > 0, part_inv + (gfn_base - 1), -1).tolist()
                bounds = np.concatenate(([open_start], part))
                yield _extents(host, bounds, [open_gfn, *gfns[:-1]], names)
                open_start, open_gfn = int(part[-1]), gfns[-1]
        # Before the next group's map is built, not after (``v`` is a view of it).
        del inv, v
    yield _extents(host, np.array([open_start, n]), [open_gfn], names)


def _extents(
    host: Host, bounds: np.ndarray, gfns: list[int], names: dict[int, str]
) -> list[PageExtent]:
    """The extents that start at ``bounds[:-1]`` (the last ends at ``bounds[-1]``)."""
    mem = host.mem
    starts = bounds[:-1]
    return [
        PageExtent(
            pfn_start=pfn,
            count=count,
            state=PAGE_STATE_OF_FLAG[flag],
            vm_id=names.get(owner, ""),
            gfn_start=max(gfn, 0),
        )
        for pfn, count, flag, owner, gfn in zip(
            mem.pfn_of(starts).tolist(),
            np.diff(bounds).tolist(),
            mem.flags[starts].tolist(),
            mem.owner[starts].tolist(),
            gfns,
            strict=True,
        )
    ]


def reserved_tag_blocks(host: Host) -> Iterator[list[ReservedTagBlock]]:
    """Every reserved tag block with its refcount, region by region, a chunk at a time."""
    mem = host.mem
    for reg in mem.regions:
        for b0, b1 in _steps(0, reg.nr_blocks, EXPORT_RECORDS_PER_CHUNK):
            first_pages = reg.tag.start + np.arange(b0, b1, dtype=np.int64) * reg.block_pages
            reserved = np.flatnonzero(mem.flags[first_pages] == TS_RESERVED)
            if reserved.size == 0:
                continue
            pfns = mem.pfn_of(first_pages[reserved]).tolist()
            refcounts = reg.refcount[b0 + reserved].tolist()
            yield [
                ReservedTagBlock(reg.name, pfn, reg.block_pages, rc)
                for pfn, rc in zip(pfns, refcounts, strict=True)
            ]


def mapping_runs(host: Host) -> Iterator[list[MappingRun]]:
    """Per VM (in id order), runs of consecutive guest frames mapped to consecutive host
    frames with the same tagged state, in guest order, a chunk at a time."""
    mem = host.mem
    for vm in _sorted_vms(host):
        # The run still open: gfn, page, pfn, tagged, length. Runs are maximal within a chunk
        # of offsets; one may go on into the next chunk.
        run: tuple[int, int, int, bool, int] | None = None
        for o0, o1 in _steps(0, vm.stage2.size, EXPORT_CHUNK_PAGES):
            s2 = vm.stage2[o0:o1]
            at = np.flatnonzero(s2)
            if at.size == 0:
                continue
            offs = at + o0
            pages = s2[at].astype(np.int64) - 1
            tagged = mem.flags[pages] == TG_TAGGED
            cont = (np.diff(offs) == 1) & (np.diff(pages) == 1) & (tagged[1:] == tagged[:-1])
            starts = np.concatenate(([0], np.flatnonzero(~cont) + 1))
            ends = np.concatenate((starts[1:], [offs.size]))
            for i in range(0, starts.size, EXPORT_RECORDS_PER_CHUNK):
                first, last = (
                    starts[i : i + EXPORT_RECORDS_PER_CHUNK],
                    ends[i : i + EXPORT_RECORDS_PER_CHUNK],
                )
                out: list[MappingRun] = []
                for found in zip(
                    vm.gfn_of_offset(offs[first]).tolist(),
                    pages[first].tolist(),
                    mem.pfn_of(pages[first]).tolist(),
                    tagged[first].tolist(),
                    (last - first).tolist(),
                    strict=True,
                ):
                    if run is not None:
                        gfn, page, pfn, was_tagged, length = run
                        if (gfn + length, page + length, was_tagged) == found[:2] + found[3:4]:
                            run = (gfn, page, pfn, was_tagged, length + found[4])
                            continue
                        out.append(_run(vm, run))
                    run = found
                if out:
                    yield out
        if run is not None:
            yield [_run(vm, run)]


def _run(vm: Vm, run: tuple[int, int, int, bool, int]) -> MappingRun:
    gfn, _, pfn, tagged, length = run
    return MappingRun(vm.vm_id, gfn, pfn, length, tagged)


@dataclass(frozen=True)
class ExportStream:
    """The export: how many records of each kind, and the records (each iterable once)."""

    page_extent_count: int
    reserved_tag_block_count: int
    mapping_run_count: int
    page_extents: Iterable[PageExtent]
    reserved_tag_blocks: Iterable[ReservedTagBlock]
    mapping_runs: Iterable[MappingRun]


def _counted(produce: Callable[[], Iterator[list[T]]], keep: int) -> tuple[int, Iterable[T]]:
    """How many records ``produce()`` yields, and the records: those of the counting pass if
    there are at most ``keep``, else a second pass."""
    count = 0
    kept: list[list[T]] | None = []
    for chunk in produce():
        count += len(chunk)
        if kept is not None:
            kept.append(chunk)
            if count > keep:
                kept = None
    if kept is not None:
        return count, itertools.chain.from_iterable(kept)
    return count, itertools.chain.from_iterable(produce())


def stream(host: Host) -> ExportStream:
    """The export of ``host``, counted first (see the module's docstring)."""
    keep = max(EXPORT_KEEP_RECORDS, host.mem.nr_pages >> 11)
    extents = _counted(lambda: page_extents(host), keep)
    blocks = _counted(lambda: reserved_tag_blocks(host), keep)
    runs = _counted(lambda: mapping_runs(host), keep)
    return ExportStream(extents[0], blocks[0], runs[0], extents[1], blocks[1], runs[1])
