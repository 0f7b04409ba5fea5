"""The gRPC metrics interceptor (what hostd serves with), on a real grpc.aio server with a
bytes-only test service, so that the rules do not depend on the tagstore proto."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import grpc
import grpc.aio
import pytest
from prometheus_client import CollectorRegistry

from hostd.metrics import TagStoreMetrics
from hostd.model import Host, default_topology
from hostd.model.types import GiB

SERVICE = "test.v1.Echo"


async def _unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    if request == b"abort":
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    if request == b"set_code":
        context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
        context.set_details("wrong phase")
        return b""
    if request == b"raise":
        raise RuntimeError("handler bug")
    if request == b"sleep":
        await asyncio.sleep(30)
    return request


async def _server_stream(
    request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    for i in range(int(request)):
        yield b"%d" % i
    if request == b"2":
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "stop after two")


async def _client_stream(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
) -> bytes:
    return b"".join([request async for request in requests])


async def _bidi(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


@pytest.fixture
def metrics() -> Iterator[TagStoreMetrics]:
    m = TagStoreMetrics(Host(default_topology(4 * GiB)), threading.Lock(), CollectorRegistry())
    yield m
    m.close()


@pytest.fixture
def channel(metrics: TagStoreMetrics) -> Iterator[grpc.Channel]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()

    async def build() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(interceptors=[metrics.aio_server_interceptor()])
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
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(build(), loop).result()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


def sample(m: TagStoreMetrics, name: str, method: str, grpc_type: str, **extra: str) -> float:
    labels = {"grpc_service": SERVICE, "grpc_method": method, "grpc_type": grpc_type, **extra}
    return m.registry.get_sample_value(name, labels) or 0.0


def handled(m: TagStoreMetrics, method: str, grpc_type: str, code: str) -> float:
    return sample(m, "grpc_server_handled_total", method, grpc_type, grpc_code=code)


def settle(m: TagStoreMetrics, method: str, grpc_type: str, calls: int) -> None:
    """Wait until ``calls`` calls of ``method`` have ended on the server. An aio handler's
    abort sends the status before the handler (and the interceptor around it) returns, so the
    client can see the error before the server has counted the call."""
    for _ in range(200):
        if sample(m, "grpc_server_handling_seconds_count", method, grpc_type) >= calls:
            return
        threading.Event().wait(0.025)


def test_a_successful_unary_call_is_started_handled_ok_and_timed(
    metrics: TagStoreMetrics, channel: grpc.Channel
) -> None:
    """One OK unary call: started 1, handled{OK} 1, one handling_seconds observation."""
    assert b"hi" == channel.unary_unary(f"/{SERVICE}/Unary")(b"hi")
    assert 1 == sample(metrics, "grpc_server_started_total", "Unary", "unary")
    assert 1 == handled(metrics, "Unary", "unary", "OK")
    assert 1 == sample(metrics, "grpc_server_handling_seconds_count", "Unary", "unary")


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [(b"abort", "NOT_FOUND"), (b"set_code", "FAILED_PRECONDITION"), (b"raise", "UNKNOWN")],
)
def test_the_code_of_a_failed_call_is_what_the_client_sees(
    metrics: TagStoreMetrics, channel: grpc.Channel, request_bytes: bytes, code: str
) -> None:
    """context.abort and context.set_code are honoured; an exception is UNKNOWN."""
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(f"/{SERVICE}/Unary")(request_bytes)
    assert code == caught.value.code().name
    settle(metrics, "Unary", "unary", 1)
    assert 1 == handled(metrics, "Unary", "unary", code)
    assert 0 == handled(metrics, "Unary", "unary", "OK")


def test_calls_of_one_method_add_up_in_its_series(
    metrics: TagStoreMetrics, channel: grpc.Channel
) -> None:
    """Every call counts in the series of its method and code, however many came before."""
    call = channel.unary_unary(f"/{SERVICE}/Unary")
    for _ in range(3):
        assert b"hi" == call(b"hi")
    for _ in range(2):
        with pytest.raises(grpc.RpcError):
            call(b"abort")
    settle(metrics, "Unary", "unary", 5)
    assert 5 == sample(metrics, "grpc_server_started_total", "Unary", "unary")
    assert 3 == handled(metrics, "Unary", "unary", "OK")
    assert 2 == handled(metrics, "Unary", "unary", "NOT_FOUND")
    assert 5 == sample(metrics, "grpc_server_handling_seconds_count", "Unary", "unary")


def test_an_aio_call_whose_client_gives_up_is_handled_as_cancelled(
    metrics: TagStoreMetrics, channel: grpc.Channel
) -> None:
    """A deadline that passes mid-call ends the handler; it counts as CANCELLED, never UNKNOWN."""
    with pytest.raises(grpc.RpcError):
        channel.unary_unary(f"/{SERVICE}/Unary")(b"sleep", timeout=0.2)
    settle(metrics, "Unary", "unary", 1)
    assert 1 == handled(metrics, "Unary", "unary", "CANCELLED")
    assert 0 == handled(metrics, "Unary", "unary", "UNKNOWN")


def test_server_streams_count_sent_messages(
    metrics: TagStoreMetrics, channel: grpc.Channel
) -> None:
    """A server stream is handled once, when it ends, and counts every message sent."""
    assert [b"0", b"1", b"2"] == list(channel.unary_stream(f"/{SERVICE}/ServerStream")(b"3"))
    settle(metrics, "ServerStream", "server_stream", 1)
    assert 1 == handled(metrics, "ServerStream", "server_stream", "OK")
    assert 3 == sample(metrics, "grpc_server_msg_sent_total", "ServerStream", "server_stream")


def test_a_stream_aborted_midway_is_handled_with_its_code(
    metrics: TagStoreMetrics, channel: grpc.Channel
) -> None:
    """Messages sent before an abort count; the RPC ends with the abort's code."""
    with pytest.raises(grpc.RpcError) as caught:
        list(channel.unary_stream(f"/{SERVICE}/ServerStream")(b"2"))
    assert grpc.StatusCode.RESOURCE_EXHAUSTED == caught.value.code()
    settle(metrics, "ServerStream", "server_stream", 1)
    assert 1 == handled(metrics, "ServerStream", "server_stream", "RESOURCE_EXHAUSTED")
    assert 0 == handled(metrics, "ServerStream", "server_stream", "OK")
    assert 2 == sample(metrics, "grpc_server_msg_sent_total", "ServerStream", "server_stream")


def test_client_streams_count_received_messages(
    metrics: TagStoreMetrics, channel: grpc.Channel
) -> None:
    """A client stream counts every request message it reads, and sends none it counts."""
    call = channel.stream_unary(f"/{SERVICE}/ClientStream")
    assert b"abc" == call(iter([b"a", b"b", b"c"]))
    settle(metrics, "ClientStream", "client_stream", 1)
    assert 1 == handled(metrics, "ClientStream", "client_stream", "OK")
    assert 3 == sample(metrics, "grpc_server_msg_received_total", "ClientStream", "client_stream")
    labels = {"grpc_service": SERVICE, "grpc_method": "ClientStream", "grpc_type": "client_stream"}
    assert metrics.registry.get_sample_value("grpc_server_msg_sent_total", labels) is None


def test_bidi_streams_count_both_directions(
    metrics: TagStoreMetrics, channel: grpc.Channel
) -> None:
    """A bidirectional stream counts messages received and sent, over several streams."""
    for _ in range(2):
        out = list(channel.stream_stream(f"/{SERVICE}/Bidi")(iter([b"x", b"y"])))
        assert [b"x", b"y"] == out
    settle(metrics, "Bidi", "bidi_stream", 2)
    assert 2 == handled(metrics, "Bidi", "bidi_stream", "OK")
    assert 4 == sample(metrics, "grpc_server_msg_received_total", "Bidi", "bidi_stream")
    assert 4 == sample(metrics, "grpc_server_msg_sent_total", "Bidi", "bidi_stream")


def test_unary_methods_have_no_message_series(
    metrics: TagStoreMetrics, channel: grpc.Channel
) -> None:
    """Message counters belong to the streaming sides only: a unary call creates neither."""
    assert b"hi" == channel.unary_unary(f"/{SERVICE}/Unary")(b"hi")
    labels = {"grpc_service": SERVICE, "grpc_method": "Unary", "grpc_type": "unary"}
    get = metrics.registry.get_sample_value
    assert get("grpc_server_msg_received_total", labels) is None
    assert get("grpc_server_msg_sent_total", labels) is None


def test_unknown_methods_are_left_to_grpc(metrics: TagStoreMetrics, channel: grpc.Channel) -> None:
    """An unimplemented method never reaches the interceptor's counters."""
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(f"/{SERVICE}/Nope")(b"")
    assert grpc.StatusCode.UNIMPLEMENTED == caught.value.code()
    labels = {"grpc_service": SERVICE, "grpc_method": "Nope", "grpc_type": "unary"}
    assert metrics.registry.get_sample_value("grpc_server_started_total", labels) is None


def test_preregistered_methods_have_zero_series_before_any_call(
    metrics: TagStoreMetrics,
) -> None:
    """preregister_grpc_service creates started/handled{OK} series for every method, and the
    message series of the streaming ones."""
    from tagstore.v1 import tagstore_pb2

    metrics.preregister_grpc_service(tagstore_pb2.DESCRIPTOR.services_by_name["TagStorage"])
    labels = {"grpc_service": "tagstore.v1.TagStorage", "grpc_method": "GetHost"}
    get = metrics.registry.get_sample_value
    assert 0 == get("grpc_server_started_total", {**labels, "grpc_type": "unary"})
    assert 0 == get(
        "grpc_server_handled_total", {**labels, "grpc_type": "unary", "grpc_code": "OK"}
    )
    stream = {"grpc_service": "tagstore.v1.TagStorage", "grpc_method": "StreamGuestFaults"}
    assert 0 == get("grpc_server_msg_sent_total", {**stream, "grpc_type": "bidi_stream"})
    assert 0 == get("grpc_server_msg_received_total", {**stream, "grpc_type": "bidi_stream"})
