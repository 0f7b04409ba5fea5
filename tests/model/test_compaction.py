"""Host page migration (DOMAIN.md §6): compacting a tag region and moving guest pages off a
host range keep every VM's view, move tags with their pages and count every move by reason."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostd.model import (
    Access,
    FailedPreconditionError,
    Host,
    InvalidArgumentError,
    MiB,
    TagCopyDirection,
    TagPolicy,
    VmConfig,
)
from hostd.model.physmem import TG_FREE, TG_TAGGED, TS_LENT, UT_FREE
from hostd.model.types import BOOT_RAM_GPA

from .conftest import PAGE, assert_sound, small_topology

VMS = ("a", "b", "c")
VM_PAGES = 2048  # 8 MiB of boot RAM each


def vm_views(host: Host) -> dict[str, Any]:
    """Every VM's view: status, mapped and tagged guest pages, tag contents."""
    out = {}
    for vm_id, vm in host.vms.items():
        offs = np.flatnonzero(vm.stage2)
        pages = vm.stage2[offs].astype(np.int64) - 1
        out[vm_id] = (
            host.get_vm(vm_id),
            offs.tolist(),
            offs[host.mem.flags[pages] == TG_TAGGED].tolist(),
            host.mem.tags.read(pages).tobytes(),
        )
    return out


def fragmented_host(faults: list[tuple[int, int, int]], destroy: list[str], lend: int) -> Host:
    """MTE VMs faulting interleaved runs (so they share tag blocks), some destroyed, and a
    non-MTE VM big enough to be lent tag storage."""
    host = Host(small_topology())
    for vm_id in VMS:
        host.create_vm(VmConfig(vm_id, True, TagPolicy.ON_FAULT, boot_memory_bytes=VM_PAGES * PAGE))
    rng = np.random.default_rng(len(faults))
    for vm_i, start, n in faults:
        n = min(n, VM_PAGES - start)
        gpa = BOOT_RAM_GPA + start * PAGE
        host.guest_fault(VMS[vm_i], gpa, n * PAGE, Access.WRITE)
        tags = rng.integers(0, 16, PAGE // 16, dtype=np.uint8).tobytes()
        host.copy_tags(VMS[vm_i], gpa, PAGE, TagCopyDirection.TO_GUEST, tags)
    # Untaggable memory, then every free taggable page, then ``lend`` pages of tag storage.
    plain_pages = host.mem.free_pages(UT_FREE) + host.mem.free_pages(TG_FREE) + lend
    host.create_vm(VmConfig("plain", False, boot_memory_bytes=plain_pages * PAGE))
    host.guest_fault("plain", BOOT_RAM_GPA, plain_pages * PAGE, Access.WRITE)
    for vm_id in destroy:
        host.destroy_vm(vm_id)
    assert_sound(host)
    return host


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    faults=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, VM_PAGES - 1), st.integers(1, 96)),
        min_size=1,
        max_size=30,
    ),
    destroy=st.lists(st.sampled_from(VMS[1:]), unique=True),
    lend=st.integers(0, 400),
)
def test_compaction_preserves_every_vm_view_and_frees_whole_tag_blocks(
    faults: list[tuple[int, int, int]], destroy: list[str], lend: int
) -> None:
    """Compaction changes no VM's layout, mapped/tagged bytes or tags, leaves no lent page in
    the region's tag storage when there is room, frees whole tag blocks, and leaves nothing a
    second compaction could free."""
    host = fragmented_host(faults, destroy, lend)
    before = vm_views(host)
    reserved_before = host.mem.regions[0].nr_reserved
    result = host.compact_tag_region("tag0")
    assert before == vm_views(host)
    assert_sound(host)
    assert reserved_before - result.tag_blocks_freed == result.tag_blocks_reserved
    assert result.tag_blocks_reserved >= result.tag_blocks_min_needed
    reg = host.mem.regions[0]
    lent_now = int(np.count_nonzero(host.mem.flags[reg.tag.start : reg.tag.end] == TS_LENT))
    assert result.lent_pages_left == lent_now
    again = host.compact_tag_region("tag0")
    assert 0 == again.compacted_pages == again.tag_blocks_freed
    assert before == vm_views(host)


def test_compaction_counts_moves_by_reason_and_frees_blocks() -> None:
    """Tagged pages of a half-empty block move into another block's free pages (counted as
    compaction), lent data moves out of tag storage (counted as evacuation)."""
    host = fragmented_host([(0, 0, 32), (1, 0, 32), (0, 32, 16), (2, 0, 1024)], ["b", "c"], 200)
    result = host.compact_tag_region("tag0")
    migrations = host.counters.page_migrations
    assert result.compacted_pages == migrations.get("compaction", 0)
    assert result.evacuated_pages == migrations.get("evacuation", 0) > 0
    assert result.complete
    assert_sound(host)


def test_compaction_of_an_unknown_region_is_not_found() -> None:
    """Only regions of the host can be compacted."""
    host = Host(small_topology())
    with pytest.raises(Exception, match="no tag region"):
        host.compact_tag_region("tag7")


def test_evacuating_a_host_range_moves_every_guest_page_with_its_tags() -> None:
    """Guest pages in a host range move elsewhere before offlining; views are unchanged and no
    guest page is left in the range."""
    host = fragmented_host([(0, 0, 512), (1, 0, 256), (2, 0, 2048)], ["c"], 0)
    before = vm_views(host)
    data = host.mem.regions[0].data
    result = host.evacuate_host_range(data.base_pfn, 1024)
    assert result.complete
    assert result.moved_pages > 0
    assert result.moved_pages == host.counters.page_migrations["offlining"]
    assert before == vm_views(host)
    assert not host.mem.owner[data.start : data.start + 1024].any()
    assert_sound(host)


def test_evacuation_without_room_stops_and_says_how_far_it_got() -> None:
    """With nowhere to go, evacuation stops cleanly: the state stays sound and the result
    names the pages left and why."""
    host = Host(small_topology())
    host.create_vm(VmConfig("big", True, TagPolicy.ON_FAULT, boot_memory_bytes=64 * MiB))
    host.guest_fault("big", BOOT_RAM_GPA, 60 * MiB, Access.WRITE)
    data = host.mem.regions[0].data
    result = host.evacuate_host_range(data.base_pfn, data.nr_pages)
    assert not result.complete
    assert result.pages_left > 0
    assert "taggable_memory" in result.stopped_reason
    assert_sound(host)


def test_evacuating_tag_storage_or_outside_memory_is_refused() -> None:
    """Tag storage is compacted, not offlined; a range must lie in host memory."""
    host = Host(small_topology())
    tag = host.mem.regions[0].tag
    with pytest.raises(FailedPreconditionError, match="tag storage"):
        host.evacuate_host_range(tag.base_pfn, 1)
    with pytest.raises(InvalidArgumentError, match="pfn_start"):
        host.evacuate_host_range(1, 1)
    with pytest.raises(InvalidArgumentError, match="nr_pages"):
        host.evacuate_host_range(tag.base_pfn, 0)
