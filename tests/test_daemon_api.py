"""Every RPC of the real daemon (a subprocess), and bad input for each: the right code, the
ErrorInfo reason and metadata, nothing changed, and the daemon still serving."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from tagstore.v1 import tagstore_pb2 as pb
from tagstore.v1 import tagstore_pb2_grpc as pb_grpc
from tests.conftest import BOOT_RAM_GPA, GiB, HostdProcess, MiB

pytestmark = pytest.mark.integration

Stub = pb_grpc.TagStorageStub
PAGE = 4096


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo detail of a failed call (there must be exactly one)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the status carries google.rpc.Status details"
    (detail,) = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    return info


def fingerprint(stub: Stub) -> tuple[Any, ...]:
    """The whole observable state of the daemon."""
    return (
        stub.ListVms(pb.ListVmsRequest()),
        list(stub.ExportState(pb.ExportStateRequest())),
        stub.GetHost(pb.GetHostRequest()),
    )


# -- happy paths -------------------------------------------------------------------------------


def test_get_host_reports_the_configured_memory(stub: Stub) -> None:
    host = stub.GetHost(pb.GetHostRequest())
    assert (PAGE, 4 * GiB) == (host.page_size, host.total_bytes)
    assert ["tag0", "tag1", "untagged0"] == [r.name for r in host.regions]
    assert pb.PLACEMENT_TAG_BLOCK_AWARE == host.placement
    assert pb.TAG_STORAGE_MODE_DYNAMIC == host.tag_storage_mode
    assert host.total_bytes == sum(r.total_bytes for r in host.regions)


def test_vm_lifecycle_create_get_list_destroy(stub: Stub, vm_id: str) -> None:
    created = stub.CreateVm(
        pb.CreateVmRequest(
            vm_id=vm_id, mte_enabled=True, tag_policy=pb.TAG_POLICY_EAGER, boot_memory_bytes=8 * MiB
        )
    )
    assert (vm_id, pb.TAG_POLICY_EAGER, 8 * MiB) == (
        created.vm_id,
        created.tag_policy,
        created.tagged_bytes,
    ), "an EAGER VM's boot RAM is tagged at creation"
    assert BOOT_RAM_GPA == created.regions[0].gpa
    assert created.vm_token, "CreateVm answers the VM's token, and only CreateVm does"
    created.ClearField("vm_token")
    assert created == stub.GetVm(pb.GetVmRequest(vm_id=vm_id))
    assert vm_id in [vm.vm_id for vm in stub.ListVms(pb.ListVmsRequest()).vms]

    destroyed = stub.DestroyVm(pb.DestroyVmRequest(vm_id=vm_id))
    assert created == destroyed.vm, "DestroyVm answers the VM as it was just before"
    assert vm_id not in [vm.vm_id for vm in stub.ListVms(pb.ListVmsRequest()).vms]


def test_fault_of_an_mte_vm_maps_tagged_pages_and_reserves_tag_blocks(
    stub: Stub, vm: pb.Vm
) -> None:
    answer = stub.GuestFault(
        pb.GuestFaultRequest(vm_id=vm.vm_id, gpa=BOOT_RAM_GPA, length=MiB, access=pb.ACCESS_WRITE)
    )
    assert MiB // PAGE == answer.newly_mapped_pages
    assert answer.tag_blocks_reserved > 0
    after = stub.GetVm(pb.GetVmRequest(vm_id=vm.vm_id))
    assert (MiB, MiB) == (after.mapped_bytes, after.tagged_bytes)


def test_stream_guest_faults_answers_every_request_in_order(stub: Stub, vm: pb.Vm) -> None:
    requests = [
        pb.GuestFaultRequest(
            vm_id=vm.vm_id,
            gpa=BOOT_RAM_GPA + i * MiB,
            length=PAGE * (i + 1),
            access=pb.ACCESS_READ,
        )
        for i in range(5)
    ]
    answers = list(stub.StreamGuestFaults(iter(requests)))
    assert [r.length // PAGE for r in requests] == [a.newly_mapped_pages for a in answers]


def test_stream_guest_faults_ends_with_the_first_error_after_the_earlier_answers(
    stub: Stub, vm: pb.Vm
) -> None:
    good = pb.GuestFaultRequest(
        vm_id=vm.vm_id, gpa=BOOT_RAM_GPA, length=PAGE, access=pb.ACCESS_WRITE
    )
    bad = pb.GuestFaultRequest(vm_id=vm.vm_id, gpa=0x1000, length=PAGE, access=pb.ACCESS_WRITE)
    never = pb.GuestFaultRequest(
        vm_id=vm.vm_id, gpa=BOOT_RAM_GPA + MiB, length=PAGE, access=pb.ACCESS_WRITE
    )
    answers = []
    with pytest.raises(grpc.RpcError) as caught:
        for answer in stub.StreamGuestFaults(iter([good, bad, never])):
            answers.append(answer)
    assert [1] == [a.newly_mapped_pages for a in answers]
    assert grpc.StatusCode.FAILED_PRECONDITION == caught.value.code()
    assert "GPA_NOT_PLUGGED" == error_info(caught.value).reason
    assert PAGE == stub.GetVm(pb.GetVmRequest(vm_id=vm.vm_id)).mapped_bytes, "never ran"


def test_dimm_is_added_at_device_memory_and_removed(stub: Stub, vm: pb.Vm) -> None:
    dimm = stub.AddMemoryDevice(
        pb.AddMemoryDeviceRequest(
            vm_id=vm.vm_id, device_id="dimm0", dimm=pb.DimmConfig(size_bytes=128 * MiB)
        )
    )
    assert (pb.MEMORY_DEVICE_KIND_DIMM, 2 * GiB, 128 * MiB) == (dimm.kind, dimm.gpa, dimm.size)
    assert (dimm.gpa, dimm.size) == (dimm.dimm.addr, dimm.dimm.size)
    stub.GuestFault(
        pb.GuestFaultRequest(vm_id=vm.vm_id, gpa=dimm.gpa, length=MiB, access=pb.ACCESS_WRITE)
    )
    stub.RemoveMemoryDevice(pb.RemoveMemoryDeviceRequest(vm_id=vm.vm_id, device_id="dimm0"))
    after = stub.GetVm(pb.GetVmRequest(vm_id=vm.vm_id))
    assert ["boot-ram"] == [r.device_id for r in after.regions]
    assert 0 == after.mapped_bytes


def test_virtio_mem_plug_state_resize_unplug_all(
    stub: Stub, vm_with_virtio_mem: tuple[pb.Vm, pb.MemoryDevice]
) -> None:
    vm, device = vm_with_virtio_mem
    assert device.gpa == device.virtio_mem.addr

    def request(
        kind: pb.VirtioMemRequestType, addr: int = 0, nb_blocks: int = 0
    ) -> pb.VirtioMemRequestResponse:
        return stub.VirtioMemRequest(
            pb.VirtioMemRequestRequest(
                vm_id=vm.vm_id, device_id="vmem0", type=kind, addr=addr, nb_blocks=nb_blocks
            )
        )

    assert (
        pb.VIRTIO_MEM_RESPONSE_ACK
        == request(pb.VIRTIO_MEM_REQUEST_TYPE_PLUG, device.gpa, 4).response
    )
    state = request(pb.VIRTIO_MEM_REQUEST_TYPE_STATE, device.gpa, 8)
    assert (pb.VIRTIO_MEM_RESPONSE_ACK, pb.VIRTIO_MEM_BLOCK_STATE_MIXED) == (
        state.response,
        state.state,
    )
    resized = stub.ResizeVirtioMem(
        pb.ResizeVirtioMemRequest(vm_id=vm.vm_id, device_id="vmem0", requested_size=0)
    )
    assert (0, 8 * MiB) == (resized.virtio_mem.requested_size, resized.virtio_mem.plugged_size)
    assert pb.VIRTIO_MEM_RESPONSE_ACK == request(pb.VIRTIO_MEM_REQUEST_TYPE_UNPLUG_ALL).response
    stub.RemoveMemoryDevice(pb.RemoveMemoryDeviceRequest(vm_id=vm.vm_id, device_id="vmem0"))


def test_virtio_mem_protocol_errors_are_answers_not_rpc_errors(
    stub: Stub, vm_with_virtio_mem: tuple[pb.Vm, pb.MemoryDevice]
) -> None:
    vm, device = vm_with_virtio_mem
    answer = stub.VirtioMemRequest(
        pb.VirtioMemRequestRequest(
            vm_id=vm.vm_id,
            device_id="vmem0",
            type=pb.VIRTIO_MEM_REQUEST_TYPE_PLUG,
            addr=device.gpa + PAGE,
            nb_blocks=1,
        )
    )
    assert pb.VIRTIO_MEM_RESPONSE_ERROR == answer.response
    beyond = stub.VirtioMemRequest(
        pb.VirtioMemRequestRequest(
            vm_id=vm.vm_id,
            device_id="vmem0",
            type=pb.VIRTIO_MEM_REQUEST_TYPE_PLUG,
            addr=device.gpa,
            nb_blocks=100,
        )
    )
    assert beyond.response in (pb.VIRTIO_MEM_RESPONSE_NACK, pb.VIRTIO_MEM_RESPONSE_ERROR)


def test_tags_written_to_the_guest_read_back(stub: Stub, vm: pb.Vm) -> None:
    tags = bytes(i % 16 for i in range(2 * PAGE // 16))
    stub.CopyTags(
        pb.CopyTagsRequest(
            vm_id=vm.vm_id,
            gpa=BOOT_RAM_GPA,
            length=2 * PAGE,
            direction=pb.TAG_COPY_DIRECTION_TO_GUEST,
            tags=tags,
        )
    )
    read = stub.CopyTags(
        pb.CopyTagsRequest(
            vm_id=vm.vm_id,
            gpa=BOOT_RAM_GPA,
            length=2 * PAGE,
            direction=pb.TAG_COPY_DIRECTION_FROM_GUEST,
        )
    )
    assert tags == read.tags


def test_check_invariants_finds_nothing_after_every_other_test(stub: Stub) -> None:
    assert [] == list(stub.CheckInvariants(pb.CheckInvariantsRequest()).violations)


def test_export_state_lists_every_page_once_and_the_vm_mapping(stub: Stub, vm: pb.Vm) -> None:
    stub.GuestFault(
        pb.GuestFaultRequest(vm_id=vm.vm_id, gpa=BOOT_RAM_GPA, length=MiB, access=pb.ACCESS_WRITE)
    )
    messages = list(stub.ExportState(pb.ExportStateRequest()))
    header = messages[0].header
    extents = [e for m in messages if m.HasField("page_extents") for e in m.page_extents.extents]
    runs = [r for m in messages if m.HasField("mapping_runs") for r in m.mapping_runs.runs]
    blocks = [
        b
        for m in messages
        if m.HasField("reserved_tag_blocks")
        for b in m.reserved_tag_blocks.blocks
    ]
    assert (header.page_extent_count, header.mapping_run_count) == (len(extents), len(runs))
    assert header.reserved_tag_block_count == len(blocks)
    assert 4 * GiB // PAGE == sum(e.count for e in extents)
    mine = [r for r in runs if r.vm_id == vm.vm_id]
    assert MiB // PAGE == sum(r.count for r in mine)
    assert all(r.tagged for r in mine)


def test_watch_events_streams_vm_and_device_events(stub: Stub, vm_id: str) -> None:
    call = stub.WatchEvents(pb.WatchEventsRequest(), timeout=30)
    call.initial_metadata()  # the subscription is active from here on
    stub.CreateVm(
        pb.CreateVmRequest(
            vm_id=vm_id, boot_memory_bytes=4 * MiB, dimm_slots=1, max_memory_bytes=GiB
        )
    )
    stub.AddMemoryDevice(
        pb.AddMemoryDeviceRequest(vm_id=vm_id, device_id="d", dimm=pb.DimmConfig(size_bytes=MiB))
    )
    stub.DestroyVm(pb.DestroyVmRequest(vm_id=vm_id))
    seen = []
    for message in call:
        if message.event.vm_id == vm_id:
            seen.append((message.event.kind, message.event.device_id))
        if message.event.kind == "vm_destroyed" and message.event.vm_id == vm_id:
            break
    call.cancel()
    assert [("vm_created", ""), ("device_added", "d"), ("vm_destroyed", "")] == seen


def test_health_reports_serving_for_the_server_and_the_service(daemon: HostdProcess) -> None:
    with daemon.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tagstore.v1.TagStorage"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert health_pb2.HealthCheckResponse.SERVING == answer.status


def test_reflection_lists_the_services(daemon: HostdProcess) -> None:
    with daemon.channel() as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = list(reflection.ServerReflectionInfo(iter([request])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"tagstore.v1.TagStorage", "grpc.health.v1.Health"} <= names


# -- bad input ----------------------------------------------------------------------------------

TARGET = "bad-input-target"
PLAIN = "bad-input-plain"


@pytest.fixture(scope="module")
def targets(stub: Stub) -> pb.MemoryDevice:
    """An MTE VM with its one DIMM slot used and a virtio-mem device with a plugged block, and a
    VM without MTE. Returns the virtio-mem device."""
    stub.CreateVm(
        pb.CreateVmRequest(
            vm_id=TARGET,
            mte_enabled=True,
            tag_policy=pb.TAG_POLICY_ON_FAULT,
            boot_memory_bytes=16 * MiB,
            dimm_slots=1,
            max_memory_bytes=16 * MiB + GiB,
        )
    )
    stub.CreateVm(pb.CreateVmRequest(vm_id=PLAIN, boot_memory_bytes=16 * MiB))
    stub.AddMemoryDevice(
        pb.AddMemoryDeviceRequest(
            vm_id=TARGET, device_id="dimm0", dimm=pb.DimmConfig(size_bytes=MiB)
        )
    )
    device = stub.AddMemoryDevice(
        pb.AddMemoryDeviceRequest(
            vm_id=TARGET,
            device_id="vmem0",
            virtio_mem=pb.VirtioMemConfig(
                region_size=64 * MiB, block_size=2 * MiB, requested_size=4 * MiB
            ),
        )
    )
    stub.VirtioMemRequest(
        pb.VirtioMemRequestRequest(
            vm_id=TARGET,
            device_id="vmem0",
            type=pb.VIRTIO_MEM_REQUEST_TYPE_PLUG,
            addr=device.gpa,
            nb_blocks=1,
        )
    )
    return device


def _fault(**kw: Any) -> pb.GuestFaultRequest:
    fields = {"vm_id": TARGET, "gpa": BOOT_RAM_GPA, "length": PAGE, "access": pb.ACCESS_WRITE}
    return pb.GuestFaultRequest(**{**fields, **kw})


def _copy(**kw: Any) -> pb.CopyTagsRequest:
    fields = {
        "vm_id": TARGET,
        "gpa": BOOT_RAM_GPA,
        "length": PAGE,
        "direction": pb.TAG_COPY_DIRECTION_TO_GUEST,
        "tags": bytes(PAGE // 16),
    }
    return pb.CopyTagsRequest(**{**fields, **kw})


def _mte_vm(**kw: Any) -> pb.CreateVmRequest:
    fields = {
        "vm_id": "new-vm",
        "mte_enabled": True,
        "tag_policy": pb.TAG_POLICY_ON_FAULT,
        "boot_memory_bytes": 16 * MiB,
    }
    return pb.CreateVmRequest(**{**fields, **kw})


def _vmem(kind: int = pb.VIRTIO_MEM_REQUEST_TYPE_PLUG, **kw: Any) -> pb.VirtioMemRequestRequest:
    fields = {"vm_id": TARGET, "device_id": "vmem0", "type": kind, "nb_blocks": 1}
    return pb.VirtioMemRequestRequest(**{**fields, **kw})


def _virtio(region: int = 64 * MiB, block: int = 2 * MiB, requested: int = 0) -> pb.VirtioMemConfig:
    return pb.VirtioMemConfig(region_size=region, block_size=block, requested_size=requested)


# (rpc, request, code, reason, metadata that must be present)
BAD_INPUT: list[tuple[str, Any, grpc.StatusCode, str, dict[str, str]]] = [
    (
        "CreateVm",
        _mte_vm(tag_policy=pb.TAG_POLICY_UNSPECIFIED),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        {"field": "tag_policy"},
    ),
    (
        "CreateVm",
        _mte_vm(tag_policy=99),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        {"field": "tag_policy", "value": "99"},
    ),
    (
        "CreateVm",
        _mte_vm(vm_id=""),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        {"field": "vm_id"},
    ),
    (
        "CreateVm",
        _mte_vm(boot_memory_bytes=0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        {"field": "boot_memory_bytes"},
    ),
    (
        "CreateVm",
        _mte_vm(boot_memory_bytes=PAGE + 1),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        {"field": "boot_memory_bytes"},
    ),
    (
        "CreateVm",
        _mte_vm(vm_id=TARGET),
        grpc.StatusCode.ALREADY_EXISTS,
        "VM_ALREADY_EXISTS",
        {"vm_id": TARGET},
    ),
    (
        "CreateVm",
        _mte_vm(tag_policy=pb.TAG_POLICY_EAGER, boot_memory_bytes=8 * GiB),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "*_EXHAUSTED",
        {},
    ),
    (
        "GetVm",
        pb.GetVmRequest(vm_id="nope"),
        grpc.StatusCode.NOT_FOUND,
        "VM_NOT_FOUND",
        {"vm_id": "nope"},
    ),
    (
        "DestroyVm",
        pb.DestroyVmRequest(vm_id="nope"),
        grpc.StatusCode.NOT_FOUND,
        "VM_NOT_FOUND",
        {"vm_id": "nope"},
    ),
    (
        "GuestFault",
        _fault(access=pb.ACCESS_UNSPECIFIED),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        {"field": "access"},
    ),
    (
        "GuestFault",
        _fault(gpa=BOOT_RAM_GPA + 1),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        {"field": "gpa"},
    ),
    (
        "GuestFault",
        _fault(length=0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        {"field": "length"},
    ),
    (
        "GuestFault",
        _fault(gpa=0x1000),
        grpc.StatusCode.FAILED_PRECONDITION,
        "GPA_NOT_PLUGGED",
        {"vm_id": TARGET, "gpa": "4096"},
    ),
    (
        "GuestFault",
        _fault(vm_id="nope"),
        grpc.StatusCode.NOT_FOUND,
        "VM_NOT_FOUND",
        {"vm_id": "nope"},
    ),
    (
        "GuestFault",
        _fault(vm_id=PLAIN, access=pb.ACCESS_TAG),
        grpc.StatusCode.FAILED_PRECONDITION,
        "VM_NOT_MTE",
        {"vm_id": PLAIN},
    ),
    (
        "AddMemoryDevice",
        pb.AddMemoryDeviceRequest(vm_id=TARGET, device_id="x"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        {"field": "device"},
    ),
    (
        "AddMemoryDevice",
        pb.AddMemoryDeviceRequest(vm_id=TARGET, device_id="x", dimm=pb.DimmConfig(size_bytes=0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        {"field": "size_bytes"},
    ),
    (
        "AddMemoryDevice",
        pb.AddMemoryDeviceRequest(vm_id=TARGET, device_id="x", dimm=pb.DimmConfig(size_bytes=MiB)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "DIMM_SLOTS_EXHAUSTED",
        {"vm_id": TARGET},
    ),
    (
        "AddMemoryDevice",
        pb.AddMemoryDeviceRequest(vm_id=TARGET, device_id="x", virtio_mem=_virtio(block=3 * MiB)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        {"field": "block_size"},
    ),
    (
        "AddMemoryDevice",
        pb.AddMemoryDeviceRequest(vm_id=TARGET, device_id="vmem0", virtio_mem=_virtio()),
        grpc.StatusCode.ALREADY_EXISTS,
        "DEVICE_ALREADY_EXISTS",
        {"device_id": "vmem0"},
    ),
    (
        "AddMemoryDevice",
        pb.AddMemoryDeviceRequest(vm_id=TARGET, device_id="x", virtio_mem=_virtio(region=4 * GiB)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "GUEST_ADDRESS_SPACE_EXHAUSTED",
        {"vm_id": TARGET},
    ),
    (
        "AddMemoryDevice",
        pb.AddMemoryDeviceRequest(vm_id="nope", device_id="x", dimm=pb.DimmConfig(size_bytes=MiB)),
        grpc.StatusCode.NOT_FOUND,
        "VM_NOT_FOUND",
        {"vm_id": "nope"},
    ),
    (
        "RemoveMemoryDevice",
        pb.RemoveMemoryDeviceRequest(vm_id=TARGET, device_id="boot-ram"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "BOOT_RAM",
        {"device_id": "boot-ram"},
    ),
    (
        "RemoveMemoryDevice",
        pb.RemoveMemoryDeviceRequest(vm_id=TARGET, device_id="vmem0"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "DEVICE_HAS_PLUGGED_MEMORY",
        {"device_id": "vmem0"},
    ),
    (
        "RemoveMemoryDevice",
        pb.RemoveMemoryDeviceRequest(vm_id=TARGET, device_id="nope"),
        grpc.StatusCode.NOT_FOUND,
        "DEVICE_NOT_FOUND",
        {"device_id": "nope"},
    ),
    (
        "ResizeVirtioMem",
        pb.ResizeVirtioMemRequest(vm_id=TARGET, device_id="dimm0", requested_size=0),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NOT_VIRTIO_MEM",
        {"device_id": "dimm0"},
    ),
    (
        "ResizeVirtioMem",
        pb.ResizeVirtioMemRequest(vm_id=TARGET, device_id="vmem0", requested_size=MiB),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        {"field": "requested_size"},
    ),
    (
        "ResizeVirtioMem",
        pb.ResizeVirtioMemRequest(vm_id=TARGET, device_id="vmem0", requested_size=128 * MiB),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        {"field": "requested_size"},
    ),
    (
        "VirtioMemRequest",
        _vmem(pb.VIRTIO_MEM_REQUEST_TYPE_UNSPECIFIED),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        {"field": "type"},
    ),
    (
        "VirtioMemRequest",
        _vmem(device_id="nope"),
        grpc.StatusCode.NOT_FOUND,
        "DEVICE_NOT_FOUND",
        {"device_id": "nope"},
    ),
    (
        "VirtioMemRequest",
        _vmem(vm_id="nope"),
        grpc.StatusCode.NOT_FOUND,
        "VM_NOT_FOUND",
        {"vm_id": "nope"},
    ),
    (
        "CopyTags",
        _copy(direction=pb.TAG_COPY_DIRECTION_UNSPECIFIED),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        {"field": "direction"},
    ),
    (
        "CopyTags",
        _copy(tags=b"\x00"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        {"field": "tags"},
    ),
    (
        "CopyTags",
        _copy(tags=b"\x10" * (PAGE // 16)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        {"field": "tags"},
    ),
    (
        "CopyTags",
        _copy(gpa=0x1000),
        grpc.StatusCode.FAILED_PRECONDITION,
        "GPA_NOT_PLUGGED",
        {"vm_id": TARGET},
    ),
    (
        "CopyTags",
        _copy(vm_id=PLAIN),
        grpc.StatusCode.FAILED_PRECONDITION,
        "VM_NOT_MTE",
        {"vm_id": PLAIN},
    ),
]


@pytest.mark.parametrize(
    ("rpc", "request_message", "code", "reason", "metadata"),
    BAD_INPUT,
    ids=[f"{rpc}-{reason}-{i}" for i, (rpc, _, _, reason, _) in enumerate(BAD_INPUT)],
)
def test_bad_input_is_refused_with_its_code_and_error_info_and_changes_nothing(
    stub: Stub,
    daemon: HostdProcess,
    targets: pb.MemoryDevice,
    rpc: str,
    request_message: Any,
    code: grpc.StatusCode,
    reason: str,
    metadata: dict[str, str],
) -> None:
    before = fingerprint(stub)
    method: Callable[..., Any] = getattr(stub, rpc)
    with pytest.raises(grpc.RpcError) as caught:
        method(request_message)
    info = error_info(caught.value)

    assert code == caught.value.code()
    if reason.startswith("*"):
        assert info.reason.endswith(reason[1:])
    else:
        assert reason == info.reason
    assert "tagstore" == info.domain
    assert metadata.items() <= dict(info.metadata).items()
    assert before == fingerprint(stub)
    assert daemon.proc.poll() is None, "the daemon survives bad input"
