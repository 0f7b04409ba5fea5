"""Real gRPC servers in the test process for the client's wire behaviour: :class:`ScriptedHost`
speaks ``tagstore.v1`` and records what each attempt carried (request, ``authorization``),
:class:`LosingProxy` forwards to a real hostd and can lose an answer after hostd gave it.

They are not stand-ins for hostd's rules (the daemon's own tests cover those): ScriptedHost
answers empty messages unless told otherwise, and exists to show what the client puts on the
wire, which no hostd answer can reveal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message

from tagstore.v1 import tagstore_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["TagStorage"]
SERVICE_NAME = SERVICE.full_name
# Methods whose request names a VM (vm_id) and which that VM's token may call (issue 9).
VM_SCOPED = frozenset(
    {
        "GetVm",
        "DestroyVm",
        "GuestFault",
        "StreamGuestFaults",
        "AddMemoryDevice",
        "RemoveMemoryDevice",
        "ResizeVirtioMem",
        "VirtioMemRequest",
        "CopyTags",
    }
)


@dataclass(frozen=True)
class Attempt:
    """One attempt that reached the server: the method, its request and its credential."""

    method: str
    request: Message
    authorization: str | None


def _authorization(context: grpc.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata():
        if key == "authorization":
            return str(value)
    return None


@dataclass
class ScriptedHost:
    """A tagstore.v1 server that records every attempt and answers as scripted.

    ``fail[method]``: status codes to answer that method's next attempts with, in order, before
    the call is answered normally. ``delay_s[method]``: how long the next attempts of that method
    wait before answering, in order. ``admin_token``: when set, every call must carry
    ``Bearer <admin_token>``, or for a VM-scoped call the token CreateVm issued to that VM
    (``vm_tokens``); otherwise UNAUTHENTICATED (no credential) or PERMISSION_DENIED.
    """

    admin_token: str | None = None
    fail: dict[str, list[grpc.StatusCode]] = field(default_factory=dict)
    delay_s: dict[str, list[float]] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)
    vm_tokens: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def of(self, method: str) -> list[Attempt]:
        """The recorded attempts of ``method``, in order."""
        with self._lock:
            return [a for a in self.attempts if a.method == method]

    def _admit(self, method: str, request: Message, context: grpc.ServicerContext) -> None:
        authorization = _authorization(context)
        with self._lock:
            self.attempts.append(Attempt(method, request, authorization))
            delays = self.delay_s.get(method, [])
            delay = delays.pop(0) if delays else 0.0
            codes = self.fail.get(method, [])
            code = codes.pop(0) if codes else None
        if delay:
            time.sleep(delay)
        if code is not None:
            context.abort(code, f"scripted {code.name}")
        if self.admin_token is None:
            return
        if authorization is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no credential")
        if authorization == f"Bearer {self.admin_token}":
            return
        vm_id = getattr(request, "vm_id", None)
        if method in VM_SCOPED and authorization == f"Bearer {self.vm_tokens.get(vm_id, '')}":
            return
        known = {f"Bearer {t}" for t in self.vm_tokens.values()}
        if authorization in known:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "not this VM's token")
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown credential")

    def _answer(self, method: str, request: Message) -> Message:
        answer = getattr(pb, SERVICE.methods_by_name[method].output_type.name)()
        if method == "CreateVm":
            token = f"vm-token-of-{request.vm_id}"  # type: ignore[attr-defined]
            with self._lock:
                self.vm_tokens[request.vm_id] = token  # type: ignore[attr-defined]
            answer.vm_id = request.vm_id  # type: ignore[attr-defined]
            answer.vm_token = token
        elif method == "VirtioMemRequest":
            answer.response = pb.VIRTIO_MEM_RESPONSE_ACK
        return answer

    def handler(self) -> grpc.GenericRpcHandler:
        """The gRPC handler serving every method of ``TagStorage``."""
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for method in SERVICE.methods:
            request_cls = getattr(pb, method.input_type.name)
            response_cls = getattr(pb, method.output_type.name)
            kwargs = {
                "request_deserializer": request_cls.FromString,
                "response_serializer": response_cls.SerializeToString,
            }
            name = method.name
            if method.client_streaming:
                handlers[name] = grpc.stream_stream_rpc_method_handler(
                    self._stream_stream(name), **kwargs
                )
            elif method.server_streaming:
                handlers[name] = grpc.unary_stream_rpc_method_handler(
                    self._unary_stream(name), **kwargs
                )
            else:
                handlers[name] = grpc.unary_unary_rpc_method_handler(self._unary(name), **kwargs)
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    def _unary(self, name: str) -> Callable[[Message, grpc.ServicerContext], Message]:
        def serve(request: Message, context: grpc.ServicerContext) -> Message:
            self._admit(name, request, context)
            return self._answer(name, request)

        return serve

    def _unary_stream(self, name: str) -> Callable[[Message, grpc.ServicerContext], Iterator[Any]]:
        def serve(request: Message, context: grpc.ServicerContext) -> Iterator[Any]:
            self._admit(name, request, context)
            if name == "ExportState":
                yield pb.ExportStateResponse(header=pb.ExportHeader(page_size=4096))
            else:
                context.send_initial_metadata(())
                yield pb.WatchEventsResponse(event=pb.Event(kind="vm_created"))

        return serve

    def _stream_stream(
        self, name: str
    ) -> Callable[[Iterator[Message], grpc.ServicerContext], Iterator[Any]]:
        def serve(requests: Iterator[Message], context: grpc.ServicerContext) -> Iterator[Any]:
            for request in requests:
                self._admit(name, request, context)
                yield pb.GuestFaultResponse(newly_mapped_pages=1)

        return serve


def serve(handler: grpc.GenericRpcHandler, workers: int = 4) -> tuple[grpc.Server, str]:
    """Start a server on a loopback port chosen by the kernel; returns it and its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


class LosingProxy(grpc.GenericRpcHandler):
    """Forwards every unary call (bytes and metadata unchanged) to a real hostd; for the methods
    in ``lose``, the next answer hostd gives is dropped and the client told UNAVAILABLE, as when
    a connection breaks after the daemon applied a call."""

    def __init__(self, target: grpc.Channel) -> None:
        self._target = target
        self.lose: set[str] = set()
        self.forwarded: list[str] = []
        self._lock = threading.Lock()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method  # type: ignore[attr-defined]
        name = method.rsplit("/", 1)[-1]
        if name not in SERVICE.methods_by_name:
            return None
        spec = SERVICE.methods_by_name[name]
        if spec.client_streaming or spec.server_streaming:
            return None
        forward = self._target.unary_unary(method)

        def relay(request: bytes, context: grpc.ServicerContext) -> bytes:
            metadata = tuple(
                (m.key, m.value) for m in context.invocation_metadata() if m.key == "authorization"
            )
            with self._lock:
                self.forwarded.append(name)
            try:
                answer = forward(request, metadata=metadata or None, timeout=30)
            except grpc.RpcError as error:
                call: Any = error
                context.set_trailing_metadata(call.trailing_metadata() or ())
                context.abort(call.code(), call.details() or "")
            with self._lock:
                lost = name in self.lose
                self.lose.discard(name)
            if lost:
                context.abort(grpc.StatusCode.UNAVAILABLE, "answer lost on the way back")
            return bytes(answer)

        return grpc.unary_unary_rpc_method_handler(relay)
