"""Open streams do not starve anyone: with 64 StreamGuestFaults streams and 8 slow WatchEvents
readers open, every health check and GetHost of a burst is answered within its deadline."""

from __future__ import annotations

import sys

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tagstore.v1 import tagstore_pb2 as pb
from tagstore.v1 import tagstore_pb2_grpc as pb_grpc
from tests.conftest import ADMIN_TOKEN, REPO_ROOT, HostdProcess, MiB, bearer, raw_channel

sys.path.insert(0, str(REPO_ROOT / "bench"))
from stream_load import StreamLoad

pytestmark = pytest.mark.integration

BURST = 200
# Generous: a deadline is what a caller waits at most; the test counts answers, it does not
# time them (bench/bench_streams.py reports the latency figures).
DEADLINE_S = 2.0


def test_health_and_get_host_answer_every_call_of_a_burst_while_streams_are_open(
    daemon: HostdProcess, stub: pb_grpc.TagStorageStub
) -> None:
    """64 fault streams and 8 slow event readers hold no thread: a burst of health checks and
    GetHost calls, each with a deadline, is answered in full, and every stream keeps working."""
    stub.CreateVm(pb.CreateVmRequest(vm_id="load", boot_memory_bytes=4 * MiB))
    stub.GuestFault(pb.GuestFaultRequest(vm_id="load", gpa=0x4000_0000, length=4096, access=1))
    with StreamLoad(daemon.address, bearer(ADMIN_TOKEN), "load") as load:
        answered_before = load.faults_answered
        with raw_channel(daemon.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            admin = pb_grpc.TagStorageStub(channel)
            answered = 0
            for _ in range(BURST):
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE_S)
                assert health_pb2.HealthCheckResponse.SERVING == status.status
                admin.GetHost(pb.GetHostRequest(), metadata=bearer(ADMIN_TOKEN), timeout=DEADLINE_S)
                answered += 1
        assert BURST == answered
        assert load.faults_answered > answered_before, "the fault streams keep being served"
    assert [] == load.errors
    assert [] == list(stub.CheckInvariants(pb.CheckInvariantsRequest()).violations)
