"""The invariant check reads the host in chunks and reports what the whole-array check did.

Each corruption below breaks one invariant of a busy small host (plain, ON_FAULT, EAGER,
ON_TAG_ACCESS, virtio-mem, huge-page and pinned VMs, lent tag storage, stored tags). The
chunked check must name the same problems, in the same words, as the whole-array check it
replaced (``reference_invariants``), with chunks of a few pages (so that tag blocks, folios and
bitmap bytes straddle chunk edges) as well as the default.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from hostd.model import (
    BOOT_RAM_GPA,
    Access,
    Host,
    MiB,
    TagPolicy,
    VirtioMemConfig,
    VirtioMemRequestType,
    VmConfig,
    invariants,
)
from hostd.model.physmem import (
    TG_DATA,
    TG_TAGGED,
    TS_FREE,
    TS_LENT,
    TS_RESERVED,
    UT_DATA,
)
from hostd.model.types import TagCopyDirection

from . import reference_invariants
from .conftest import PAGE, SMALL_SPAN_PAGES, assert_sound

# Pages per chunk: a few (not a divisor of a tag block's span of 64 data pages, so spans, folios
# and guest devices straddle chunk edges), and the default.
CHUNKS = [40, invariants.CHECK_CHUNK_PAGES]


def _boot_only(vm_id: str, policy: TagPolicy, size: int, **kw: int) -> VmConfig:
    return VmConfig(vm_id, True, policy, boot_memory_bytes=size, **kw)


def _busy(host: Host) -> Host:
    """Every kind of VM and page state the small host can hold at once."""
    host.create_vm(VmConfig("plain", False, boot_memory_bytes=20 * MiB))
    host.guest_fault("plain", BOOT_RAM_GPA, 20 * MiB, Access.WRITE)
    host.create_vm(_boot_only("mte", TagPolicy.ON_FAULT, 4 * MiB))
    # Three MiB and a few pages: a partial tag block.
    host.guest_fault("mte", BOOT_RAM_GPA, 3 * MiB + 8 * PAGE, Access.WRITE)
    host.copy_tags("mte", BOOT_RAM_GPA, 4 * PAGE, TagCopyDirection.TO_GUEST, bytes(range(16)) * 64)
    host.create_vm(_boot_only("eager", TagPolicy.EAGER, 2 * MiB))
    host.create_vm(_boot_only("ota", TagPolicy.ON_TAG_ACCESS, 2 * MiB))
    host.guest_fault("ota", BOOT_RAM_GPA, 2 * MiB, Access.WRITE)
    host.guest_fault("ota", BOOT_RAM_GPA, 16 * PAGE, Access.TAG)
    host.create_vm(VmConfig("vmem", True, boot_memory_bytes=2 * MiB, max_memory_bytes=66 * MiB))
    host.add_virtio_mem("vmem", "vmem0", VirtioMemConfig(64 * MiB, 2 * MiB))
    host.resize_virtio_mem("vmem", "vmem0", 4 * MiB)
    gpa = host.vms["vmem"].devices["vmem0"].gpa
    host.virtio_mem_request("vmem", "vmem0", VirtioMemRequestType.PLUG, gpa + 2 * MiB, 2)
    host.guest_fault("vmem", gpa + 2 * MiB, 3 * MiB, Access.WRITE)
    host.create_vm(_boot_only("thp", TagPolicy.ON_FAULT, 4 * MiB, backing_page_size_bytes=2 * MiB))
    host.guest_fault("thp", BOOT_RAM_GPA, 2 * MiB, Access.WRITE)
    host.create_vm(VmConfig("pin", False, boot_memory_bytes=1 * MiB, pinned=True))
    # The rest of the host to plain guests: taggable memory, then lent tag storage.
    usage = host.status().usage
    free = usage.free_bytes + usage.tag_free_bytes // 2
    host.create_vm(VmConfig("hog", False, boot_memory_bytes=free))
    host.guest_fault("hog", BOOT_RAM_GPA, free, Access.WRITE)
    # Free pages in a tag block that describes tagged pages: a partial block.
    host.discard_guest_memory("mte", BOOT_RAM_GPA + 3 * MiB, 4 * PAGE)
    assert_sound(host)
    assert (host.mem.flags == TS_LENT).any()
    assert (host.mem.flags == TS_RESERVED).any()
    assert len(host.mem.tags) > 0
    return host


def _pages(host: Host, vm_id: str) -> np.ndarray:
    s2 = host.vms[vm_id].stage2
    return s2[s2 != 0].astype(np.int64) - 1


def _first(host: Host, flag: int) -> int:
    return int(np.flatnonzero(host.mem.flags == flag)[0])


def _retag(host: Host, page: int, flag: int) -> None:
    """Change a page's flag behind the allocator's back (its counts stay as they were)."""
    host.mem.flags[page] = flag


def _reserved_block(host: Host) -> int:
    reg = host.mem.regions[0]
    return int(np.flatnonzero(reg.refcount)[0])


def _free_block(host: Host) -> int:
    reg = host.mem.regions[0]
    return int(np.flatnonzero((reg.refcount == 0) & (reg.lent == 0))[-1])


def _unmap_one(host: Host, vm_id: str) -> None:
    vm = host.vms[vm_id]
    vm.stage2[np.flatnonzero(vm.stage2)[5]] = 0


def _map_twice(host: Host, vm_id: str) -> None:
    vm = host.vms[vm_id]
    offs = np.flatnonzero(vm.stage2)
    vm.stage2[offs[7]] = vm.stage2[offs[3]]


def _swap_owners(host: Host) -> None:
    a, b = host.vms["plain"], host.vms["hog"]
    oa, ob = np.flatnonzero(a.stage2)[9], np.flatnonzero(b.stage2)[9]
    a.stage2[oa], b.stage2[ob] = b.stage2[ob], a.stage2[oa]


def _split_folio(host: Host) -> None:
    vm = host.vms["thp"]
    fp = vm.folio_pages
    first = int(np.flatnonzero(vm.huge)[0]) * fp
    vm.stage2[first + 1], vm.stage2[first + 2] = vm.stage2[first + 2], vm.stage2[first + 1]


def _lent_page_back_map(host: Host) -> None:
    lent = _first(host, TS_LENT)
    host.mem.ts_gfn[host.mem._ts_slot(np.array([lent]))] += 1


def _pin_in_tag_storage(host: Host) -> None:
    """Swap a pinned page with a lent tag storage page of another VM, consistently."""
    mem = host.mem
    pin, hog = host.vms["pin"], host.vms["hog"]
    lent = _first(host, TS_LENT)
    other = host.vms["hog" if mem.owner[lent] == hog.slot else "plain"]
    o_lent = int(mem.ts_gfn[mem._ts_slot(np.array([lent]))][0])
    o_pin = int(np.flatnonzero(pin.stage2)[2])
    page = int(pin.stage2[o_pin]) - 1
    pin.stage2[o_pin], other.stage2[o_lent] = lent + 1, page + 1
    mem.owner[lent], mem.owner[page] = pin.slot, other.slot
    mem.ts_gfn[mem._ts_slot(np.array([lent]))] = o_pin


def _set(
    of: Callable[[Host], object], name: str, value: Callable[[int], int]
) -> Callable[[Host], None]:
    """Change attribute ``name`` of ``of(host)`` to ``value(old)``."""

    def corrupt(host: Host) -> None:
        target = of(host)
        setattr(target, name, value(getattr(target, name)))

    return corrupt


def _region(host: Host) -> object:
    return host.mem.regions[0]


def _bump(array: str, block: Callable[[Host], int]) -> Callable[[Host], None]:
    def corrupt(host: Host) -> None:
        getattr(host.mem.regions[0], array)[block(host)] += 1

    return corrupt


def _hint_past_a_free_page(host: Host) -> None:
    for seg in host.mem.segments:
        free = np.flatnonzero(host.mem.flags[seg.start : seg.end] == seg.free_flag)
        if free.size:
            seg.hint = int(free[0]) + 1
            return
    raise AssertionError("no free page to skip")


def _untaggable_page_in_use(host: Host) -> int:
    return _first(host, UT_DATA)


CORRUPTIONS: dict[str, tuple[Callable[[Host], None], str]] = {
    "invalid flag": (
        lambda h: _retag(h, _untaggable_page_in_use(h), TG_TAGGED),
        "flags invalid for its kind",
    ),
    "segment totals": (
        lambda h: h.mem.seg_counts.__setitem__((0, 0), h.mem.seg_counts[0, 0] + 1),
        "per-state page totals",
    ),
    "free-page hint": (_hint_past_a_free_page, "free-page hint"),
    "owner of a free page": (
        lambda h: h.mem.owner.__setitem__(_first(h, TS_FREE), h.vms["plain"].slot),
        "free or reserved pages with an owner",
    ),
    "dead owner": (
        lambda h: h.mem.owner.__setitem__(int(_pages(h, "hog")[100]), 999),
        "without a live owner VM",
    ),
    "refcount": (_bump("refcount", _reserved_block), "refcount differs"),
    "partly reserved": (
        lambda h: _retag(
            h,
            h.mem.regions[0].tag.start + _reserved_block(h) * h.mem.regions[0].block_pages + 1,
            TS_FREE,
        ),
        "blocks partly reserved",
    ),
    "tagged page, block not reserved": (
        lambda h: _retag(
            h, h.mem.regions[0].data.start + _free_block(h) * SMALL_SPAN_PAGES + 33, TG_TAGGED
        ),
        "tag block is not reserved",
    ),
    "reserved block, nothing tagged": (
        lambda h: h.mem.flags.__setitem__(
            slice(
                h.mem.regions[0].tag.start + _free_block(h) * 2,
                h.mem.regions[0].tag.start + _free_block(h) * 2 + 2,
            ),
            TS_RESERVED,
        ),
        "reserved blocks describing no tagged page",
    ),
    "reserved count": (_set(_region, "nr_reserved", lambda n: n + 1), "reserved block count"),
    "lent count": (_bump("lent", _reserved_block), "lent page counts drifted"),
    "free count": (_bump("span_free", _free_block), "free page counts per block drifted"),
    "partial count": (_set(_region, "nr_partial", lambda n: n + 1), "partial block count"),
    "partial hint": (
        _set(_region, "partial_hint", lambda _: 10**6),
        "partial-block hint skips",
    ),
    "free-block hint": (_set(_region, "free_hint", lambda _: 10**6), "free-block hint skips"),
    "stage-2 past the end": (
        lambda h: h.vms["mte"].stage2.__setitem__(0, h.mem.nr_pages + 5),
        "points past the end",
    ),
    "mapped by the wrong VM": (_swap_owners, "owned by someone else"),
    "mapped twice": (lambda h: _map_twice(h, "hog"), "pages mapped more than once"),
    "owned, not mapped": (lambda h: _unmap_one(h, "plain"), "owned pages that no VM maps"),
    "EAGER page unmapped": (lambda h: _unmap_one(h, "eager"), "EAGER VM"),
    "accounting": (
        lambda h: setattr(h.vms["mte"], "tagged_pages", h.vms["mte"].tagged_pages + 1),
        "accounting says",
    ),
    "plain VM with a tagged page": (
        lambda h: _retag(h, _taggable_of(h, "hog"), TG_TAGGED),
        "non-MTE VM holds",
    ),
    "MTE page untagged": (
        lambda h: _retag(h, int(_pages(h, "mte")[10]), TG_DATA),
        "VM with untagged pages",
    ),
    "mapped outside plugged memory": (
        lambda h: h.vms["vmem"].devices["vmem0"].plugged.__setitem__(1, False),
        "outside plugged memory",
    ),
    "tags on an untagged page": (
        lambda h: _retag(h, int(h.mem.tags.pages[0]), TG_DATA),
        "tags stored for untagged pages",
    ),
    "tag storage reverse map": (_lent_page_back_map, "reverse map disagrees"),
    "pinned VM discarded": (
        _set(lambda h: h.vms["pin"], "discarded_pages", lambda _: 3),
        "pinned VM with 3 discarded",
    ),
    "pinned VM unbacked": (lambda h: _unmap_one(h, "pin"), "plugged pages unbacked"),
    "pinned page in tag storage": (_pin_in_tag_storage, "pinned memory in lent tag storage"),
    "pool": (
        lambda h: h.mem.owner_pool.__setitem__(h.vms["mte"].slot, 0),
        "allocator pool",
    ),
    "MTE pool on untaggable RAM": (
        lambda h: h.mem.flags.__setitem__(int(_pages(h, "mte")[4]), UT_DATA),
        "on untaggable RAM",
    ),
    "huge folio unmapped": (
        lambda h: h.vms["thp"].huge.__setitem__(1, True),
        "huge folios not mapped whole",
    ),
    "huge folio split": (_split_folio, "not physically contiguous"),
}


def _taggable_of(host: Host, vm_id: str) -> int:
    pages = _pages(host, vm_id)
    return int(pages[host.mem.flags[pages] == TG_DATA][0])


@pytest.fixture
def busy(small_host: Host) -> Host:
    return _busy(small_host)


@pytest.mark.parametrize("chunk_pages", CHUNKS)
def test_a_sound_busy_host_passes_the_chunked_check(
    busy: Host, chunk_pages: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy but sound host has no violation, whatever the chunk size."""
    monkeypatch.setattr(invariants, "CHECK_CHUNK_PAGES", chunk_pages)
    assert [] == invariants.check(busy)


@pytest.mark.parametrize("chunk_pages", CHUNKS)
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_chunked_check_names_the_problems_the_whole_array_check_named(
    busy: Host, corruption: str, chunk_pages: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken invariant is reported, in the same sentences (counts, examples) as the check
    over whole arrays, whatever the chunk size."""
    corrupt, expected = CORRUPTIONS[corruption]
    corrupt(busy)
    reference = reference_invariants.check(busy)
    assert any(expected in problem for problem in reference), reference
    monkeypatch.setattr(invariants, "CHECK_CHUNK_PAGES", chunk_pages)
    assert reference == invariants.check(busy)
