"""Persistence (hostd.store) with the real model: snapshot + journal, restart and refusals."""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import hostd.store
from hostd.model import (
    BOOT_RAM_GPA,
    Access,
    FailedPreconditionError,
    Host,
    MiB,
    Placement,
    TagCopyDirection,
    TagPolicy,
    VirtioMemConfig,
    VirtioMemRequestType,
    VmConfig,
    default_topology,
)
from hostd.model.errors import StateUnavailableError
from hostd.model.types import FaultResult, VirtioMemAnswer, VirtioMemResponse
from hostd.store import (
    BOOT_ID_FILE_ENV,
    StateError,
    Store,
    SyncMode,
    check_state_dir,
    decode_value,
    encode_value,
    reset_state_dir,
    seal,
    unseal,
)

GiB = 1 << 30
TOPOLOGY = default_topology(1 * GiB)
TAGS = bytes(i % 16 for i in range(4096 // 16))


def call(store: Store, method: str, *args: object, request_id: str = "") -> object:
    """What the servicer does: write the record ahead, call the model, abort or commit."""
    ticket = store.begin(method, args, request_id)
    try:
        result = getattr(store.host, method)(*args)
    except BaseException:
        if ticket is not None:
            store.abort(ticket)
        raise
    if ticket is not None:
        store.wait_durable(store.commit(ticket))
    store.requests.remember(request_id, method, args, result)
    return result


def current(state_dir: Path) -> dict[str, Any]:
    """The commit point's fields."""
    return unseal((state_dir / "CURRENT").read_bytes().rstrip(b"\n"))  # type: ignore[no-any-return]


def journal_of(state_dir: Path, generation: int | None = None) -> Path:
    """The journal being appended to (or of ``generation``)."""
    g = current(state_dir)["generation"] if generation is None else generation
    return state_dir / f"journal-{g:08d}.jsonl"


def records(journal: Path) -> list[dict[str, Any]]:
    """The records of a journal."""
    return [unseal(line) for line in journal.read_bytes().splitlines()]


def populate(store: Store) -> None:
    """A VM with faulted memory, tags, a DIMM and a virtio-mem device with plugged blocks."""
    call(store, "create_vm", VmConfig("vm1", True, TagPolicy.ON_FAULT, 32 * MiB, 2, 32 * MiB + GiB))
    call(store, "guest_fault", "vm1", BOOT_RAM_GPA, 2 * MiB, Access.WRITE)
    call(store, "copy_tags", "vm1", BOOT_RAM_GPA, 4096, TagCopyDirection.TO_GUEST, TAGS)
    call(store, "add_dimm", "vm1", "dimm0", 64 * MiB)
    device = call(
        store, "add_virtio_mem", "vm1", "vmem0", VirtioMemConfig(128 * MiB, 2 * MiB, 8 * MiB)
    )
    gpa = device.gpa  # type: ignore[attr-defined]
    call(store, "virtio_mem_request", "vm1", "vmem0", VirtioMemRequestType.PLUG, gpa, 2)
    call(store, "guest_fault", "vm1", gpa, 4 * MiB, Access.TAG)
    call(store, "create_vm", VmConfig("plain", False, TagPolicy.ON_FAULT, 16 * MiB))
    call(store, "guest_fault", "plain", BOOT_RAM_GPA, 16 * MiB, Access.READ)


def fingerprint(host: Host) -> tuple[object, ...]:
    """Everything observable about a host, to compare before and after a restart.

    Latency histograms are left out: they are measurements, and replaying the journal times
    the replayed calls again (their counts still match, and are compared).
    """
    counters = {
        k: v
        for k, v in vars(host.counters).items()
        if k not in ("fault_seconds", "reservation_seconds")
    }
    return (
        host.export_state(),
        host.status(),
        sorted(host.list_vms(), key=lambda vm: vm.vm_id),
        counters,
        {a: h.count for a, h in host.counters.fault_seconds.items()},
        host.counters.reservation_seconds.count,
    )


def crash(store: Store) -> None:
    """Drop the store as SIGKILL would: no snapshot, just the file descriptors."""
    store.close(snapshot=False)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path) -> Iterator[Store]:
    s = Store.open(state_dir, TOPOLOGY)
    yield s
    s.close(snapshot=False)


def test_journaled_calls_survive_a_crash(state_dir: Path) -> None:
    store = Store.open(state_dir, TOPOLOGY)
    populate(store)
    before = fingerprint(store.host)
    crash(store)

    reopened = Store.open(state_dir, TOPOLOGY)
    try:
        assert before == fingerprint(reopened.host)
        tags = reopened.host.copy_tags("vm1", BOOT_RAM_GPA, 4096, TagCopyDirection.FROM_GUEST)
        assert TAGS == tags
        assert [] == reopened.host.check_invariants()
    finally:
        reopened.close()


def test_graceful_close_snapshots_and_leaves_an_empty_journal(state_dir: Path) -> None:
    """A graceful stop writes a snapshot, so the next start replays nothing."""
    store = Store.open(state_dir, TOPOLOGY)
    populate(store)
    before = fingerprint(store.host)
    store.close()

    assert b"" == journal_of(state_dir).read_bytes()
    reopened = Store.open(state_dir, TOPOLOGY)
    try:
        assert before == fingerprint(reopened.host)
        assert 0 == reopened.report.replayed
    finally:
        reopened.close()


def test_only_the_current_generation_is_kept(state_dir: Path) -> None:
    """Snapshots taken by forked children replace the older generation's files."""
    store = Store.open(state_dir, TOPOLOGY, snapshot_every=3)
    populate(store)
    store.close()
    names = sorted(p.name for p in state_dir.iterdir())
    generation = current(state_dir)["generation"]
    expected = ["CURRENT", "LOCK", f"journal-{generation:08d}.jsonl", f"snapshot-{generation:08d}"]
    assert expected == names


def test_snapshot_every_n_records_starts_a_new_journal(state_dir: Path) -> None:
    """After ``snapshot_every`` records, records go to a new journal and the old one goes."""
    store = Store.open(state_dir, TOPOLOGY, snapshot_every=4, fork_snapshots=False)
    try:
        first = store.generation
        populate(store)  # 9 journaled calls: two snapshots, one call left in the journal
        assert first + 2 == store.generation
        assert 1 == len(records(journal_of(state_dir)))
    finally:
        store.close(snapshot=False)


def test_snapshot_by_journal_bytes_bounds_the_journal(state_dir: Path) -> None:
    """A journal of big records is snapshotted by size even below the record count."""
    store = Store.open(state_dir, TOPOLOGY, snapshot_journal_bytes=2000, fork_snapshots=False)
    try:
        call(store, "create_vm", VmConfig("vm1", True, TagPolicy.ON_FAULT, 16 * MiB))
        for _ in range(5):
            call(store, "copy_tags", "vm1", BOOT_RAM_GPA, 4096, TagCopyDirection.TO_GUEST, TAGS)
        assert journal_of(state_dir).stat().st_size < 2000 + 600
        assert current(state_dir)["generation"] > 1
    finally:
        store.close(snapshot=False)


def test_forked_snapshot_loses_no_call_made_while_it_is_written(state_dir: Path) -> None:
    """Calls made while a child writes the snapshot are in the next journal; a crash before
    CURRENT moves replays both journals."""
    store = Store.open(state_dir, TOPOLOGY, snapshot_every=2)
    populate(store)
    before = fingerprint(store.host)
    crash(store)  # the last child may still be running: its snapshot is not needed

    reopened = Store.open(state_dir, TOPOLOGY)
    try:
        assert before == fingerprint(reopened.host)
    finally:
        reopened.close()


def test_refused_call_is_recorded_as_aborted_and_replays_refused(state_dir: Path) -> None:
    """A refused call's record is followed by its abort; the replay expects the refusal."""
    store = Store.open(state_dir, TOPOLOGY)
    call(store, "create_vm", VmConfig("vm1", False, TagPolicy.ON_FAULT, 16 * MiB))
    with pytest.raises(FailedPreconditionError):
        call(store, "guest_fault", "vm1", 0x1000, 4096, Access.READ)
    call(store, "destroy_vm", "vm1")
    assert [("create_vm", None), ("guest_fault", None), (None, 2), ("destroy_vm", None)] == [
        (r.get("method"), r.get("abort")) for r in records(journal_of(state_dir))
    ]
    crash(store)
    reopened = Store.open(state_dir, TOPOLOGY)
    try:
        assert [] == reopened.host.list_vms()
        assert 2 == reopened.report.replayed
    finally:
        reopened.close()


def test_queries_are_not_journaled(store: Store) -> None:
    """Calls that only read the host write no record."""
    assert store.begin("status", ()) is None
    assert store.begin("export_state", ()) is None
    assert store.begin("check_invariants", ()) is None


def test_torn_last_journal_line_is_dropped(state_dir: Path) -> None:
    """A record cut short by a kill was never answered: it is dropped, and cut off the file
    so that later records follow a complete one."""
    store = Store.open(state_dir, TOPOLOGY)
    call(store, "create_vm", VmConfig("vm1", True, TagPolicy.ON_FAULT, 16 * MiB))
    journal = journal_of(state_dir)
    crash(store)
    with open(journal, "ab") as f:
        f.write(seal({"seq": 2, "method": "destroy_vm", "args": ["vm1"]})[:20])

    reopened = Store.open(state_dir, TOPOLOGY)
    try:
        assert ["vm1"] == [vm.vm_id for vm in reopened.host.list_vms()]
        call(reopened, "create_vm", VmConfig("vm2", True, TagPolicy.ON_FAULT, 16 * MiB))
    finally:
        crash(reopened)
    again = Store.open(state_dir, TOPOLOGY)
    try:
        assert ["vm1", "vm2"] == sorted(vm.vm_id for vm in again.host.list_vms())
    finally:
        again.close()


def test_unanswered_refused_last_record_is_closed_with_an_abort(state_dir: Path) -> None:
    """The last record of a call that raises on replay was never answered (the kill came
    before its abort): the start appends the abort so later records can follow."""
    store = Store.open(state_dir, TOPOLOGY)
    call(store, "create_vm", VmConfig("vm1", True, TagPolicy.ON_FAULT, 16 * MiB))
    journal = journal_of(state_dir)
    crash(store)
    with open(journal, "ab") as f:
        f.write(seal({"seq": 2, "method": "destroy_vm", "args": ["nope"]}))

    reopened = Store.open(state_dir, TOPOLOGY)
    call(reopened, "destroy_vm", "vm1")
    crash(reopened)
    assert [None, None, 2, None] == [r.get("abort") for r in records(journal)]
    again = Store.open(state_dir, TOPOLOGY)
    try:
        assert [] == again.host.list_vms()
    finally:
        again.close()


def test_altered_journal_line_refuses_start(state_dir: Path) -> None:
    """A record whose bytes changed (still valid JSON) fails its checksum: the start is
    refused naming file and line, never started without it."""
    store = Store.open(state_dir, TOPOLOGY)
    call(store, "create_vm", VmConfig("vm1", True, TagPolicy.ON_FAULT, 16 * MiB))
    call(store, "create_vm", VmConfig("vm2", True, TagPolicy.ON_FAULT, 16 * MiB))
    journal = journal_of(state_dir)
    crash(store)
    journal.write_bytes(journal.read_bytes().replace(b'"vm1"', b'"vm9"', 1))

    with pytest.raises(StateError, match=r"journal-\d+\.jsonl:1: unreadable .*checksum mismatch"):
        Store.open(state_dir, TOPOLOGY)


def test_garbage_journal_line_refuses_start(state_dir: Path) -> None:
    """A line that is not a sealed record, before the last, refuses the start."""
    store = Store.open(state_dir, TOPOLOGY)
    call(store, "create_vm", VmConfig("vm1", True, TagPolicy.ON_FAULT, 16 * MiB))
    call(store, "create_vm", VmConfig("vm2", True, TagPolicy.ON_FAULT, 16 * MiB))
    journal = journal_of(state_dir)
    crash(store)
    lines = journal.read_bytes().split(b"\n")
    journal.write_bytes(b"\n".join([b"not json", *lines[1:]]))

    with pytest.raises(StateError, match=r"journal-\d+\.jsonl:1: unreadable journal record"):
        Store.open(state_dir, TOPOLOGY)


def test_record_refused_on_replay_but_not_last_refuses_start(state_dir: Path) -> None:
    """A record that succeeded when made (no abort follows) must succeed on replay."""
    store = Store.open(state_dir, TOPOLOGY)
    call(store, "create_vm", VmConfig("vm1", True, TagPolicy.ON_FAULT, 16 * MiB))
    journal = journal_of(state_dir)
    crash(store)
    with open(journal, "ab") as f:
        f.write(seal({"seq": 2, "method": "destroy_vm", "args": ["nope"]}))
        f.write(seal({"seq": 3, "method": "destroy_vm", "args": ["vm1"]}))

    with pytest.raises(StateError, match="destroy_vm was refused on replay"):
        Store.open(state_dir, TOPOLOGY)


def test_missing_current_beside_a_journal_refuses_start(state_dir: Path) -> None:
    """Without its commit point a directory is not started empty over the old journal."""
    store = Store.open(state_dir, TOPOLOGY)
    call(store, "create_vm", VmConfig("vm1", True, TagPolicy.ON_FAULT, 16 * MiB))
    crash(store)
    (state_dir / "CURRENT").unlink()

    with pytest.raises(StateError, match=r"CURRENT is missing beside journal-\d+"):
        Store.open(state_dir, TOPOLOGY)
    assert records(journal_of(state_dir, 1))  # untouched


@pytest.mark.parametrize("damage", ["empty", "truncated", "missing", "altered"])
def test_damaged_snapshot_array_refuses_start_naming_the_file(state_dir: Path, damage: str) -> None:
    """A zero-length, truncated, missing or altered array file refuses the start in one
    line."""
    store = Store.open(state_dir, TOPOLOGY)
    populate(store)
    store.close()
    snapshot = state_dir / f"snapshot-{current(state_dir)['generation']:08d}"
    array = snapshot / "arrays" / "0000.npy"
    if damage == "empty":
        array.write_bytes(b"")
    elif damage == "truncated":
        os.truncate(array, array.stat().st_size // 2)
    elif damage == "altered":
        data = bytearray(array.read_bytes())
        data[-1] ^= 0x01
        array.write_bytes(bytes(data))
    else:
        array.unlink()

    with pytest.raises(StateError, match=r"arrays/0000\.npy: array .*hostd state check") as e:
        Store.open(state_dir, TOPOLOGY)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["meta.json", "tables.json"])
def test_empty_snapshot_description_refuses_start(state_dir: Path, name: str) -> None:
    """A zero-length meta.json or tables.json is corruption, not an empty host."""
    store = Store.open(state_dir, TOPOLOGY)
    populate(store)
    store.close()
    (state_dir / f"snapshot-{current(state_dir)['generation']:08d}" / name).write_bytes(b"")

    with pytest.raises(StateError, match=rf"{name}: the .* is empty"):
        Store.open(state_dir, TOPOLOGY)


def test_other_format_version_refuses_start(state_dir: Path) -> None:
    """State written by another format version is not read."""
    Store.open(state_dir, TOPOLOGY).close()
    (state_dir / "CURRENT").write_bytes(seal({**current(state_dir), "format": 99}))

    with pytest.raises(StateError, match="state format 99, this hostd reads format 2"):
        Store.open(state_dir, TOPOLOGY)


def test_state_of_another_boot_is_discarded(
    state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a reboot every VM is gone: state written under another boot id is discarded."""
    boot = tmp_path / "boot_id"
    boot.write_text("boot-a\n")
    monkeypatch.setenv(BOOT_ID_FILE_ENV, str(boot))
    store = Store.open(state_dir, TOPOLOGY)
    call(store, "create_vm", VmConfig("vm1", True, TagPolicy.ON_FAULT, 16 * MiB))
    crash(store)
    boot.write_text("boot-b\n")

    reopened = Store.open(state_dir, TOPOLOGY)
    try:
        assert [] == reopened.host.list_vms()
        assert "boot-a" in reopened.report.discarded
        assert "boot-b" == current(state_dir)["boot_id"]
    finally:
        reopened.close()


def test_synced_state_survives_another_boot(
    state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With sync=always every record was fsync'd: the state is kept across a reboot."""
    boot = tmp_path / "boot_id"
    boot.write_text("boot-a\n")
    monkeypatch.setenv(BOOT_ID_FILE_ENV, str(boot))
    store = Store.open(state_dir, TOPOLOGY, sync=SyncMode.ALWAYS)
    call(store, "create_vm", VmConfig("vm1", True, TagPolicy.ON_FAULT, 16 * MiB))
    crash(store)
    boot.write_text("boot-b\n")

    reopened = Store.open(state_dir, TOPOLOGY, sync=SyncMode.ALWAYS)
    try:
        assert ["vm1"] == [vm.vm_id for vm in reopened.host.list_vms()]
    finally:
        reopened.close()


def test_group_commit_syncs_once_for_records_written_before_it(state_dir: Path) -> None:
    """A record written before another caller's fsync started needs no fsync of its own."""
    store = Store.open(state_dir, TOPOLOGY, sync=SyncMode.ALWAYS)
    try:
        first = store.begin("create_vm", (VmConfig("a", False, TagPolicy.ON_FAULT, MiB),))
        store.host.create_vm(VmConfig("a", False, TagPolicy.ON_FAULT, MiB))
        assert first is not None
        token_a = store.commit(first)
        second = store.begin("destroy_vm", ("a",))
        store.host.destroy_vm("a")
        assert second is not None
        token_b = store.commit(second)
        store.wait_durable(token_b)  # one fsync covers both
        synced = store._synced
        store.wait_durable(token_a)
        assert synced == store._synced >= token_b
    finally:
        store.close()


def test_unwritable_journal_refuses_the_call_unchanged_until_writable(state_dir: Path) -> None:
    """ENOSPC on the record: the call is refused before it runs, later mutations too, and
    once the journal is writable calls go on; nothing acknowledged is lost."""
    store = Store.open(state_dir, TOPOLOGY)
    call(store, "create_vm", VmConfig("vm1", True, TagPolicy.ON_FAULT, 16 * MiB))
    journal_fd = store._journal_fd
    store._journal_fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    try:
        with pytest.raises(StateUnavailableError, match="No space left"):
            call(store, "create_vm", VmConfig("vm2", True, TagPolicy.ON_FAULT, 16 * MiB))
        with pytest.raises(StateUnavailableError):
            call(store, "destroy_vm", "vm1")
        assert ["vm1"] == [vm.vm_id for vm in store.host.list_vms()]
    finally:
        os.close(store._journal_fd)
        store._journal_fd = journal_fd
    call(store, "create_vm", VmConfig("vm3", True, TagPolicy.ON_FAULT, 16 * MiB))
    crash(store)

    reopened = Store.open(state_dir, TOPOLOGY)
    try:
        assert ["vm1", "vm3"] == sorted(vm.vm_id for vm in reopened.host.list_vms())
    finally:
        reopened.close()


def test_short_write_is_cut_off_and_refused(state_dir: Path) -> None:
    """Part of a record written before the disk filled is removed; the call is refused."""
    store = Store.open(state_dir, TOPOLOGY)
    call(store, "create_vm", VmConfig("vm1", True, TagPolicy.ON_FAULT, 16 * MiB))
    good = journal_of(state_dir).read_bytes()
    real_write = os.write

    def short_write(fd: int, data: bytes) -> int:
        return real_write(fd, data[: len(data) // 2])

    os.write = short_write  # type: ignore[assignment]
    try:
        with pytest.raises(StateUnavailableError, match="short write"):
            call(store, "destroy_vm", "vm1")
    finally:
        os.write = real_write
    assert good == journal_of(state_dir).read_bytes()
    assert ["vm1"] == [vm.vm_id for vm in store.host.list_vms()]
    store.close()


def test_stale_files_of_an_interrupted_snapshot_are_removed(state_dir: Path) -> None:
    """Temp dirs and older generations left by a crash are deleted at start."""
    store = Store.open(state_dir, TOPOLOGY)
    call(store, "create_vm", VmConfig("vm1", True, TagPolicy.ON_FAULT, 16 * MiB))
    crash(store)
    (state_dir / ".snapshot-00000099.tmp" / "arrays").mkdir(parents=True)
    (state_dir / "snapshot-00000000").mkdir()

    reopened = Store.open(state_dir, TOPOLOGY)
    try:
        assert ["vm1"] == [vm.vm_id for vm in reopened.host.list_vms()]
        assert not any(p.name.endswith(("99.tmp", "00000000")) for p in state_dir.iterdir())
    finally:
        reopened.close()


def test_other_topology_refuses_start_naming_the_difference(state_dir: Path) -> None:
    """The saved host configuration must match the requested one, field by field."""
    Store.open(state_dir, TOPOLOGY).close()
    with pytest.raises(StateError, match=r"another host configuration \(topology\.page_size"):
        Store.open(state_dir, default_topology(4 * GiB, 16 * 1024))


def test_other_placement_refuses_start(state_dir: Path) -> None:
    """The placement policy is part of the saved configuration."""
    Store.open(state_dir, TOPOLOGY).close()
    with pytest.raises(StateError, match="placement: saved 'TAG_BLOCK_AWARE', requested 'NAIVE'"):
        Store.open(state_dir, TOPOLOGY, Placement.NAIVE)


def test_second_store_on_the_same_directory_is_refused(store: Store, state_dir: Path) -> None:
    """One daemon per state directory."""
    with pytest.raises(StateError, match="in use by another hostd"):
        Store.open(state_dir, TOPOLOGY)


def test_state_check_reports_invariant_violations(state_dir: Path) -> None:
    """The start runs no full invariant check; ``hostd state check`` does."""
    store = Store.open(state_dir, TOPOLOGY)
    populate(store)
    store.close()
    snapshot = state_dir / f"snapshot-{current(state_dir)['generation']:08d}"
    meta = unseal((snapshot / "meta.json").read_bytes().rstrip(b"\n"))
    entry = meta["arrays"]["owner"]
    owner_file = snapshot / "arrays" / entry["file"]
    owner = np.load(owner_file)
    owner[:] = 0  # every mapped page loses its owner
    np.save(owner_file, owner)
    crc, size = zlib.crc32(owner_file.read_bytes()), owner_file.stat().st_size
    meta["arrays"]["owner"] = {**entry, "crc32": crc, "size": size}
    (snapshot / "meta.json").write_bytes(seal(meta))
    (state_dir / "CURRENT").write_bytes(
        seal({**current(state_dir), "meta_crc32": zlib.crc32(seal(meta))})
    )

    with pytest.raises(StateError, match=r"violates \d+ invariant"):
        list(check_state_dir(state_dir))


def test_state_check_of_a_sound_directory_says_ok(state_dir: Path) -> None:
    """``state check`` loads and replays without changing anything."""
    store = Store.open(state_dir, TOPOLOGY)
    populate(store)
    crash(store)
    before = sorted((p.name, p.stat().st_size) for p in state_dir.iterdir())
    lines = list(check_state_dir(state_dir))
    assert "  ok" == lines[-1]
    assert any("2 VM(s), 9 journal record(s)" in line for line in lines)
    assert before == sorted((p.name, p.stat().st_size) for p in state_dir.iterdir())


def test_state_reset_moves_the_state_aside(state_dir: Path) -> None:
    """``state reset`` keeps a copy; the directory then starts empty."""
    store = Store.open(state_dir, TOPOLOGY)
    populate(store)
    store.close()
    message = reset_state_dir(state_dir, force=False)
    aside = Path(message.rsplit(" ", 1)[1])
    assert (aside / "CURRENT").exists()
    reopened = Store.open(state_dir, TOPOLOGY)
    try:
        assert [] == reopened.host.list_vms()
    finally:
        reopened.close()


def test_request_ids_are_remembered_across_a_snapshot_and_a_crash(state_dir: Path) -> None:
    """The window of request ids is rebuilt by replay and saved in snapshots."""
    store = Store.open(state_dir, TOPOLOGY, fork_snapshots=False)
    config = VmConfig("vm1", True, TagPolicy.ON_FAULT, 16 * MiB)
    first = call(store, "create_vm", config, request_id="r1")
    store.snapshot()
    fault = call(store, "guest_fault", "vm1", BOOT_RAM_GPA, MiB, Access.WRITE, request_id="r2")
    crash(store)

    reopened = Store.open(state_dir, TOPOLOGY)
    try:
        assert first == reopened.requests.lookup("r1", "create_vm", (config,))
        args = ("vm1", BOOT_RAM_GPA, MiB, Access.WRITE)
        assert fault == reopened.requests.lookup("r2", "guest_fault", args)
    finally:
        reopened.close()


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        1 << 63,
        "vm-1",
        b"\x00\x0f" * 100,
        TagPolicy.ON_TAG_ACCESS,
        Access.TAG,
        TagCopyDirection.FROM_GUEST,
        VirtioMemRequestType.UNPLUG_ALL,
        VmConfig("a", True, TagPolicy.EAGER, 16 * MiB, 4, GiB),
        VirtioMemConfig(128 * MiB, 2 * MiB, 8 * MiB),
        FaultResult(1, 2, 3, 4),
        VirtioMemAnswer(VirtioMemResponse.ACK),
        ("a", 1),
    ],
)
def test_journal_values_round_trip_through_json(value: object) -> None:
    assert value == decode_value(json.loads(json.dumps(encode_value(value))))


def test_a_fault_that_changes_nothing_is_not_journaled_unless_it_has_a_request_id(
    store: Store,
) -> None:
    """A fault on pages already mapped as the access needs (the vCPU race) writes no record; a
    fresh fault does, and so does a no-op fault that carries a request_id (its answer must be
    remembered across a restart)."""
    from hostd.model.types import Access, TagPolicy, VmConfig

    store.host.create_vm(
        VmConfig(vm_id="nf", mte_enabled=True, tag_policy=TagPolicy.ON_FAULT,
                 boot_memory_bytes=1 << 20)
    )  # fmt: skip
    args = ("nf", 0x4000_0000, 4096, Access.WRITE)
    fresh = store.begin("guest_fault", args)
    assert fresh is not None
    store.host.guest_fault(*args)
    store.commit(fresh)
    assert None is store.begin("guest_fault", args)
    with_id = store.begin("guest_fault", args, "req-1")
    assert with_id is not None
    store.abort(with_id)


def test_values_the_journal_cannot_encode_are_refused_before_the_call(store: Store) -> None:
    with pytest.raises(TypeError, match="cannot journal"):
        store.begin("guest_fault", (object(),))


def test_restore_in_small_chunks_gives_the_same_host(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Arrays are read from the snapshot and counts rebuilt chunk by chunk (bounded memory):
    chunk boundaries anywhere give the same host."""
    store = Store.open(state_dir, TOPOLOGY)
    populate(store)
    before = fingerprint(store.host)
    store.close()
    monkeypatch.setattr("hostd.model.host.REBUILD_CHUNK_PAGES", 999)
    monkeypatch.setattr("hostd.model.physmem.REBUILD_CHUNK_PAGES", 999)
    reopened = Store.open(state_dir, TOPOLOGY)
    try:
        assert before == fingerprint(reopened.host)
        assert [] == reopened.host.check_invariants()
    finally:
        reopened.close()


def test_failed_directory_fsync_after_current_moved_loses_no_commit(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the directory cannot be fsync'd after CURRENT was replaced, later records still go
    where a restart reads them (the new journal), and the older files are kept."""
    store = Store.open(state_dir, TOPOLOGY, fork_snapshots=False)
    call(store, "create_vm", VmConfig("vm1", True, TagPolicy.ON_FAULT, 16 * MiB))
    real_replace, real_fsync_dir = os.replace, hostd.store._fsync_dir
    replaced = []

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        replaced.append(Path(dst).name)

    def fsync_dir(path: Path) -> None:
        if replaced and replaced[-1] == "CURRENT" and path == state_dir:
            replaced.clear()
            raise OSError(5, "Input/output error")
        real_fsync_dir(path)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(hostd.store, "_fsync_dir", fsync_dir)
    store.snapshot()
    monkeypatch.undo()
    call(store, "create_vm", VmConfig("vm2", True, TagPolicy.ON_FAULT, 16 * MiB))
    assert 2 == current(state_dir)["generation"]
    assert (state_dir / "journal-00000001.jsonl").exists()  # kept: CURRENT may not be durable
    crash(store)

    reopened = Store.open(state_dir, TOPOLOGY)
    try:
        assert ["vm1", "vm2"] == sorted(vm.vm_id for vm in reopened.host.list_vms())
    finally:
        reopened.close()


def test_restore_counts_invalid_flags_so_the_check_names_them(state_dir: Path) -> None:
    """A flag value its range may not hold is still counted on restore (not folded into a
    valid state): the invariant check reports the invalid pages, not just drifted totals."""
    host = Host(TOPOLOGY)
    host.create_vm(VmConfig("vm1", True, TagPolicy.ON_FAULT, 16 * MiB))
    host.guest_fault("vm1", BOOT_RAM_GPA, MiB, Access.WRITE)
    state = host.save_state()
    flags = state.arrays["flags"].copy()
    flags[0] = 15  # no range holds 15
    state.arrays["flags"] = flags
    restored = Host.restore(state)
    violations = restored.check_invariants()
    assert any("flags invalid for its kind" in v for v in violations)
    assert not any("per-state page totals drifted" in v for v in violations)


def populate_folios_and_pins(store: Store) -> None:
    """A THP-backed MTE guest (huge folios, tags), a pinned guest (its own owner pool) and a
    plain guest, each map spanning several restore chunks."""
    thp = VmConfig("thp", True, TagPolicy.ON_FAULT, 64 * MiB, backing_page_size_bytes=2 * MiB)
    call(store, "create_vm", thp)
    call(store, "guest_fault", "thp", BOOT_RAM_GPA, 16 * MiB, Access.WRITE)
    call(store, "guest_fault", "thp", BOOT_RAM_GPA + 32 * MiB, 4096, Access.TAG)
    call(store, "copy_tags", "thp", BOOT_RAM_GPA, 4096, TagCopyDirection.TO_GUEST, TAGS)
    call(store, "create_vm", VmConfig("pinned", False, TagPolicy.ON_FAULT, 32 * MiB, pinned=True))
    call(store, "create_vm", VmConfig("plain", False, TagPolicy.ON_FAULT, 64 * MiB))
    call(store, "guest_fault", "plain", BOOT_RAM_GPA, 48 * MiB, Access.WRITE)


def pools(host: Host) -> tuple[object, ...]:
    """What restore derives besides the exported state: owner pools, pins, huge folios."""
    mem = host.mem
    return (
        mem.owner_pool.tolist(),
        mem.pinned_owner.tolist(),
        {vm.vm_id: (vm.folio_pages, vm.huge.tolist()) for vm in host.vms.values()},
    )


@pytest.mark.parametrize("how", ["snapshot", "replay"])
def test_a_host_with_huge_folios_and_pinned_pools_restores_equal(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Huge folios (vm.huge) and pinned owner pools come back from a snapshot, or from the
    journal, equal to the original, with chunk boundaries inside the VMs' maps."""
    monkeypatch.setattr("hostd.model.host.REBUILD_CHUNK_PAGES", 999)
    monkeypatch.setattr("hostd.model.physmem.REBUILD_CHUNK_PAGES", 999)
    store = Store.open(state_dir, TOPOLOGY, fork_snapshots=False)
    populate_folios_and_pins(store)
    assert store.host.vms["thp"].huge.any() and store.host.mem.pinned_owner.any()
    before = (fingerprint(store.host), pools(store.host))
    if how == "snapshot":
        store.close()
    else:
        crash(store)
    reopened = Store.open(state_dir, TOPOLOGY)
    try:
        assert (how == "snapshot") == (reopened.report.replayed == 0)
        assert before == (fingerprint(reopened.host), pools(reopened.host))
        assert [] == reopened.host.check_invariants()
    finally:
        reopened.close(snapshot=False)


def test_snapshot_arrays_are_written_as_numpy_reads_them(state_dir: Path) -> None:
    """Arrays written a chunk at a time from the host's memory are plain .npy files whose
    recorded checksum and size are those of the file."""
    store = Store.open(state_dir, TOPOLOGY, fork_snapshots=False)
    populate_folios_and_pins(store)
    host = store.host
    store.close()
    snapshot = state_dir / f"snapshot-{current(state_dir)['generation']:08d}"
    meta = unseal((snapshot / "meta.json").read_bytes().rstrip(b"\n"))
    saved = host.save_state().arrays
    assert set(saved) == set(meta["arrays"])
    for name, entry in meta["arrays"].items():
        path = snapshot / "arrays" / entry["file"]
        assert (entry["crc32"], entry["size"]) == (
            zlib.crc32(path.read_bytes()),
            path.stat().st_size,
        )
        np.testing.assert_array_equal(saved[name], np.load(path, allow_pickle=False))


@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_damaged_huge_folio_array_refuses_start_naming_the_file(
    state_dir: Path, damage: str
) -> None:
    """The arrays added with huge folios are checksummed like the others: damage refuses
    the start in one line naming the file."""
    store = Store.open(state_dir, TOPOLOGY, fork_snapshots=False)
    populate_folios_and_pins(store)
    slot = store.host.vms["thp"].slot
    store.close()
    snapshot = state_dir / f"snapshot-{current(state_dir)['generation']:08d}"
    meta = unseal((snapshot / "meta.json").read_bytes().rstrip(b"\n"))
    array = snapshot / "arrays" / meta["arrays"][f"vm{slot}_huge"]["file"]
    data = bytearray(array.read_bytes())
    if damage == "truncated":
        del data[-1:]
    else:
        data[-1] ^= 0x01
    array.write_bytes(bytes(data))

    with pytest.raises(StateError, match=rf"{array.name}: array 'vm{slot}_huge'") as e:
        Store.open(state_dir, TOPOLOGY)
    assert "\n" not in str(e.value)


def test_a_snapshot_taken_during_a_migration_restores_it(state_dir: Path) -> None:
    """A graceful stop in the middle of a migration snapshots its arrays (dirty pages, the
    round's offsets), and the next start reads them back: the migration carries on."""
    store = Store.open(state_dir, TOPOLOGY, fork_snapshots=False)
    call(store, "create_vm", VmConfig("vm", True, TagPolicy.ON_FAULT, 32 * MiB))
    call(store, "guest_fault", "vm", BOOT_RAM_GPA, 8 * MiB, Access.WRITE)
    call(store, "start_migration", "vm", "m1", 100.0, 30.0)
    call(store, "read_migration_chunk", "vm", "m1", 100.5)
    call(store, "guest_fault", "vm", BOOT_RAM_GPA + 16 * MiB, 4096, Access.WRITE)
    before = store.host.get_migration("vm")
    store.close()

    reopened = Store.open(state_dir, TOPOLOGY)
    try:
        assert 0 == reopened.report.replayed
        assert before == reopened.host.get_migration("vm")
        assert [] == reopened.host.check_invariants()
        while call(reopened, "read_migration_chunk", "vm", "m1", 101.0) is not None:
            pass
        call(reopened, "next_migration_round", "vm", "m1", 101.0)
    finally:
        reopened.close(snapshot=False)
