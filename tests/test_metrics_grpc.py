"""The gRPC server interceptor of hostd.metrics, on a real gRPC server with a bytes-only test
service (so the tests do not depend on the tagstore proto)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from prometheus_client import CollectorRegistry

from hostd.metrics import TagStoreMetrics
from hostd.model import Host, default_topology
from hostd.model.types import GiB

SERVICE = "test.v1.Echo"


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request == b"abort":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    if request == b"set_code":
        context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
        context.set_details("wrong phase")
        return b""
    if request == b"raise":
        raise RuntimeError("handler bug")
    return request


def _server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(int(request)):
        yield b"%d" % i
    if request == b"2":
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "stop after two")


def _client_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return b"".join(requests)


def _bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    yield from requests


@pytest.fixture
def metrics() -> Iterator[TagStoreMetrics]:
    m = TagStoreMetrics(Host(default_topology(4 * GiB)), threading.Lock(), CollectorRegistry())
    yield m
    m.close()


@pytest.fixture
def channel(metrics: TagStoreMetrics) -> Iterator[grpc.Channel]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), interceptors=[metrics.server_interceptor()]
    )
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    server.stop(None).wait()


def sample(m: TagStoreMetrics, name: str, method: str, grpc_type: str, **extra: str) -> float:
    labels = {"grpc_service": SERVICE, "grpc_method": method, "grpc_type": grpc_type, **extra}
    return m.registry.get_sample_value(name, labels) or 0.0


def handled(m: TagStoreMetrics, method: str, grpc_type: str, code: str) -> float:
    return sample(m, "grpc_server_handled_total", method, grpc_type, grpc_code=code)


def test_a_successful_unary_call_is_started_handled_ok_and_timed(
    metrics: TagStoreMetrics, channel: grpc.Channel
) -> None:
    """One OK unary call: started 1, handled{OK} 1, one handling_seconds observation."""
    assert channel.unary_unary(f"/{SERVICE}/Unary", None, None)(b"hi") == b"hi"
    assert sample(metrics, "grpc_server_started_total", "Unary", "unary") == 1
    assert handled(metrics, "Unary", "unary", "OK") == 1
    assert sample(metrics, "grpc_server_handling_seconds_count", "Unary", "unary") == 1


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [(b"abort", "NOT_FOUND"), (b"set_code", "FAILED_PRECONDITION"), (b"raise", "UNKNOWN")],
)
def test_the_code_of_a_failed_call_is_what_the_client_sees(
    metrics: TagStoreMetrics, channel: grpc.Channel, request_bytes: bytes, code: str
) -> None:
    """context.abort and context.set_code are honoured; an exception is UNKNOWN."""
    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary(f"/{SERVICE}/Unary", None, None)(request_bytes)
    assert code == e.value.code().name
    assert handled(metrics, "Unary", "unary", code) == 1
    assert handled(metrics, "Unary", "unary", "OK") == 0


def test_server_streams_count_sent_messages(
    metrics: TagStoreMetrics, channel: grpc.Channel
) -> None:
    """A server stream is handled once, when it ends, and counts every message sent."""
    assert list(channel.unary_stream(f"/{SERVICE}/ServerStream", None, None)(b"3")) == [
        b"0",
        b"1",
        b"2",
    ]
    assert handled(metrics, "ServerStream", "server_stream", "OK") == 1
    assert sample(metrics, "grpc_server_msg_sent_total", "ServerStream", "server_stream") == 3


def test_a_stream_aborted_midway_is_handled_with_its_code(
    metrics: TagStoreMetrics, channel: grpc.Channel
) -> None:
    """Messages sent before an abort count; the RPC ends with the abort's code."""
    with pytest.raises(grpc.RpcError):
        list(channel.unary_stream(f"/{SERVICE}/ServerStream", None, None)(b"2"))
    assert handled(metrics, "ServerStream", "server_stream", "RESOURCE_EXHAUSTED") == 1
    assert sample(metrics, "grpc_server_msg_sent_total", "ServerStream", "server_stream") == 2


def test_client_streams_count_received_messages(
    metrics: TagStoreMetrics, channel: grpc.Channel
) -> None:
    """A client stream counts every request message it reads."""
    assert (
        channel.stream_unary(f"/{SERVICE}/ClientStream", None, None)(iter([b"a", b"b", b"c"]))
        == b"abc"
    )
    assert handled(metrics, "ClientStream", "client_stream", "OK") == 1
    assert sample(metrics, "grpc_server_msg_received_total", "ClientStream", "client_stream") == 3


def test_bidi_streams_count_both_directions(
    metrics: TagStoreMetrics, channel: grpc.Channel
) -> None:
    """A bidirectional stream counts messages received and sent."""
    out = list(channel.stream_stream(f"/{SERVICE}/Bidi", None, None)(iter([b"x", b"y"])))
    assert out == [b"x", b"y"]
    assert handled(metrics, "Bidi", "bidi_stream", "OK") == 1
    assert sample(metrics, "grpc_server_msg_received_total", "Bidi", "bidi_stream") == 2
    assert sample(metrics, "grpc_server_msg_sent_total", "Bidi", "bidi_stream") == 2


def test_unknown_methods_are_left_to_grpc(metrics: TagStoreMetrics, channel: grpc.Channel) -> None:
    """An unimplemented method never reaches the interceptor's counters."""
    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary(f"/{SERVICE}/Nope", None, None)(b"")
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert sample(metrics, "grpc_server_started_total", "Nope", "unary") == 0


def test_preregistered_methods_have_zero_series_before_any_call(
    metrics: TagStoreMetrics,
) -> None:
    """preregister_grpc_service creates started/handled{OK} series for every method."""
    from tagstore.v1 import tagstore_pb2

    metrics.preregister_grpc_service(tagstore_pb2.DESCRIPTOR.services_by_name["TagStorage"])
    labels = {"grpc_service": "tagstore.v1.TagStorage", "grpc_method": "GetHost"}
    get = metrics.registry.get_sample_value
    assert get("grpc_server_started_total", {**labels, "grpc_type": "unary"}) == 0
    assert (
        get("grpc_server_handled_total", {**labels, "grpc_type": "unary", "grpc_code": "OK"}) == 0
    )
    stream = {"grpc_service": "tagstore.v1.TagStorage", "grpc_method": "StreamGuestFaults"}
    assert get("grpc_server_msg_sent_total", {**stream, "grpc_type": "bidi_stream"}) == 0
