"""Live migration between two modelled hosts (DOMAIN.md §6): admission before anything moves,
tags in checksummed chunks, dirty tracking over pre-copy rounds, a paused final round, commit,
and abort/expiry returning both hosts to where they were."""

from __future__ import annotations

from dataclasses import replace
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostd.model import (
    Access,
    FailedPreconditionError,
    GiB,
    Host,
    InvalidArgumentError,
    MiB,
    NotFoundError,
    ResourceExhaustedError,
    TagCopyDirection,
    TagPolicy,
    TagStoreError,
    VirtioMemConfig,
    VirtioMemRequestType,
    VirtioMemResponse,
    VmConfig,
    default_topology,
    migration,
)
from hostd.model.migration import (
    MigrationManifest,
    MigrationPhase,
    TagChunk,
    pack_tags,
    unpack_tags,
)
from hostd.model.types import BOOT_RAM_GPA

from .conftest import assert_sound, assert_unchanged, snapshot

MIG = "mig-1"
T0 = 1000.0
TIMEOUT = 30.0


def new_host(memory: int = 4 * GiB) -> Host:
    return Host(default_topology(memory))


def build_vm(host: Host, vm_id: str, mte: bool, policy: TagPolicy) -> dict[str, int]:
    """A VM with boot RAM partly faulted, a DIMM, a partly plugged virtio-mem device and
    written tags (MTE). Returns the gpas it used."""
    host.create_vm(
        VmConfig(
            vm_id,
            mte,
            policy,
            boot_memory_bytes=64 * MiB,
            dimm_slots=2,
            max_memory_bytes=64 * MiB + GiB,
        )
    )
    dimm = host.add_dimm(vm_id, "dimm0", 32 * MiB).gpa
    # A removed DIMM leaves a hole: the destination must keep the addresses, not re-place.
    host.add_dimm(vm_id, "dimm1", 16 * MiB)
    host.remove_memory_device(vm_id, "dimm1")
    vmem = host.add_virtio_mem(vm_id, "vmem0", VirtioMemConfig(256 * MiB, 2 * MiB, 8 * MiB)).gpa
    for i in (0, 2, 3):
        answer = host.virtio_mem_request(
            vm_id, "vmem0", VirtioMemRequestType.PLUG, vmem + i * 2 * MiB, 1
        )
        assert VirtioMemResponse.ACK == answer.response
    host.guest_fault(vm_id, BOOT_RAM_GPA, 16 * MiB, Access.WRITE)
    host.guest_fault(vm_id, dimm, 8 * MiB, Access.WRITE)
    host.guest_fault(vm_id, vmem, 2 * MiB, Access.WRITE)
    if mte:
        rng = np.random.default_rng(7)
        for gpa, length in ((BOOT_RAM_GPA + MiB, 2 * MiB), (vmem + 4 * MiB, MiB)):
            tags = rng.integers(0, 16, length // 16, dtype=np.uint8)
            tags[: length // 32] = 0  # the first half of the range keeps all-zero tags
            host.copy_tags(vm_id, gpa, length, TagCopyDirection.TO_GUEST, tags.tobytes())
    assert_sound(host)
    return {"dimm": dimm, "vmem": vmem}


def view(host: Host, vm_id: str) -> dict[str, Any]:
    """What a VM sees: layout, mapped/tagged bytes, which pages are mapped/tagged, tags."""
    vm = host.vms[vm_id]
    status = host.get_vm(vm_id)
    offs = np.flatnonzero(vm.stage2)
    pages = vm.stage2[offs].astype(np.int64) - 1
    tagged = host.mem.flags[pages] == 6
    return {
        "status": status,
        "mapped": offs.tolist(),
        "tagged": offs[tagged].tolist(),
        "tags": host.mem.tags.read(pages).tobytes(),
        "plugged": {d.device_id: d.plugged.tolist() for d in vm.devices.values()},
    }


def send_round(src: Host, dst: Host, vm_id: str, now: float = T0) -> int:
    n = 0
    while (chunk := src.read_migration_chunk(vm_id, MIG, now)) is not None:
        dst.write_migration_chunk(vm_id, MIG, chunk, now)
        n += 1
    return n


def migrate(src: Host, dst: Host, vm_id: str) -> None:
    manifest = src.start_migration(vm_id, MIG, T0, TIMEOUT)
    dst.admit_migration(manifest, T0, TIMEOUT)
    send_round(src, dst, vm_id)
    src.next_migration_round(vm_id, MIG, T0)
    send_round(src, dst, vm_id)
    src.pause_migration(vm_id, MIG, T0)
    src.next_migration_round(vm_id, MIG, T0)
    send_round(src, dst, vm_id)
    src.handover_migration(vm_id, MIG, T0)
    dst.commit_migration(vm_id, MIG)
    src.complete_migration(vm_id, MIG)


POLICIES = [
    pytest.param(True, TagPolicy.ON_FAULT, id="on-fault"),
    pytest.param(True, TagPolicy.EAGER, id="eager"),
    pytest.param(True, TagPolicy.ON_TAG_ACCESS, id="on-tag-access"),
    pytest.param(False, TagPolicy.ON_FAULT, id="non-mte"),
]


@pytest.mark.parametrize(("mte", "policy"), POLICIES)
def test_migrated_vm_keeps_layout_mapped_and_tagged_bytes_and_tags(
    mte: bool, policy: TagPolicy
) -> None:
    """After commit the destination holds the VM exactly as the source did (devices, plugged
    blocks, mapped and tagged pages, tag contents); the source holds nothing of it."""
    src, dst = new_host(), new_host()
    build_vm(src, "vm", mte, policy)
    before = view(src, "vm")
    free_before = src.status().usage
    migrate(src, dst, "vm")
    assert before == view(dst, "vm")
    assert "vm" not in src.vms
    assert {} == src.migrations == dst.migrations
    assert 0 == src.status().usage.tagged_bytes
    assert free_before.total_bytes == src.status().usage.total_bytes
    assert 0 == src.status().usage.tag_reserved_bytes
    assert_sound(src)
    assert_sound(dst)


def test_admission_short_of_taggable_memory_is_refused_naming_the_shortfall() -> None:
    """A destination that cannot back the VM refuses before anything moves, saying which
    resource is short and by how many bytes; neither host changes."""
    src, dst = new_host(), new_host(1 * GiB)
    src.create_vm(VmConfig("big", True, TagPolicy.EAGER, boot_memory_bytes=2 * GiB))
    manifest = src.start_migration("big", MIG, T0, TIMEOUT)
    before = snapshot(dst)
    with pytest.raises(ResourceExhaustedError) as refusal:
        dst.admit_migration(manifest, T0, TIMEOUT)
    assert "taggable_memory" == refusal.value.resource
    assert int(refusal.value.metadata["short_bytes"], 0) > 0
    assert "short by" in str(refusal.value)
    assert_unchanged(dst, before)
    assert "big" not in dst.vms
    src.abort_migration("big", MIG)
    assert_sound(src)


def sparse_vm(host: Host, vm_id: str, plugged: int) -> int:
    """An ON_FAULT MTE VM with ``plugged`` bytes of virtio-mem plugged (no prealloc) but only
    16 MiB of it (and 16 MiB of boot RAM) mapped. Returns the device's gpa."""
    host.create_vm(
        VmConfig(
            vm_id, True, TagPolicy.ON_FAULT, boot_memory_bytes=64 * MiB, max_memory_bytes=8 * GiB
        )
    )
    gpa = host.add_virtio_mem(vm_id, "vmem0", VirtioMemConfig(4 * GiB, 2 * MiB, plugged)).gpa
    answer = host.virtio_mem_request(
        vm_id, "vmem0", VirtioMemRequestType.PLUG, gpa, plugged // (2 * MiB)
    )
    assert VirtioMemResponse.ACK == answer.response
    host.guest_fault(vm_id, BOOT_RAM_GPA, 16 * MiB, Access.WRITE)
    host.guest_fault(vm_id, gpa, 16 * MiB, Access.WRITE)
    return gpa


def test_admission_that_fits_the_mapped_pages_but_not_the_plugged_blocks_is_refused() -> None:
    """Plugged blocks the source has not mapped yet count like mapped ones: a destination that
    could back the 32 MiB mapped but not the 1.5 GiB plugged refuses, naming the shortfall."""
    src, dst = new_host(8 * GiB), new_host(1 * GiB)
    sparse_vm(src, "vm", 3 * GiB // 2)
    manifest = src.start_migration("vm", MIG, T0, TIMEOUT)
    free_taggable = dst.mem.free_pages(4) * dst.page_size
    before = snapshot(dst)
    with pytest.raises(ResourceExhaustedError) as refusal:
        dst.admit_migration(manifest, T0, TIMEOUT)
    meta = refusal.value.metadata
    assert "taggable_memory" == refusal.value.resource
    assert 64 * MiB + 3 * GiB // 2 == int(meta["needed_bytes"], 0)
    assert free_taggable == int(meta["available_bytes"], 0)
    assert 64 * MiB + 3 * GiB // 2 - free_taggable == int(meta["short_bytes"], 0)
    assert_unchanged(dst, before)
    assert 1 == dst.counters.migrations[("INCOMING", "refused")]


def test_the_lease_holds_every_plugged_block_until_abort_or_expiry() -> None:
    """Admission backs the plugged blocks the source has not mapped: while the lease runs no
    other VM can take that memory, pages the guest maps during pre-copy arrive without a new
    allocation, and abort or expiry give all of it back."""
    src, dst = new_host(8 * GiB), new_host(4 * GiB)
    gpa = sparse_vm(src, "vm", GiB)
    dst_before = snapshot(dst)
    free_before = dst.status().usage
    # A VM that fits in the taggable memory the destination has now, but not beside the lease.
    fits_now = (dst.mem.free_pages(4) * dst.page_size - 512 * MiB) // (2 * MiB) * (2 * MiB)
    other = VmConfig("other", True, TagPolicy.EAGER, boot_memory_bytes=fits_now)
    for ending in ("abort", "expiry"):
        dst.admit_migration(src.start_migration("vm", MIG, T0, TIMEOUT), T0, TIMEOUT)
        held = free_before.free_bytes - dst.status().usage.free_bytes
        assert 64 * MiB + GiB <= held  # every plugged page, not only the 32 MiB mapped
        assert_sound(dst)
        with pytest.raises(ResourceExhaustedError):
            dst.create_vm(other)
        assert "other" not in dst.vms
        send_round(src, dst, "vm")
        src.guest_fault("vm", gpa + 512 * MiB, 8 * MiB, Access.WRITE)  # plugged, not mapped
        src.next_migration_round("vm", MIG, T0)
        usage = dst.status().usage
        send_round(src, dst, "vm")
        assert usage == dst.status().usage  # the held pages became the guest's pages
        if ending == "abort":
            dst.abort_migration("vm", MIG)
        else:
            assert ["vm"] == [m.vm_id for m in dst.expire_migrations(T0 + 2 * TIMEOUT)]
        src.abort_migration("vm", MIG)
        assert_unchanged(dst, dst_before)
        assert_sound(dst)
    dst.create_vm(other)
    dst.destroy_vm("other")


def test_commit_gives_back_the_held_pages_the_source_never_mapped() -> None:
    """After commit the destination maps exactly what the source mapped: the plugged blocks
    it held for the lease and no chunk described go back to the host."""
    src, dst = new_host(8 * GiB), new_host(4 * GiB)
    gpa = sparse_vm(src, "vm", GiB)
    free_before = dst.status().usage.free_bytes
    manifest = src.start_migration("vm", MIG, T0, TIMEOUT)
    dst.admit_migration(manifest, T0, TIMEOUT)
    send_round(src, dst, "vm")
    src.guest_fault("vm", gpa + 512 * MiB, 8 * MiB, Access.WRITE)
    src.pause_migration("vm", MIG, T0)
    src.next_migration_round("vm", MIG, T0)
    send_round(src, dst, "vm")
    src.handover_migration("vm", MIG, T0)
    before = view(src, "vm")
    dst.commit_migration("vm", MIG)
    src.complete_migration("vm", MIG)
    assert before == view(dst, "vm")
    assert 40 * MiB == dst.get_vm("vm").mapped_bytes
    assert free_before - dst.status().usage.free_bytes < 64 * MiB
    assert_sound(dst)


def test_chunk_with_bad_checksum_is_refused_and_changes_nothing() -> None:
    """A damaged chunk is refused (INVALID_ARGUMENT on ``checksum``) and the destination keeps
    expecting it: the same chunk resent intact is applied."""
    src, dst = new_host(), new_host()
    build_vm(src, "vm", True, TagPolicy.ON_FAULT)
    dst.admit_migration(src.start_migration("vm", MIG, T0, TIMEOUT), T0, TIMEOUT)
    chunk = src.read_migration_chunk("vm", MIG, T0)
    assert chunk is not None
    damaged = replace(chunk, tags=bytes([chunk.tags[0] ^ 1]) + chunk.tags[1:])
    before = snapshot(dst)
    with pytest.raises(InvalidArgumentError) as refusal:
        dst.write_migration_chunk("vm", MIG, damaged, T0)
    assert "checksum" == refusal.value.field
    assert_unchanged(dst, before)
    assert 0 == dst.get_migration("vm").chunks
    dst.write_migration_chunk("vm", MIG, chunk, T0)
    assert 1 == dst.get_migration("vm").chunks


def test_chunk_resent_after_a_lost_reply_is_applied_once() -> None:
    """Writing the same chunk twice acknowledges it again without effect."""
    src, dst = new_host(), new_host()
    build_vm(src, "vm", True, TagPolicy.ON_FAULT)
    dst.admit_migration(src.start_migration("vm", MIG, T0, TIMEOUT), T0, TIMEOUT)
    chunk = src.read_migration_chunk("vm", MIG, T0)
    assert chunk is not None
    dst.write_migration_chunk("vm", MIG, chunk, T0)
    assert 1 == dst.write_migration_chunk("vm", MIG, chunk, T0).chunks


def test_tag_writes_and_faults_during_precopy_reach_the_destination() -> None:
    """Pages faulted, tagged or whose tags are written on the source after they were sent are
    dirty and go again in the next round."""
    src, dst = new_host(), new_host()
    gpas = build_vm(src, "vm", True, TagPolicy.ON_FAULT)
    dst.admit_migration(src.start_migration("vm", MIG, T0, TIMEOUT), T0, TIMEOUT)
    send_round(src, dst, "vm")
    src.guest_fault("vm", gpas["dimm"] + 16 * MiB, 4 * MiB, Access.WRITE)
    tags = np.full(MiB // 16, 0xA, np.uint8).tobytes()
    src.copy_tags("vm", BOOT_RAM_GPA + 8 * MiB, MiB, TagCopyDirection.TO_GUEST, tags)
    assert (4 * MiB + MiB) // src.page_size == src.get_migration("vm").dirty_pages
    assert 0 < src.next_migration_round("vm", MIG, T0)
    send_round(src, dst, "vm")
    src.pause_migration("vm", MIG, T0)
    assert 0 == src.next_migration_round("vm", MIG, T0)
    expected = view(src, "vm")
    src.handover_migration("vm", MIG, T0)
    dst.commit_migration("vm", MIG)
    src.complete_migration("vm", MIG)
    assert expected == view(dst, "vm")
    read = dst.copy_tags("vm", BOOT_RAM_GPA + 8 * MiB, MiB, TagCopyDirection.FROM_GUEST)
    assert tags == read
    assert_sound(dst)


def test_paused_vm_refuses_faults_and_tag_writes_naming_the_phase() -> None:
    """While paused for the final round the source refuses the VM's faults and tag copies with
    FAILED_PRECONDITION naming the phase, and changes nothing."""
    src = new_host()
    build_vm(src, "vm", True, TagPolicy.ON_FAULT)
    src.start_migration("vm", MIG, T0, TIMEOUT)
    src.pause_migration("vm", MIG, T0)
    before = snapshot(src)
    with pytest.raises(FailedPreconditionError) as refusal:
        src.guest_fault("vm", BOOT_RAM_GPA + 32 * MiB, MiB, Access.WRITE)
    assert "PAUSED" == refusal.value.metadata["phase"]
    with pytest.raises(FailedPreconditionError, match="PAUSED"):
        src.copy_tags("vm", BOOT_RAM_GPA, 4096, TagCopyDirection.FROM_GUEST)
    assert_unchanged(src, before)


def test_migrating_vm_answers_virtio_mem_busy_and_refuses_device_changes() -> None:
    """While a migration runs, virtio-mem requests answer BUSY (as QEMU), and memory devices
    cannot be added, removed or resized (FAILED_PRECONDITION)."""
    src = new_host()
    gpas = build_vm(src, "vm", True, TagPolicy.ON_FAULT)
    src.start_migration("vm", MIG, T0, TIMEOUT)
    answer = src.virtio_mem_request("vm", "vmem0", VirtioMemRequestType.PLUG, gpas["vmem"], 1)
    assert VirtioMemResponse.BUSY == answer.response
    with pytest.raises(FailedPreconditionError, match="migrating"):
        src.add_dimm("vm", "dimm9", 2 * MiB)
    with pytest.raises(FailedPreconditionError, match="migrating"):
        src.remove_memory_device("vm", "dimm0")
    with pytest.raises(FailedPreconditionError, match="migrating"):
        src.resize_virtio_mem("vm", "vmem0", 0)
    src.abort_migration("vm", MIG)
    answer = src.virtio_mem_request("vm", "vmem0", VirtioMemRequestType.STATE, gpas["vmem"], 1)
    assert VirtioMemResponse.ACK == answer.response


@pytest.mark.parametrize("step", ["admitted", "one-chunk", "paused"])
def test_abort_returns_both_hosts_to_their_state_before_the_migration(step: str) -> None:
    """Aborting on both sides at any step before the handover leaves both hosts' pages, tags,
    VMs and tag blocks as they were, and the VM running on the source."""
    src, dst = new_host(), new_host()
    build_vm(src, "vm", True, TagPolicy.ON_FAULT)
    src_before, dst_before = snapshot(src), snapshot(dst)
    dst.admit_migration(src.start_migration("vm", MIG, T0, TIMEOUT), T0, TIMEOUT)
    if step != "admitted":
        chunk = src.read_migration_chunk("vm", MIG, T0)
        assert chunk is not None
        dst.write_migration_chunk("vm", MIG, chunk, T0)
    if step == "paused":
        src.pause_migration("vm", MIG, T0)
    dst.abort_migration("vm", MIG)
    src.abort_migration("vm", MIG)
    assert_unchanged(src, src_before)
    assert_unchanged(dst, dst_before)
    src.guest_fault("vm", BOOT_RAM_GPA + 32 * MiB, MiB, Access.WRITE)


def test_lease_expiry_drops_the_incoming_vm() -> None:
    """A destination whose lease runs out drops the incoming VM and everything reserved."""
    src, dst = new_host(), new_host()
    build_vm(src, "vm", True, TagPolicy.EAGER)
    dst_before = snapshot(dst)
    dst.admit_migration(src.start_migration("vm", MIG, T0, TIMEOUT), T0, 5.0)
    assert [] == dst.expire_migrations(T0 + 4.0)
    ended = dst.expire_migrations(T0 + 6.0)
    assert ["vm"] == [m.vm_id for m in ended]
    assert_unchanged(dst, dst_before)
    assert 1 == dst.counters.migrations[("INCOMING", "expired")]


def test_silent_client_resumes_the_source_vm_but_not_after_handover() -> None:
    """A source that hears nothing before its deadline resumes the (paused) VM; once it handed
    over it waits for complete or abort, because the destination may own the VM."""
    src = new_host()
    build_vm(src, "vm", True, TagPolicy.ON_FAULT)
    src.start_migration("vm", MIG, T0, TIMEOUT)
    src.pause_migration("vm", MIG, T0)
    assert ["vm"] == [m.vm_id for m in src.expire_migrations(T0 + TIMEOUT + 1)]
    src.guest_fault("vm", BOOT_RAM_GPA + 32 * MiB, MiB, Access.WRITE)
    src.start_migration("vm", "mig-2", T0, TIMEOUT)
    src.pause_migration("vm", "mig-2", T0)
    while src.read_migration_chunk("vm", "mig-2", T0) is not None:
        pass
    src.next_migration_round("vm", "mig-2", T0)
    src.handover_migration("vm", "mig-2", T0)
    assert [] == src.expire_migrations(T0 + 10 * TIMEOUT)
    assert MigrationPhase.HANDOVER == src.get_migration("vm").phase


def test_handover_refused_while_pages_are_unsent() -> None:
    """The source cannot hand over before the final round is sent."""
    src = new_host()
    build_vm(src, "vm", True, TagPolicy.ON_FAULT)
    src.start_migration("vm", MIG, T0, TIMEOUT)
    src.pause_migration("vm", MIG, T0)
    with pytest.raises(FailedPreconditionError, match="not sent"):
        src.handover_migration("vm", MIG, T0)


def test_migration_state_survives_save_and_restore_on_both_hosts() -> None:
    """Both hosts saved and restored mid-transfer carry on where they were and commit."""
    src, dst = new_host(), new_host()
    build_vm(src, "vm", True, TagPolicy.ON_TAG_ACCESS)
    expected = view(src, "vm")
    dst.admit_migration(src.start_migration("vm", MIG, T0, TIMEOUT), T0, TIMEOUT)
    chunk = src.read_migration_chunk("vm", MIG, T0)
    assert chunk is not None
    dst.write_migration_chunk("vm", MIG, chunk, T0)
    src, dst = Host.restore(src.save_state()), Host.restore(dst.save_state())
    assert_sound(src)
    assert_sound(dst)
    assert 1 == dst.get_migration("vm").chunks
    send_round(src, dst, "vm")
    src.pause_migration("vm", MIG, T0)
    src.next_migration_round("vm", MIG, T0)
    send_round(src, dst, "vm")
    src.handover_migration("vm", MIG, T0)
    src = Host.restore(src.save_state())
    dst.commit_migration("vm", MIG)
    src.complete_migration("vm", MIG)
    assert expected == view(dst, "vm")
    assert_sound(dst)


def test_unknown_migration_is_not_found() -> None:
    """Steps of a migration this host does not know are NOT_FOUND."""
    src = new_host()
    build_vm(src, "vm", True, TagPolicy.ON_FAULT)
    src.start_migration("vm", MIG, T0, TIMEOUT)
    with pytest.raises(NotFoundError):
        src.read_migration_chunk("vm", "other", T0)
    with pytest.raises(NotFoundError):
        src.get_migration("nope")


def test_manifest_for_an_existing_vm_is_refused() -> None:
    """A destination refuses a manifest naming a VM it already runs."""
    src, dst = new_host(), new_host()
    build_vm(src, "vm", False, TagPolicy.ON_FAULT)
    dst.create_vm(VmConfig("vm", False))
    manifest: MigrationManifest = src.start_migration("vm", MIG, T0, TIMEOUT)
    with pytest.raises(Exception, match="exists"):
        dst.admit_migration(manifest, T0, TIMEOUT)


def test_tags_pack_to_four_bits_and_back() -> None:
    """Packing is lossless: 4 bits per granule, two granules per byte."""
    rows = np.random.default_rng(1).integers(0, 16, (3, 256), dtype=np.uint8)
    packed = pack_tags(rows)
    assert 3 * 128 == len(packed)
    assert np.array_equal(rows, unpack_tags(packed, 3, 256))


def test_tag_bytes_on_the_wire_stay_within_five_percent_of_the_packed_minimum() -> None:
    """Chunks cost 4 bits per granule for pages with non-zero tags and a few bits for every
    other page: at most 1.05x the packed minimum for a guest with 1 page in 8 tagged non-zero."""
    src, dst = new_host(), new_host()
    src.create_vm(VmConfig("vm", True, TagPolicy.ON_FAULT, boot_memory_bytes=256 * MiB))
    src.guest_fault("vm", BOOT_RAM_GPA, 256 * MiB, Access.WRITE)
    ps = src.page_size
    tags = np.zeros((256 * MiB // ps, ps // 16), np.uint8)
    tags[::8] = np.random.default_rng(2).integers(1, 16, tags[::8].shape, dtype=np.uint8)
    for off in range(0, 256 * MiB, 32 * MiB):
        part = tags[off // ps : (off + 32 * MiB) // ps]
        src.copy_tags("vm", BOOT_RAM_GPA + off, 32 * MiB, TagCopyDirection.TO_GUEST, part.tobytes())
    dst.admit_migration(src.start_migration("vm", MIG, T0, TIMEOUT), T0, TIMEOUT)
    chunks: list[TagChunk] = []
    while (chunk := src.read_migration_chunk("vm", MIG, T0)) is not None:
        dst.write_migration_chunk("vm", MIG, chunk, T0)
        chunks.append(chunk)
    minimum = tags.shape[0] // 8 * ps // 32
    assert minimum == sum(len(c.tags) for c in chunks)
    assert sum(c.wire_bytes for c in chunks) <= 1.05 * minimum


U64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 4096, 2 * MiB, 64 * MiB]))


@settings(max_examples=30, deadline=None)
@given(
    field=st.sampled_from(["mapped", "tagged", "boot", "max", "dev_gpa", "dev_size", "block"]),
    value=U64,
    blob=st.binary(max_size=64),
)
def test_a_mangled_manifest_is_refused_with_a_model_error_and_changes_nothing(
    field: str, value: int, blob: bytes
) -> None:
    """Whatever a manifest holds, admission either succeeds soundly or refuses with the
    model's own error, leaving the destination as it was."""
    src, dst = new_host(), new_host()
    build_vm(src, "vm", True, TagPolicy.ON_FAULT)
    manifest = src.start_migration("vm", MIG, T0, TIMEOUT)
    devices = list(manifest.devices)
    vmem = next(i for i, d in enumerate(devices) if d.device_id == "vmem0")
    if field in ("mapped", "tagged"):
        manifest = replace(manifest, **{field: blob})
    elif field == "boot":
        manifest = replace(manifest, config=replace(manifest.config, boot_memory_bytes=value))
    elif field == "max":
        manifest = replace(manifest, config=replace(manifest.config, max_memory_bytes=value))
    else:
        key = {"dev_gpa": "gpa", "dev_size": "size_bytes", "block": "block_size_bytes"}[field]
        devices[vmem] = replace(devices[vmem], **{key: value})
        manifest = replace(manifest, devices=tuple(devices))
    before = snapshot(dst)
    try:
        dst.admit_migration(manifest, T0, TIMEOUT)
    except TagStoreError:
        assert_unchanged(dst, before)
    else:
        assert_sound(dst)


@settings(max_examples=30, deadline=None)
@given(
    field=st.sampled_from(["first_gfn_offset", "span_pages", "present", "mapped", "tags"]),
    value=U64,
    blob=st.binary(max_size=64),
)
def test_a_mangled_chunk_with_a_valid_checksum_is_refused_cleanly(
    field: str, value: int, blob: bytes
) -> None:
    """A chunk whose fields disagree (re-checksummed, so only the decoding can catch it) is
    refused with the model's own error; the destination stays sound."""
    src, dst = new_host(), new_host()
    build_vm(src, "vm", True, TagPolicy.ON_FAULT)
    dst.admit_migration(src.start_migration("vm", MIG, T0, TIMEOUT), T0, TIMEOUT)
    chunk = src.read_migration_chunk("vm", MIG, T0)
    assert chunk is not None
    mangled = replace(chunk, **{field: blob if field in ("present", "mapped", "tags") else value})
    mangled = replace(mangled, checksum=mangled.compute_checksum())
    before = snapshot(dst)
    try:
        dst.write_migration_chunk("vm", MIG, mangled, T0)
    except TagStoreError:
        assert_unchanged(dst, before)
    else:
        assert_sound(dst)


PRECOPY_STEPS = st.lists(
    st.tuples(
        st.sampled_from(["fault", "tag", "round"]),
        st.integers(0, 63),  # MiB into boot RAM
        st.integers(1, 4),  # MiB
        st.integers(0, 15),  # tag value
    ),
    max_size=12,
)


@settings(max_examples=25, deadline=None)
@given(steps=PRECOPY_STEPS, policy=st.sampled_from(list(TagPolicy)))
def test_whatever_the_guest_does_during_precopy_the_destination_ends_up_equal(
    steps: list[tuple[str, int, int, int]], policy: TagPolicy
) -> None:
    """Faults and tag writes interleaved with chunks and rounds in any order: after the paused
    round and commit, the destination's view equals the source's just before handover."""
    precopy_then_compare(steps, policy)


@settings(max_examples=25, deadline=None)
@given(
    steps=PRECOPY_STEPS,
    policy=st.sampled_from(list(TagPolicy)),
    max_pages=st.sampled_from([64, 1000]),
    max_tag_pages=st.sampled_from([1, 5, 40]),
)
def test_chunks_cut_small_by_their_page_and_byte_bounds_carry_the_same_guest(
    steps: list[tuple[str, int, int, int]], policy: TagPolicy, max_pages: int, max_tag_pages: int
) -> None:
    """With chunks bounded to a few pages and a few pages' packed tags, every round is cut into
    many chunks (at the page bound, the byte bound and the window bound), and the destination
    still ends up equal to the source."""
    packed_per_page = 4096 // 16 // 2
    with (
        mock.patch.object(migration, "CHUNK_MAX_PAGES", max_pages),
        mock.patch.object(migration, "CHUNK_MAX_TAG_BYTES", max_tag_pages * packed_per_page),
    ):
        precopy_then_compare(steps, policy)


def precopy_then_compare(steps: list[tuple[str, int, int, int]], policy: TagPolicy) -> None:
    src, dst = new_host(), new_host()
    build_vm(src, "vm", True, policy)
    dst.admit_migration(src.start_migration("vm", MIG, T0, TIMEOUT), T0, TIMEOUT)
    for kind, start_mib, length_mib, tag in steps:
        gpa = BOOT_RAM_GPA + start_mib * MiB
        length = min(length_mib, 64 - start_mib) * MiB
        if kind == "fault":
            src.guest_fault("vm", gpa, length, Access.WRITE)
        elif kind == "tag":
            tags = bytes([tag]) * (length // 16)
            src.copy_tags("vm", gpa, length, TagCopyDirection.TO_GUEST, tags)
        else:
            # Part of a round, then maybe the next one.
            chunk = src.read_migration_chunk("vm", MIG, T0)
            if chunk is None:
                src.next_migration_round("vm", MIG, T0)
            else:
                dst.write_migration_chunk("vm", MIG, chunk, T0)
    send_round(src, dst, "vm")
    src.next_migration_round("vm", MIG, T0)
    send_round(src, dst, "vm")
    src.pause_migration("vm", MIG, T0)
    src.next_migration_round("vm", MIG, T0)
    send_round(src, dst, "vm")
    expected = view(src, "vm")
    src.handover_migration("vm", MIG, T0)
    dst.commit_migration("vm", MIG)
    src.complete_migration("vm", MIG)
    assert expected == view(dst, "vm")
    assert_sound(src)
    assert_sound(dst)
