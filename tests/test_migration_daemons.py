"""Live migration between two real hostd daemons, driven by the Python client and the CLI, and
its faults: refused admission, a damaged chunk, lease expiry, either daemon killed mid-transfer.
After every test no page is owned twice and CheckInvariants is empty on both daemons."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tagstore.v1 import tagstore_pb2 as pb
from tests.conftest import ADMIN_TOKEN, HostdProcess
from vmm_shim.cli import main
from vmm_shim.client import (
    BOOT_RAM_GPA,
    FailedPrecondition,
    HostClient,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TagStoreClientError,
    Unauthenticated,
    Unavailable,
)
from vmm_shim.migration_client import MigrationProgress

MiB = 1 << 20
GiB = 1 << 30
Start = Callable[..., HostdProcess]


@pytest.fixture(scope="module")
def pair(hostd_process: Start) -> Iterator[tuple[HostClient, HostClient]]:
    """Two daemons (source, destination) shared by the module's tests (distinct VM ids)."""
    src, dst = hostd_process(), hostd_process()
    with (
        HostClient(src.address, token=ADMIN_TOKEN) as a,
        HostClient(dst.address, token=ADMIN_TOKEN) as b,
    ):
        yield a, b
    for d in (src, dst):
        d.signal(signal.SIGTERM)
        d.wait()


def build_vm(host: HostClient, vm_id: str, *, mte: bool, policy: str) -> bytes:
    """Boot RAM partly faulted, a DIMM, a partly plugged virtio-mem device, written tags.
    Returns the tags written at BOOT_RAM_GPA + 1 MiB (2 MiB of guest memory)."""
    vm = host.create_vm(
        vm_id,
        mte_enabled=mte,
        tag_policy=policy,
        boot_memory_bytes=64 * MiB,
        dimm_slots=2,
        max_memory_bytes=64 * MiB + GiB,
    )
    dimm = vm.add_dimm("dimm0", 32 * MiB)
    vmem = vm.add_virtio_mem("vmem0", region_size=256 * MiB, block_size=2 * MiB)
    vm.resize_virtio_mem("vmem0", 8 * MiB)
    for i in (0, 2):
        assert "ACK" == vm.virtio_mem_plug("vmem0", vmem.gpa + i * 2 * MiB, 1)
    vm.fault(BOOT_RAM_GPA, 16 * MiB)
    vm.fault(dimm.gpa, 4 * MiB)
    vm.fault(vmem.gpa, 2 * MiB)
    tags = b""
    if mte:
        tags = bytes((i * 7) % 16 if i >= 4096 else 0 for i in range(2 * MiB // 16))
        vm.copy_tags_to_guest(BOOT_RAM_GPA + MiB, tags)
    return tags


def guest_view(host: HostClient, vm_id: str) -> tuple[object, ...]:
    """Layout, mapped/tagged bytes per region, and which guest frames are mapped/tagged."""
    info = host.get_vm(vm_id)
    runs = sorted(
        (r.gfn_start, r.count, r.tagged)
        for r in host.export_state().mapping_runs
        if r.vm_id == vm_id
    )
    # Host placement differs between daemons: compare per-gfn, merging adjacent runs.
    merged: list[list[int]] = []
    for gfn, count, tagged in runs:
        if merged and merged[-1][0] + merged[-1][1] == gfn and merged[-1][2] == tagged:
            merged[-1][1] += count
        else:
            merged.append([gfn, count, int(tagged)])
    return info, merged


def assert_clean(*hosts: HostClient) -> None:
    for host in hosts:
        assert [] == host.check_invariants()


@pytest.mark.parametrize(
    ("mte", "policy"),
    [(True, "ON_FAULT"), (True, "EAGER"), (True, "ON_TAG_ACCESS"), (False, "ON_FAULT")],
    ids=["on-fault", "eager", "on-tag-access", "non-mte"],
)
def test_migrated_vm_arrives_whole_and_leaves_nothing_on_the_source(
    pair: tuple[HostClient, HostClient], mte: bool, policy: str
) -> None:
    """After migrate() the destination has the same layout, mapped/tagged bytes and tags; the
    source holds nothing of the VM; both daemons' invariants hold."""
    src, dst = pair
    vm_id = f"whole-{policy.lower()}-{int(mte)}"
    tags = build_vm(src, vm_id, mte=mte, policy=policy)
    before = guest_view(src, vm_id)
    seen: list[MigrationProgress] = []
    result = src.migrate(vm_id, dst, progress=seen.append)
    assert before == guest_view(dst, vm_id)
    if mte:
        assert tags == dst.vm(vm_id).copy_tags_from_guest(BOOT_RAM_GPA + MiB, 2 * MiB)
    with pytest.raises(NotFound):
        src.get_vm(vm_id)
    assert result.mapped_bytes == before[0].mapped_bytes  # type: ignore[attr-defined]
    assert ["admitting", "precopy"] == [p.phase for p in seen[:2]]
    assert "completed" == seen[-1].phase
    assert_clean(src, dst)
    dst.vm(vm_id).fault(BOOT_RAM_GPA + 32 * MiB, MiB)
    dst.vm(vm_id).destroy()


def test_migrated_vm_gets_its_own_token_on_the_destination_and_loses_the_source_one(
    pair: tuple[HostClient, HostClient],
) -> None:
    """migrate() returns the VM's token on the destination (the commit makes it): it drives
    that VM there and no other; the source's token of the VM is revoked by the completion."""
    src, dst = pair
    vm_id = "token-moves"
    handle = src.create_vm(
        vm_id, mte_enabled=True, tag_policy="ON_FAULT", boot_memory_bytes=64 * MiB
    )
    handle.fault(BOOT_RAM_GPA, 4 * MiB)
    neighbour = dst.create_vm("token-neighbour", mte_enabled=False, boot_memory_bytes=64 * MiB)
    result = src.migrate(vm_id, dst)
    assert result.vm_token.startswith("tsv_")
    assert handle.vm_token != result.vm_token
    moved = dst.vm(vm_id, token=result.vm_token)
    moved.fault(BOOT_RAM_GPA + 4 * MiB, MiB)
    assert 5 * MiB == moved.info().mapped_bytes
    with pytest.raises(PermissionDenied):
        dst.vm("token-neighbour", token=result.vm_token).fault(BOOT_RAM_GPA, MiB)
    with pytest.raises(Unauthenticated):
        handle.fault(BOOT_RAM_GPA, MiB)  # the source's token, on the source
    with pytest.raises(Unauthenticated):
        dst.vm(vm_id, token=handle.vm_token).fault(BOOT_RAM_GPA, MiB)
    moved.destroy()
    neighbour.destroy()
    assert_clean(src, dst)


def test_tag_writes_and_faults_during_precopy_arrive(pair: tuple[HostClient, HostClient]) -> None:
    """Pages faulted and tags written on the source after round 1 was sent reach the
    destination in a later round."""
    src, dst = pair
    vm_id = "dirty-precopy"
    build_vm(src, vm_id, mte=True, policy="ON_FAULT")
    mid = "dirty-1"
    dst.admit_migration(src.start_migration(vm_id, mid, 30), 30)
    while (chunk := src.read_migration_chunk(vm_id, mid)) is not None:
        dst.write_migration_chunk(vm_id, mid, chunk)
    late = bytes([0x5] * (MiB // 16))
    src.vm(vm_id).fault(BOOT_RAM_GPA + 40 * MiB, 2 * MiB)
    src.vm(vm_id).copy_tags_to_guest(BOOT_RAM_GPA + 8 * MiB, late)
    assert 0 < src.get_migration(vm_id).dirty_pages
    assert 0 < src.next_migration_round(vm_id, mid)
    src.pause_migration(vm_id, mid)
    with pytest.raises(FailedPrecondition) as refusal:
        src.vm(vm_id).fault(BOOT_RAM_GPA + 48 * MiB, MiB)
    assert "PAUSED" == refusal.value.metadata["phase"]
    while (chunk := src.read_migration_chunk(vm_id, mid)) is not None:
        dst.write_migration_chunk(vm_id, mid, chunk)
    assert 0 == src.next_migration_round(vm_id, mid)
    before = guest_view(src, vm_id)
    src.handover_migration(vm_id, mid)
    dst.commit_migration(vm_id, mid)
    src.complete_migration(vm_id, mid)
    assert before == guest_view(dst, vm_id)
    assert late == dst.vm(vm_id).copy_tags_from_guest(BOOT_RAM_GPA + 8 * MiB, MiB)
    assert_clean(src, dst)
    dst.vm(vm_id).destroy()


def test_virtio_mem_answers_busy_while_the_vm_migrates(pair: tuple[HostClient, HostClient]) -> None:
    """A guest PLUG during a migration is answered BUSY; adding a device is refused."""
    src, _ = pair
    vm_id = "busy"
    build_vm(src, vm_id, mte=True, policy="ON_FAULT")
    vmem = src.get_vm(vm_id).device("vmem0")
    src.start_migration(vm_id, "busy-1", 30)
    assert "BUSY" == src.vm(vm_id).virtio_mem_plug("vmem0", vmem.gpa + 2 * MiB, 1)
    with pytest.raises(FailedPrecondition) as refusal:
        src.vm(vm_id).add_dimm("dimm1", 2 * MiB)
    assert "VM_MIGRATING" == refusal.value.reason
    src.abort_migration(vm_id, "busy-1")
    assert "ACK" == src.vm(vm_id).virtio_mem_plug("vmem0", vmem.gpa + 2 * MiB, 1)
    src.vm(vm_id).destroy()


def test_destination_short_of_memory_refuses_before_anything_moves(
    hostd_process: Start, pair: tuple[HostClient, HostClient]
) -> None:
    """RESOURCE_EXHAUSTED names what is short and by how much; the VM keeps running on the
    source and the destination holds nothing."""
    src, _ = pair
    small = hostd_process("--memory", "1GiB")
    vm_id = "too-big"
    src.create_vm(vm_id, mte_enabled=True, tag_policy="EAGER", boot_memory_bytes=1536 * MiB)
    with HostClient(small.address, token=ADMIN_TOKEN) as dst:
        with pytest.raises(ResourceExhausted) as refusal:
            src.migrate(vm_id, dst)
        assert int(refusal.value.metadata["short_bytes"], 0) > 0
        assert "short by" in refusal.value.message
        assert [] == dst.list_vms()
        assert_clean(dst)
    with pytest.raises(NotFound):
        src.get_migration(vm_id)
    src.vm(vm_id).fault(BOOT_RAM_GPA, MiB)
    src.vm(vm_id).destroy()
    assert_clean(src)


def test_destination_that_fits_the_mapped_pages_but_not_the_plugged_blocks_refuses(
    hostd_process: Start, pair: tuple[HostClient, HostClient]
) -> None:
    """Plugged virtio-mem blocks the guest has not touched yet must fit too: the ErrorInfo
    says the taggable memory is short by what they need beyond the destination's free pages."""
    src, _ = pair
    small = hostd_process("--memory", "1GiB")
    vm_id = "plugged-not-mapped"
    vm = src.create_vm(
        vm_id,
        mte_enabled=True,
        tag_policy="ON_FAULT",
        boot_memory_bytes=64 * MiB,
        max_memory_bytes=64 * MiB + 4 * GiB,
    )
    vmem = vm.add_virtio_mem("vmem0", region_size=2 * GiB, block_size=2 * MiB)
    vm.resize_virtio_mem("vmem0", 1536 * MiB)
    assert "ACK" == vm.virtio_mem_plug("vmem0", vmem.gpa, 768)
    vm.fault(BOOT_RAM_GPA, 16 * MiB)
    vm.fault(vmem.gpa, 16 * MiB)
    with HostClient(small.address, token=ADMIN_TOKEN) as dst:
        with pytest.raises(ResourceExhausted) as refusal:
            src.migrate(vm_id, dst)
        meta = refusal.value.metadata
        assert "taggable_memory" == meta["resource"]
        assert 64 * MiB + 1536 * MiB == int(meta["needed_bytes"], 0)
        short = int(meta["needed_bytes"], 0) - int(meta["available_bytes"], 0)
        assert short == int(meta["short_bytes"], 0) > 0
        assert [] == dst.list_vms()
        assert_clean(dst)
    assert not_migrating(src, vm_id)
    vm.fault(vmem.gpa + GiB, MiB)
    vm.destroy()
    assert_clean(src)


def test_chunk_with_a_bad_checksum_is_refused(pair: tuple[HostClient, HostClient]) -> None:
    """A damaged chunk is INVALID_ARGUMENT (MIGRATION_CHUNK_CHECKSUM) and changes nothing;
    aborting both sides leaves the VM running on the source only."""
    src, dst = pair
    vm_id = "bad-crc"
    build_vm(src, vm_id, mte=True, policy="ON_FAULT")
    dst.admit_migration(src.start_migration(vm_id, "crc-1", 30), 30)
    chunk = src.read_migration_chunk(vm_id, "crc-1")
    chunk.tags = bytes([chunk.tags[0] ^ 0x10]) + chunk.tags[1:]
    with pytest.raises(InvalidArgument) as refusal:
        dst.write_migration_chunk(vm_id, "crc-1", chunk)
    assert "MIGRATION_CHUNK_CHECKSUM" == refusal.value.reason
    assert 0 == dst.get_migration(vm_id).chunks
    dst.abort_migration(vm_id, "crc-1")
    src.abort_migration(vm_id, "crc-1")
    with pytest.raises(NotFound):
        dst.get_vm(vm_id)
    src.vm(vm_id).fault(BOOT_RAM_GPA + 32 * MiB, MiB)
    assert_clean(src, dst)
    src.vm(vm_id).destroy()


def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.1)


def gone(host: HostClient, vm_id: str) -> bool:
    try:
        host.get_vm(vm_id)
    except NotFound:
        return True
    return False


def not_migrating(host: HostClient, vm_id: str) -> bool:
    try:
        host.get_migration(vm_id)
    except NotFound:
        return True
    return False


def test_expired_lease_drops_the_incoming_vm(pair: tuple[HostClient, HostClient]) -> None:
    """A destination whose lease runs out drops the VM and everything reserved for it by
    itself; the source, still heard from, keeps migrating until it aborts."""
    src, dst = pair
    vm_id = "lease"
    build_vm(src, vm_id, mte=True, policy="EAGER")
    used_before = dst.host_status()
    dst.admit_migration(src.start_migration(vm_id, "lease-1", 30), 0.5)
    wait_for(lambda: gone(dst, vm_id))
    assert used_before.vm_count == dst.host_status().vm_count
    with pytest.raises(NotFound):
        dst.write_migration_chunk(vm_id, "lease-1", src.read_migration_chunk(vm_id, "lease-1"))
    src.abort_migration(vm_id, "lease-1")
    assert_clean(src, dst)
    src.vm(vm_id).destroy()


def test_killed_destination_loses_nothing_and_the_source_resumes(
    hostd_process: Start, pair: tuple[HostClient, HostClient], tmp_path: Path
) -> None:
    """Kill -9 the destination mid-transfer: the client's next step fails, the source VM runs
    on (after its deadline); the restarted destination drops the half-received VM when its
    lease runs out."""
    src, _ = pair
    state = str(tmp_path / "dst-state")
    dst_proc = hostd_process("--state-dir", state)
    vm_id = "kill-dst"
    build_vm(src, vm_id, mte=True, policy="ON_FAULT")
    with HostClient(dst_proc.address, token=ADMIN_TOKEN, timeout_s=2) as dst:
        dst.admit_migration(src.start_migration(vm_id, "kd-1", 1.0), 1.0)
        dst.write_migration_chunk(vm_id, "kd-1", src.read_migration_chunk(vm_id, "kd-1"))
        dst_proc.signal(signal.SIGKILL)
        dst_proc.wait()
        with pytest.raises(TagStoreClientError):
            dst.write_migration_chunk(vm_id, "kd-1", src.read_migration_chunk(vm_id, "kd-1"))
    wait_for(lambda: not_migrating(src, vm_id))
    src.vm(vm_id).fault(BOOT_RAM_GPA + 32 * MiB, MiB)
    restarted = hostd_process("--state-dir", state)
    with HostClient(restarted.address, token=ADMIN_TOKEN) as dst:
        wait_for(lambda: gone(dst, vm_id))
        assert 0 == dst.host_status().vm_count
        assert_clean(src, dst)
    src.vm(vm_id).destroy()


def test_killed_source_resumes_the_vm_after_restart_and_the_destination_drops_it(
    hostd_process: Start, tmp_path: Path
) -> None:
    """Kill -9 the source while the guest is paused: restarted from its state, it resumes the
    VM once its deadline passes (faults work again), with the tags it had; the destination's
    lease ends and it holds nothing."""
    state = str(tmp_path / "src-state")
    src_proc, dst_proc = hostd_process("--state-dir", state), hostd_process()
    vm_id = "kill-src"
    with (
        HostClient(src_proc.address, token=ADMIN_TOKEN) as src,
        HostClient(dst_proc.address, token=ADMIN_TOKEN) as dst,
    ):
        tags = build_vm(src, vm_id, mte=True, policy="ON_TAG_ACCESS")
        dst.admit_migration(src.start_migration(vm_id, "ks-1", 1.5), 1.5)
        dst.write_migration_chunk(vm_id, "ks-1", src.read_migration_chunk(vm_id, "ks-1"))
        src.pause_migration(vm_id, "ks-1")
        src_proc.signal(signal.SIGKILL)
        src_proc.wait()
    again = hostd_process("--state-dir", state)
    with (
        HostClient(again.address, token=ADMIN_TOKEN) as src,
        HostClient(dst_proc.address, token=ADMIN_TOKEN) as dst,
    ):
        wait_for(lambda: not_migrating(src, vm_id))
        src.vm(vm_id).fault(BOOT_RAM_GPA + 32 * MiB, MiB)
        assert tags == src.vm(vm_id).copy_tags_from_guest(BOOT_RAM_GPA + MiB, 2 * MiB)
        wait_for(lambda: gone(dst, vm_id))
        assert_clean(src, dst)


def test_cli_migrates_with_json_and_refuses_nonsense(
    pair: tuple[HostClient, HostClient], capsys: pytest.CaptureFixture[str]
) -> None:
    """``vmm-shim --host SRC migrate VM --to DST --json`` prints the result document; an
    unknown VM exits 1 with the error line; bad flags exit 2."""
    src, dst = pair
    build_vm(src, "cli-vm", mte=True, policy="ON_FAULT")
    assert 0 == main(["--host", src.address, "migrate", "cli-vm", "--to", dst.address, "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert "cli-vm" == doc["vm_id"]
    assert doc["tag_bytes"] > 0
    assert 1 == main(["--host", src.address, "migrate", "nope", "--to", dst.address])
    assert "error: NOT_FOUND VM_NOT_FOUND" in capsys.readouterr().err
    assert 2 == main(
        ["--host", src.address, "migrate", "cli-vm", "--to", dst.address, "--lease", "-1"]
    )
    assert 0 == main(["--host", dst.address, "compact", "tag0"])
    assert "tag block(s) freed" in capsys.readouterr().out
    assert_clean(src, dst)
    dst.vm("cli-vm").destroy()


def test_watch_events_reports_every_phase_on_both_sides(
    pair: tuple[HostClient, HostClient],
) -> None:
    """WatchEvents streams migration_phase events: PRECOPY, PAUSED, HANDOVER, COMPLETED on
    the source; INCOMING, COMPLETED on the destination."""
    src, dst = pair
    vm_id = "events"
    build_vm(src, vm_id, mte=True, policy="ON_FAULT")
    with src.watch_events() as src_events, dst.watch_events() as dst_events:
        src.migrate(vm_id, dst, migration_id="ev-1")

        def phases(stream: object, last: str) -> list[str]:
            out: list[str] = []
            for event in stream:  # type: ignore[attr-defined]
                if event.kind == "migration_phase" and event.vm_id == vm_id:
                    assert "ev-1" == event.detail["migration_id"]
                    out.append(event.detail["phase"])
                    if event.detail["phase"] == last:
                        return out
            return out

        assert ["PRECOPY", "PAUSED", "HANDOVER", "COMPLETED"] == phases(src_events, "COMPLETED")
        assert ["INCOMING", "COMPLETED"] == phases(dst_events, "COMPLETED")
    dst.vm(vm_id).destroy()
    assert_clean(src, dst)


def test_cut_connection_leaves_the_vm_running_on_the_source_only(
    pair: tuple[HostClient, HostClient],
) -> None:
    """A client whose calls to the destination miss their deadline gives up: the migration is
    aborted, the VM runs on the source, and the destination holds nothing once its lease (or
    the client's abort) ended it."""
    src, dst = pair
    vm_id = "cut"
    build_vm(src, vm_id, mte=True, policy="EAGER")
    with (
        HostClient(dst.address, token=ADMIN_TOKEN, timeout_s=0.001, max_attempts=1) as hasty,
        pytest.raises(TagStoreClientError),
    ):
        src.migrate(vm_id, hasty, lease_s=1.0)
    assert not_migrating(src, vm_id)
    src.vm(vm_id).fault(BOOT_RAM_GPA + 32 * MiB, MiB)
    wait_for(lambda: gone(dst, vm_id) and not_migrating(dst, vm_id))
    assert_clean(src, dst)
    src.vm(vm_id).destroy()


def test_cli_shows_and_aborts_a_migration_by_hand(
    pair: tuple[HostClient, HostClient], capsys: pytest.CaptureFixture[str]
) -> None:
    """``vmm-shim migration show`` names the phase; ``migration abort`` resumes the VM; a
    migration that does not exist is NOT_FOUND (exit 1)."""
    src, _ = pair
    build_vm(src, "by-hand", mte=True, policy="ON_FAULT")
    src.start_migration("by-hand", "hand-1", 30)
    src.pause_migration("by-hand", "hand-1")
    assert 0 == main(["--host", src.address, "migration", "show", "by-hand"])
    assert "phase PAUSED" in capsys.readouterr().out
    assert 0 == main(["--host", src.address, "migration", "abort", "by-hand", "hand-1", "--json"])
    assert "PAUSED" == json.loads(capsys.readouterr().out)["phase"]
    assert 1 == main(["--host", src.address, "migration", "show", "by-hand"])
    assert "MIGRATION_NOT_FOUND" in capsys.readouterr().err
    src.vm("by-hand").fault(BOOT_RAM_GPA + 32 * MiB, MiB)
    src.vm("by-hand").destroy()


class _ReplyLost(grpc.RpcError):
    """What a client sees when the connection drops after the server answered."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection reset before the reply (injected by the test)"


class LoseCommitReplies(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Lets the first ``n`` CommitMigration calls reach the daemon and run, then drops their
    replies; keeps the answers that were lost."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.lost: list[pb.MigrationReport] = []

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        outcome = continuation(details, request)
        if details.method.endswith("/CommitMigration") and self.left > 0:
            self.left -= 1
            self.lost.append(outcome.result())  # the daemon answered: the commit happened
            raise _ReplyLost()
        return outcome


def lossy_client(address: str, loss: LoseCommitReplies, **options: Any) -> HostClient:
    channel = grpc.intercept_channel(grpc.insecure_channel(address), loss)
    return HostClient(address, token=ADMIN_TOKEN, channel=channel, **options)


def assert_owned_by_destination_only(
    src: HostClient, dst: HostClient, vm_id: str, token: str
) -> None:
    with pytest.raises(NotFound):
        src.get_vm(vm_id)
    assert not_migrating(src, vm_id) and not_migrating(dst, vm_id)
    assert not [r for r in src.export_state().mapping_runs if r.vm_id == vm_id]
    dst.vm(vm_id, token=token).fault(BOOT_RAM_GPA + 40 * MiB, MiB)
    assert_clean(src, dst)


def test_commit_reply_lost_once_is_retried_with_its_request_id_and_answers_the_same(
    pair: tuple[HostClient, HostClient],
) -> None:
    """The destination commits but the reply is lost: the client's retry carries the same
    request_id and gets the first answer (the same VM token) without committing twice; the
    source then completes, and only the destination owns the VM."""
    src, dst = pair
    vm_id = "commit-lost-once"
    build_vm(src, vm_id, mte=True, policy="ON_FAULT")
    before = guest_view(src, vm_id)
    loss = LoseCommitReplies(1)
    with lossy_client(dst.address, loss) as lossy:
        result = src.migrate(vm_id, lossy)
    assert 1 == len(loss.lost)
    assert loss.lost[0].vm_token == result.vm_token != ""
    assert loss.lost[0].mapped_bytes == result.mapped_bytes
    assert before == guest_view(dst, vm_id)
    assert_owned_by_destination_only(src, dst, vm_id, result.vm_token)
    dst.vm(vm_id).destroy()


def test_commit_reply_lost_on_every_attempt_is_resolved_by_asking_the_destination(
    pair: tuple[HostClient, HostClient],
) -> None:
    """Every attempt of the commit loses its reply (the first commits, the next ones repeat
    it): migrate() asks the destination whether it owns the VM, fetches the commit's answer
    with the same request_id, completes the source and returns the destination's token."""
    src, dst = pair
    vm_id = "commit-lost-always"
    build_vm(src, vm_id, mte=True, policy="EAGER")
    before = guest_view(src, vm_id)
    loss = LoseCommitReplies(2)
    with lossy_client(dst.address, loss, max_attempts=2) as lossy:
        result = src.migrate(vm_id, lossy)
    assert 2 == len(loss.lost)
    assert loss.lost[0] == loss.lost[1]  # the retry answered the first commit's report
    assert loss.lost[0].vm_token == result.vm_token != ""
    assert before == guest_view(dst, vm_id)
    assert_owned_by_destination_only(src, dst, vm_id, result.vm_token)
    dst.vm(vm_id).destroy()


def test_commit_reply_lost_and_destination_unreachable_leaves_one_owner_until_resolved(
    pair: tuple[HostClient, HostClient], capsys: pytest.CaptureFixture[str]
) -> None:
    """The commit happens but the driver never hears of it and cannot reach the destination
    again: migrate() fails, the source stays paused in HANDOVER (it never resumes by itself, as
    the destination owns the VM) and the VM runs nowhere twice. ``migration complete`` on the
    source then finishes: exactly one host owns the VM, nothing leaked on either."""
    src, dst = pair
    vm_id = "commit-lost-cut"
    build_vm(src, vm_id, mte=True, policy="ON_FAULT")
    before = guest_view(src, vm_id)
    loss = LoseCommitReplies(1)
    with (
        lossy_client(dst.address, loss, max_attempts=1) as lossy,
        pytest.raises(TagStoreClientError),
    ):
        # After the lost reply the destination is unreachable: every other call fails too.
        real = lossy._unary

        def cut(method: str, request: Any, *, token: str | None = None) -> Any:
            if loss.lost:
                raise Unavailable("UNAVAILABLE", "connection cut (injected by the test)")
            return real(method, request, token=token)

        lossy._unary = cut  # type: ignore[method-assign]
        src.migrate(vm_id, lossy, migration_id="cut-commit")
    assert "HANDOVER" == src.get_migration(vm_id).phase
    with pytest.raises(FailedPrecondition):
        src.vm(vm_id).fault(BOOT_RAM_GPA + 40 * MiB, MiB)  # paused, not resumed
    assert not_migrating(dst, vm_id)  # the destination committed: it owns the VM
    assert before == guest_view(dst, vm_id)
    assert 0 == main(["--host", src.address, "migration", "complete", vm_id, "cut-commit"])
    capsys.readouterr()
    assert_owned_by_destination_only(src, dst, vm_id, loss.lost[0].vm_token)
    dst.vm(vm_id).destroy()
