"""The one error mapping (hostd.api.errors): one test per row, plus what every row shares."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from hostd.api.auth import AuthError, PermissionDeniedError, UnauthenticatedError
from hostd.api.errors import ERROR_DOMAIN, MAX_ECHO_CHARS, STATUS_CODES, to_grpc_status
from hostd.model.errors import (
    RESOURCE_TAG_STORAGE,
    AlreadyExistsError,
    ConfigError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    StateUnavailableError,
    TagStoreError,
)


def _decode(status: grpc.Status) -> tuple[status_pb2.Status, error_details_pb2.ErrorInfo]:
    (key, value), *rest = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    assert rest == []
    rich = status_pb2.Status.FromString(value)
    (detail,) = rich.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    return rich, info


@pytest.mark.parametrize(
    ("error", "code", "reason", "metadata"),
    [
        pytest.param(
            InvalidArgumentError("gpa", 0x1001, "must be page aligned"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            {"field": "gpa", "value": "4097"},
            id="invalid_argument",
        ),
        pytest.param(
            ConfigError("page_size", "8K", "must be 4K, 16K or 64K"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_TOPOLOGY",
            {"field": "page_size", "value": "8K"},
            id="config_error_is_invalid_argument",
        ),
        pytest.param(
            NotFoundError("no VM 'a'", reason="VM_NOT_FOUND", vm_id="a"),
            grpc.StatusCode.NOT_FOUND,
            "VM_NOT_FOUND",
            {"vm_id": "a"},
            id="not_found",
        ),
        pytest.param(
            AlreadyExistsError("VM 'a' exists", reason="VM_EXISTS", vm_id="a"),
            grpc.StatusCode.ALREADY_EXISTS,
            "VM_EXISTS",
            {"vm_id": "a"},
            id="already_exists",
        ),
        pytest.param(
            FailedPreconditionError("not plugged", reason="GPA_NOT_PLUGGED", gpa=0x1000_0000),
            grpc.StatusCode.FAILED_PRECONDITION,
            "GPA_NOT_PLUGGED",
            {"gpa": "0x10000000"},
            id="failed_precondition",
        ),
        pytest.param(
            ResourceExhaustedError(RESOURCE_TAG_STORAGE, "no tag storage left", vm_id="a"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TAG_STORAGE_EXHAUSTED",
            {"resource": "tag_storage", "vm_id": "a"},
            id="resource_exhausted",
        ),
        pytest.param(
            StateUnavailableError("disk full", reason="STATE_UNWRITABLE", journal="/s/j"),
            grpc.StatusCode.UNAVAILABLE,
            "STATE_UNWRITABLE",
            {"journal": "/s/j"},
            id="state_unavailable",
        ),
        pytest.param(
            TagStoreError("unclassified refusal", reason="SOMETHING"),
            grpc.StatusCode.INTERNAL,
            "SOMETHING",
            {},
            id="unclassified_model_error_is_internal",
        ),
    ],
)
def test_model_error_maps_to_its_status_code_with_error_info(
    error: TagStoreError, code: grpc.StatusCode, reason: str, metadata: dict[str, str]
) -> None:
    """Each error class has its code; ErrorInfo carries reason, domain and metadata."""
    status = to_grpc_status(error)
    rich, info = _decode(status)

    assert code == status.code
    assert str(error) == status.details
    assert getattr(code_pb2, code.name) == rich.code
    assert str(error) == rich.message
    assert reason == info.reason
    assert ERROR_DOMAIN == info.domain
    assert metadata == dict(info.metadata)


def test_every_error_class_of_the_model_has_a_row() -> None:
    """A new TagStoreError subclass cannot silently fall through to the catch-all row."""
    classes = {
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        ResourceExhaustedError,
        StateUnavailableError,
        TagStoreError,
    }
    assert classes == {cls for cls, _ in STATUS_CODES}
    direct_subclasses = set(TagStoreError.__subclasses__())
    assert direct_subclasses <= classes


def test_no_model_error_maps_to_unknown() -> None:
    """UNKNOWN is what gRPC says for an uncaught exception; the mapping never produces it."""
    assert grpc.StatusCode.UNKNOWN not in {code for _, code in STATUS_CODES}


@pytest.mark.parametrize(
    ("error", "code", "reason"),
    [
        pytest.param(
            UnauthenticatedError("no credential"),
            grpc.StatusCode.UNAUTHENTICATED,
            "UNAUTHENTICATED",
            id="unauthenticated",
        ),
        pytest.param(
            PermissionDeniedError("another VM's token"),
            grpc.StatusCode.PERMISSION_DENIED,
            "PERMISSION_DENIED",
            id="permission_denied",
        ),
    ],
)
def test_credential_error_maps_to_its_status_code_with_error_info(
    error: AuthError, code: grpc.StatusCode, reason: str
) -> None:
    """Refused credentials carry the same ErrorInfo shape as model errors, with no metadata."""
    status = to_grpc_status(error)
    _, info = _decode(status)
    assert (code, reason, ERROR_DOMAIN, {}) == (
        status.code,
        info.reason,
        info.domain,
        dict(info.metadata),
    )


def test_a_long_value_is_echoed_as_a_short_prefix_in_message_and_metadata() -> None:
    """A 10,000-character value cannot make the status overflow gRPC's metadata limit."""
    huge = "v" * 10_000
    status = to_grpc_status(InvalidArgumentError("vm_id", huge, "must be 1-63 characters"))
    rich, info = _decode(status)
    assert len(rich.message) < 200
    assert "(10000 characters)" in rich.message
    assert rich.message.endswith("must be 1-63 characters")
    assert len(info.metadata["value"]) <= MAX_ECHO_CHARS + 32
    assert len(status.trailing_metadata[0][1]) < 1024
