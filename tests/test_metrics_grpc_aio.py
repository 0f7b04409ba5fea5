"""The grpc.aio form of the gRPC metrics interceptor (what hostd serves with), on a real
grpc.aio server with a bytes-only test service: the same series as the sync interceptor."""

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


def test_an_aio_unary_call_is_started_handled_and_timed_with_its_code(
    metrics: TagStoreMetrics, channel: grpc.Channel
) -> None:
    """OK and an aborted call: each counted once, with the code the client saw."""
    call = channel.unary_unary(f"/{SERVICE}/Unary")
    assert b"hi" == call(b"hi")
    with pytest.raises(grpc.RpcError) as caught:
        call(b"abort")
    assert grpc.StatusCode.NOT_FOUND == caught.value.code()
    assert 2 == sample(metrics, "grpc_server_started_total", "Unary", "unary")
    assert 1 == sample(metrics, "grpc_server_handled_total", "Unary", "unary", grpc_code="OK")
    assert 1 == sample(
        metrics, "grpc_server_handled_total", "Unary", "unary", grpc_code="NOT_FOUND"
    )
    assert 2 == sample(metrics, "grpc_server_handling_seconds_count", "Unary", "unary")


def test_an_aio_call_whose_client_gives_up_is_handled_as_cancelled(
    metrics: TagStoreMetrics, channel: grpc.Channel
) -> None:
    """A deadline that passes mid-call ends the handler; it counts as CANCELLED, never UNKNOWN."""
    with pytest.raises(grpc.RpcError):
        channel.unary_unary(f"/{SERVICE}/Unary")(b"sleep", timeout=0.2)
    for _ in range(100):
        if sample(metrics, "grpc_server_handling_seconds_count", "Unary", "unary"):
            break
        threading.Event().wait(0.05)
    assert 1 == sample(
        metrics, "grpc_server_handled_total", "Unary", "unary", grpc_code="CANCELLED"
    )


def test_aio_streams_count_messages_each_way_and_end_with_their_code(
    metrics: TagStoreMetrics, channel: grpc.Channel
) -> None:
    """Server streams count sent messages (an abort midway keeps its code); bidi counts both."""
    assert [b"0", b"1", b"2"] == list(channel.unary_stream(f"/{SERVICE}/ServerStream")(b"3"))
    with pytest.raises(grpc.RpcError):
        list(channel.unary_stream(f"/{SERVICE}/ServerStream")(b"2"))
    assert 5 == sample(metrics, "grpc_server_msg_sent_total", "ServerStream", "server_stream")
    assert 1 == sample(
        metrics,
        "grpc_server_handled_total",
        "ServerStream",
        "server_stream",
        grpc_code="RESOURCE_EXHAUSTED",
    )
    assert [b"a", b"b"] == list(channel.stream_stream(f"/{SERVICE}/Bidi")(iter([b"a", b"b"])))
    assert 2 == sample(metrics, "grpc_server_msg_received_total", "Bidi", "bidi_stream")
    assert 2 == sample(metrics, "grpc_server_msg_sent_total", "Bidi", "bidi_stream")
