from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TagStorageMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TAG_STORAGE_MODE_UNSPECIFIED: _ClassVar[TagStorageMode]
    TAG_STORAGE_MODE_DYNAMIC: _ClassVar[TagStorageMode]
    TAG_STORAGE_MODE_STATIC: _ClassVar[TagStorageMode]

class Placement(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLACEMENT_UNSPECIFIED: _ClassVar[Placement]
    PLACEMENT_TAG_BLOCK_AWARE: _ClassVar[Placement]
    PLACEMENT_NAIVE: _ClassVar[Placement]

class TagPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TAG_POLICY_UNSPECIFIED: _ClassVar[TagPolicy]
    TAG_POLICY_ON_FAULT: _ClassVar[TagPolicy]
    TAG_POLICY_EAGER: _ClassVar[TagPolicy]
    TAG_POLICY_ON_TAG_ACCESS: _ClassVar[TagPolicy]

class Access(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCESS_UNSPECIFIED: _ClassVar[Access]
    ACCESS_READ: _ClassVar[Access]
    ACCESS_WRITE: _ClassVar[Access]
    ACCESS_TAG: _ClassVar[Access]

class TagCopyDirection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TAG_COPY_DIRECTION_UNSPECIFIED: _ClassVar[TagCopyDirection]
    TAG_COPY_DIRECTION_TO_GUEST: _ClassVar[TagCopyDirection]
    TAG_COPY_DIRECTION_FROM_GUEST: _ClassVar[TagCopyDirection]

class MemoryDeviceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEMORY_DEVICE_KIND_UNSPECIFIED: _ClassVar[MemoryDeviceKind]
    MEMORY_DEVICE_KIND_BOOT_RAM: _ClassVar[MemoryDeviceKind]
    MEMORY_DEVICE_KIND_DIMM: _ClassVar[MemoryDeviceKind]
    MEMORY_DEVICE_KIND_VIRTIO_MEM: _ClassVar[MemoryDeviceKind]

class VirtioMemRequestType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VIRTIO_MEM_REQUEST_TYPE_UNSPECIFIED: _ClassVar[VirtioMemRequestType]
    VIRTIO_MEM_REQUEST_TYPE_PLUG: _ClassVar[VirtioMemRequestType]
    VIRTIO_MEM_REQUEST_TYPE_UNPLUG: _ClassVar[VirtioMemRequestType]
    VIRTIO_MEM_REQUEST_TYPE_UNPLUG_ALL: _ClassVar[VirtioMemRequestType]
    VIRTIO_MEM_REQUEST_TYPE_STATE: _ClassVar[VirtioMemRequestType]

class VirtioMemResponse(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VIRTIO_MEM_RESPONSE_UNSPECIFIED: _ClassVar[VirtioMemResponse]
    VIRTIO_MEM_RESPONSE_ACK: _ClassVar[VirtioMemResponse]
    VIRTIO_MEM_RESPONSE_NACK: _ClassVar[VirtioMemResponse]
    VIRTIO_MEM_RESPONSE_BUSY: _ClassVar[VirtioMemResponse]
    VIRTIO_MEM_RESPONSE_ERROR: _ClassVar[VirtioMemResponse]

class VirtioMemBlockState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VIRTIO_MEM_BLOCK_STATE_UNSPECIFIED: _ClassVar[VirtioMemBlockState]
    VIRTIO_MEM_BLOCK_STATE_PLUGGED: _ClassVar[VirtioMemBlockState]
    VIRTIO_MEM_BLOCK_STATE_UNPLUGGED: _ClassVar[VirtioMemBlockState]
    VIRTIO_MEM_BLOCK_STATE_MIXED: _ClassVar[VirtioMemBlockState]

class PageState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAGE_STATE_UNSPECIFIED: _ClassVar[PageState]
    PAGE_STATE_FREE: _ClassVar[PageState]
    PAGE_STATE_DATA: _ClassVar[PageState]
    PAGE_STATE_TAGGED: _ClassVar[PageState]
    PAGE_STATE_TAG_RESERVED: _ClassVar[PageState]
    PAGE_STATE_TAG_LENT: _ClassVar[PageState]
    PAGE_STATE_TAG_FREE: _ClassVar[PageState]

class MigrationRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIGRATION_ROLE_UNSPECIFIED: _ClassVar[MigrationRole]
    MIGRATION_ROLE_OUTGOING: _ClassVar[MigrationRole]
    MIGRATION_ROLE_INCOMING: _ClassVar[MigrationRole]

class MigrationPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIGRATION_PHASE_UNSPECIFIED: _ClassVar[MigrationPhase]
    MIGRATION_PHASE_PRECOPY: _ClassVar[MigrationPhase]
    MIGRATION_PHASE_PAUSED: _ClassVar[MigrationPhase]
    MIGRATION_PHASE_HANDOVER: _ClassVar[MigrationPhase]
    MIGRATION_PHASE_INCOMING: _ClassVar[MigrationPhase]
TAG_STORAGE_MODE_UNSPECIFIED: TagStorageMode
TAG_STORAGE_MODE_DYNAMIC: TagStorageMode
TAG_STORAGE_MODE_STATIC: TagStorageMode
PLACEMENT_UNSPECIFIED: Placement
PLACEMENT_TAG_BLOCK_AWARE: Placement
PLACEMENT_NAIVE: Placement
TAG_POLICY_UNSPECIFIED: TagPolicy
TAG_POLICY_ON_FAULT: TagPolicy
TAG_POLICY_EAGER: TagPolicy
TAG_POLICY_ON_TAG_ACCESS: TagPolicy
ACCESS_UNSPECIFIED: Access
ACCESS_READ: Access
ACCESS_WRITE: Access
ACCESS_TAG: Access
TAG_COPY_DIRECTION_UNSPECIFIED: TagCopyDirection
TAG_COPY_DIRECTION_TO_GUEST: TagCopyDirection
TAG_COPY_DIRECTION_FROM_GUEST: TagCopyDirection
MEMORY_DEVICE_KIND_UNSPECIFIED: MemoryDeviceKind
MEMORY_DEVICE_KIND_BOOT_RAM: MemoryDeviceKind
MEMORY_DEVICE_KIND_DIMM: MemoryDeviceKind
MEMORY_DEVICE_KIND_VIRTIO_MEM: MemoryDeviceKind
VIRTIO_MEM_REQUEST_TYPE_UNSPECIFIED: VirtioMemRequestType
VIRTIO_MEM_REQUEST_TYPE_PLUG: VirtioMemRequestType
VIRTIO_MEM_REQUEST_TYPE_UNPLUG: VirtioMemRequestType
VIRTIO_MEM_REQUEST_TYPE_UNPLUG_ALL: VirtioMemRequestType
VIRTIO_MEM_REQUEST_TYPE_STATE: VirtioMemRequestType
VIRTIO_MEM_RESPONSE_UNSPECIFIED: VirtioMemResponse
VIRTIO_MEM_RESPONSE_ACK: VirtioMemResponse
VIRTIO_MEM_RESPONSE_NACK: VirtioMemResponse
VIRTIO_MEM_RESPONSE_BUSY: VirtioMemResponse
VIRTIO_MEM_RESPONSE_ERROR: VirtioMemResponse
VIRTIO_MEM_BLOCK_STATE_UNSPECIFIED: VirtioMemBlockState
VIRTIO_MEM_BLOCK_STATE_PLUGGED: VirtioMemBlockState
VIRTIO_MEM_BLOCK_STATE_UNPLUGGED: VirtioMemBlockState
VIRTIO_MEM_BLOCK_STATE_MIXED: VirtioMemBlockState
PAGE_STATE_UNSPECIFIED: PageState
PAGE_STATE_FREE: PageState
PAGE_STATE_DATA: PageState
PAGE_STATE_TAGGED: PageState
PAGE_STATE_TAG_RESERVED: PageState
PAGE_STATE_TAG_LENT: PageState
PAGE_STATE_TAG_FREE: PageState
MIGRATION_ROLE_UNSPECIFIED: MigrationRole
MIGRATION_ROLE_OUTGOING: MigrationRole
MIGRATION_ROLE_INCOMING: MigrationRole
MIGRATION_PHASE_UNSPECIFIED: MigrationPhase
MIGRATION_PHASE_PRECOPY: MigrationPhase
MIGRATION_PHASE_PAUSED: MigrationPhase
MIGRATION_PHASE_HANDOVER: MigrationPhase
MIGRATION_PHASE_INCOMING: MigrationPhase

class GetHostRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HostStatus(_message.Message):
    __slots__ = ("page_size", "mte_perm", "tag_storage_mode", "placement", "regions", "total_bytes", "free_bytes", "data_bytes", "tagged_bytes", "tag_storage_bytes", "tag_reserved_bytes", "tag_lent_bytes", "tag_blocks_reserved", "tag_blocks_min_needed", "vm_count", "tagged_capacity_bytes")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MTE_PERM_FIELD_NUMBER: _ClassVar[int]
    TAG_STORAGE_MODE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    TAGGED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TAG_STORAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TAG_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TAG_LENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    TAG_BLOCKS_RESERVED_FIELD_NUMBER: _ClassVar[int]
    TAG_BLOCKS_MIN_NEEDED_FIELD_NUMBER: _ClassVar[int]
    VM_COUNT_FIELD_NUMBER: _ClassVar[int]
    TAGGED_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    mte_perm: bool
    tag_storage_mode: TagStorageMode
    placement: Placement
    regions: _containers.RepeatedCompositeFieldContainer[Region]
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
    def __init__(self, page_size: _Optional[int] = ..., mte_perm: _Optional[bool] = ..., tag_storage_mode: _Optional[_Union[TagStorageMode, str]] = ..., placement: _Optional[_Union[Placement, str]] = ..., regions: _Optional[_Iterable[_Union[Region, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., data_bytes: _Optional[int] = ..., tagged_bytes: _Optional[int] = ..., tag_storage_bytes: _Optional[int] = ..., tag_reserved_bytes: _Optional[int] = ..., tag_lent_bytes: _Optional[int] = ..., tag_blocks_reserved: _Optional[int] = ..., tag_blocks_min_needed: _Optional[int] = ..., vm_count: _Optional[int] = ..., tagged_capacity_bytes: _Optional[int] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("index", "name", "memory_base", "memory_size", "tag_base", "tag_size", "block_size", "total_bytes", "free_bytes", "data_bytes", "tagged_bytes", "tag_storage_bytes", "tag_reserved_bytes", "tag_lent_bytes", "tag_blocks_total", "tag_blocks_reserved", "tag_blocks_min_needed", "tagged_capacity_bytes")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BASE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_SIZE_FIELD_NUMBER: _ClassVar[int]
    TAG_BASE_FIELD_NUMBER: _ClassVar[int]
    TAG_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    TAGGED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TAG_STORAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TAG_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TAG_LENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    TAG_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TAG_BLOCKS_RESERVED_FIELD_NUMBER: _ClassVar[int]
    TAG_BLOCKS_MIN_NEEDED_FIELD_NUMBER: _ClassVar[int]
    TAGGED_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
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
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., memory_base: _Optional[int] = ..., memory_size: _Optional[int] = ..., tag_base: _Optional[int] = ..., tag_size: _Optional[int] = ..., block_size: _Optional[int] = ..., total_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., data_bytes: _Optional[int] = ..., tagged_bytes: _Optional[int] = ..., tag_storage_bytes: _Optional[int] = ..., tag_reserved_bytes: _Optional[int] = ..., tag_lent_bytes: _Optional[int] = ..., tag_blocks_total: _Optional[int] = ..., tag_blocks_reserved: _Optional[int] = ..., tag_blocks_min_needed: _Optional[int] = ..., tagged_capacity_bytes: _Optional[int] = ...) -> None: ...

class CreateVmRequest(_message.Message):
    __slots__ = ("vm_id", "mte_enabled", "tag_policy", "boot_memory_bytes", "dimm_slots", "max_memory_bytes", "pinned", "backing_page_size", "request_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    MTE_ENABLED_FIELD_NUMBER: _ClassVar[int]
    TAG_POLICY_FIELD_NUMBER: _ClassVar[int]
    BOOT_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIMM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    MAX_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    BACKING_PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    mte_enabled: bool
    tag_policy: TagPolicy
    boot_memory_bytes: int
    dimm_slots: int
    max_memory_bytes: int
    pinned: bool
    backing_page_size: int
    request_id: str
    def __init__(self, vm_id: _Optional[str] = ..., mte_enabled: _Optional[bool] = ..., tag_policy: _Optional[_Union[TagPolicy, str]] = ..., boot_memory_bytes: _Optional[int] = ..., dimm_slots: _Optional[int] = ..., max_memory_bytes: _Optional[int] = ..., pinned: _Optional[bool] = ..., backing_page_size: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetVmRequest(_message.Message):
    __slots__ = ("vm_id",)
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    def __init__(self, vm_id: _Optional[str] = ...) -> None: ...

class ListVmsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListVmsResponse(_message.Message):
    __slots__ = ("vms",)
    VMS_FIELD_NUMBER: _ClassVar[int]
    vms: _containers.RepeatedCompositeFieldContainer[Vm]
    def __init__(self, vms: _Optional[_Iterable[_Union[Vm, _Mapping]]] = ...) -> None: ...

class DestroyVmRequest(_message.Message):
    __slots__ = ("vm_id", "request_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    request_id: str
    def __init__(self, vm_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class DestroyVmResponse(_message.Message):
    __slots__ = ("vm",)
    VM_FIELD_NUMBER: _ClassVar[int]
    vm: Vm
    def __init__(self, vm: _Optional[_Union[Vm, _Mapping]] = ...) -> None: ...

class Vm(_message.Message):
    __slots__ = ("vm_id", "mte_enabled", "tag_policy", "boot_memory_bytes", "dimm_slots", "max_memory_bytes", "mapped_bytes", "tagged_bytes", "regions", "pinned", "discarded_bytes", "backing_page_size", "huge_page_bytes", "vm_token")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    MTE_ENABLED_FIELD_NUMBER: _ClassVar[int]
    TAG_POLICY_FIELD_NUMBER: _ClassVar[int]
    BOOT_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIMM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    MAX_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TAGGED_BYTES_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    DISCARDED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BACKING_PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    HUGE_PAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    VM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    mte_enabled: bool
    tag_policy: TagPolicy
    boot_memory_bytes: int
    dimm_slots: int
    max_memory_bytes: int
    mapped_bytes: int
    tagged_bytes: int
    regions: _containers.RepeatedCompositeFieldContainer[MemoryDevice]
    pinned: bool
    discarded_bytes: int
    backing_page_size: int
    huge_page_bytes: int
    vm_token: str
    def __init__(self, vm_id: _Optional[str] = ..., mte_enabled: _Optional[bool] = ..., tag_policy: _Optional[_Union[TagPolicy, str]] = ..., boot_memory_bytes: _Optional[int] = ..., dimm_slots: _Optional[int] = ..., max_memory_bytes: _Optional[int] = ..., mapped_bytes: _Optional[int] = ..., tagged_bytes: _Optional[int] = ..., regions: _Optional[_Iterable[_Union[MemoryDevice, _Mapping]]] = ..., pinned: _Optional[bool] = ..., discarded_bytes: _Optional[int] = ..., backing_page_size: _Optional[int] = ..., huge_page_bytes: _Optional[int] = ..., vm_token: _Optional[str] = ...) -> None: ...

class MemoryDevice(_message.Message):
    __slots__ = ("device_id", "kind", "gpa", "size", "plugged_size", "mapped_bytes", "tagged_bytes", "dimm", "virtio_mem")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    GPA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    PLUGGED_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TAGGED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIMM_FIELD_NUMBER: _ClassVar[int]
    VIRTIO_MEM_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    kind: MemoryDeviceKind
    gpa: int
    size: int
    plugged_size: int
    mapped_bytes: int
    tagged_bytes: int
    dimm: DimmDevice
    virtio_mem: VirtioMemDevice
    def __init__(self, device_id: _Optional[str] = ..., kind: _Optional[_Union[MemoryDeviceKind, str]] = ..., gpa: _Optional[int] = ..., size: _Optional[int] = ..., plugged_size: _Optional[int] = ..., mapped_bytes: _Optional[int] = ..., tagged_bytes: _Optional[int] = ..., dimm: _Optional[_Union[DimmDevice, _Mapping]] = ..., virtio_mem: _Optional[_Union[VirtioMemDevice, _Mapping]] = ...) -> None: ...

class DimmDevice(_message.Message):
    __slots__ = ("addr", "size")
    ADDR_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    addr: int
    size: int
    def __init__(self, addr: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class VirtioMemDevice(_message.Message):
    __slots__ = ("addr", "region_size", "usable_region_size", "block_size", "plugged_size", "requested_size", "prealloc")
    ADDR_FIELD_NUMBER: _ClassVar[int]
    REGION_SIZE_FIELD_NUMBER: _ClassVar[int]
    USABLE_REGION_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PLUGGED_SIZE_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREALLOC_FIELD_NUMBER: _ClassVar[int]
    addr: int
    region_size: int
    usable_region_size: int
    block_size: int
    plugged_size: int
    requested_size: int
    prealloc: bool
    def __init__(self, addr: _Optional[int] = ..., region_size: _Optional[int] = ..., usable_region_size: _Optional[int] = ..., block_size: _Optional[int] = ..., plugged_size: _Optional[int] = ..., requested_size: _Optional[int] = ..., prealloc: _Optional[bool] = ...) -> None: ...

class GuestFaultRequest(_message.Message):
    __slots__ = ("vm_id", "gpa", "length", "access", "request_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    GPA_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    ACCESS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    gpa: int
    length: int
    access: Access
    request_id: str
    def __init__(self, vm_id: _Optional[str] = ..., gpa: _Optional[int] = ..., length: _Optional[int] = ..., access: _Optional[_Union[Access, str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GuestFaultResponse(_message.Message):
    __slots__ = ("newly_mapped_pages", "tag_blocks_reserved", "pages_migrated", "replays")
    NEWLY_MAPPED_PAGES_FIELD_NUMBER: _ClassVar[int]
    TAG_BLOCKS_RESERVED_FIELD_NUMBER: _ClassVar[int]
    PAGES_MIGRATED_FIELD_NUMBER: _ClassVar[int]
    REPLAYS_FIELD_NUMBER: _ClassVar[int]
    newly_mapped_pages: int
    tag_blocks_reserved: int
    pages_migrated: int
    replays: int
    def __init__(self, newly_mapped_pages: _Optional[int] = ..., tag_blocks_reserved: _Optional[int] = ..., pages_migrated: _Optional[int] = ..., replays: _Optional[int] = ...) -> None: ...

class AddMemoryDeviceRequest(_message.Message):
    __slots__ = ("vm_id", "device_id", "dimm", "virtio_mem", "request_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DIMM_FIELD_NUMBER: _ClassVar[int]
    VIRTIO_MEM_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    device_id: str
    dimm: DimmConfig
    virtio_mem: VirtioMemConfig
    request_id: str
    def __init__(self, vm_id: _Optional[str] = ..., device_id: _Optional[str] = ..., dimm: _Optional[_Union[DimmConfig, _Mapping]] = ..., virtio_mem: _Optional[_Union[VirtioMemConfig, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class DimmConfig(_message.Message):
    __slots__ = ("size_bytes",)
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    def __init__(self, size_bytes: _Optional[int] = ...) -> None: ...

class VirtioMemConfig(_message.Message):
    __slots__ = ("region_size", "block_size", "requested_size", "prealloc")
    REGION_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREALLOC_FIELD_NUMBER: _ClassVar[int]
    region_size: int
    block_size: int
    requested_size: int
    prealloc: bool
    def __init__(self, region_size: _Optional[int] = ..., block_size: _Optional[int] = ..., requested_size: _Optional[int] = ..., prealloc: _Optional[bool] = ...) -> None: ...

class RemoveMemoryDeviceRequest(_message.Message):
    __slots__ = ("vm_id", "device_id", "request_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    device_id: str
    request_id: str
    def __init__(self, vm_id: _Optional[str] = ..., device_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class RemoveMemoryDeviceResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResizeVirtioMemRequest(_message.Message):
    __slots__ = ("vm_id", "device_id", "requested_size", "request_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_SIZE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    device_id: str
    requested_size: int
    request_id: str
    def __init__(self, vm_id: _Optional[str] = ..., device_id: _Optional[str] = ..., requested_size: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class VirtioMemRequestRequest(_message.Message):
    __slots__ = ("vm_id", "device_id", "type", "addr", "nb_blocks", "request_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    NB_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    device_id: str
    type: VirtioMemRequestType
    addr: int
    nb_blocks: int
    request_id: str
    def __init__(self, vm_id: _Optional[str] = ..., device_id: _Optional[str] = ..., type: _Optional[_Union[VirtioMemRequestType, str]] = ..., addr: _Optional[int] = ..., nb_blocks: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class VirtioMemRequestResponse(_message.Message):
    __slots__ = ("response", "state")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    response: VirtioMemResponse
    state: VirtioMemBlockState
    def __init__(self, response: _Optional[_Union[VirtioMemResponse, str]] = ..., state: _Optional[_Union[VirtioMemBlockState, str]] = ...) -> None: ...

class DiscardGuestMemoryRequest(_message.Message):
    __slots__ = ("vm_id", "gpa", "length", "request_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    GPA_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    gpa: int
    length: int
    request_id: str
    def __init__(self, vm_id: _Optional[str] = ..., gpa: _Optional[int] = ..., length: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class DiscardGuestMemoryResponse(_message.Message):
    __slots__ = ("discarded_bytes", "tagged_bytes", "tag_blocks_released")
    DISCARDED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TAGGED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TAG_BLOCKS_RELEASED_FIELD_NUMBER: _ClassVar[int]
    discarded_bytes: int
    tagged_bytes: int
    tag_blocks_released: int
    def __init__(self, discarded_bytes: _Optional[int] = ..., tagged_bytes: _Optional[int] = ..., tag_blocks_released: _Optional[int] = ...) -> None: ...

class ReportVmmDifferenceRequest(_message.Message):
    __slots__ = ("vm_id", "device_id", "reporter", "what", "request_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    REPORTER_FIELD_NUMBER: _ClassVar[int]
    WHAT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    device_id: str
    reporter: str
    what: str
    request_id: str
    def __init__(self, vm_id: _Optional[str] = ..., device_id: _Optional[str] = ..., reporter: _Optional[str] = ..., what: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ReportVmmDifferenceResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CopyTagsRequest(_message.Message):
    __slots__ = ("vm_id", "gpa", "length", "direction", "tags", "request_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    GPA_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    gpa: int
    length: int
    direction: TagCopyDirection
    tags: bytes
    request_id: str
    def __init__(self, vm_id: _Optional[str] = ..., gpa: _Optional[int] = ..., length: _Optional[int] = ..., direction: _Optional[_Union[TagCopyDirection, str]] = ..., tags: _Optional[bytes] = ..., request_id: _Optional[str] = ...) -> None: ...

class CopyTagsResponse(_message.Message):
    __slots__ = ("tags",)
    TAGS_FIELD_NUMBER: _ClassVar[int]
    tags: bytes
    def __init__(self, tags: _Optional[bytes] = ...) -> None: ...

class CheckInvariantsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckInvariantsResponse(_message.Message):
    __slots__ = ("violations",)
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    violations: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, violations: _Optional[_Iterable[str]] = ...) -> None: ...

class ExportStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportStateResponse(_message.Message):
    __slots__ = ("header", "page_extents", "reserved_tag_blocks", "mapping_runs")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAGE_EXTENTS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_TAG_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAPPING_RUNS_FIELD_NUMBER: _ClassVar[int]
    header: ExportHeader
    page_extents: PageExtents
    reserved_tag_blocks: ReservedTagBlocks
    mapping_runs: MappingRuns
    def __init__(self, header: _Optional[_Union[ExportHeader, _Mapping]] = ..., page_extents: _Optional[_Union[PageExtents, _Mapping]] = ..., reserved_tag_blocks: _Optional[_Union[ReservedTagBlocks, _Mapping]] = ..., mapping_runs: _Optional[_Union[MappingRuns, _Mapping]] = ...) -> None: ...

class ExportHeader(_message.Message):
    __slots__ = ("page_size", "page_extent_count", "reserved_tag_block_count", "mapping_run_count")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_EXTENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    RESERVED_TAG_BLOCK_COUNT_FIELD_NUMBER: _ClassVar[int]
    MAPPING_RUN_COUNT_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_extent_count: int
    reserved_tag_block_count: int
    mapping_run_count: int
    def __init__(self, page_size: _Optional[int] = ..., page_extent_count: _Optional[int] = ..., reserved_tag_block_count: _Optional[int] = ..., mapping_run_count: _Optional[int] = ...) -> None: ...

class PageExtents(_message.Message):
    __slots__ = ("extents",)
    EXTENTS_FIELD_NUMBER: _ClassVar[int]
    extents: _containers.RepeatedCompositeFieldContainer[PageExtent]
    def __init__(self, extents: _Optional[_Iterable[_Union[PageExtent, _Mapping]]] = ...) -> None: ...

class PageExtent(_message.Message):
    __slots__ = ("pfn_start", "count", "state", "vm_id", "gfn_start")
    PFN_START_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    GFN_START_FIELD_NUMBER: _ClassVar[int]
    pfn_start: int
    count: int
    state: PageState
    vm_id: str
    gfn_start: int
    def __init__(self, pfn_start: _Optional[int] = ..., count: _Optional[int] = ..., state: _Optional[_Union[PageState, str]] = ..., vm_id: _Optional[str] = ..., gfn_start: _Optional[int] = ...) -> None: ...

class ReservedTagBlocks(_message.Message):
    __slots__ = ("blocks",)
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[ReservedTagBlock]
    def __init__(self, blocks: _Optional[_Iterable[_Union[ReservedTagBlock, _Mapping]]] = ...) -> None: ...

class ReservedTagBlock(_message.Message):
    __slots__ = ("region", "tag_pfn_start", "nr_pages", "refcount")
    REGION_FIELD_NUMBER: _ClassVar[int]
    TAG_PFN_START_FIELD_NUMBER: _ClassVar[int]
    NR_PAGES_FIELD_NUMBER: _ClassVar[int]
    REFCOUNT_FIELD_NUMBER: _ClassVar[int]
    region: str
    tag_pfn_start: int
    nr_pages: int
    refcount: int
    def __init__(self, region: _Optional[str] = ..., tag_pfn_start: _Optional[int] = ..., nr_pages: _Optional[int] = ..., refcount: _Optional[int] = ...) -> None: ...

class MappingRuns(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[MappingRun]
    def __init__(self, runs: _Optional[_Iterable[_Union[MappingRun, _Mapping]]] = ...) -> None: ...

class MappingRun(_message.Message):
    __slots__ = ("vm_id", "gfn_start", "pfn_start", "count", "tagged")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    GFN_START_FIELD_NUMBER: _ClassVar[int]
    PFN_START_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TAGGED_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    gfn_start: int
    pfn_start: int
    count: int
    tagged: bool
    def __init__(self, vm_id: _Optional[str] = ..., gfn_start: _Optional[int] = ..., pfn_start: _Optional[int] = ..., count: _Optional[int] = ..., tagged: _Optional[bool] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("include_faults",)
    INCLUDE_FAULTS_FIELD_NUMBER: _ClassVar[int]
    include_faults: bool
    def __init__(self, include_faults: _Optional[bool] = ...) -> None: ...

class WatchEventsResponse(_message.Message):
    __slots__ = ("event", "dropped_events")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    DROPPED_EVENTS_FIELD_NUMBER: _ClassVar[int]
    event: Event
    dropped_events: int
    def __init__(self, event: _Optional[_Union[Event, _Mapping]] = ..., dropped_events: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("kind", "vm_id", "device_id", "region", "count", "seconds", "detail", "sequence")
    class DetailEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    vm_id: str
    device_id: str
    region: str
    count: int
    seconds: float
    detail: _containers.ScalarMap[str, str]
    sequence: int
    def __init__(self, kind: _Optional[str] = ..., vm_id: _Optional[str] = ..., device_id: _Optional[str] = ..., region: _Optional[str] = ..., count: _Optional[int] = ..., seconds: _Optional[float] = ..., detail: _Optional[_Mapping[str, str]] = ..., sequence: _Optional[int] = ...) -> None: ...

class StartMigrationRequest(_message.Message):
    __slots__ = ("vm_id", "migration_id", "timeout_seconds", "request_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    migration_id: str
    timeout_seconds: float
    request_id: str
    def __init__(self, vm_id: _Optional[str] = ..., migration_id: _Optional[str] = ..., timeout_seconds: _Optional[float] = ..., request_id: _Optional[str] = ...) -> None: ...

class MigrationManifest(_message.Message):
    __slots__ = ("migration_id", "config", "page_size_bytes", "devices", "mapped_bitmap", "tagged_bitmap", "mapped_bytes", "tagged_bytes", "plugged_bytes")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    MAPPED_BITMAP_FIELD_NUMBER: _ClassVar[int]
    TAGGED_BITMAP_FIELD_NUMBER: _ClassVar[int]
    MAPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TAGGED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PLUGGED_BYTES_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    config: CreateVmRequest
    page_size_bytes: int
    devices: _containers.RepeatedCompositeFieldContainer[DeviceManifest]
    mapped_bitmap: bytes
    tagged_bitmap: bytes
    mapped_bytes: int
    tagged_bytes: int
    plugged_bytes: int
    def __init__(self, migration_id: _Optional[str] = ..., config: _Optional[_Union[CreateVmRequest, _Mapping]] = ..., page_size_bytes: _Optional[int] = ..., devices: _Optional[_Iterable[_Union[DeviceManifest, _Mapping]]] = ..., mapped_bitmap: _Optional[bytes] = ..., tagged_bitmap: _Optional[bytes] = ..., mapped_bytes: _Optional[int] = ..., tagged_bytes: _Optional[int] = ..., plugged_bytes: _Optional[int] = ...) -> None: ...

class DeviceManifest(_message.Message):
    __slots__ = ("device_id", "kind", "gpa", "size_bytes", "block_size", "requested_size", "usable_region_size", "plugged_bitmap", "prealloc")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    GPA_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_SIZE_FIELD_NUMBER: _ClassVar[int]
    USABLE_REGION_SIZE_FIELD_NUMBER: _ClassVar[int]
    PLUGGED_BITMAP_FIELD_NUMBER: _ClassVar[int]
    PREALLOC_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    kind: MemoryDeviceKind
    gpa: int
    size_bytes: int
    block_size: int
    requested_size: int
    usable_region_size: int
    plugged_bitmap: bytes
    prealloc: bool
    def __init__(self, device_id: _Optional[str] = ..., kind: _Optional[_Union[MemoryDeviceKind, str]] = ..., gpa: _Optional[int] = ..., size_bytes: _Optional[int] = ..., block_size: _Optional[int] = ..., requested_size: _Optional[int] = ..., usable_region_size: _Optional[int] = ..., plugged_bitmap: _Optional[bytes] = ..., prealloc: _Optional[bool] = ...) -> None: ...

class AdmitMigrationRequest(_message.Message):
    __slots__ = ("manifest", "lease_seconds", "request_id")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    manifest: MigrationManifest
    lease_seconds: float
    request_id: str
    def __init__(self, manifest: _Optional[_Union[MigrationManifest, _Mapping]] = ..., lease_seconds: _Optional[float] = ..., request_id: _Optional[str] = ...) -> None: ...

class MigrationStepRequest(_message.Message):
    __slots__ = ("vm_id", "migration_id", "request_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    migration_id: str
    request_id: str
    def __init__(self, vm_id: _Optional[str] = ..., migration_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ReadMigrationChunkRequest(_message.Message):
    __slots__ = ("vm_id", "migration_id", "request_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    migration_id: str
    request_id: str
    def __init__(self, vm_id: _Optional[str] = ..., migration_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ReadMigrationChunkResponse(_message.Message):
    __slots__ = ("round_done", "chunk")
    ROUND_DONE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    round_done: bool
    chunk: TagChunk
    def __init__(self, round_done: _Optional[bool] = ..., chunk: _Optional[_Union[TagChunk, _Mapping]] = ...) -> None: ...

class TagChunk(_message.Message):
    __slots__ = ("seq", "round", "first_gfn_offset", "span_pages", "present", "mapped", "tagged", "nonzero", "tags", "checksum")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FIRST_GFN_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SPAN_PAGES_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    MAPPED_FIELD_NUMBER: _ClassVar[int]
    TAGGED_FIELD_NUMBER: _ClassVar[int]
    NONZERO_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    seq: int
    round: int
    first_gfn_offset: int
    span_pages: int
    present: bytes
    mapped: bytes
    tagged: bytes
    nonzero: bytes
    tags: bytes
    checksum: int
    def __init__(self, seq: _Optional[int] = ..., round: _Optional[int] = ..., first_gfn_offset: _Optional[int] = ..., span_pages: _Optional[int] = ..., present: _Optional[bytes] = ..., mapped: _Optional[bytes] = ..., tagged: _Optional[bytes] = ..., nonzero: _Optional[bytes] = ..., tags: _Optional[bytes] = ..., checksum: _Optional[int] = ...) -> None: ...

class WriteMigrationChunkRequest(_message.Message):
    __slots__ = ("vm_id", "migration_id", "chunk", "request_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    migration_id: str
    chunk: TagChunk
    request_id: str
    def __init__(self, vm_id: _Optional[str] = ..., migration_id: _Optional[str] = ..., chunk: _Optional[_Union[TagChunk, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class NextMigrationRoundResponse(_message.Message):
    __slots__ = ("round_pages",)
    ROUND_PAGES_FIELD_NUMBER: _ClassVar[int]
    round_pages: int
    def __init__(self, round_pages: _Optional[int] = ...) -> None: ...

class GetMigrationRequest(_message.Message):
    __slots__ = ("vm_id",)
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    def __init__(self, vm_id: _Optional[str] = ...) -> None: ...

class MigrationStatus(_message.Message):
    __slots__ = ("migration_id", "vm_id", "role", "phase", "round", "round_pages_left", "dirty_pages", "chunks", "wire_bytes", "tag_bytes", "deadline_unix_seconds")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_PAGES_LEFT_FIELD_NUMBER: _ClassVar[int]
    DIRTY_PAGES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TAG_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    vm_id: str
    role: MigrationRole
    phase: MigrationPhase
    round: int
    round_pages_left: int
    dirty_pages: int
    chunks: int
    wire_bytes: int
    tag_bytes: int
    deadline_unix_seconds: float
    def __init__(self, migration_id: _Optional[str] = ..., vm_id: _Optional[str] = ..., role: _Optional[_Union[MigrationRole, str]] = ..., phase: _Optional[_Union[MigrationPhase, str]] = ..., round: _Optional[int] = ..., round_pages_left: _Optional[int] = ..., dirty_pages: _Optional[int] = ..., chunks: _Optional[int] = ..., wire_bytes: _Optional[int] = ..., tag_bytes: _Optional[int] = ..., deadline_unix_seconds: _Optional[float] = ...) -> None: ...

class MigrationReport(_message.Message):
    __slots__ = ("migration_id", "vm_id", "rounds", "wire_bytes", "tag_bytes", "mapped_bytes", "tagged_bytes", "vm_token")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TAG_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TAGGED_BYTES_FIELD_NUMBER: _ClassVar[int]
    VM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    vm_id: str
    rounds: int
    wire_bytes: int
    tag_bytes: int
    mapped_bytes: int
    tagged_bytes: int
    vm_token: str
    def __init__(self, migration_id: _Optional[str] = ..., vm_id: _Optional[str] = ..., rounds: _Optional[int] = ..., wire_bytes: _Optional[int] = ..., tag_bytes: _Optional[int] = ..., mapped_bytes: _Optional[int] = ..., tagged_bytes: _Optional[int] = ..., vm_token: _Optional[str] = ...) -> None: ...

class CompactTagRegionRequest(_message.Message):
    __slots__ = ("region", "request_id")
    REGION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    region: str
    request_id: str
    def __init__(self, region: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class CompactTagRegionResponse(_message.Message):
    __slots__ = ("region", "evacuated_pages", "lent_pages_left", "compacted_pages", "tag_blocks_freed", "tag_blocks_reserved", "tag_blocks_min_needed", "complete")
    REGION_FIELD_NUMBER: _ClassVar[int]
    EVACUATED_PAGES_FIELD_NUMBER: _ClassVar[int]
    LENT_PAGES_LEFT_FIELD_NUMBER: _ClassVar[int]
    COMPACTED_PAGES_FIELD_NUMBER: _ClassVar[int]
    TAG_BLOCKS_FREED_FIELD_NUMBER: _ClassVar[int]
    TAG_BLOCKS_RESERVED_FIELD_NUMBER: _ClassVar[int]
    TAG_BLOCKS_MIN_NEEDED_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    region: str
    evacuated_pages: int
    lent_pages_left: int
    compacted_pages: int
    tag_blocks_freed: int
    tag_blocks_reserved: int
    tag_blocks_min_needed: int
    complete: bool
    def __init__(self, region: _Optional[str] = ..., evacuated_pages: _Optional[int] = ..., lent_pages_left: _Optional[int] = ..., compacted_pages: _Optional[int] = ..., tag_blocks_freed: _Optional[int] = ..., tag_blocks_reserved: _Optional[int] = ..., tag_blocks_min_needed: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...

class EvacuateHostRangeRequest(_message.Message):
    __slots__ = ("pfn_start", "nr_pages", "request_id")
    PFN_START_FIELD_NUMBER: _ClassVar[int]
    NR_PAGES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    pfn_start: int
    nr_pages: int
    request_id: str
    def __init__(self, pfn_start: _Optional[int] = ..., nr_pages: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class EvacuateHostRangeResponse(_message.Message):
    __slots__ = ("pfn_start", "nr_pages", "moved_pages", "pages_left", "stopped_reason", "complete")
    PFN_START_FIELD_NUMBER: _ClassVar[int]
    NR_PAGES_FIELD_NUMBER: _ClassVar[int]
    MOVED_PAGES_FIELD_NUMBER: _ClassVar[int]
    PAGES_LEFT_FIELD_NUMBER: _ClassVar[int]
    STOPPED_REASON_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    pfn_start: int
    nr_pages: int
    moved_pages: int
    pages_left: int
    stopped_reason: str
    complete: bool
    def __init__(self, pfn_start: _Optional[int] = ..., nr_pages: _Optional[int] = ..., moved_pages: _Optional[int] = ..., pages_left: _Optional[int] = ..., stopped_reason: _Optional[str] = ..., complete: _Optional[bool] = ...) -> None: ...
