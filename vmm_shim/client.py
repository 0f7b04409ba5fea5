"""The client a VMM embeds: ``HostClient`` (one per hostd connection) and ``VmHandle`` (one per VM).

Protobuf stays inside this module. Results are frozen dataclasses; enums are plain strings
(``"ON_FAULT"``, ``"WRITE"``, ``"TO_GUEST"``, ``"VIRTIO_MEM"``) converted in one place,
:class:`_EnumNames`. Sizes are bytes, addresses guest-physical.

Credentials: ``HostClient(token=...)`` sends ``authorization: Bearer <token>`` on every call and
stream (the admin token from ``<state-dir>/admin.token``, or a VM's token). ``create_vm`` keeps
the new VM's token (``CreateVm`` answers it once, in ``Vm.vm_token``) in the returned
:class:`VmHandle`, which sends it on that VM's calls; ``host.vm(vm_id, token=...)`` makes such a
handle for an existing VM. Tokens never appear in reprs or error messages.

Calls and retries: a call may take ``timeout_s`` (10 s by default) in all; one attempt at most
``attempt_timeout_s`` (half of ``timeout_s`` by default), so that a lost answer leaves time to
try again. An attempt that fails with ``UNAVAILABLE`` or ``DEADLINE_EXCEEDED`` is repeated, up to
``max_attempts`` (5) attempts, after a jittered pause that doubles from 50 ms up to 1 s. Reads
repeat as they are. Every mutating request carries a ``request_id`` (AIP-155), a fresh uuid4 per
logical call (or the caller's ``request_id=``) and the same on each of its attempts: hostd answers
a repeat with the first answer and applies nothing twice. ``StreamGuestFaults`` is never repeated
(its faults carry no id); ``WatchEvents`` is a subscription and is not repeated either.

Exceptions (every gRPC error is translated by :func:`translate_error`, the one mapping)::

    TagStoreClientError            code (gRPC code name), reason + metadata (google.rpc.ErrorInfo)
    ├── InvalidArgument            INVALID_ARGUMENT, also raised before sending for a value the
    │                              request cannot carry (out of range, unknown enum word, ...)
    ├── NotFound                   NOT_FOUND
    ├── AlreadyExists              ALREADY_EXISTS
    ├── FailedPrecondition         FAILED_PRECONDITION
    ├── ResourceExhausted          RESOURCE_EXHAUSTED
    ├── Unauthenticated            UNAUTHENTICATED (no token, or one hostd does not know)
    ├── PermissionDenied           PERMISSION_DENIED (another VM's token, a VM token on a host call)
    ├── DeadlineExceeded           DEADLINE_EXCEEDED (after the retries)
    └── Unavailable                UNAVAILABLE (after the retries)
    VirtioMemRequestError          a STATE request answered NACK/BUSY/ERROR (not a gRPC error)

Misuse of the client object itself (a non-positive ``timeout_s``, a token that cannot be a bearer
token) is a ``ValueError`` raised by the constructor. virtio-mem NACK/BUSY/ERROR answers are
return values.
"""

from __future__ import annotations

import itertools
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tagstore.v1 import tagstore_pb2 as pb
from tagstore.v1 import tagstore_pb2_grpc as pb_grpc
from vmm_shim.migration_client import MigrationCalls

__all__ = [
    "ACCESSES",
    "BOOT_RAM_GPA",
    "DEFAULT_ADDRESS",
    "DEFAULT_TIMEOUT_S",
    "TAG_POLICIES",
    "AlreadyExists",
    "DeadlineExceeded",
    "DeviceInfo",
    "DriveResult",
    "EventInfo",
    "EventStream",
    "FailedPrecondition",
    "FaultOutcome",
    "HostClient",
    "HostInfo",
    "InvalidArgument",
    "MappingRun",
    "NotFound",
    "PageExtent",
    "PermissionDenied",
    "RegionInfo",
    "ReservedTagBlock",
    "ResourceExhausted",
    "StateExport",
    "TagStoreClientError",
    "Unauthenticated",
    "Unavailable",
    "VirtioMemRequestError",
    "VmHandle",
    "VmInfo",
    "translate_error",
]

T = TypeVar("T")

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 10.0
# Guest layout fixed by the daemon (docs/design.md): boot RAM starts here.
BOOT_RAM_GPA = 0x4000_0000
# Attempts of one call, and the pause between them (jittered, doubled, capped).
MAX_ATTEMPTS = 5
BACKOFF_INITIAL_S = 0.05
BACKOFF_MAX_S = 1.0
# An attempt may use at most this share of the call's timeout, so a lost answer leaves time to
# try again (with the same request_id).
ATTEMPT_SHARE = 0.5
# Blocks per PLUG/UNPLUG request sent by drive_virtio_mem (Linux batches similarly).
DRIVE_BATCH_BLOCKS = 32
DRIVE_MAX_REQUESTS = 4096
# A virtio-mem request's nb_blocks is a le16.
MAX_NB_BLOCKS = 0xFFFF
# Bytes of guest memory described by one tag byte (one 16-byte granule).
TAG_GRANULE_BYTES = 16
ERROR_DOMAIN = "tagstore"
# An error message shows at most this many characters of a bad value.
VALUE_PREFIX_CHARS = 64

# Attempts failing with these are repeated: the daemon was not reached or the answer was not
# seen in time. Mutating requests carry a request_id, so hostd never applies a repeat twice.
_RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# What can follow "Bearer " in the header: printable ASCII without spaces. gRPC refuses other
# metadata bytes on every call, and a newline would let a token forge a second log line. (Looser
# than RFC 6750's b64token, so that any token hostd issues passes.)
_BEARER_TOKEN_RE = re.compile(r"[\x21-\x7e]+")
_AUTHORIZATION = "authorization"
# Largest value of each integer field type a request can carry.
_INT_RANGES = {
    FieldDescriptor.TYPE_UINT64: (0, (1 << 64) - 1),
    FieldDescriptor.TYPE_UINT32: (0, (1 << 32) - 1),
    FieldDescriptor.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_INT32: (-(1 << 31), (1 << 31) - 1),
}


# -- enums: the one conversion table -----------------------------------------------------------


class _EnumNames:
    """A proto enum seen as strings without its prefix (``TAG_POLICY_ON_FAULT`` -> ``ON_FAULT``).

    Found through the message field that uses it, and the prefix through its ``*_UNSPECIFIED``
    value, so that only field names tie this table to the proto.
    """

    def __init__(self, message: Any, field_name: str) -> None:
        self.field_name = field_name
        self._enum = message.DESCRIPTOR.fields_by_name[field_name].enum_type
        unspecified = self._enum.values_by_number[0].name
        self._prefix = unspecified.removesuffix("UNSPECIFIED")
        self.names: tuple[str, ...] = tuple(
            value.name.removeprefix(self._prefix)
            for value in self._enum.values
            if value.number != 0
        )

    def to_proto(self, name: str) -> Any:
        """The proto value of ``name`` (case and ``-``/``_`` insensitive); InvalidArgument
        naming the field if unknown.

        Typed ``Any``: an int at runtime, a distinct enum class per field in the stubs.
        """
        normal = name.strip().upper().replace("-", "_") if isinstance(name, str) else None
        if normal not in self.names:
            raise _invalid_value(self.field_name, name, f"expected one of {', '.join(self.names)}")
        return self._enum.values_by_name[self._prefix + normal].number

    def from_proto(self, value: int) -> str:
        """The name of a proto value: ``"UNSPECIFIED"``, or ``"UNKNOWN(n)"`` for a newer server."""
        member = self._enum.values_by_number.get(value)
        if member is None:
            return f"UNKNOWN({value})"
        return str(member.name).removeprefix(self._prefix)


_TAG_POLICY = _EnumNames(pb.CreateVmRequest, "tag_policy")
_ACCESS = _EnumNames(pb.GuestFaultRequest, "access")
_DIRECTION = _EnumNames(pb.CopyTagsRequest, "direction")
_DEVICE_KIND = _EnumNames(pb.MemoryDevice, "kind")
_REQUEST_TYPE = _EnumNames(pb.VirtioMemRequestRequest, "type")
_RESPONSE = _EnumNames(pb.VirtioMemRequestResponse, "response")
_BLOCK_STATE = _EnumNames(pb.VirtioMemRequestResponse, "state")
_PAGE_STATE = _EnumNames(pb.PageExtent, "state")
_TAG_STORAGE_MODE = _EnumNames(pb.HostStatus, "tag_storage_mode")
_PLACEMENT = _EnumNames(pb.HostStatus, "placement")

TAG_POLICIES: tuple[str, ...] = _TAG_POLICY.names
ACCESSES: tuple[str, ...] = _ACCESS.names


# -- errors ------------------------------------------------------------------------------------


class TagStoreClientError(Exception):
    """A call refused or failed: the gRPC ``code`` name and the ``ErrorInfo`` of the refusal.

    ``reason`` and ``metadata`` are empty when the status carried no ``ErrorInfo`` (transport
    errors, deadlines). Decide on ``reason``, not on ``message``.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})

    def __str__(self) -> str:
        # The reason adds nothing when it only repeats the code (INVALID_ARGUMENT twice).
        head = f"{self.code} {self.reason}" if self.reason not in ("", self.code) else self.code
        return f"{head}: {self.message}"


class InvalidArgument(TagStoreClientError):
    """INVALID_ARGUMENT: a request field is wrong; ``metadata["field"]`` names it."""


class NotFound(TagStoreClientError):
    """NOT_FOUND: no such VM or device."""


class AlreadyExists(TagStoreClientError):
    """ALREADY_EXISTS: the VM or device id is taken."""


class FailedPrecondition(TagStoreClientError):
    """FAILED_PRECONDITION: not possible in the current state (e.g. unplugged memory)."""


class ResourceExhausted(TagStoreClientError):
    """RESOURCE_EXHAUSTED: the host lacks memory, tag storage, slots or address space."""


class Unauthenticated(TagStoreClientError):
    """UNAUTHENTICATED: no token was sent, or hostd knows none like it."""


class PermissionDenied(TagStoreClientError):
    """PERMISSION_DENIED: the token is valid but not for this (another VM's, or a VM token on a
    host-scoped call)."""


class DeadlineExceeded(TagStoreClientError):
    """DEADLINE_EXCEEDED: no answer within the call's ``timeout_s`` (after the retries)."""


class Unavailable(TagStoreClientError):
    """UNAVAILABLE: the daemon could not be reached (after the retries)."""


_ERROR_CLASSES: dict[grpc.StatusCode, type[TagStoreClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def _value_text(value: object) -> str:
    """A short, one-line rendering of a bad value for an error message."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print (sys.int_info.default_max_str_digits)
        return f"<a {cast(int, value).bit_length()}-bit integer>"
    if len(text) > VALUE_PREFIX_CHARS:
        return f"{text[:VALUE_PREFIX_CHARS]}... ({len(text)} characters)"
    return text


def _invalid_value(field_name: str, value: object, problem: str) -> InvalidArgument:
    """The InvalidArgument for a value a request cannot carry, shaped like hostd's own."""
    shown = _value_text(value)
    return InvalidArgument(
        "INVALID_ARGUMENT",
        f"{field_name}={shown}: {problem}",
        reason="INVALID_ARGUMENT",
        metadata={"field": field_name, "value": shown},
    )


def _message(cls: Callable[[], T], **fields: Any) -> T:
    """``cls(**fields)``, with any value protobuf would refuse reported as InvalidArgument
    naming the field (protobuf's own ValueError/TypeError names neither field nor range)."""
    message = cls()
    descriptor = cast(Message, message).DESCRIPTOR
    for name, value in fields.items():
        if isinstance(value, Message):
            getattr(message, name).CopyFrom(value)
            continue
        try:
            setattr(message, name, value)
        except (ValueError, TypeError):  # UnicodeEncodeError is a ValueError
            field_type = descriptor.fields_by_name[name].type
            bounds = _INT_RANGES.get(field_type)
            if bounds is not None and isinstance(value, int):
                problem = f"out of range {bounds[0]}..{bounds[1]}"
            elif bounds is not None:
                problem = f"expected an integer, not {type(value).__name__}"
            elif field_type == FieldDescriptor.TYPE_STRING:
                problem = "not valid UTF-8 text"
            else:
                problem = f"not a valid {name} ({type(value).__name__})"
            raise _invalid_value(name, value, problem) from None
    return message


def _mutation(cls: Callable[[], T], request_id: str | None, **fields: Any) -> T:
    """A mutating request: ``_message`` plus its ``request_id`` (the caller's, or a fresh uuid4
    that every attempt of this logical call repeats)."""
    return _message(cls, request_id=request_id or str(uuid.uuid4()), **fields)


def _check_token(token: str | None, what: str) -> str | None:
    """``token`` if it can be sent as a bearer token (None or empty: none); ValueError names
    ``what`` but never echoes the token."""
    if token is None or token == "":
        return None
    if not isinstance(token, str) or not _BEARER_TOKEN_RE.fullmatch(token):
        raise ValueError(f"{what}: not a bearer token (printable ASCII without spaces)")
    return token


class VirtioMemRequestError(Exception):
    """A virtio-mem STATE request was not acknowledged (the answer is ``response``)."""

    def __init__(self, device_id: str, response: str, addr: int, nb_blocks: int) -> None:
        super().__init__(
            f"virtio-mem {device_id}: STATE addr={addr:#x} nb_blocks={nb_blocks} "
            f"answered {response}"
        )
        self.device_id = device_id
        self.response = response
        self.addr = addr
        self.nb_blocks = nb_blocks


def translate_error(error: grpc.RpcError) -> TagStoreClientError:
    """The :class:`TagStoreClientError` for a failed call: the one place gRPC errors are read.

    ``reason`` and ``metadata`` come from the ``google.rpc.ErrorInfo`` inside the
    ``grpc-status-details-bin`` trailer; a missing or inconsistent trailer leaves them empty.
    """
    call = cast(grpc.Call, error)
    code = call.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    message = (call.details() if callable(getattr(error, "details", None)) else None) or ""
    reason, metadata = "", {}
    try:
        status = rpc_status.from_call(call)
    except (ValueError, TypeError, AttributeError, DecodeError):
        # Inconsistent with the call's code or message, undecodable, or no trailers at all.
        status = None
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
                reason, metadata = info.reason, dict(info.metadata)
                break
    cls = _ERROR_CLASSES.get(code, TagStoreClientError)
    return cls(code.name, message or code.name, reason=reason, metadata=metadata)


# -- results -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegionInfo:
    """One tag region (tagged range + its tag storage) or untaggable range, and its use."""

    index: int
    name: str
    memory_base: int
    memory_size: int
    tag_base: int
    tag_size: int
    block_size: int
    total_bytes: int
    free_bytes: int
    data_bytes: int
    tagged_bytes: int
    tag_storage_bytes: int
    tag_reserved_bytes: int
    tag_lent_bytes: int
    tag_blocks_total: int
    tag_blocks_reserved: int
    tag_blocks_min_needed: int
    tagged_capacity_bytes: int


@dataclass(frozen=True, slots=True)
class HostInfo:
    """The host: geometry and memory use, host-wide and per region (``regions``)."""

    page_size: int
    mte_perm: bool
    tag_storage_mode: str
    placement: str
    total_bytes: int
    free_bytes: int
    data_bytes: int
    tagged_bytes: int
    tag_storage_bytes: int
    tag_reserved_bytes: int
    tag_lent_bytes: int
    tag_blocks_reserved: int
    tag_blocks_min_needed: int
    vm_count: int
    tagged_capacity_bytes: int
    regions: list[RegionInfo]


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """A VM memory region: boot RAM, a DIMM or a virtio-mem device.

    ``kind`` is ``"BOOT_RAM"``, ``"DIMM"`` or ``"VIRTIO_MEM"``. ``requested_size``,
    ``usable_region_size`` and ``block_size`` are 0 except for virtio-mem.
    """

    device_id: str
    kind: str
    gpa: int
    size: int
    plugged_size: int
    requested_size: int
    usable_region_size: int
    block_size: int
    mapped_bytes: int
    tagged_bytes: int


@dataclass(frozen=True, slots=True)
class DiscardOutcome:
    """What discarding a guest range gave back (bytes that were backed, of which tagged, and
    tag blocks released with their last tagged page)."""

    discarded_bytes: int
    tagged_bytes: int
    tag_blocks_released: int


@dataclass(frozen=True, slots=True)
class VmInfo:
    """A VM: boot RAM first in ``regions``, then memory devices in address order.

    ``tag_policy`` is as stored (meaningless, possibly ``"UNSPECIFIED"``, without MTE).
    """

    vm_id: str
    mte_enabled: bool
    tag_policy: str
    boot_memory_bytes: int
    dimm_slots: int
    max_memory_bytes: int
    mapped_bytes: int
    tagged_bytes: int
    regions: list[DeviceInfo]
    pinned: bool = False
    discarded_bytes: int = 0
    backing_page_size: int = 0
    huge_page_bytes: int = 0

    def device(self, device_id: str) -> DeviceInfo:
        """The region named ``device_id``; KeyError if the VM has none."""
        for region in self.regions:
            if region.device_id == device_id:
                return region
        raise KeyError(device_id)


@dataclass(frozen=True, slots=True)
class FaultOutcome:
    """What handling one guest fault did; ``seconds`` is the client-side latency."""

    newly_mapped_pages: int
    tag_blocks_reserved: int
    pages_migrated: int
    replays: int
    seconds: float


@dataclass(frozen=True, slots=True)
class DriveResult:
    """The outcome of :meth:`VmHandle.drive_virtio_mem` (sizes as the device reports after)."""

    plugged_size: int
    requested_size: int
    requests: int
    acks: int
    nacks: int
    busy: int
    errors: int


@dataclass(frozen=True, slots=True)
class PageExtent:
    """A run of host pages in one ``state`` (``"FREE"``, ``"TAGGED"``, ``"TAG_LENT"`` ...)."""

    pfn_start: int
    count: int
    state: str
    vm_id: str
    gfn_start: int


@dataclass(frozen=True, slots=True)
class ReservedTagBlock:
    """A reserved tag block and the number of tagged data pages it describes."""

    region: str
    tag_pfn_start: int
    nr_pages: int
    refcount: int


@dataclass(frozen=True, slots=True)
class MappingRun:
    """Consecutive guest frames of one VM mapped to consecutive host frames."""

    vm_id: str
    gfn_start: int
    pfn_start: int
    count: int
    tagged: bool


@dataclass(frozen=True, slots=True)
class StateExport:
    """A consistent snapshot of the whole host state."""

    page_size: int
    page_extents: list[PageExtent] = field(default_factory=list)
    reserved_tag_blocks: list[ReservedTagBlock] = field(default_factory=list)
    mapping_runs: list[MappingRun] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class EventInfo:
    """One model event (``kind`` such as ``"vm_created"``, ``"tag_blocks_reserved"``)."""

    kind: str
    vm_id: str
    device_id: str
    region: str
    count: int
    seconds: float = 0.0
    detail: dict[str, str] = field(default_factory=dict)
    sequence: int = 0
    dropped_events: int = 0


# -- proto -> results --------------------------------------------------------------------------


def _region_info(r: pb.Region) -> RegionInfo:
    return RegionInfo(
        index=r.index,
        name=r.name,
        memory_base=r.memory_base,
        memory_size=r.memory_size,
        tag_base=r.tag_base,
        tag_size=r.tag_size,
        block_size=r.block_size,
        total_bytes=r.total_bytes,
        free_bytes=r.free_bytes,
        data_bytes=r.data_bytes,
        tagged_bytes=r.tagged_bytes,
        tag_storage_bytes=r.tag_storage_bytes,
        tag_reserved_bytes=r.tag_reserved_bytes,
        tag_lent_bytes=r.tag_lent_bytes,
        tag_blocks_total=r.tag_blocks_total,
        tag_blocks_reserved=r.tag_blocks_reserved,
        tag_blocks_min_needed=r.tag_blocks_min_needed,
        tagged_capacity_bytes=r.tagged_capacity_bytes,
    )


def _host_info(h: pb.HostStatus) -> HostInfo:
    return HostInfo(
        page_size=h.page_size,
        mte_perm=h.mte_perm,
        tag_storage_mode=_TAG_STORAGE_MODE.from_proto(h.tag_storage_mode),
        placement=_PLACEMENT.from_proto(h.placement),
        total_bytes=h.total_bytes,
        free_bytes=h.free_bytes,
        data_bytes=h.data_bytes,
        tagged_bytes=h.tagged_bytes,
        tag_storage_bytes=h.tag_storage_bytes,
        tag_reserved_bytes=h.tag_reserved_bytes,
        tag_lent_bytes=h.tag_lent_bytes,
        tag_blocks_reserved=h.tag_blocks_reserved,
        tag_blocks_min_needed=h.tag_blocks_min_needed,
        vm_count=h.vm_count,
        tagged_capacity_bytes=h.tagged_capacity_bytes,
        regions=[_region_info(r) for r in h.regions],
    )


def _device_info(d: pb.MemoryDevice) -> DeviceInfo:
    is_virtio_mem = d.WhichOneof("details") == "virtio_mem"
    vmem = d.virtio_mem
    return DeviceInfo(
        device_id=d.device_id,
        kind=_DEVICE_KIND.from_proto(d.kind),
        gpa=d.gpa,
        size=d.size,
        plugged_size=d.plugged_size,
        requested_size=vmem.requested_size if is_virtio_mem else 0,
        usable_region_size=vmem.usable_region_size if is_virtio_mem else 0,
        block_size=vmem.block_size if is_virtio_mem else 0,
        mapped_bytes=d.mapped_bytes,
        tagged_bytes=d.tagged_bytes,
    )


def _vm_info(v: pb.Vm) -> VmInfo:
    return VmInfo(
        vm_id=v.vm_id,
        mte_enabled=v.mte_enabled,
        tag_policy=_TAG_POLICY.from_proto(v.tag_policy),
        boot_memory_bytes=v.boot_memory_bytes,
        dimm_slots=v.dimm_slots,
        max_memory_bytes=v.max_memory_bytes,
        mapped_bytes=v.mapped_bytes,
        tagged_bytes=v.tagged_bytes,
        regions=[_device_info(d) for d in v.regions],
        pinned=v.pinned,
        discarded_bytes=v.discarded_bytes,
        backing_page_size=v.backing_page_size,
        huge_page_bytes=v.huge_page_bytes,
    )


def _fault_outcome(r: pb.GuestFaultResponse, seconds: float) -> FaultOutcome:
    return FaultOutcome(
        newly_mapped_pages=r.newly_mapped_pages,
        tag_blocks_reserved=r.tag_blocks_reserved,
        pages_migrated=r.pages_migrated,
        replays=r.replays,
        seconds=seconds,
    )


def _event_info(r: pb.WatchEventsResponse) -> EventInfo:
    e = r.event
    return EventInfo(
        kind=e.kind,
        vm_id=e.vm_id,
        device_id=e.device_id,
        region=e.region,
        count=e.count,
        seconds=e.seconds,
        detail=dict(e.detail),
        sequence=e.sequence,
        dropped_events=r.dropped_events,
    )


# -- the client --------------------------------------------------------------------------------


class EventStream:
    """An iterator of :class:`EventInfo` from ``WatchEvents``; ``cancel()`` (or leaving the
    ``with`` block) ends it. Once constructed, it sees every event caused after that."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._cancelled = False

    def __iter__(self) -> Iterator[EventInfo]:
        return self

    def __next__(self) -> EventInfo:
        try:
            return _event_info(next(self._call))
        except grpc.RpcError as error:
            if self._cancelled or cast(grpc.Call, error).code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise translate_error(error) from error

    def cancel(self) -> None:
        """End the stream (the server unsubscribes)."""
        self._cancelled = True
        self._call.cancel()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()


class HostClient(MigrationCalls):
    """A connection to one hostd (``host:port`` or ``unix:/path``); a context manager.

    Live migration and host page migration calls come from
    :class:`vmm_shim.migration_client.MigrationCalls`; ``migrate()`` runs a whole migration.

    ``token`` is sent as ``authorization: Bearer <token>`` on every call (None: no credential).
    ``timeout_s`` bounds each call, retries included; ``attempt_timeout_s`` (default: half of
    ``timeout_s``) each attempt of it. ``channel`` replaces the channel the client would open
    (tests, TLS); the client then does not own it and ``close()`` leaves it open.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        attempt_timeout_s: float | None = None,
        max_attempts: int = MAX_ATTEMPTS,
        channel: grpc.Channel | None = None,
    ) -> None:
        # `not x > 0` also refuses NaN.
        if not timeout_s > 0 or timeout_s == float("inf"):
            raise ValueError(f"timeout_s={timeout_s}: must be a positive number of seconds")
        if attempt_timeout_s is not None and not attempt_timeout_s > 0:
            raise ValueError(f"attempt_timeout_s={attempt_timeout_s}: must be positive")
        if max_attempts < 1:
            raise ValueError(f"max_attempts={max_attempts}: must be at least 1")
        self._token = _check_token(token, "token")
        self.address = address
        self.timeout_s = timeout_s
        self.attempt_timeout_s = (
            attempt_timeout_s if attempt_timeout_s is not None else timeout_s * ATTEMPT_SHARE
        )
        self.max_attempts = max_attempts
        self._owns_channel = channel is None
        self._channel = channel if channel is not None else grpc.insecure_channel(address)
        self._stub: Any = pb_grpc.TagStorageStub(self._channel)
        self._health: Any = health_pb2_grpc.HealthStub(self._channel)

    def __repr__(self) -> str:
        # Says whether a token is set, never which.
        return f"HostClient({self.address!r}, token={'set' if self._token else None})"

    def close(self) -> None:
        """Close the channel (if this client opened it)."""
        if self._owns_channel:
            self._channel.close()

    def _metadata(self, token: str | None = None) -> tuple[tuple[str, str], ...] | None:
        """The call metadata carrying ``token`` (a VM's), else the client's token, if any."""
        credential = token or self._token
        return ((_AUTHORIZATION, f"Bearer {credential}"),) if credential else None

    def __enter__(self) -> HostClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # The one place calls are made: deadlines, retry policy and error translation. Every call
    # it makes can be repeated: reads by nature, mutations because their request carries a
    # request_id that stays the same across attempts.
    def _invoke(self, attempt: Callable[[float], T]) -> T:
        """Run ``attempt(timeout)`` until it succeeds, fails for good, or time runs out."""
        deadline = time.monotonic() + self.timeout_s
        backoff = BACKOFF_INITIAL_S
        for attempt_no in itertools.count(1):
            remaining = deadline - time.monotonic()
            try:
                return attempt(max(min(remaining, self.attempt_timeout_s), 0.001))
            except grpc.RpcError as error:
                pause = backoff * random.uniform(0.5, 1.0)
                retry = (
                    cast(grpc.Call, error).code() in _RETRY_CODES
                    and attempt_no < self.max_attempts
                    and time.monotonic() + pause < deadline
                )
                if not retry:
                    raise translate_error(error) from error
            time.sleep(pause)
            backoff = min(backoff * 2, BACKOFF_MAX_S)
        raise AssertionError("unreachable")  # pragma: no cover

    def _unary(self, method: str, request: Any, *, token: str | None = None) -> Any:
        rpc = getattr(self._stub, method)
        metadata = self._metadata(token)
        return self._invoke(
            lambda timeout: rpc(request, timeout=timeout, metadata=metadata, wait_for_ready=False)
        )

    def health(self) -> bool:
        """Whether the daemon's health service answers SERVING (False if it is unreachable)."""
        request = health_pb2.HealthCheckRequest(service="")
        try:
            answer = self._invoke(
                lambda t: self._health.Check(request, timeout=t, wait_for_ready=False)
            )
        except (Unavailable, DeadlineExceeded):
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    def host_status(self) -> HostInfo:
        """The host geometry and memory use."""
        return _host_info(self._unary("GetHost", pb.GetHostRequest()))

    def create_vm(
        self,
        vm_id: str,
        *,
        mte_enabled: bool,
        tag_policy: str | None = "ON_FAULT",
        boot_memory_bytes: int,
        dimm_slots: int = 0,
        max_memory_bytes: int = 0,
        pinned: bool = False,
        backing_page_size: int = 0,
        request_id: str | None = None,
    ) -> VmHandle:
        """Create a VM (boot RAM at :data:`BOOT_RAM_GPA`). ``tag_policy`` is one of
        :data:`TAG_POLICIES`; None sends UNSPECIFIED (accepted only without MTE). ``pinned``:
        a passthrough device pins all guest memory (backed at once, never in tag storage).
        ``backing_page_size``: 0 (host pages), the THP size or the hugetlb size.

        The handle keeps the VM's token (``vm.vm_token``, empty if hostd issued none) and uses
        it for the VM's calls: save it if another process is to drive this VM."""
        request = _mutation(
            pb.CreateVmRequest,
            request_id,
            vm_id=vm_id,
            mte_enabled=mte_enabled,
            tag_policy=(
                pb.TAG_POLICY_UNSPECIFIED
                if tag_policy is None
                else _TAG_POLICY.to_proto(tag_policy)
            ),
            boot_memory_bytes=boot_memory_bytes,
            dimm_slots=dimm_slots,
            max_memory_bytes=max_memory_bytes,
            pinned=pinned,
            backing_page_size=backing_page_size,
        )
        answer = self._unary("CreateVm", request)
        return VmHandle(self, vm_id, token=answer.vm_token or None)

    def vm(self, vm_id: str, *, token: str | None = None) -> VmHandle:
        """A handle on an existing VM (makes no call); ``token`` is the VM's, if the client's
        own token is not to be used for it."""
        return VmHandle(self, vm_id, token=token)

    def get_vm(self, vm_id: str) -> VmInfo:
        """One VM."""
        return _vm_info(self._unary("GetVm", _message(pb.GetVmRequest, vm_id=vm_id)))

    def list_vms(self) -> list[VmInfo]:
        """Every VM, ordered by id."""
        answer = self._unary("ListVms", pb.ListVmsRequest())
        return [_vm_info(v) for v in answer.vms]

    def check_invariants(self) -> list[str]:
        """The model's consistency violations; empty when the state is sound."""
        answer = self._unary("CheckInvariants", pb.CheckInvariantsRequest())
        return list(answer.violations)

    def export_state(self) -> StateExport:
        """A consistent snapshot of the host (retried as a whole if the stream breaks)."""

        def attempt(timeout: float) -> StateExport:
            export = StateExport(page_size=0)
            page_size = 0
            for message in self._stub.ExportState(
                pb.ExportStateRequest(),
                timeout=timeout,
                metadata=self._metadata(),
                wait_for_ready=False,
            ):
                chunk = message.WhichOneof("chunk")
                if chunk == "header":
                    page_size = message.header.page_size
                elif chunk == "page_extents":
                    export.page_extents.extend(
                        PageExtent(
                            e.pfn_start,
                            e.count,
                            _PAGE_STATE.from_proto(e.state),
                            e.vm_id,
                            e.gfn_start,
                        )
                        for e in message.page_extents.extents
                    )
                elif chunk == "reserved_tag_blocks":
                    export.reserved_tag_blocks.extend(
                        ReservedTagBlock(b.region, b.tag_pfn_start, b.nr_pages, b.refcount)
                        for b in message.reserved_tag_blocks.blocks
                    )
                elif chunk == "mapping_runs":
                    export.mapping_runs.extend(
                        MappingRun(r.vm_id, r.gfn_start, r.pfn_start, r.count, r.tagged)
                        for r in message.mapping_runs.runs
                    )
            return StateExport(
                page_size, export.page_extents, export.reserved_tag_blocks, export.mapping_runs
            )

        return self._invoke(attempt)

    def watch_events(self, *, include_faults: bool = False) -> EventStream:
        """Subscribe to model events. The stream has no deadline (it is a subscription); it
        returns once the daemon confirmed the subscription, so every later event is seen."""
        call = self._stub.WatchEvents(
            pb.WatchEventsRequest(include_faults=include_faults),
            metadata=self._metadata(),
            wait_for_ready=False,
        )
        try:
            call.initial_metadata()  # blocks until the server subscribed (or the call failed)
        except grpc.RpcError as error:
            raise translate_error(error) from error
        return EventStream(call)


def next_block_run(plugged: list[bool], plug: bool, want: int) -> tuple[int, int]:
    """The run of virtio-mem blocks Linux's driver takes next, at most ``want`` long: (first
    block, count). Plugging: from the lowest unplugged block upwards; unplugging: from the
    highest plugged block downwards. There must be such a block."""
    if plug:
        first = plugged.index(False)
        last = first
        while last + 1 < len(plugged) and not plugged[last + 1] and last + 1 - first < want:
            last += 1
    else:
        last = len(plugged) - 1 - plugged[::-1].index(True)
        first = last
        while first > 0 and plugged[first - 1] and last - first + 1 < want:
            first -= 1
    return first, last - first + 1


class VmHandle:
    """Operations on one VM of a :class:`HostClient`, sent with the VM's token (``vm_token``)
    when it has one, else with the client's."""

    boot_gpa: int = BOOT_RAM_GPA

    def __init__(self, client: HostClient, vm_id: str, *, token: str | None = None) -> None:
        self.client = client
        self.vm_id = vm_id
        self._token = _check_token(token, "VM token")

    @property
    def vm_token(self) -> str:
        """The VM's credential ("" if none): what another process needs to drive this VM."""
        return self._token or ""

    def __repr__(self) -> str:
        return f"VmHandle({self.vm_id!r} on {self.client.address})"

    def _unary(self, method: str, request: Any) -> Any:
        return self.client._unary(method, request, token=self._token)

    def info(self) -> VmInfo:
        """The VM and its memory regions."""
        return _vm_info(self._unary("GetVm", _message(pb.GetVmRequest, vm_id=self.vm_id)))

    def device(self, device_id: str) -> DeviceInfo:
        """One memory region of the VM (NotFound if it has none of that id)."""
        try:
            return self.info().device(device_id)
        except KeyError:
            # The refusal hostd gives for an unknown device.
            raise NotFound(
                "NOT_FOUND",
                f"VM {self.vm_id!r} has no memory device {device_id!r}",
                reason="DEVICE_NOT_FOUND",
                metadata={"vm_id": self.vm_id, "device_id": device_id},
            ) from None

    def destroy(self, *, request_id: str | None = None) -> None:
        """Destroy the VM: its memory, tags and reserved tag storage are freed."""
        self._unary("DestroyVm", _mutation(pb.DestroyVmRequest, request_id, vm_id=self.vm_id))

    def report_difference(
        self,
        device_id: str,
        what: str,
        *,
        reporter: str = "vmm-shim",
        request_id: str | None = None,
    ) -> None:
        """Tell hostd that this VMM's view of ``device_id`` (or of the VM, with "") differs from
        hostd's in a way it could not reconcile: hostd counts it per ``reporter`` and publishes
        a ``vmm_difference`` event."""
        request = _mutation(
            pb.ReportVmmDifferenceRequest,
            request_id,
            vm_id=self.vm_id,
            device_id=device_id,
            reporter=reporter,
            what=what[:512],
        )
        self._unary("ReportVmmDifference", request)

    def discard(self, gpa: int, length: int, *, request_id: str | None = None) -> DiscardOutcome:
        """Discard ``[gpa, gpa+length)``, memory the guest gave back (free page reporting,
        balloon inflation): its pages, tags and emptied tag blocks are freed."""
        request = _mutation(
            pb.DiscardGuestMemoryRequest, request_id, vm_id=self.vm_id, gpa=gpa, length=length
        )
        r = self._unary("DiscardGuestMemory", request)
        return DiscardOutcome(r.discarded_bytes, r.tagged_bytes, r.tag_blocks_released)

    def _fault_request(
        self, gpa: int, length: int, access: str, request_id: str | None = None
    ) -> pb.GuestFaultRequest:
        return _message(
            pb.GuestFaultRequest,
            vm_id=self.vm_id,
            gpa=gpa,
            length=length,
            access=_ACCESS.to_proto(access),
            request_id=request_id or "",
        )

    def fault(
        self, gpa: int, length: int, access: str = "WRITE", *, request_id: str | None = None
    ) -> FaultOutcome:
        """Handle a stage-2 fault over ``[gpa, gpa+length)``; ``access`` in :data:`ACCESSES`."""
        request = self._fault_request(gpa, length, access, request_id or str(uuid.uuid4()))
        start = time.perf_counter()
        answer = self._unary("GuestFault", request)
        return _fault_outcome(answer, time.perf_counter() - start)

    def fault_stream(
        self, faults: Iterable[tuple[int, int, str]], *, timeout_s: float | None = None
    ) -> Iterator[FaultOutcome]:
        """Send ``(gpa, length, access)`` faults on one ``StreamGuestFaults`` call and yield the
        outcomes in order; ``seconds`` is the time since the previous outcome. The whole stream
        must finish within ``timeout_s`` (default: the client's); it is never retried. The first
        refused fault ends the stream with its error, after every earlier outcome."""
        misuse: list[Exception] = []

        def requests() -> Iterator[pb.GuestFaultRequest]:
            try:
                for gpa, length, access in faults:
                    yield self._fault_request(gpa, length, access)
            except Exception as error:  # surfaced to the caller below, not lost in grpc's thread
                misuse.append(error)
                raise

        call = self.client._stub.StreamGuestFaults(
            requests(),
            timeout=timeout_s if timeout_s is not None else self.client.timeout_s,
            metadata=self.client._metadata(self._token),
            wait_for_ready=False,
        )
        last = time.perf_counter()
        try:
            for answer in call:
                now = time.perf_counter()
                yield _fault_outcome(answer, now - last)
                last = now
        except grpc.RpcError as error:
            if misuse:
                raise misuse[0] from None
            raise translate_error(error) from error
        finally:
            call.cancel()
        if misuse:
            raise misuse[0]

    def copy_tags_to_guest(self, gpa: int, tags: bytes, *, request_id: str | None = None) -> None:
        """Write tags (one per byte, 0..15) for ``len(tags) * 16`` bytes of guest memory."""
        if not isinstance(tags, bytes | bytearray | memoryview):
            raise _invalid_value("tags", type(tags).__name__, "expected bytes")
        data = bytes(tags)
        request = _mutation(
            pb.CopyTagsRequest,
            request_id,
            vm_id=self.vm_id,
            gpa=gpa,
            length=len(data) * TAG_GRANULE_BYTES,
            direction=_DIRECTION.to_proto("TO_GUEST"),
            tags=data,
        )
        self._unary("CopyTags", request)

    def copy_tags_from_guest(self, gpa: int, length: int) -> bytes:
        """Read the tags of ``length`` bytes of guest memory: ``length / 16`` bytes.

        Repeated as a read, without a request_id: a repeat changes nothing more (pages it
        faulted in stay mapped) and returns the same tags, so hostd need not remember the
        answer, which can be large."""
        request = _message(
            pb.CopyTagsRequest,
            vm_id=self.vm_id,
            gpa=gpa,
            length=length,
            direction=_DIRECTION.to_proto("FROM_GUEST"),
        )
        return bytes(self._unary("CopyTags", request).tags)

    def _add_device(self, device_id: str, request_id: str | None, **device: Any) -> DeviceInfo:
        request = _mutation(
            pb.AddMemoryDeviceRequest,
            request_id,
            vm_id=self.vm_id,
            device_id=device_id,
            **device,
        )
        return _device_info(self._unary("AddMemoryDevice", request))

    def add_dimm(
        self, device_id: str, size_bytes: int, *, request_id: str | None = None
    ) -> DeviceInfo:
        """Hot-add a DIMM of ``size_bytes`` (plugged as a whole)."""
        config = _message(pb.DimmConfig, size_bytes=size_bytes)
        return self._add_device(device_id, request_id, dimm=config)

    def add_virtio_mem(
        self,
        device_id: str,
        *,
        region_size: int,
        block_size: int,
        requested_size: int = 0,
        prealloc: bool = False,
        request_id: str | None = None,
    ) -> DeviceInfo:
        """Hot-add a virtio-mem device; nothing is plugged until the guest asks. With
        ``prealloc`` (QEMU's device property) a PLUG backs its blocks before it is ACKed."""
        config = _message(
            pb.VirtioMemConfig,
            region_size=region_size,
            block_size=block_size,
            requested_size=requested_size,
            prealloc=prealloc,
        )
        return self._add_device(device_id, request_id, virtio_mem=config)

    def remove_device(self, device_id: str, *, request_id: str | None = None) -> None:
        """Hot-remove a DIMM or a virtio-mem device (which must have nothing plugged)."""
        request = _mutation(
            pb.RemoveMemoryDeviceRequest, request_id, vm_id=self.vm_id, device_id=device_id
        )
        self._unary("RemoveMemoryDevice", request)

    def resize_virtio_mem(
        self, device_id: str, requested_size: int, *, request_id: str | None = None
    ) -> DeviceInfo:
        """Set a virtio-mem device's ``requested_size`` (the operator's ``qom-set``)."""
        request = _mutation(
            pb.ResizeVirtioMemRequest,
            request_id,
            vm_id=self.vm_id,
            device_id=device_id,
            requested_size=requested_size,
        )
        return _device_info(self._unary("ResizeVirtioMem", request))

    def _virtio_mem_request(
        self,
        device_id: str,
        kind: str,
        addr: int = 0,
        nb_blocks: int = 0,
        request_id: str | None = None,
    ) -> tuple[str, str]:
        """One guest request; returns (response, block state). STATE is a read and carries no
        request_id; PLUG, UNPLUG and UNPLUG_ALL do."""
        request = _message(
            pb.VirtioMemRequestRequest,
            vm_id=self.vm_id,
            device_id=device_id,
            type=_REQUEST_TYPE.to_proto(kind),
            addr=addr,
            nb_blocks=nb_blocks,
            request_id="" if kind == "STATE" else request_id or str(uuid.uuid4()),
        )
        answer = self._unary("VirtioMemRequest", request)
        return _RESPONSE.from_proto(answer.response), _BLOCK_STATE.from_proto(answer.state)

    def virtio_mem_plug(
        self, device_id: str, addr: int, nb_blocks: int, *, request_id: str | None = None
    ) -> str:
        """PLUG: ``"ACK"``, ``"NACK"``, ``"BUSY"`` or ``"ERROR"``."""
        return self._virtio_mem_request(device_id, "PLUG", addr, nb_blocks, request_id)[0]

    def virtio_mem_unplug(
        self, device_id: str, addr: int, nb_blocks: int, *, request_id: str | None = None
    ) -> str:
        """UNPLUG: ``"ACK"``, ``"NACK"``, ``"BUSY"`` or ``"ERROR"``."""
        return self._virtio_mem_request(device_id, "UNPLUG", addr, nb_blocks, request_id)[0]

    def virtio_mem_unplug_all(self, device_id: str, *, request_id: str | None = None) -> str:
        """UNPLUG_ALL: ``"ACK"``, ``"BUSY"`` ..."""
        return self._virtio_mem_request(device_id, "UNPLUG_ALL", request_id=request_id)[0]

    def virtio_mem_state(self, device_id: str, addr: int, nb_blocks: int) -> str:
        """STATE: ``"PLUGGED"``, ``"UNPLUGGED"`` or ``"MIXED"``; raises
        :class:`VirtioMemRequestError` if the device does not acknowledge the request."""
        response, state = self._virtio_mem_request(device_id, "STATE", addr, nb_blocks)
        if response != "ACK":
            raise VirtioMemRequestError(device_id, response, addr, nb_blocks)
        return state

    def _plugged_blocks(self, device_id: str, dev: DeviceInfo) -> list[bool]:
        """The plug state of every block of the usable region, found with STATE requests
        (bisecting MIXED ranges, so the cost grows with the number of plugged runs)."""
        nb_usable = dev.usable_region_size // dev.block_size
        plugged = [False] * nb_usable
        if dev.plugged_size == 0 or nb_usable == 0:
            return plugged
        if dev.plugged_size >= nb_usable * dev.block_size:
            return [True] * nb_usable
        pending = [
            (first, min(MAX_NB_BLOCKS, nb_usable - first))
            for first in range(0, nb_usable, MAX_NB_BLOCKS)
        ]
        while pending:
            first, count = pending.pop()
            state = self.virtio_mem_state(device_id, dev.gpa + first * dev.block_size, count)
            if state == "PLUGGED":
                plugged[first : first + count] = [True] * count
            elif state == "MIXED":
                half = count // 2
                pending += [(first, half), (first + half, count - half)]
        return plugged

    def drive_virtio_mem(
        self, device_id: str, *, max_requests: int = DRIVE_MAX_REQUESTS
    ) -> DriveResult:
        """Plug or unplug blocks until ``plugged_size == requested_size``, as Linux's virtio-mem
        driver does: PLUG the lowest unplugged blocks of the usable region, UNPLUG the highest
        plugged ones, up to :data:`DRIVE_BATCH_BLOCKS` contiguous blocks a request. A NACK means
        "the config changed" (only a PLUG beyond requested_size is NACKed): like Linux, the
        loop re-reads the config at once and goes on toward the new requested_size, stopping if
        it did not change. BUSY (the host could not back the blocks now) stops the loop: Linux
        retries it later on a backoff timer, so the caller should call again later. It also
        stops at ERROR or after ``max_requests`` PLUG/UNPLUG requests. Raises
        FailedPrecondition (``NOT_VIRTIO_MEM``) for another kind of device. Only requests valid
        for the state it read are sent; the state comes from the device (STATE requests), so
        another actor changing it meanwhile can still make a request fail."""
        dev = self.device(device_id)
        if dev.kind != "VIRTIO_MEM":
            # The refusal the daemon gives every virtio-mem call on such a device.
            raise FailedPrecondition(
                "FAILED_PRECONDITION",
                f"memory device {device_id!r} is a {dev.kind}, not virtio-mem",
                reason="NOT_VIRTIO_MEM",
                metadata={"vm_id": self.vm_id, "device_id": device_id},
            )
        plugged = self._plugged_blocks(device_id, dev)
        nb_plugged = sum(plugged)
        nb_requested = dev.requested_size // dev.block_size
        counts = {"ACK": 0, "NACK": 0, "BUSY": 0, "ERROR": 0}
        requests = 0
        while nb_plugged != nb_requested and requests < max_requests:
            plug = nb_plugged < nb_requested
            want = min(abs(nb_requested - nb_plugged), DRIVE_BATCH_BLOCKS)
            if plug and False not in plugged:
                break  # nothing left to plug in the usable region
            first, count = next_block_run(plugged, plug, want)
            addr = dev.gpa + first * dev.block_size
            kind = "PLUG" if plug else "UNPLUG"
            response = self._virtio_mem_request(device_id, kind, addr, count)[0]
            requests += 1
            counts[response] = counts.get(response, 0) + 1
            if response == "NACK":
                # virtio_mem_send_plug_request(): NACK -> the config changed; re-read it now.
                dev = self.device(device_id)
                if dev.requested_size // dev.block_size == nb_requested:
                    break
                nb_requested = dev.requested_size // dev.block_size
                continue
            if response != "ACK":
                break
            plugged[first : first + count] = [plug] * count
            nb_plugged += count if plug else -count
        after = self.device(device_id)
        return DriveResult(
            plugged_size=after.plugged_size,
            requested_size=after.requested_size,
            requests=requests,
            acks=counts["ACK"],
            nacks=counts["NACK"],
            busy=counts["BUSY"],
            errors=requests - counts["ACK"] - counts["NACK"] - counts["BUSY"],
        )
