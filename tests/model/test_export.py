"""The export is built a chunk of pages at a time and equals the whole-array export.

``reference_export`` is the export as it was over whole arrays. The chunked one must produce
the same records in the same order on a busy host, on a fragmented one (extents and mapping
runs cut at every few pages, across chunk and group edges), and on broken states (a page
mapped twice, a page owned but not mapped), with chunks of a few pages and the default.
"""

from __future__ import annotations

import itertools
import random

import pytest

from hostd.model import BOOT_RAM_GPA, Access, Host, MiB, VmConfig, export

from . import reference_export
from .conftest import PAGE, assert_sound
from .test_invariants import CORRUPTIONS, _busy

CHUNKS = [8, 40, export.EXPORT_CHUNK_PAGES]


def _fragmented(host: Host) -> Host:
    """Guests faulted in random small ranges, interleaved, some destroyed: short extents."""
    rng = random.Random(8)
    for i in range(6):
        host.create_vm(VmConfig(f"g{i}", i % 2 == 0, boot_memory_bytes=8 * MiB))
    for _ in range(400):
        vm = f"g{rng.randrange(6)}"
        page = rng.randrange(2048 - 8)
        host.guest_fault(vm, BOOT_RAM_GPA + page * PAGE, rng.randrange(1, 8) * PAGE, Access.WRITE)
    host.destroy_vm("g3")
    assert_sound(host)
    return host


@pytest.mark.parametrize("chunk_pages", CHUNKS)
@pytest.mark.parametrize("state", ["busy", "fragmented"])
def test_a_chunked_export_equals_the_whole_array_export(
    small_host: Host, state: str, chunk_pages: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = _busy(small_host) if state == "busy" else _fragmented(small_host)
    expected = reference_export.export_state(host)
    assert len(expected.page_extents) > 20
    monkeypatch.setattr(export, "EXPORT_CHUNK_PAGES", chunk_pages)
    assert expected == host.export_state()


@pytest.mark.parametrize(
    "corruption", ["mapped twice", "owned, not mapped", "mapped by the wrong VM", "dead owner"]
)
def test_a_chunked_export_of_a_broken_state_equals_the_whole_array_export(
    small_host: Host, corruption: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export shows a broken state as it is (for debugging it), the same way as before."""
    host = _busy(small_host)
    CORRUPTIONS[corruption][0](host)
    expected = reference_export.export_state(host)
    monkeypatch.setattr(export, "EXPORT_CHUNK_PAGES", 40)
    assert expected == host.export_state()


@pytest.mark.parametrize("keep", [0, 1 << 20])
def test_the_streamed_export_counts_its_records_first_whether_it_keeps_them_or_not(
    small_host: Host, keep: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header's counts come before the records: a first pass counts them and keeps them
    when they are few; when they are many, a second pass produces them again."""
    host = _fragmented(small_host)
    expected = reference_export.export_state(host)
    monkeypatch.setattr(export, "EXPORT_CHUNK_PAGES", 40)
    monkeypatch.setattr(export, "EXPORT_KEEP_RECORDS", keep)
    stream = export.stream(host)
    assert (
        len(expected.page_extents),
        len(expected.reserved_tag_blocks),
        len(expected.mapping_runs),
    ) == (stream.page_extent_count, stream.reserved_tag_block_count, stream.mapping_run_count)
    assert list(expected.page_extents) == list(stream.page_extents)
    assert list(expected.reserved_tag_blocks) == list(stream.reserved_tag_blocks)
    assert list(expected.mapping_runs) == list(stream.mapping_runs)


def test_records_come_a_few_at_a_time(small_host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """No chunk holds more than ``EXPORT_RECORDS_PER_CHUNK`` records (the export never builds
    them all at once), and together they are the whole export."""
    host = _fragmented(small_host)
    expected = reference_export.export_state(host)
    monkeypatch.setattr(export, "EXPORT_CHUNK_PAGES", 4096)
    monkeypatch.setattr(export, "EXPORT_RECORDS_PER_CHUNK", 16)
    for produce, records in (
        (export.page_extents, expected.page_extents),
        (export.reserved_tag_blocks, expected.reserved_tag_blocks),
        (export.mapping_runs, expected.mapping_runs),
    ):
        chunks = list(produce(host))
        assert max(len(c) for c in chunks) <= 16
        assert list(records) == list(itertools.chain.from_iterable(chunks))
