"""The one error hierarchy of the tagstore model.

Every refusal of the model is a :class:`TagStoreError` with a stable ``reason`` (UPPER_SNAKE,
used as the gRPC ``ErrorInfo.reason``) and ``metadata`` naming the offending field and value.
A refused call changes nothing. Guest-protocol outcomes (virtio-mem NACK/ERROR/BUSY) are
*answers*, never exceptions: see :mod:`hostd.model.types`.

::

    TagStoreError
    ├── InvalidArgumentError        bad value in a call: misaligned, zero, too large, unknown
    │   └── ConfigError             bad host topology (field and value named)
    ├── NotFoundError               no such VM or device
    ├── AlreadyExistsError          VM or device id taken
    ├── FailedPreconditionError     legal value, wrong state (unplugged gpa, non-MTE VM, ...)
    ├── ResourceExhaustedError      taggable memory, tag storage or memory ran out
    └── StateUnavailableError       the daemon cannot record the call durably (disk full, ...)
"""

from __future__ import annotations

from collections.abc import Mapping


class TagStoreError(Exception):
    """Base of every error the model raises on purpose."""

    reason: str = "TAGSTORE_ERROR"

    def __init__(self, message: str, *, reason: str | None = None, **metadata: object) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: Mapping[str, str] = {k: _fmt(v) for k, v in metadata.items()}

    def __str__(self) -> str:
        return self.message


def _fmt(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:#x}" if value >= 1 << 16 else str(value)
    return str(value)


class InvalidArgumentError(TagStoreError):
    """A field of a call has a value the model can never accept."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, value: object, why: str, *, reason: str | None = None) -> None:
        super().__init__(f"{field}={_fmt(value)}: {why}", reason=reason, field=field, value=value)
        self.field = field
        self.value = value


class ConfigError(InvalidArgumentError):
    """The host topology is invalid; tag storage management cannot start on it."""

    reason = "INVALID_TOPOLOGY"


class NotFoundError(TagStoreError):
    """The named VM or memory device does not exist."""

    reason = "NOT_FOUND"


class AlreadyExistsError(TagStoreError):
    """The VM or device id is already in use."""

    reason = "ALREADY_EXISTS"


class FailedPreconditionError(TagStoreError):
    """The call is well formed but the current state does not allow it."""

    reason = "FAILED_PRECONDITION"


class ResourceExhaustedError(TagStoreError):
    """The host ran out of a resource; ``resource`` says which one."""

    reason = "RESOURCE_EXHAUSTED"

    def __init__(self, resource: str, message: str, **metadata: object) -> None:
        super().__init__(
            message, reason=f"{resource.upper()}_EXHAUSTED", resource=resource, **metadata
        )
        self.resource = resource


class StateUnavailableError(TagStoreError):
    """The call could not be recorded durably (the state directory is full or unwritable), so
    it was not made; retrying later may succeed. Raised by the daemon's store, not the model."""

    reason = "STATE_UNAVAILABLE"


# The resources ResourceExhaustedError names.
RESOURCE_TAGGABLE_MEMORY = "taggable_memory"
RESOURCE_TAG_STORAGE = "tag_storage"
RESOURCE_MEMORY = "memory"
RESOURCE_GUEST_ADDRESS_SPACE = "guest_address_space"
RESOURCE_DIMM_SLOTS = "dimm_slots"
