"""The client's own rules, without hostd: error translation, enum names, retry policy and the
public surface. The retry tests use an in-process gRPC server that refuses every call."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

import vmm_shim
from tagstore.v1 import tagstore_pb2 as pb
from tagstore.v1 import tagstore_pb2_grpc as pb_grpc
from vmm_shim import client
from vmm_shim.client import (
    AlreadyExists,
    FailedPrecondition,
    HostClient,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TagStoreClientError,
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
    assert "INVALID_ARGUMENT INVALID_ARGUMENT: gpa=1: must be aligned" == str(error)


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
    error = translate_error(FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "too slow"))
    assert (TagStoreClientError, "DEADLINE_EXCEEDED") == (type(error), error.code)


def test_enum_names_drop_the_proto_prefix_and_unspecified() -> None:
    assert ("ON_FAULT", "EAGER", "ON_TAG_ACCESS") == vmm_shim.TAG_POLICIES
    assert ("READ", "WRITE", "TAG") == vmm_shim.ACCESSES


@pytest.mark.parametrize("name", ["ON_TAG_ACCESS", "on-tag-access", " on_tag_access "])
def test_enum_strings_are_case_and_dash_insensitive(name: str) -> None:
    assert pb.TAG_POLICY_ON_TAG_ACCESS == client._TAG_POLICY.to_proto(name, what="policy")


def test_every_enum_round_trips_between_string_and_proto() -> None:
    tables = [v for v in vars(client).values() if isinstance(v, client._EnumNames)]
    assert len(tables) >= 10
    for table in tables:
        assert list(table.names) == [
            table.from_proto(table.to_proto(n, what="x")) for n in table.names
        ]


def test_unknown_enum_strings_are_refused_before_sending() -> None:
    with pytest.raises(ValueError, match="unknown access 'EXECUTE'"):
        client._ACCESS.to_proto("EXECUTE", what="access")
    with pytest.raises(ValueError, match="unknown tag policy"):
        client._TAG_POLICY.to_proto("UNSPECIFIED", what="tag policy")


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
        "RegionInfo",
        "ReservedTagBlock",
        "ResourceExhausted",
        "StateExport",
        "TagStoreClientError",
        "Unavailable",
        "VirtioMemRequestError",
        "VmHandle",
        "VmInfo",
        "format_size",
        "parse_size",
        "translate_error",
    } == set(vmm_shim.__all__)
    assert all(hasattr(vmm_shim, name) for name in vmm_shim.__all__)


# -- retry policy against an in-process server that answers UNAVAILABLE -------------------------


class UnavailableServicer(pb_grpc.TagStorageServicer):
    """Counts every call that reached it and refuses it with UNAVAILABLE (after sending)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.deadlines: list[float | None] = []

    def _refuse(self, name: str, context: grpc.ServicerContext) -> Any:
        self.calls[name] += 1
        self.deadlines.append(context.time_remaining())
        context.abort(grpc.StatusCode.UNAVAILABLE, "draining")

    def GetHost(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._refuse("GetHost", context)

    def CreateVm(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._refuse("CreateVm", context)

    def GuestFault(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._refuse("GuestFault", context)

    def VirtioMemRequest(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._refuse(pb.VirtioMemRequestType.Name(request.type), context)


@pytest.fixture
def refusing_host() -> Iterator[tuple[HostClient, UnavailableServicer]]:
    servicer = UnavailableServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_TagStorageServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with HostClient(f"127.0.0.1:{port}", timeout_s=30.0, max_attempts=3) as host:
        yield host, servicer
    server.stop(None)


def test_reads_are_retried_on_unavailable_up_to_max_attempts(
    refusing_host: tuple[HostClient, UnavailableServicer],
) -> None:
    host, servicer = refusing_host
    with pytest.raises(Unavailable):
        host.host_status()
    assert 3 == servicer.calls["GetHost"]


def test_virtio_mem_state_is_retried_but_plug_is_not(
    refusing_host: tuple[HostClient, UnavailableServicer],
) -> None:
    host, servicer = refusing_host
    vm = host.vm("vm")
    with pytest.raises(Unavailable):
        vm.virtio_mem_state("vmem0", 0, 1)
    with pytest.raises(Unavailable):
        vm.virtio_mem_plug("vmem0", 0, 1)
    assert (3, 1) == (
        servicer.calls["VIRTIO_MEM_REQUEST_TYPE_STATE"],
        servicer.calls["VIRTIO_MEM_REQUEST_TYPE_PLUG"],
    )


def test_calls_that_change_state_are_not_retried_once_they_reached_the_daemon(
    refusing_host: tuple[HostClient, UnavailableServicer],
) -> None:
    host, servicer = refusing_host
    with pytest.raises(Unavailable):
        host.create_vm("vm", mte_enabled=True, boot_memory_bytes=1 << 20)
    with pytest.raises(Unavailable):
        host.vm("vm").fault(0x4000_0000, 4096)
    assert (1, 1) == (servicer.calls["CreateVm"], servicer.calls["GuestFault"])


def test_every_call_carries_a_deadline_within_the_client_timeout(
    refusing_host: tuple[HostClient, UnavailableServicer],
) -> None:
    host, servicer = refusing_host
    with pytest.raises(Unavailable):
        host.create_vm("vm", mte_enabled=True, boot_memory_bytes=1 << 20)
    (remaining,) = servicer.deadlines
    # Without a deadline time_remaining() is None; with one it is about the client's 30 s
    # (the server's clock rounding can make it a little more).
    assert remaining is not None and remaining < 60


def test_a_call_that_never_reached_a_daemon_fails_unavailable(tmp_path: Any) -> None:
    with HostClient(f"unix:{tmp_path}/none.sock", timeout_s=5.0, max_attempts=2) as host:
        with pytest.raises(Unavailable, match="failed to connect"):
            host.create_vm("vm", mte_enabled=True, boot_memory_bytes=1 << 20)
        assert host.health() is False


def test_client_refuses_a_non_positive_timeout() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        HostClient(timeout_s=0)
