"""Persistence (hostd.store) with the real model: snapshot + journal, restart and refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

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
from hostd.store import StateError, Store, decode_value, encode_value

GiB = 1 << 30
TOPOLOGY = default_topology(1 * GiB)
TAGS = bytes(i % 16 for i in range(4096 // 16))


def call(store: Store, method: str, *args: object) -> object:
    """What the servicer does: prepare the record, call the model, commit on success."""
    record = store.prepare(method, args)
    result = getattr(store.host, method)(*args)
    if record is not None:
        store.commit(record)
    return result


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
    store = Store.open(state_dir, TOPOLOGY)
    populate(store)
    before = fingerprint(store.host)
    store.close()

    generation = int((state_dir / "CURRENT").read_text())
    assert b"" == (state_dir / f"journal-{generation:08d}.jsonl").read_bytes()
    reopened = Store.open(state_dir, TOPOLOGY)
    try:
        assert before == fingerprint(reopened.host)
    finally:
        reopened.close()


def test_only_the_current_generation_is_kept(state_dir: Path) -> None:
    store = Store.open(state_dir, TOPOLOGY, snapshot_every=3)
    populate(store)
    store.close()
    names = sorted(p.name for p in state_dir.iterdir())
    generation = int((state_dir / "CURRENT").read_text())
    expected = ["CURRENT", "LOCK", f"journal-{generation:08d}.jsonl", f"snapshot-{generation:08d}"]
    assert expected == names


def test_snapshot_every_n_entries_truncates_the_journal(store: Store) -> None:
    store.snapshot_every = 4
    first = store.generation
    populate(store)  # 9 journaled calls: two snapshots, one call left in the journal
    assert first + 2 == store.generation
    journal = store.state_dir / f"journal-{store.generation:08d}.jsonl"
    assert 1 == len(journal.read_text().splitlines())


def test_refused_call_is_not_journaled(store: Store) -> None:
    call(store, "create_vm", VmConfig("vm1", False, TagPolicy.ON_FAULT, 16 * MiB))
    with pytest.raises(FailedPreconditionError):
        call(store, "guest_fault", "vm1", 0x1000, 4096, Access.READ)
    journal = store.state_dir / f"journal-{store.generation:08d}.jsonl"
    assert ["create_vm"] == [
        json.loads(line)["method"] for line in journal.read_text().splitlines()
    ]


def test_queries_are_not_journaled(store: Store) -> None:
    assert store.prepare("status", ()) is None
    assert store.prepare("export_state", ()) is None
    assert store.prepare("check_invariants", ()) is None


def test_torn_last_journal_line_is_dropped(state_dir: Path) -> None:
    store = Store.open(state_dir, TOPOLOGY)
    call(store, "create_vm", VmConfig("vm1", True, TagPolicy.ON_FAULT, 16 * MiB))
    journal = state_dir / f"journal-{store.generation:08d}.jsonl"
    crash(store)
    with open(journal, "ab") as f:
        f.write(b'{"seq":2,"method":"destroy_vm","ar')  # killed mid-write: never acknowledged

    reopened = Store.open(state_dir, TOPOLOGY)
    try:
        assert ["vm1"] == [vm.vm_id for vm in reopened.host.list_vms()]
    finally:
        reopened.close()


def test_corrupt_journal_line_refuses_start(state_dir: Path) -> None:
    store = Store.open(state_dir, TOPOLOGY)
    call(store, "create_vm", VmConfig("vm1", True, TagPolicy.ON_FAULT, 16 * MiB))
    call(store, "create_vm", VmConfig("vm2", True, TagPolicy.ON_FAULT, 16 * MiB))
    journal = state_dir / f"journal-{store.generation:08d}.jsonl"
    crash(store)
    lines = journal.read_bytes().split(b"\n")
    journal.write_bytes(b"\n".join([b"not json", *lines[1:]]))

    with pytest.raises(StateError, match=r"journal-\d+\.jsonl:1: unreadable journal entry"):
        Store.open(state_dir, TOPOLOGY)


def test_journal_entry_refused_on_replay_refuses_start(state_dir: Path) -> None:
    store = Store.open(state_dir, TOPOLOGY)
    call(store, "create_vm", VmConfig("vm1", True, TagPolicy.ON_FAULT, 16 * MiB))
    journal = state_dir / f"journal-{store.generation:08d}.jsonl"
    crash(store)
    with open(journal, "a") as f:
        f.write(json.dumps({"seq": 2, "method": "destroy_vm", "args": ["nope"]}) + "\n")

    with pytest.raises(StateError, match="destroy_vm was refused on replay"):
        Store.open(state_dir, TOPOLOGY)


def test_other_topology_refuses_start_naming_the_difference(state_dir: Path) -> None:
    Store.open(state_dir, TOPOLOGY).close()
    with pytest.raises(StateError, match=r"another host configuration \(topology\.page_size"):
        Store.open(state_dir, default_topology(4 * GiB, 16 * 1024))


def test_other_placement_refuses_start(state_dir: Path) -> None:
    Store.open(state_dir, TOPOLOGY).close()
    with pytest.raises(StateError, match="placement: saved 'TAG_BLOCK_AWARE', requested 'NAIVE'"):
        Store.open(state_dir, TOPOLOGY, Placement.NAIVE)


def test_second_store_on_the_same_directory_is_refused(store: Store, state_dir: Path) -> None:
    with pytest.raises(StateError, match="in use by another hostd"):
        Store.open(state_dir, TOPOLOGY)


def test_state_violating_invariants_refuses_start(state_dir: Path) -> None:
    store = Store.open(state_dir, TOPOLOGY)
    populate(store)
    store.close()
    generation = int((state_dir / "CURRENT").read_text())
    snapshot = state_dir / f"snapshot-{generation:08d}"
    meta = json.loads((snapshot / "meta.json").read_text())
    owner_file = snapshot / "arrays" / meta["arrays"]["owner"]
    owner = np.load(owner_file)
    owner[:] = 0  # every mapped page loses its owner
    np.save(owner_file, owner)

    with pytest.raises(StateError, match=r"violates .* invariant"):
        Store.open(state_dir, TOPOLOGY)


def test_stale_files_of_an_interrupted_snapshot_are_removed(state_dir: Path) -> None:
    store = Store.open(state_dir, TOPOLOGY)
    call(store, "create_vm", VmConfig("vm1", True, TagPolicy.ON_FAULT, 16 * MiB))
    crash(store)
    (state_dir / ".snapshot-00000099.tmp" / "arrays").mkdir(parents=True)
    (state_dir / "snapshot-00000098").mkdir()
    (state_dir / "journal-00000098.jsonl").write_text("garbage\n")

    reopened = Store.open(state_dir, TOPOLOGY)
    try:
        assert ["vm1"] == [vm.vm_id for vm in reopened.host.list_vms()]
        assert not any("0000009" in p.name for p in state_dir.iterdir())
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
    ],
)
def test_journal_values_round_trip_through_json(value: object) -> None:
    assert value == decode_value(json.loads(json.dumps(encode_value(value))))


def test_values_the_journal_cannot_encode_are_refused_before_the_call(store: Store) -> None:
    with pytest.raises(TypeError, match="cannot journal"):
        store.prepare("guest_fault", (object(),))
