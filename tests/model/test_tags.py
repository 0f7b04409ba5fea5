"""Guest tag contents: ``copy_tags`` (KVM_ARM_MTE_COPY_TAGS) and :class:`TagContents`."""

from __future__ import annotations

import numpy as np
import pytest

from hostd.model import (
    BOOT_RAM_GPA,
    Access,
    FailedPreconditionError,
    Host,
    InvalidArgumentError,
    MiB,
    TagCopyDirection,
    TagPolicy,
    VmConfig,
)
from hostd.model.physmem import TG_DATA, TG_TAGGED
from hostd.model.tags import TagContents

from .conftest import (
    DEVICE_GPA,
    SMALL_DATA_PAGES,
    SMALL_UNTAGGED_PAGES,
    assert_sound,
    assert_unchanged,
    fill,
    flags_of,
    lay_out,
    mte_config,
    pages_of,
    snapshot,
)

PAGE = 4096
TAGS_PER_PAGE = PAGE // 16
TO = TagCopyDirection.TO_GUEST
FROM = TagCopyDirection.FROM_GUEST


def pattern(nr_pages: int, seed: int = 1) -> bytes:
    """Random-looking tags (0..15) for ``nr_pages`` pages."""
    rng = np.random.default_rng(seed)
    return bytes(rng.integers(0, 16, nr_pages * TAGS_PER_PAGE, dtype=np.uint8))


def write(host: Host, vm_id: str, gpa: int, tags: bytes) -> None:
    host.copy_tags(vm_id, gpa, len(tags) * 16, TO, tags)
    assert_sound(host)


def read(host: Host, vm_id: str, gpa: int, nr_pages: int) -> bytes:
    tags = host.copy_tags(vm_id, gpa, nr_pages * PAGE, FROM)
    assert_sound(host)
    return tags


# ----------------------------------------------------------------- copy_tags


def test_tags_written_read_back_unchanged(host: Host, mte_vm: str) -> None:
    """Tags written TO_GUEST read back FROM_GUEST unchanged, page by page and as a whole."""
    tags = pattern(5)
    write(host, mte_vm, BOOT_RAM_GPA, tags)
    assert tags == read(host, mte_vm, BOOT_RAM_GPA, 5)
    assert tags[TAGS_PER_PAGE : 2 * TAGS_PER_PAGE] == read(host, mte_vm, BOOT_RAM_GPA + PAGE, 1)
    assert {"TO_GUEST": 5 * TAGS_PER_PAGE, "FROM_GUEST": 6 * TAGS_PER_PAGE} == (
        host.counters.tags_copied_bytes
    )


def test_copy_tags_to_guest_faults_in_unmapped_pages_as_tagged(host: Host, mte_vm: str) -> None:
    """Writing tags maps unmapped plugged pages first, as a tag access: they become tagged."""
    write(host, mte_vm, BOOT_RAM_GPA, pattern(3))
    vm = host.get_vm(mte_vm)
    assert (3 * PAGE, 3 * PAGE) == (vm.mapped_bytes, vm.tagged_bytes)
    assert 1 == host.status().tag_blocks_reserved


def test_copy_tags_from_guest_reads_zeros_and_neither_maps_nor_tags(host: Host) -> None:
    """KVM_ARM_MTE_COPY_TAGS from the guest over pages without tags returns zeros ("No tags in
    memory, so write zeros", arch/arm64/kvm/guest.c) and neither maps nor tags them: a 32 MiB
    tag dump of an ON_TAG_ACCESS guest, as migration pre-copy makes, changes nothing."""
    host.create_vm(mte_config("ota", TagPolicy.ON_TAG_ACCESS))
    host.guest_fault("ota", BOOT_RAM_GPA, 16 * PAGE, Access.WRITE)  # mapped, untagged
    before = snapshot(host)
    assert bytes(32 * MiB // 16) == host.copy_tags("ota", BOOT_RAM_GPA, 32 * MiB, FROM)
    assert_unchanged(host, before)
    assert (16 * PAGE, 0) == (host.get_vm("ota").mapped_bytes, host.get_vm("ota").tagged_bytes)
    assert 0 == host.status().tag_blocks_reserved


def test_copy_tags_tags_on_tag_access_pages_mapped_untagged(host: Host) -> None:
    """For ON_TAG_ACCESS, copy_tags is the first tag access: READ-mapped pages become tagged."""
    host.create_vm(mte_config("ota", TagPolicy.ON_TAG_ACCESS))
    host.guest_fault("ota", BOOT_RAM_GPA, 2 * PAGE, Access.READ)
    assert (flags_of(host, "ota", BOOT_RAM_GPA, 2) == TG_DATA).all()
    tags = pattern(4)
    write(host, "ota", BOOT_RAM_GPA, tags)
    assert (flags_of(host, "ota", BOOT_RAM_GPA, 4) == TG_TAGGED).all()
    assert tags == read(host, "ota", BOOT_RAM_GPA, 4)


def test_new_pages_read_zero_tags(host: Host, mte_vm: str) -> None:
    """Pages mapped by a fault have all-zero tags (KVM sanitises them on first map)."""
    host.guest_fault(mte_vm, BOOT_RAM_GPA, 8 * PAGE, Access.WRITE)
    assert bytes(8 * TAGS_PER_PAGE) == read(host, mte_vm, BOOT_RAM_GPA, 8)
    assert 0 == len(host.mem.tags)


def test_tags_of_other_pages_are_untouched(host: Host, mte_vm: str) -> None:
    """Writing tags of one page leaves its neighbours' tags as they were."""
    write(host, mte_vm, BOOT_RAM_GPA, pattern(3, seed=1))
    write(host, mte_vm, BOOT_RAM_GPA + PAGE, pattern(1, seed=2))
    expected = pattern(3, seed=1)
    expected = expected[:TAGS_PER_PAGE] + pattern(1, seed=2) + expected[2 * TAGS_PER_PAGE :]
    assert expected == read(host, mte_vm, BOOT_RAM_GPA, 3)


def test_writing_zero_tags_stores_nothing(host: Host, mte_vm: str) -> None:
    """All-zero tags clear a page's stored tags."""
    write(host, mte_vm, BOOT_RAM_GPA, pattern(2))
    assert 2 == len(host.mem.tags)
    write(host, mte_vm, BOOT_RAM_GPA, bytes(2 * TAGS_PER_PAGE))
    assert 0 == len(host.mem.tags)


def test_tags_survive_evacuation_of_other_pages(small_host: Host) -> None:
    """Evacuating lent pages for a reservation does not disturb tags of tagged pages."""
    host = small_host
    host.create_vm(mte_config(boot_memory_bytes=MiB))
    tags = pattern(4)
    write(host, "mte", BOOT_RAM_GPA, tags)  # data pages 0..3, block 0
    # Data pages 4..127 free, tag pages of blocks 1..5 lent to 'plain', the rest in use.
    lay_out(host, [("span", 124), ("rest", SMALL_DATA_PAGES - 128), ("lent", 10)], ["span"])
    host.guest_fault("mte", BOOT_RAM_GPA + 4 * PAGE, 124 * PAGE, Access.WRITE)
    assert_sound(host)
    assert {"tag0": 2} == host.counters.evacuated_pages
    assert tags == read(host, "mte", BOOT_RAM_GPA, 4)
    assert bytes(124 * TAGS_PER_PAGE) == read(host, "mte", BOOT_RAM_GPA + 4 * PAGE, 124)


def test_tags_survive_migration_out_of_tag_storage(small_host: Host) -> None:
    """An ON_TAG_ACCESS page living in tag storage is moved to tagged memory by its first tag
    write; the tags written read back from the new page."""
    host = small_host
    host.create_vm(mte_config("ota", TagPolicy.ON_TAG_ACCESS, boot_memory_bytes=MiB))
    fill(host, "hog", SMALL_UNTAGGED_PAGES + SMALL_DATA_PAGES)
    host.guest_fault("ota", BOOT_RAM_GPA, 4 * PAGE, Access.WRITE)
    old = pages_of(host, "ota", BOOT_RAM_GPA, 4)
    host.destroy_vm("hog")
    tags = pattern(4)
    write(host, "ota", BOOT_RAM_GPA, tags)
    new = pages_of(host, "ota", BOOT_RAM_GPA, 4)
    assert not np.isin(new, old).any()
    assert {"tag_access": 4} == host.counters.page_migrations
    assert tags == read(host, "ota", BOOT_RAM_GPA, 4)
    assert new.tolist() == host.mem.tags.pages.tolist()


def test_tags_discarded_on_dimm_removal(host: Host, mte_vm: str) -> None:
    """Removing a DIMM discards its tags: the same DIMM added again reads zero tags."""
    gpa = host.add_dimm(mte_vm, "dimm0", 2 * MiB).gpa
    write(host, mte_vm, gpa, pattern(2))
    host.remove_memory_device(mte_vm, "dimm0")
    assert_sound(host)
    assert 0 == len(host.mem.tags)
    assert gpa == host.add_dimm(mte_vm, "dimm0", 2 * MiB).gpa
    assert bytes(2 * TAGS_PER_PAGE) == read(host, mte_vm, gpa, 2)


def test_tags_discarded_on_destroy(host: Host, mte_vm: str) -> None:
    """Destroying a VM discards its tags: a new VM with the same id reads zero tags."""
    write(host, mte_vm, BOOT_RAM_GPA, pattern(3))
    host.destroy_vm(mte_vm)
    assert_sound(host)
    assert 0 == len(host.mem.tags)
    host.create_vm(mte_config())
    assert bytes(3 * TAGS_PER_PAGE) == read(host, mte_vm, BOOT_RAM_GPA, 3)


@pytest.mark.parametrize(
    "tags",
    [b"", bytes(TAGS_PER_PAGE - 1), bytes(TAGS_PER_PAGE + 1), bytes(2 * TAGS_PER_PAGE)],
)
def test_wrong_tags_length_is_invalid_and_changes_nothing(
    host: Host, mte_vm: str, tags: bytes
) -> None:
    """TO_GUEST needs exactly length/16 tag bytes; otherwise InvalidArgument 'tags', no change."""
    before = snapshot(host)
    with pytest.raises(InvalidArgumentError) as info:
        host.copy_tags(mte_vm, BOOT_RAM_GPA, PAGE, TO, tags)
    assert "tags" == info.value.field
    assert f"{len(tags)} bytes" == info.value.value
    assert_unchanged(host, before)
    assert 0 == host.get_vm(mte_vm).mapped_bytes


@pytest.mark.parametrize("bad", [16, 0x80, 0xFF])
def test_tag_value_above_15_is_invalid_and_changes_nothing(
    host: Host, mte_vm: str, bad: int
) -> None:
    """A tag is 4 bits: a byte above 15 is InvalidArgument naming its index, nothing changes."""
    write(host, mte_vm, BOOT_RAM_GPA, pattern(1))
    before = snapshot(host)
    tags = bytearray(pattern(1, seed=7))
    tags[37] = bad
    with pytest.raises(InvalidArgumentError) as info:
        host.copy_tags(mte_vm, BOOT_RAM_GPA, PAGE, TO, bytes(tags))
    assert "tags" == info.value.field
    assert f"tags[37]={bad:#x}" == info.value.value
    assert_unchanged(host, before)
    assert pattern(1) == read(host, mte_vm, BOOT_RAM_GPA, 1)


def test_copy_tags_on_non_mte_vm_is_failed_precondition(host: Host) -> None:
    """A non-MTE VM has no tags: copy_tags is FailedPrecondition VM_NOT_MTE, nothing mapped."""
    host.create_vm(VmConfig("plain", False))
    before = snapshot(host)
    for direction, tags in ((FROM, b""), (TO, bytes(TAGS_PER_PAGE))):
        with pytest.raises(FailedPreconditionError) as info:
            host.copy_tags("plain", BOOT_RAM_GPA, PAGE, direction, tags)
        assert "VM_NOT_MTE" == info.value.reason
    assert_unchanged(host, before)


@pytest.mark.parametrize(
    ("gpa", "length", "field"),
    [
        (BOOT_RAM_GPA + 16, PAGE, "gpa"),
        (BOOT_RAM_GPA, 16, "length"),
        (BOOT_RAM_GPA, 0, "length"),
        (BOOT_RAM_GPA, 32 * MiB + PAGE, "length"),
    ],
)
def test_bad_copy_tags_range_is_invalid(
    host: Host, mte_vm: str, gpa: int, length: int, field: str
) -> None:
    """copy_tags needs a page-aligned, non-empty range of at most 32 MiB."""
    with pytest.raises(InvalidArgumentError) as info:
        host.copy_tags(mte_vm, gpa, length, FROM)
    assert field == info.value.field


def test_copy_tags_outside_plugged_memory_is_failed_precondition(host: Host, mte_vm: str) -> None:
    """copy_tags on memory that is not plugged is FailedPrecondition GPA_NOT_PLUGGED."""
    with pytest.raises(FailedPreconditionError) as info:
        host.copy_tags(mte_vm, DEVICE_GPA, PAGE, FROM)
    assert "GPA_NOT_PLUGGED" == info.value.reason


# ----------------------------------------------------------------- TagContents


def rows(*values: int) -> np.ndarray:
    """One row of tags per value (every tag of the row set to that value)."""
    return np.repeat(np.array(values, dtype=np.uint8)[:, None], TAGS_PER_PAGE, axis=1)


def test_tag_contents_write_then_read() -> None:
    """Written rows read back; pages never written read as zeros."""
    t = TagContents(PAGE)
    t.write(np.array([7, 3]), rows(1, 2))
    assert rows(2, 0, 1).tolist() == t.read(np.array([3, 5, 7])).tolist()
    assert [3, 7] == t.pages.tolist()
    assert 2 == len(t)


def test_tag_contents_zero_rows_are_not_stored() -> None:
    """An all-zero row is not stored, and overwrites what was there."""
    t = TagContents(PAGE)
    t.write(np.array([1, 2]), rows(0, 4))
    assert [2] == t.pages.tolist()
    t.write(np.array([2]), rows(0))
    assert 0 == len(t)


def test_tag_contents_discard() -> None:
    """Discarded pages read as zero; others keep their tags."""
    t = TagContents(PAGE)
    t.write(np.array([1, 2, 3]), rows(1, 2, 3))
    t.discard(np.array([2, 9]))
    assert rows(1, 0, 3).tolist() == t.read(np.array([1, 2, 3])).tolist()


def test_tag_contents_move() -> None:
    """move gives dst the tags of src; src reads zero after; pages without tags move nothing."""
    t = TagContents(PAGE)
    t.write(np.array([10, 20]), rows(5, 6))
    t.move(np.array([20, 30, 10]), np.array([2, 3, 1]))
    assert [1, 2] == t.pages.tolist()
    assert rows(5, 6, 0, 0, 0).tolist() == t.read(np.array([1, 2, 3, 10, 20])).tolist()


def test_tag_contents_state_round_trip() -> None:
    """state() / restore() keep every page's tags."""
    t = TagContents(PAGE)
    t.write(np.array([4, 1]), rows(9, 8))
    u = TagContents(PAGE)
    u.restore(*t.state())
    assert t.read(np.arange(6)).tolist() == u.read(np.arange(6)).tolist()


def test_tag_contents_pages_view_is_read_only() -> None:
    """The pages view cannot be written through."""
    t = TagContents(PAGE)
    t.write(np.array([1]), rows(1))
    with pytest.raises(ValueError):
        t.pages[0] = 5
