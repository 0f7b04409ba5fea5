"""Proto <-> model conversions (hostd.api.convert), with the real model where a value is needed."""

from __future__ import annotations

import pytest

from hostd.api import convert
from hostd.model import (
    BOOT_RAM_GPA,
    Access,
    Host,
    HostExport,
    InvalidArgumentError,
    MappingRun,
    MiB,
    PageExtent,
    PageState,
    ReservedTagBlock,
    TagPolicy,
    VirtioMemAnswer,
    VirtioMemBlockState,
    VirtioMemResponse,
    VmConfig,
    default_topology,
)
from tagstore.v1 import tagstore_pb2 as pb

GiB = 1 << 30


@pytest.fixture(scope="module")
def host() -> Host:
    return Host(default_topology(4 * GiB))


@pytest.mark.parametrize(
    ("convert_fn", "field"),
    [
        (convert.access_from_proto, "access"),
        (convert.direction_from_proto, "direction"),
        (convert.virtio_mem_request_type_from_proto, "type"),
    ],
)
@pytest.mark.parametrize("value", [0, 99])
def test_unspecified_or_unknown_enum_is_invalid_argument_naming_the_field(
    convert_fn: object, field: str, value: int
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        convert_fn(value)  # type: ignore[operator]
    assert field == caught.value.metadata["field"]
    assert "INVALID_ARGUMENT" == caught.value.reason


def test_tag_policy_is_required_for_an_mte_vm() -> None:
    request = pb.CreateVmRequest(vm_id="a", mte_enabled=True)
    with pytest.raises(InvalidArgumentError) as caught:
        convert.vm_config_from_proto(request)
    assert "tag_policy" == caught.value.metadata["field"]


def test_tag_policy_may_be_unspecified_for_a_vm_without_mte() -> None:
    config = convert.vm_config_from_proto(pb.CreateVmRequest(vm_id="a", boot_memory_bytes=MiB))
    assert VmConfig("a", False, TagPolicy.ON_FAULT, MiB, 0, 0) == config


def test_proto_enum_values_map_to_model_members_by_name() -> None:
    assert Access.TAG == convert.access_from_proto(pb.ACCESS_TAG)
    request = pb.CreateVmRequest(vm_id="a", mte_enabled=True, tag_policy=pb.TAG_POLICY_EAGER)
    assert TagPolicy.EAGER == convert.vm_config_from_proto(request).tag_policy


def test_add_memory_device_without_a_device_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        convert.memory_device_kind_of(pb.AddMemoryDeviceRequest(vm_id="a", device_id="d"))
    assert "device" == caught.value.metadata["field"]


def test_host_usage_fields_count_lent_as_data_and_free_tag_storage_as_free(host: Host) -> None:
    status = host.status()
    message = convert.host_status_to_proto(status)
    usage = status.usage
    assert usage.total_bytes == message.total_bytes
    assert usage.free_bytes + usage.tag_free_bytes == message.free_bytes
    assert usage.data_bytes + usage.tag_lent_bytes == message.data_bytes
    assert message.total_bytes == (
        message.free_bytes + message.data_bytes + message.tagged_bytes + message.tag_reserved_bytes
    )
    assert [r.name for r in status.regions] == [r.name for r in message.regions]
    assert pb.PLACEMENT_TAG_BLOCK_AWARE == message.placement
    assert pb.TAG_STORAGE_MODE_DYNAMIC == message.tag_storage_mode


def test_vm_boot_ram_is_the_first_region_at_its_gpa(host: Host) -> None:
    status = host.create_vm(VmConfig("conv", True, TagPolicy.ON_FAULT, 16 * MiB))
    message = convert.vm_to_proto(status)
    boot = message.regions[0]
    assert (pb.MEMORY_DEVICE_KIND_BOOT_RAM, BOOT_RAM_GPA, 16 * MiB) == (
        boot.kind,
        boot.gpa,
        boot.size,
    )
    assert pb.TAG_POLICY_ON_FAULT == message.tag_policy


def test_virtio_mem_state_is_unspecified_unless_the_answer_has_one() -> None:
    ack = convert.virtio_mem_answer_to_proto(VirtioMemAnswer(VirtioMemResponse.ACK))
    assert (pb.VIRTIO_MEM_RESPONSE_ACK, pb.VIRTIO_MEM_BLOCK_STATE_UNSPECIFIED) == (
        ack.response,
        ack.state,
    )
    mixed = convert.virtio_mem_answer_to_proto(
        VirtioMemAnswer(VirtioMemResponse.ACK, VirtioMemBlockState.MIXED)
    )
    assert pb.VIRTIO_MEM_BLOCK_STATE_MIXED == mixed.state


def test_export_is_chunked_below_one_mib_and_keeps_every_item_in_order() -> None:
    n = 100_000
    export = HostExport(
        page_extents=tuple(
            PageExtent(i * 4, 4, PageState.DATA, f"vm-with-a-long-name-{i % 7}", i)
            for i in range(n)
        ),
        reserved_tag_blocks=(ReservedTagBlock("tag0", 0x1000, 2, 64),),
        mapping_runs=tuple(MappingRun("vm", i, i * 2, 1, i % 2 == 0) for i in range(n)),
    )
    messages = convert.export_to_proto(export, 4096)

    assert "header" == messages[0].WhichOneof("chunk")
    header = messages[0].header
    assert (4096, n, 1, n) == (
        header.page_size,
        header.page_extent_count,
        header.reserved_tag_block_count,
        header.mapping_run_count,
    )
    assert all(m.ByteSize() <= 1 << 20 for m in messages)
    extents = [e for m in messages if m.HasField("page_extents") for e in m.page_extents.extents]
    runs = [r for m in messages if m.HasField("mapping_runs") for r in m.mapping_runs.runs]
    assert [i * 4 for i in range(n)] == [e.pfn_start for e in extents]
    assert [i for i in range(n)] == [r.gfn_start for r in runs]
    assert len(messages) > 3, "a large export takes several chunks"
    kinds = [m.WhichOneof("chunk") for m in messages]
    assert kinds == sorted(
        kinds, key=["header", "page_extents", "reserved_tag_blocks", "mapping_runs"].index
    )
