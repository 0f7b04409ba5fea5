"""Checks and exports read a forked copy-on-write image of the host and say what a direct read
of the host would say: the servicer in-process (so that the test can reach its host, corrupt
it, and compare), serving over gRPC and forking real children."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from hostd.api import convert
from hostd.cow import CHILD_NICENESS, CHILD_YIELD_SECONDS, call_on_copy
from hostd.daemon import Daemon, create_server
from hostd.model import Host, default_topology, export
from tagstore.v1 import tagstore_pb2 as pb
from tagstore.v1 import tagstore_pb2_grpc as pb_grpc
from tests.conftest import ADMIN_TOKEN, token_channel
from tests.model import reference_export

GiB = 1 << 30
MiB = 1 << 20
BOOT_RAM_GPA = 0x4000_0000


@pytest.fixture
def daemon(tmp_path: Path, admin_token_file: Path) -> Iterator[Daemon]:
    built = create_server(
        default_topology(1 * GiB),
        listen="127.0.0.1:0",
        metrics_listen="",
        state_dir=None,
        admin_token_file=admin_token_file,
    )
    built.start()
    yield built
    built.stop(grace_seconds=5)


@pytest.fixture
def stub(daemon: Daemon) -> Iterator[pb_grpc.TagStorageStub]:
    with token_channel(daemon.address, ADMIN_TOKEN) as channel:
        stub = pb_grpc.TagStorageStub(channel)
        # Interleaved guests: extents and mapping runs that are not one run each.
        for vm_id, mte in (("a", True), ("b", False), ("c", True)):
            stub.CreateVm(
                pb.CreateVmRequest(
                    vm_id=vm_id,
                    mte_enabled=mte,
                    tag_policy=pb.TAG_POLICY_ON_FAULT if mte else pb.TAG_POLICY_UNSPECIFIED,
                    boot_memory_bytes=GiB // 8,
                )
            )
        for off in range(0, 64 * MiB, 4 * MiB):
            for vm_id in ("a", "b", "c"):
                stub.GuestFault(
                    pb.GuestFaultRequest(
                        vm_id=vm_id, gpa=BOOT_RAM_GPA + off, length=MiB, access=pb.ACCESS_WRITE
                    )
                )
        yield stub


def _host(daemon: Daemon) -> Host:
    return daemon.servicer.host


def _children() -> set[int]:
    """This process's child processes (each thread's children are listed under it)."""
    found: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            found |= {int(pid) for pid in (task / "children").read_text().split()}
    return found


def _corrupt(host: Host) -> None:
    """Two broken invariants: a drifted refcount and a page mapped twice."""
    host.mem.regions[0].refcount[int(np.flatnonzero(host.mem.regions[0].refcount)[0])] += 1
    vm = host.vms["b"]
    offs = np.flatnonzero(vm.stage2)
    vm.stage2[offs[1]] = vm.stage2[offs[0]]


def test_a_check_on_a_copy_reports_what_a_direct_check_reports(
    daemon: Daemon, stub: pb_grpc.TagStorageStub
) -> None:
    assert [] == list(stub.CheckInvariants(pb.CheckInvariantsRequest()).violations)
    host = _host(daemon)
    _corrupt(host)
    direct = host.check_invariants()
    assert len(direct) >= 2
    assert direct == list(stub.CheckInvariants(pb.CheckInvariantsRequest()).violations)


def test_the_periodic_check_on_a_copy_counts_what_a_direct_check_reports(
    daemon: Daemon, stub: pb_grpc.TagStorageStub
) -> None:
    host = _host(daemon)
    assert 0 == daemon.metrics.check_invariants_now()
    _corrupt(host)
    assert len(host.check_invariants()) == daemon.metrics.check_invariants_now()


@pytest.mark.parametrize("chunk_pages", [4096, export.EXPORT_CHUNK_PAGES])
def test_an_export_streamed_in_chunks_equals_the_whole_array_export(
    daemon: Daemon,
    stub: pb_grpc.TagStorageStub,
    chunk_pages: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same messages, byte for byte, as the export built over whole arrays and encoded at
    once (the child inherits the chunk size at the fork)."""
    monkeypatch.setattr(export, "EXPORT_CHUNK_PAGES", chunk_pages)
    host = _host(daemon)
    expected = convert.export_to_proto(reference_export.export_state(host), host.page_size)
    assert len(expected) > 1 and expected[0].header.page_extent_count > 40
    assert expected == list(stub.ExportState(pb.ExportStateRequest()))


def test_a_cancelled_export_stream_kills_the_copy(
    daemon: Daemon, stub: pb_grpc.TagStorageStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that stops reading an export does not leave its child running: the child is
    killed once the stream ends, even one that would never finish."""

    def endless(stream: object, page_size: int) -> Iterator[pb.ExportStateResponse]:
        while True:
            yield pb.ExportStateResponse(header=pb.ExportHeader(page_size=page_size))

    monkeypatch.setattr(convert, "export_stream_to_proto", endless)
    before = _children()
    call = stub.ExportState(pb.ExportStateRequest())
    for _ in range(3):
        next(call)
    copies = _children() - before
    assert len(copies) == 1
    call.cancel()
    with pytest.raises(grpc.RpcError):
        for _ in call:
            pass
    deadline = time.monotonic() + 30
    while copies & _children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not copies & _children()


def test_a_copy_reads_at_idle_priority_and_gives_up_its_cpu_on_a_timer() -> None:
    """The child runs SCHED_IDLE at nice 19, with an interval timer that makes it yield its CPU
    every ``CHILD_YIELD_SECONDS`` (without it, fault p99 during back-to-back checks was 2.5x
    idle on this project's machine)."""

    def probe() -> tuple[int, int, float]:
        return os.sched_getscheduler(0), os.nice(0), signal.getitimer(signal.ITIMER_REAL)[1]

    policy, niceness, interval = call_on_copy(threading.Lock(), probe)
    assert os.SCHED_IDLE == policy
    assert niceness >= min(19, os.nice(0) + CHILD_NICENESS)
    assert interval == pytest.approx(CHILD_YIELD_SECONDS, rel=0.5)
