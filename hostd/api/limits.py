"""What one client may ask of the daemon: caps that keep any client from starving the others.

Each refusal is a model error (so it maps through :mod:`hostd.api.errors` like any other) with
an ErrorInfo naming the limit, and comes before the model is called, so nothing changes:

- ids longer than :data:`MAX_ID_CHARS`: INVALID_ARGUMENT (the model accepts 63 characters;
  longer ones are refused here, before they are hashed, logged or looked up);
- more VMs than ``max_vms``, more memory devices in a VM than ``max_devices_per_vm``:
  RESOURCE_EXHAUSTED (``VMS_EXHAUSTED``, ``DEVICES_EXHAUSTED``);
- more open streams (StreamGuestFaults, WatchEvents, ExportState) than ``max_streams`` in all
  or ``max_streams_per_client`` per credential: RESOURCE_EXHAUSTED (``STREAMS_EXHAUSTED``).

Range lengths per call are capped by the model itself (``MAX_FAULT_BYTES``,
``MAX_TAG_COPY_BYTES``); message sizes are set on the server (:data:`MAX_MESSAGE_BYTES`); each
WatchEvents stream queues at most ``event_queue_size`` events (the oldest are dropped, counted).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hostd.model.errors import InvalidArgumentError, ResourceExhaustedError

MAX_ID_CHARS = 128
# Requests and answers: the largest is a 32 MiB tag copy (2 MiB of tags); exports are chunked
# below 1 MiB. Set explicitly so that a library default change cannot widen it.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_VMS = 1024
# 256 DIMM slots (the QEMU/ACPI limit) and room for virtio-mem devices.
DEFAULT_MAX_DEVICES_PER_VM = 320
DEFAULT_MAX_STREAMS = 1024
DEFAULT_MAX_STREAMS_PER_CLIENT = 256
DEFAULT_EVENT_QUEUE_SIZE = 1024


def check_id(field: str, value: str) -> None:
    """Refuse an id no VM or device can have before anything else looks at it."""
    if len(value) > MAX_ID_CHARS:
        raise InvalidArgumentError(
            field, f"{value[:16]}...", f"{len(value)} characters, at most {MAX_ID_CHARS}"
        )


@dataclass(frozen=True)
class Limits:
    """The caps of one daemon (``hostd serve --max-*``)."""

    max_vms: int = DEFAULT_MAX_VMS
    max_devices_per_vm: int = DEFAULT_MAX_DEVICES_PER_VM
    max_streams: int = DEFAULT_MAX_STREAMS
    max_streams_per_client: int = DEFAULT_MAX_STREAMS_PER_CLIENT
    event_queue_size: int = DEFAULT_EVENT_QUEUE_SIZE

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1")

    def check_new_vm(self, nr_vms: int) -> None:
        """Refuse a VM beyond ``max_vms``."""
        if nr_vms >= self.max_vms:
            raise ResourceExhaustedError(
                "vms", f"at most {self.max_vms} VMs (hostd serve --max-vms)", limit=self.max_vms
            )

    def check_new_device(self, vm_id: str, nr_devices: int) -> None:
        """Refuse a memory device beyond ``max_devices_per_vm``."""
        if nr_devices >= self.max_devices_per_vm:
            raise ResourceExhaustedError(
                "devices",
                f"VM {vm_id!r} has {nr_devices} memory devices, at most "
                f"{self.max_devices_per_vm} (hostd serve --max-devices-per-vm)",
                vm_id=vm_id,
                limit=self.max_devices_per_vm,
            )


class StreamSlots:
    """Counts open streams in all and per client; single-threaded (the event loop's)."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._by_client: Counter[str] = Counter()
        self._total = 0

    @property
    def open(self) -> int:
        """Streams open now."""
        return self._total

    def acquire(self, client: str) -> None:
        """Take a slot for ``client`` or refuse with RESOURCE_EXHAUSTED."""
        if self._total >= self._limits.max_streams:
            raise ResourceExhaustedError(
                "streams",
                f"{self._total} streams open, at most {self._limits.max_streams} in all",
                limit=self._limits.max_streams,
            )
        if self._by_client[client] >= self._limits.max_streams_per_client:
            raise ResourceExhaustedError(
                "streams",
                f"this credential has {self._by_client[client]} streams open, at most "
                f"{self._limits.max_streams_per_client}",
                limit=self._limits.max_streams_per_client,
            )
        self._by_client[client] += 1
        self._total += 1

    def release(self, client: str) -> None:
        """Give back a slot taken by :meth:`acquire`."""
        self._total -= 1
        self._by_client[client] -= 1
        if self._by_client[client] <= 0:
            del self._by_client[client]
