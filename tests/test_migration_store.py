"""Migration state is durable: every step is journaled and replayed after a crash, on both
sides, and the replayed hosts carry on (hostd.store with hostd.model.migration)."""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path

import pytest

from hostd.api.requests import WALL_CLOCK_ARG, RequestWindow
from hostd.model import (
    BOOT_RAM_GPA,
    Access,
    GiB,
    Host,
    InvalidArgumentError,
    MiB,
    TagCopyDirection,
    TagPolicy,
    VirtioMemConfig,
    VirtioMemRequestType,
    VmConfig,
    default_topology,
)
from hostd.model.migration import MigrationPhase, TagChunk
from hostd.store import Store

TOPOLOGY = default_topology(1 * GiB)
TAGS = bytes(i % 16 for i in range(4096 // 16))


def call(store: Store, method: str, *args: object) -> object:
    """What the servicer does: record the call ahead, call the model, commit on success (abort
    on a refusal)."""
    ticket = store.begin(method, args)
    try:
        result = getattr(store.host, method)(*args)
    except BaseException:
        if ticket is not None:
            store.abort(ticket)
        raise
    if ticket is not None:
        store.commit(ticket)
    return result


def test_migration_steps_survive_a_crash_of_both_daemons(tmp_path: Path) -> None:
    """Source and destination killed mid-transfer come back in the same phase, with the same
    chunks applied, and finish the migration."""
    src = Store.open(tmp_path / "src", TOPOLOGY)
    dst = Store.open(tmp_path / "dst", TOPOLOGY)
    call(src, "create_vm", VmConfig("vm", True, TagPolicy.ON_FAULT, 32 * MiB, 1, 32 * MiB + GiB))
    call(src, "guest_fault", "vm", BOOT_RAM_GPA, 8 * MiB, Access.WRITE)
    call(src, "copy_tags", "vm", BOOT_RAM_GPA, 4096, TagCopyDirection.TO_GUEST, TAGS)
    dev = call(src, "add_virtio_mem", "vm", "vmem0", VirtioMemConfig(64 * MiB, 2 * MiB, 4 * MiB))
    gpa = dev.gpa  # type: ignore[attr-defined]
    call(src, "virtio_mem_request", "vm", "vmem0", VirtioMemRequestType.PLUG, gpa, 1)
    manifest = call(src, "start_migration", "vm", "m1", 100.0, 30.0)
    call(dst, "admit_migration", manifest, 100.0, 30.0)
    chunk = call(src, "read_migration_chunk", "vm", "m1", 100.5)
    call(dst, "write_migration_chunk", "vm", "m1", chunk, 100.5)
    call(src, "pause_migration", "vm", "m1", 101.0)
    src.close(snapshot=False)
    dst.close(snapshot=False)

    src = Store.open(tmp_path / "src", TOPOLOGY)
    dst = Store.open(tmp_path / "dst", TOPOLOGY)
    try:
        assert MigrationPhase.PAUSED == src.host.get_migration("vm").phase
        assert 1 == dst.host.get_migration("vm").chunks
        assert 131.0 == src.host.get_migration("vm").deadline
        while (c := call(src, "read_migration_chunk", "vm", "m1", 102.0)) is not None:
            call(dst, "write_migration_chunk", "vm", "m1", c, 102.0)
        call(src, "next_migration_round", "vm", "m1", 102.0)
        call(src, "handover_migration", "vm", "m1", 102.0)
        call(dst, "commit_migration", "vm", "m1")
        call(src, "complete_migration", "vm", "m1")
        assert "vm" not in src.host.vms
        assert TAGS == dst.host.copy_tags("vm", BOOT_RAM_GPA, 4096, TagCopyDirection.FROM_GUEST)
        assert [] == src.host.check_invariants() == dst.host.check_invariants()
    finally:
        src.close()
        dst.close()


def test_a_retried_migration_step_matches_its_first_call_whatever_the_time() -> None:
    """A retry of a migration step arrives later than the call it repeats: its request_id
    finds the first answer (the wall-clock argument is not part of the call's fingerprint),
    while another VM or migration under the same id is still refused REQUEST_ID_REUSED."""
    window = RequestWindow()
    window.remember("r1", "commit_migration", ("vm", "m", 100.0), "answer")
    assert "answer" == window.lookup("r1", "commit_migration", ("vm", "m", 107.5))
    with pytest.raises(InvalidArgumentError, match="first used for another call"):
        window.lookup("r1", "commit_migration", ("vm", "other", 100.0))
    for method, position in WALL_CLOCK_ARG.items():
        parameters = list(inspect.signature(getattr(Host, method)).parameters)
        assert "now" == parameters[position + 1], method  # after self


def test_a_retried_chunk_matches_its_first_call_and_another_chunk_under_its_id_is_refused() -> None:
    """A chunk is named by its header and checksum: the same chunk sent again finds the first
    answer; another chunk (other tags, so another checksum; or another seq) under the same
    request_id is refused REQUEST_ID_REUSED."""

    def chunk(seq: int, tags: bytes) -> TagChunk:
        c = TagChunk(seq, 1, 0, 1, b"\x80", b"\x80", b"\x80", b"\x80", tags, 0)
        return replace(c, checksum=c.compute_checksum())

    first = chunk(0, bytes(range(128)))
    window = RequestWindow()
    window.remember("r1", "write_migration_chunk", ("vm", "m", first, 100.0), "answer")
    again = chunk(0, bytes(range(128)))
    assert "answer" == window.lookup("r1", "write_migration_chunk", ("vm", "m", again, 101.0))
    for other in (chunk(0, bytes(range(1, 129))), chunk(1, bytes(range(128)))):
        with pytest.raises(InvalidArgumentError, match="first used for another call"):
            window.lookup("r1", "write_migration_chunk", ("vm", "m", other, 101.0))
