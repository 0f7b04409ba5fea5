"""The client's own rules, without hostd: error translation, enum names, client options and the
public surface (what goes on the wire: test_client_wire.py)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

import vmm_shim
from tagstore.v1 import tagstore_pb2 as pb
from vmm_shim import client
from vmm_shim.client import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    HostClient,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TagStoreClientError,
    Unauthenticated,
    Unavailable,
    translate_error,
)

DETAILS_KEY = "grpc-status-details-bin"


class FakeRpcError(grpc.RpcError):
    """What a failed unary call raises: an RpcError that is also a grpc.Call."""

    def __init__(
        self, code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, Any], ...] = ()
    ) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailers


def refusal(
    code: grpc.StatusCode, message: str, reason: str, status_code: int | None = None, **meta: str
) -> FakeRpcError:
    """A refusal as hostd sends it: a google.rpc.Status with one ErrorInfo in the trailers."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="tagstore", metadata=meta))
    status = status_pb2.Status(
        code=status_code if status_code is not None else getattr(code_pb2, code.name),
        message=message,
        details=[detail],
    )
    return FakeRpcError(code, message, ((DETAILS_KEY, status.SerializeToString()),))


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, NotFound),
        (grpc.StatusCode.ALREADY_EXISTS, AlreadyExists),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
    ],
)
def test_each_status_code_becomes_its_own_error_class(
    code: grpc.StatusCode, cls: type[TagStoreClientError]
) -> None:
    error = translate_error(refusal(code, "refused", "SOME_REASON"))
    assert (cls, code.name) == (type(error), error.code)


def test_reason_and_metadata_come_from_the_error_info() -> None:
    error = translate_error(
        refusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            "gpa=1: must be aligned",
            "INVALID_ARGUMENT",
            field="gpa",
            value="1",
        )
    )
    assert ("INVALID_ARGUMENT", {"field": "gpa", "value": "1"}, "gpa=1: must be aligned") == (
        error.reason,
        error.metadata,
        error.message,
    )
    assert "INVALID_ARGUMENT: gpa=1: must be aligned" == str(error), "the reason only repeats it"
    other = translate_error(refusal(grpc.StatusCode.NOT_FOUND, "no vm 'x'", "VM_NOT_FOUND"))
    assert "NOT_FOUND VM_NOT_FOUND: no vm 'x'" == str(other)


def test_a_status_without_details_has_an_empty_reason() -> None:
    error = translate_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    assert (Unavailable, "", {}) == (type(error), error.reason, error.metadata)
    assert "UNAVAILABLE: connection refused" == str(error)


def test_details_inconsistent_with_the_call_status_are_ignored() -> None:
    fake = refusal(
        grpc.StatusCode.NOT_FOUND, "no vm", "VM_NOT_FOUND", status_code=code_pb2.INTERNAL
    )
    error = translate_error(fake)
    assert (NotFound, "") == (type(error), error.reason)


def test_garbage_details_trailer_does_not_break_translation() -> None:
    fake = FakeRpcError(grpc.StatusCode.INTERNAL, "boom", ((DETAILS_KEY, b"\xff\xff\xff"),))
    error = translate_error(fake)
    assert (TagStoreClientError, "INTERNAL", "") == (type(error), error.code, error.reason)


def test_an_unmapped_code_is_the_base_error_class() -> None:
    error = translate_error(FakeRpcError(grpc.StatusCode.ABORTED, "conflict"))
    assert (TagStoreClientError, "ABORTED") == (type(error), error.code)


def test_enum_names_drop_the_proto_prefix_and_unspecified() -> None:
    assert ("ON_FAULT", "EAGER", "ON_TAG_ACCESS") == vmm_shim.TAG_POLICIES
    assert ("READ", "WRITE", "TAG") == vmm_shim.ACCESSES


@pytest.mark.parametrize("name", ["ON_TAG_ACCESS", "on-tag-access", " on_tag_access "])
def test_enum_strings_are_case_and_dash_insensitive(name: str) -> None:
    assert pb.TAG_POLICY_ON_TAG_ACCESS == client._TAG_POLICY.to_proto(name)


def test_every_enum_round_trips_between_string_and_proto() -> None:
    tables = [v for v in vars(client).values() if isinstance(v, client._EnumNames)]
    assert len(tables) >= 10
    for table in tables:
        assert list(table.names) == [table.from_proto(table.to_proto(n)) for n in table.names]


def test_unknown_enum_strings_are_invalid_argument_naming_the_field() -> None:
    with pytest.raises(InvalidArgument, match="access='EXECUTE': expected one of READ, WRITE"):
        client._ACCESS.to_proto("EXECUTE")
    with pytest.raises(InvalidArgument, match="tag_policy='UNSPECIFIED'"):
        client._TAG_POLICY.to_proto("UNSPECIFIED")


def test_a_proto_value_newer_than_the_client_is_named_unknown() -> None:
    assert ("UNSPECIFIED", "UNKNOWN(99)") == (
        client._TAG_POLICY.from_proto(0),
        client._TAG_POLICY.from_proto(99),
    )


def test_the_public_surface_is_pinned() -> None:
    assert {
        "ACCESSES",
        "BOOT_RAM_GPA",
        "DEFAULT_ADDRESS",
        "DEFAULT_TIMEOUT_S",
        "TAG_POLICIES",
        "AlreadyExists",
        "DeadlineExceeded",
        "DeviceInfo",
        "DiscardOutcome",
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
        "format_size",
        "parse_size",
        "translate_error",
    } == set(vmm_shim.__all__)
    assert all(hasattr(vmm_shim, name) for name in vmm_shim.__all__)


def test_a_call_that_never_reached_a_daemon_fails_unavailable(tmp_path: Any) -> None:
    with HostClient(f"unix:{tmp_path}/none.sock", timeout_s=5.0, max_attempts=2) as host:
        with pytest.raises(Unavailable, match="failed to connect"):
            host.create_vm("vm", mte_enabled=True, boot_memory_bytes=1 << 20)
        assert host.health() is False


@pytest.mark.parametrize("timeout_s", [0, -1, float("nan"), float("inf")])
def test_client_refuses_a_timeout_that_is_not_a_positive_number(timeout_s: float) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        HostClient(timeout_s=timeout_s)
