"""Pure conversions between ``tagstore.v1`` messages and model values.

Proto → model conversions also validate what only the wire format can get wrong: an enum left
UNSPECIFIED or unknown to this server, a oneof left empty. They raise the model's own
:class:`~hostd.model.errors.InvalidArgumentError` naming the proto field, so that the one error
mapping (:mod:`hostd.api.errors`) covers them too.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from google.protobuf.message import Message

from hostd.model.compaction import CompactionResult, EvacuationResult
from hostd.model.errors import InvalidArgumentError
from hostd.model.events import Event
from hostd.model.export import ExportStream
from hostd.model.migration import (
    DeviceManifest,
    MigrationManifest,
    MigrationReport,
    MigrationStatus,
    TagChunk,
)
from hostd.model.types import (
    Access,
    DiscardResult,
    FaultResult,
    HostExport,
    HostStatus,
    MemoryDeviceKind,
    MemoryDeviceStatus,
    MemoryUsage,
    PageState,
    RegionStatus,
    TagCopyDirection,
    TagPolicy,
    VirtioMemAnswer,
    VirtioMemConfig,
    VirtioMemRequestType,
    VmConfig,
    VmStatus,
)
from tagstore.v1 import tagstore_pb2 as pb

E = TypeVar("E", bound=enum.Enum)
M = TypeVar("M", bound=Message)

# Export chunks stay well below gRPC's default 4 MiB message limit (and the contract's ~1 MiB),
# and small: the daemon decodes each chunk from its copy-on-write child and gRPC encodes it
# again, both holding the GIL (some 3 ms for 512 KiB here), which stalls the faults it serves.
EXPORT_CHUNK_BYTES = 64 * 1024
# Per-item framing overhead inside a repeated field (tag + length varint), generously rounded.
_ITEM_OVERHEAD_BYTES = 6


# (proto enum, value) -> model member, filled on first use: faults convert an enum per call.
_ENUM_CACHE: dict[tuple[int, int], enum.Enum] = {}


def _from_proto_enum(
    field: str, value: int, proto_enum: Any, prefix: str, model_enum: type[E]
) -> E:
    """The model enum member for a proto enum value; UNSPECIFIED or unknown is refused."""
    cached = _ENUM_CACHE.get((id(model_enum), value))
    if cached is not None:
        return cached  # type: ignore[return-value]
    try:
        name = proto_enum.Name(value)
    except ValueError:
        raise InvalidArgumentError(field, value, "unknown enum value") from None
    member = name.removeprefix(prefix)
    if member == "UNSPECIFIED" or member not in model_enum.__members__:
        raise InvalidArgumentError(field, name, "required: set one of the defined values")
    _ENUM_CACHE[(id(model_enum), value)] = model_enum[member]
    return model_enum[member]


def _to_proto_enum(prefix: str, member: enum.Enum) -> str:
    """The proto enum value name for a model enum member (constructors accept names)."""
    return prefix + member.name


# -- requests (proto -> model) ------------------------------------------------------------------


def tag_policy_from_proto(request: pb.CreateVmRequest) -> TagPolicy:
    """The VM's tag policy; a VM without MTE ignores it, so UNSPECIFIED is allowed there."""
    if not request.mte_enabled and request.tag_policy == pb.TAG_POLICY_UNSPECIFIED:
        return TagPolicy.ON_FAULT
    return _from_proto_enum(
        "tag_policy", request.tag_policy, pb.TagPolicy, "TAG_POLICY_", TagPolicy
    )


def vm_config_from_proto(request: pb.CreateVmRequest) -> VmConfig:
    """The model's ``VmConfig`` for a ``CreateVmRequest`` (values are checked by the model)."""
    return VmConfig(
        vm_id=request.vm_id,
        mte_enabled=request.mte_enabled,
        tag_policy=tag_policy_from_proto(request),
        boot_memory_bytes=request.boot_memory_bytes,
        dimm_slots=request.dimm_slots,
        max_memory_bytes=request.max_memory_bytes,
        pinned=request.pinned,
        backing_page_size_bytes=request.backing_page_size,
    )


def access_from_proto(value: int) -> Access:
    """``Access`` for ``GuestFaultRequest.access``."""
    return _from_proto_enum("access", value, pb.Access, "ACCESS_", Access)


def direction_from_proto(value: int) -> TagCopyDirection:
    """``TagCopyDirection`` for ``CopyTagsRequest.direction``."""
    return _from_proto_enum(
        "direction", value, pb.TagCopyDirection, "TAG_COPY_DIRECTION_", TagCopyDirection
    )


def virtio_mem_request_type_from_proto(value: int) -> VirtioMemRequestType:
    """``VirtioMemRequestType`` for ``VirtioMemRequestRequest.type``."""
    return _from_proto_enum(
        "type", value, pb.VirtioMemRequestType, "VIRTIO_MEM_REQUEST_TYPE_", VirtioMemRequestType
    )


def virtio_mem_config_from_proto(config: pb.VirtioMemConfig) -> VirtioMemConfig:
    """The model's ``VirtioMemConfig`` (sizes are checked by the model)."""
    return VirtioMemConfig(
        region_size_bytes=config.region_size,
        block_size_bytes=config.block_size,
        requested_size_bytes=config.requested_size,
        prealloc=config.prealloc,
    )


def memory_device_kind_of(request: pb.AddMemoryDeviceRequest) -> str:
    """Which member of the ``device`` oneof is set (``dimm`` or ``virtio_mem``); one must be."""
    kind = request.WhichOneof("device")
    if kind is None:
        raise InvalidArgumentError("device", "<unset>", "required: set dimm or virtio_mem")
    return kind


# -- results (model -> proto) -------------------------------------------------------------------


def _usage_fields(usage: MemoryUsage) -> dict[str, int]:
    """The API's usage fields: free includes free tag storage, data includes lent tag storage."""
    return {
        "total_bytes": usage.total_bytes,
        "free_bytes": usage.all_free_bytes,
        "data_bytes": usage.all_data_bytes,
        "tagged_bytes": usage.tagged_bytes,
        "tag_storage_bytes": usage.tag_storage_bytes,
        "tag_reserved_bytes": usage.tag_reserved_bytes,
        "tag_lent_bytes": usage.tag_lent_bytes,
    }


def region_to_proto(region: RegionStatus) -> pb.Region:
    """``Region`` message for a model ``RegionStatus``."""
    return pb.Region(
        index=region.index,
        name=region.name,
        memory_base=region.memory_base,
        memory_size=region.memory_size_bytes,
        tag_base=region.tag_base,
        tag_size=region.tag_size_bytes,
        block_size=region.block_size_bytes,
        tag_blocks_total=region.tag_blocks_total,
        tag_blocks_reserved=region.tag_blocks_reserved,
        tag_blocks_min_needed=region.tag_blocks_min_needed,
        tagged_capacity_bytes=region.tagged_capacity_bytes,
        **_usage_fields(region.usage),
    )


def host_status_to_proto(status: HostStatus) -> pb.HostStatus:
    """``HostStatus`` message for the model's ``HostStatus``."""
    return pb.HostStatus(
        page_size=status.page_size_bytes,
        mte_perm=status.mte_perm,
        tag_storage_mode=_to_proto_enum("TAG_STORAGE_MODE_", status.tag_storage_mode),
        placement=_to_proto_enum("PLACEMENT_", status.placement),
        regions=[region_to_proto(r) for r in status.regions],
        tag_blocks_reserved=status.tag_blocks_reserved,
        tag_blocks_min_needed=status.tag_blocks_min_needed,
        vm_count=status.vm_count,
        tagged_capacity_bytes=status.tagged_capacity_bytes,
        **_usage_fields(status.usage),
    )


def memory_device_to_proto(device: MemoryDeviceStatus) -> pb.MemoryDevice:
    """``MemoryDevice`` message; device details use the device's own names (``addr``, ...)."""
    message = pb.MemoryDevice(
        device_id=device.device_id,
        kind=_to_proto_enum("MEMORY_DEVICE_KIND_", device.kind),
        gpa=device.gpa,
        size=device.size_bytes,
        plugged_size=device.plugged_bytes,
        mapped_bytes=device.mapped_bytes,
        tagged_bytes=device.tagged_bytes,
    )
    if device.kind is MemoryDeviceKind.DIMM:
        message.dimm.CopyFrom(pb.DimmDevice(addr=device.gpa, size=device.size_bytes))
    elif device.kind is MemoryDeviceKind.VIRTIO_MEM:
        message.virtio_mem.CopyFrom(
            pb.VirtioMemDevice(
                addr=device.gpa,
                region_size=device.size_bytes,
                usable_region_size=device.usable_region_size_bytes,
                block_size=device.block_size_bytes,
                plugged_size=device.plugged_bytes,
                requested_size=device.requested_size_bytes,
                prealloc=device.prealloc,
            )
        )
    return message


def vm_to_proto(vm: VmStatus) -> pb.Vm:
    """``Vm`` message for the model's ``VmStatus``."""
    return pb.Vm(
        vm_id=vm.vm_id,
        mte_enabled=vm.mte_enabled,
        tag_policy=_to_proto_enum("TAG_POLICY_", vm.tag_policy),
        boot_memory_bytes=vm.boot_memory_bytes,
        dimm_slots=vm.dimm_slots,
        max_memory_bytes=vm.max_memory_bytes,
        mapped_bytes=vm.mapped_bytes,
        tagged_bytes=vm.tagged_bytes,
        regions=[memory_device_to_proto(r) for r in vm.regions],
        pinned=vm.pinned,
        discarded_bytes=vm.discarded_bytes,
        backing_page_size=vm.backing_page_size_bytes,
        huge_page_bytes=vm.huge_page_bytes,
    )


def fault_result_to_proto(result: FaultResult) -> pb.GuestFaultResponse:
    """``GuestFaultResponse`` for the model's ``FaultResult``."""
    return pb.GuestFaultResponse(
        newly_mapped_pages=result.newly_mapped_pages,
        tag_blocks_reserved=result.tag_blocks_reserved,
        pages_migrated=result.pages_migrated,
        replays=result.replays,
    )


def discard_result_to_proto(result: DiscardResult) -> pb.DiscardGuestMemoryResponse:
    """``DiscardGuestMemoryResponse`` for the model's ``DiscardResult``."""
    return pb.DiscardGuestMemoryResponse(
        discarded_bytes=result.discarded_bytes,
        tagged_bytes=result.tagged_bytes,
        tag_blocks_released=result.tag_blocks_released,
    )


def virtio_mem_answer_to_proto(answer: VirtioMemAnswer) -> pb.VirtioMemRequestResponse:
    """``VirtioMemRequestResponse`` for the device's answer (``state`` only for STATE)."""
    return pb.VirtioMemRequestResponse(
        response=_to_proto_enum("VIRTIO_MEM_RESPONSE_", answer.response),
        state=(
            _to_proto_enum("VIRTIO_MEM_BLOCK_STATE_", answer.state)
            if answer.state is not None
            else "VIRTIO_MEM_BLOCK_STATE_UNSPECIFIED"
        ),
    )


def event_to_proto(event: Event, sequence: int) -> pb.Event:
    """``Event`` message for a model event, numbered ``sequence`` within its stream."""
    return pb.Event(
        kind=event.kind,
        vm_id=event.vm_id,
        device_id=event.device_id,
        region=event.region,
        count=event.count,
        seconds=event.seconds,
        detail=event.detail,
        sequence=sequence,
    )


def _page_state_to_proto(state: PageState) -> str:
    return _to_proto_enum("PAGE_STATE_", state)


def _chunks(items: Iterable[M]) -> Iterator[list[M]]:
    """Consecutive runs of ``items`` whose encoded size stays under ``EXPORT_CHUNK_BYTES``."""
    chunk: list[M] = []
    size = 0
    for item in items:
        item_size = item.ByteSize() + _ITEM_OVERHEAD_BYTES
        if chunk and size + item_size > EXPORT_CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += item_size
    if chunk:
        yield chunk


def export_to_proto(export: HostExport, page_size_bytes: int) -> list[pb.ExportStateResponse]:
    """The whole ``ExportState`` stream: a header, then chunks of extents, blocks and runs."""
    return list(
        export_stream_to_proto(
            ExportStream(
                len(export.page_extents),
                len(export.reserved_tag_blocks),
                len(export.mapping_runs),
                export.page_extents,
                export.reserved_tag_blocks,
                export.mapping_runs,
            ),
            page_size_bytes,
        )
    )


def export_stream_to_proto(
    export: ExportStream, page_size_bytes: int
) -> Iterator[pb.ExportStateResponse]:
    """The ``ExportState`` stream, converted as ``export`` produces its records: a header,
    then chunks of extents, blocks and runs (never the whole export at once)."""
    yield pb.ExportStateResponse(
        header=pb.ExportHeader(
            page_size=page_size_bytes,
            page_extent_count=export.page_extent_count,
            reserved_tag_block_count=export.reserved_tag_block_count,
            mapping_run_count=export.mapping_run_count,
        )
    )
    extents = (
        pb.PageExtent(
            pfn_start=e.pfn_start,
            count=e.count,
            state=_page_state_to_proto(e.state),
            vm_id=e.vm_id,
            gfn_start=e.gfn_start,
        )
        for e in export.page_extents
    )
    for c in _chunks(extents):
        yield pb.ExportStateResponse(page_extents=pb.PageExtents(extents=c))
    blocks = (
        pb.ReservedTagBlock(
            region=b.region, tag_pfn_start=b.tag_pfn_start, nr_pages=b.nr_pages, refcount=b.refcount
        )
        for b in export.reserved_tag_blocks
    )
    for block_chunk in _chunks(blocks):
        yield pb.ExportStateResponse(reserved_tag_blocks=pb.ReservedTagBlocks(blocks=block_chunk))
    runs = (
        pb.MappingRun(
            vm_id=r.vm_id,
            gfn_start=r.gfn_start,
            pfn_start=r.pfn_start,
            count=r.count,
            tagged=r.tagged,
        )
        for r in export.mapping_runs
    )
    for run_chunk in _chunks(runs):
        yield pb.ExportStateResponse(mapping_runs=pb.MappingRuns(runs=run_chunk))


# -- migration (hostd.model.migration, hostd.model.compaction) ---------------------------------


def vm_config_to_proto(config: VmConfig) -> pb.CreateVmRequest:
    """A ``VmConfig`` as the ``CreateVmRequest`` that would create it."""
    return pb.CreateVmRequest(
        vm_id=config.vm_id,
        mte_enabled=config.mte_enabled,
        tag_policy=_to_proto_enum("TAG_POLICY_", config.tag_policy),
        boot_memory_bytes=config.boot_memory_bytes,
        dimm_slots=config.dimm_slots,
        max_memory_bytes=config.max_memory_bytes,
        pinned=config.pinned,
        backing_page_size=config.backing_page_size_bytes,
    )


def manifest_to_proto(manifest: MigrationManifest) -> pb.MigrationManifest:
    """A migration manifest on the wire."""
    return pb.MigrationManifest(
        migration_id=manifest.migration_id,
        config=vm_config_to_proto(manifest.config),
        page_size_bytes=manifest.page_size_bytes,
        devices=[
            pb.DeviceManifest(
                device_id=d.device_id,
                kind=_to_proto_enum("MEMORY_DEVICE_KIND_", d.kind),
                gpa=d.gpa,
                size_bytes=d.size_bytes,
                block_size=d.block_size_bytes,
                requested_size=d.requested_size_bytes,
                usable_region_size=d.usable_region_size_bytes,
                plugged_bitmap=d.plugged,
                prealloc=d.prealloc,
            )
            for d in manifest.devices
        ],
        mapped_bitmap=manifest.mapped,
        tagged_bitmap=manifest.tagged,
        mapped_bytes=manifest.mapped_bytes,
        tagged_bytes=manifest.tagged_bytes,
        plugged_bytes=manifest.plugged_bytes,
    )


def manifest_from_proto(manifest: pb.MigrationManifest) -> MigrationManifest:
    """The model's manifest (contents are checked by the destination's model)."""
    return MigrationManifest(
        migration_id=manifest.migration_id,
        config=vm_config_from_proto(manifest.config),
        page_size_bytes=manifest.page_size_bytes,
        devices=tuple(
            DeviceManifest(
                device_id=d.device_id,
                kind=_from_proto_enum(
                    "devices.kind", d.kind, pb.MemoryDeviceKind, "MEMORY_DEVICE_KIND_",
                    MemoryDeviceKind,
                ),
                gpa=d.gpa,
                size_bytes=d.size_bytes,
                block_size_bytes=d.block_size,
                requested_size_bytes=d.requested_size,
                usable_region_size_bytes=d.usable_region_size,
                plugged=d.plugged_bitmap,
                prealloc=d.prealloc,
            )
            for d in manifest.devices
        ),
        mapped=manifest.mapped_bitmap,
        tagged=manifest.tagged_bitmap,
        mapped_bytes=manifest.mapped_bytes,
        tagged_bytes=manifest.tagged_bytes,
        plugged_bytes=manifest.plugged_bytes,
    )  # fmt: skip


def tag_chunk_to_proto(chunk: TagChunk) -> pb.TagChunk:
    """A tag chunk on the wire (field for field)."""
    return pb.TagChunk(**{f.name: getattr(chunk, f.name) for f in dataclasses.fields(chunk)})


def tag_chunk_from_proto(chunk: pb.TagChunk) -> TagChunk:
    """The model's tag chunk (verified against its checksum by the destination's model)."""
    return TagChunk(**{f.name: getattr(chunk, f.name) for f in dataclasses.fields(TagChunk)})


def migration_status_to_proto(status: MigrationStatus) -> pb.MigrationStatus:
    """A migration's status on the wire."""
    return pb.MigrationStatus(
        migration_id=status.migration_id,
        vm_id=status.vm_id,
        role=_to_proto_enum("MIGRATION_ROLE_", status.role),
        phase=_to_proto_enum("MIGRATION_PHASE_", status.phase),
        round=status.round,
        round_pages_left=status.round_pages_left,
        dirty_pages=status.dirty_pages,
        chunks=status.chunks,
        wire_bytes=status.wire_bytes,
        tag_bytes=status.tag_bytes,
        deadline_unix_seconds=status.deadline,
    )


def migration_report_to_proto(report: MigrationReport) -> pb.MigrationReport:
    """What a completed or committed migration moved."""
    return pb.MigrationReport(
        migration_id=report.migration_id,
        vm_id=report.vm_id,
        rounds=report.rounds,
        wire_bytes=report.wire_bytes,
        tag_bytes=report.tag_bytes,
        mapped_bytes=report.mapped_bytes,
        tagged_bytes=report.tagged_bytes,
    )


def compaction_to_proto(result: CompactionResult) -> pb.CompactTagRegionResponse:
    """What a compaction did."""
    return pb.CompactTagRegionResponse(
        region=result.region,
        evacuated_pages=result.evacuated_pages,
        lent_pages_left=result.lent_pages_left,
        compacted_pages=result.compacted_pages,
        tag_blocks_freed=result.tag_blocks_freed,
        tag_blocks_reserved=result.tag_blocks_reserved,
        tag_blocks_min_needed=result.tag_blocks_min_needed,
        complete=result.complete,
    )


def evacuation_to_proto(result: EvacuationResult) -> pb.EvacuateHostRangeResponse:
    """What moving guest pages off a host range did."""
    return pb.EvacuateHostRangeResponse(
        pfn_start=result.pfn_start,
        nr_pages=result.nr_pages,
        moved_pages=result.moved_pages,
        pages_left=result.pages_left,
        stopped_reason=result.stopped_reason,
        complete=result.complete,
    )
