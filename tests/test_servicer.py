"""The servicer in-process (hostd.api.servicer and hostd.daemon.create_server) with the real
model: the event queue policy, the journal hook and the server built without a subprocess."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from hostd.api.servicer import _EventQueue
from hostd.daemon import Daemon, create_server
from hostd.model import Event, default_topology
from hostd.model.events import EVENT_FAULT, EVENT_VM_CREATED
from hostd.store import unseal
from tagstore.v1 import tagstore_pb2 as pb
from tagstore.v1 import tagstore_pb2_grpc as pb_grpc
from tests.conftest import ADMIN_TOKEN, token_channel

GiB = 1 << 30
MiB = 1 << 20


def test_full_event_queue_drops_the_oldest_and_counts_them() -> None:
    queue = _EventQueue(maxsize=2, include_faults=False)
    for i in range(5):
        queue.put(Event(EVENT_VM_CREATED, vm_id=f"vm{i}"))
    assert 3 == queue.dropped
    first, second = queue.pop(), queue.pop()
    assert first is not None and second is not None
    assert [(4, "vm3"), (5, "vm4")] == [(s, e.vm_id) for s, e in (first, second)]
    assert queue.pop() is None


def test_fault_events_are_streamed_only_on_request() -> None:
    quiet = _EventQueue(maxsize=4, include_faults=False)
    chatty = _EventQueue(maxsize=4, include_faults=True)
    for queue in (quiet, chatty):
        queue.put(Event(EVENT_FAULT, vm_id="vm"))
    assert quiet.pop() is None
    assert chatty.pop() is not None


@pytest.fixture
def daemon(tmp_path: Path, admin_token_file: Path) -> Iterator[Daemon]:
    built = create_server(
        default_topology(1 * GiB),
        listen="127.0.0.1:0",
        metrics_listen="",
        state_dir=tmp_path / "state",
        admin_token_file=admin_token_file,
    )
    built.start()
    yield built
    built.stop(grace_seconds=5)


def test_port_zero_is_resolved_to_the_bound_port(daemon: Daemon) -> None:
    assert not daemon.address.endswith(":0")
    with token_channel(daemon.address, ADMIN_TOKEN) as channel:
        host = pb_grpc.TagStorageStub(channel).GetHost(pb.GetHostRequest())
    assert 1 * GiB == host.total_bytes


def test_mutations_are_journaled_in_call_order_with_refusals_aborted(daemon: Daemon) -> None:
    """Every mutating call is recorded ahead of running; a refused one is followed by its
    abort record; reads are not recorded."""
    with token_channel(daemon.address, ADMIN_TOKEN) as channel:
        stub = pb_grpc.TagStorageStub(channel)
        stub.CreateVm(pb.CreateVmRequest(vm_id="a", boot_memory_bytes=4 * MiB))
        with pytest.raises(grpc.RpcError):
            stub.CreateVm(pb.CreateVmRequest(vm_id="a", boot_memory_bytes=4 * MiB))
        stub.GetVm(pb.GetVmRequest(vm_id="a"))
        stub.DestroyVm(pb.DestroyVmRequest(vm_id="a"))
    assert daemon.store is not None
    journal = daemon.store.state_dir / f"journal-{daemon.store.generation:08d}.jsonl"
    entries = [unseal(line) for line in journal.read_bytes().splitlines()]
    assert [("create_vm", None), ("create_vm", None), (None, 2), ("destroy_vm", None)] == [
        (e.get("method"), e.get("abort")) for e in entries
    ]
