"""Events the model emits to its subscribers (the WatchEvents stream).

Subscribers are called synchronously, after the state change is complete, while the caller
still holds the host; they must be quick and must not call back into the host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Event:
    """One thing that happened (read-only by convention: a fault emits one, so it is a cheap
    slotted record). ``kind`` is one of the ``EVENT_*`` names below."""

    kind: str
    vm_id: str = ""
    device_id: str = ""
    region: str = ""
    count: int = 0
    seconds: float = 0.0
    detail: dict[str, str] = field(default_factory=dict)


EVENT_VM_CREATED = "vm_created"
EVENT_VM_DESTROYED = "vm_destroyed"
EVENT_DEVICE_ADDED = "device_added"
EVENT_DEVICE_REMOVED = "device_removed"
EVENT_VIRTIO_MEM_RESIZED = "virtio_mem_resized"
EVENT_VIRTIO_MEM_PLUGGED = "virtio_mem_plugged"  # count = blocks
EVENT_VIRTIO_MEM_UNPLUGGED = "virtio_mem_unplugged"  # count = blocks
EVENT_TAG_BLOCKS_RESERVED = "tag_blocks_reserved"  # count = blocks, seconds incl. evacuation
EVENT_TAG_BLOCKS_RELEASED = "tag_blocks_released"
EVENT_TAG_RESERVE_FAILED = "tag_reserve_failed"
EVENT_EVACUATION = "evacuation"  # count = pages moved out of tag storage
EVENT_FAULT = "fault"  # detail: access, outcome; seconds = handling time
# detail: migration_id, role, phase (a MigrationPhase or an outcome, upper case); count = round
EVENT_MIGRATION_PHASE = "migration_phase"
EVENT_VMM_DIFFERENCE = "vmm_difference"  # detail: reporter, what (a VMM's view differs)
EVENT_PAGES_MOVED = "pages_moved"  # count = pages; detail: reason (compaction, offlining)


Subscriber = Callable[[Event], None]
