"""Random requests against the real daemon: whatever the field values, an RPC either succeeds or
fails with a status that names a bad call; it never answers UNKNOWN or INTERNAL, never takes
the daemon down, and never leaves the model unsound."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tagstore.v1 import tagstore_pb2 as pb
from tagstore.v1 import tagstore_pb2_grpc as pb_grpc

from .conftest import BOOT_RAM_GPA, GiB, MiB

pytestmark = pytest.mark.integration

DEVICE_GPA = BOOT_RAM_GPA + GiB  # the fixture VM's device memory starts here
U64 = st.one_of(
    st.integers(0, 2**64 - 1),
    st.sampled_from([0, 1, 4095, 4096, BOOT_RAM_GPA, BOOT_RAM_GPA + 4096, 2 * MiB, 2**63]),
    st.integers(0, 64).map(lambda k: k * 2 * MiB),  # sizes and lengths that may be valid
    st.integers(0, 600).map(lambda k: BOOT_RAM_GPA + k * 64 * 4096),  # boot RAM
    st.integers(0, 128).map(lambda k: DEVICE_GPA + k * 2 * MiB),  # DIMM / virtio-mem
)
SMALL = st.integers(0, 2**32 - 1)
# Guest addresses and lengths: plugged memory of the fixture VM most of the time.
GPA = st.one_of(
    st.integers(0, 255).map(lambda k: BOOT_RAM_GPA + k * 64 * 4096),
    st.integers(0, 127).map(lambda k: DEVICE_GPA + k * 2 * MiB),
    U64,
)
LENGTH = st.one_of(st.integers(1, 512).map(lambda k: k * 4096), U64)
ENUM = st.one_of(st.integers(1, 3), st.integers(-3, 7))  # mostly defined values
# Mostly the fixture VM and its devices, so that calls get past the lookups.
VM_IDS = st.one_of(st.just("fz"), st.sampled_from(["fz2", "", "no such vm", "a" * 80]))
DEVICE_IDS = st.one_of(
    st.sampled_from(["vmem0", "dimm0"]), st.sampled_from(["boot-ram", "dimm1", "", "b" * 80])
)
# DestroyVm never takes the fixture VM: the rest of the sequence would only find nothing.
DOOMED_IDS = st.sampled_from(["fz2", "", "no such vm", "a" * 80])
# Codes a bad or unlucky call may get; UNKNOWN and INTERNAL are never among them.
ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}

requests = st.one_of(
    st.builds(
        lambda *a: ("CreateVm", pb.CreateVmRequest(
            vm_id=a[0], mte_enabled=a[1], tag_policy=a[2], boot_memory_bytes=a[3],
            dimm_slots=a[4], max_memory_bytes=a[5])),
        VM_IDS, st.booleans(), ENUM, st.one_of(U64, st.sampled_from([4 * MiB, 64 * MiB])),
        SMALL, U64,
    ),
    st.builds(
        lambda *a: ("GuestFault", pb.GuestFaultRequest(
            vm_id=a[0], gpa=a[1], length=a[2], access=a[3])),
        VM_IDS, GPA, LENGTH, ENUM,
    ),
    st.builds(
        lambda *a: ("CopyTags", pb.CopyTagsRequest(
            vm_id=a[0], gpa=a[1], length=a[2], direction=a[3], tags=a[4])),
        VM_IDS, GPA, st.one_of(st.just(4096), LENGTH), ENUM,
        st.one_of(st.binary(min_size=256, max_size=256), st.binary(max_size=300)),
    ),
    st.builds(
        lambda *a: ("AddMemoryDevice", pb.AddMemoryDeviceRequest(
            vm_id=a[0], device_id=a[1], dimm=pb.DimmConfig(size_bytes=a[2]))),
        VM_IDS, DEVICE_IDS, U64,
    ),
    st.builds(
        lambda *a: ("AddMemoryDevice", pb.AddMemoryDeviceRequest(
            vm_id=a[0], device_id=a[1], virtio_mem=pb.VirtioMemConfig(
                region_size=a[2], block_size=a[3], requested_size=a[4]))),
        VM_IDS, DEVICE_IDS, U64, st.one_of(U64, st.just(2 * MiB)), U64,
    ),
    st.builds(
        lambda *a: ("ResizeVirtioMem", pb.ResizeVirtioMemRequest(
            vm_id=a[0], device_id=a[1], requested_size=a[2])),
        VM_IDS, DEVICE_IDS, U64,
    ),
    st.builds(
        lambda *a: ("VirtioMemRequest", pb.VirtioMemRequestRequest(
            vm_id=a[0], device_id=a[1], type=a[2], addr=a[3], nb_blocks=a[4])),
        VM_IDS, DEVICE_IDS, ENUM, U64, st.one_of(SMALL, st.integers(0, 40)),
    ),
    st.builds(
        lambda *a: ("RemoveMemoryDevice", pb.RemoveMemoryDeviceRequest(
            vm_id=a[0], device_id=a[1])),
        VM_IDS, DEVICE_IDS,
    ),
    st.builds(lambda a: ("DestroyVm", pb.DestroyVmRequest(vm_id=a)), DOOMED_IDS),
)  # fmt: skip


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(calls=st.lists(requests, min_size=1, max_size=8))
def test_random_requests_never_answer_unknown_or_internal(
    stub: pb_grpc.TagStorageStub, calls: list[tuple[str, object]]
) -> None:
    """Any sequence of requests with any field values: OK or a bad-call status, never
    UNKNOWN/INTERNAL; the daemon keeps serving and its state stays sound."""
    # A real VM with a DIMM and a virtio-mem device, so that calls get past the lookups.
    stub.CreateVm(
        pb.CreateVmRequest(
            vm_id="fz",
            mte_enabled=True,
            tag_policy=pb.TAG_POLICY_ON_TAG_ACCESS,
            boot_memory_bytes=64 * MiB,
            dimm_slots=2,
            max_memory_bytes=64 * MiB + GiB,
        )
    )
    stub.AddMemoryDevice(
        pb.AddMemoryDeviceRequest(
            vm_id="fz", device_id="dimm0", dimm=pb.DimmConfig(size_bytes=64 * MiB)
        )
    )
    stub.AddMemoryDevice(
        pb.AddMemoryDeviceRequest(
            vm_id="fz",
            device_id="vmem0",
            virtio_mem=pb.VirtioMemConfig(
                region_size=256 * MiB, block_size=2 * MiB, requested_size=64 * MiB
            ),
        )
    )
    for method, request in calls:
        try:
            getattr(stub, method)(request, timeout=30)
            event(f"{method}: OK")
        except grpc.RpcError as error:
            assert error.code() in ALLOWED, (method, request, error.details())
            event(f"{method}: {error.code().name}")
    assert [] == list(stub.CheckInvariants(pb.CheckInvariantsRequest()).violations)
    for vm_id in ("fz", "fz2"):
        try:
            stub.DestroyVm(pb.DestroyVmRequest(vm_id=vm_id))
        except grpc.RpcError as error:
            assert grpc.StatusCode.NOT_FOUND == error.code()
