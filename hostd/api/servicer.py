"""The ``tagstore.v1.TagStorage`` servicer: proto → one model call → proto.

Lock rule: the servicer owns the :class:`~hostd.model.Host` and one ``threading.Lock``; every
model call (and the journal record of a mutating call) happens under it, so the host sees one
call at a time and the journal order is the call order. Nothing slow happens under the lock:
messages are converted and streamed after it is released.

Errors: a :class:`~hostd.model.errors.TagStoreError` becomes its status through
:func:`hostd.api.errors.to_grpc_status`; anything else is a bug, logged with its traceback and
answered INTERNAL (the daemon keeps serving).
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, Protocol, TypeVar

import grpc

from hostd.api import convert
from hostd.api.errors import to_grpc_status
from hostd.logs import kv
from hostd.model import Host
from hostd.model.errors import TagStoreError
from hostd.model.events import EVENT_FAULT, Event
from hostd.model.types import TagCopyDirection
from tagstore.v1 import tagstore_pb2 as pb
from tagstore.v1 import tagstore_pb2_grpc as pb_grpc

logger = logging.getLogger("hostd.api")

T = TypeVar("T")

# Per-stream event queue bound for WatchEvents; overflow drops the oldest events (counted).
EVENT_QUEUE_SIZE = 1024
# How often an idle WatchEvents stream re-checks that its client and the server are still there.
_WATCH_POLL_SECONDS = 1.0


class Journal(Protocol):
    """Where successful mutating calls are recorded (:class:`hostd.store.Store`)."""

    def prepare(self, method: str, args: tuple[object, ...]) -> str | None:
        """The record for a call, or None if ``method`` is not journaled. Called before the
        call; raises if the record could not be made durable, so that nothing changes then."""

    def commit(self, record: str) -> None:
        """Make a prepared record durable; called after the call succeeded, before the reply."""


def _rpc(level: int) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorate a unary handler: map model errors, log the outcome, contain unexpected bugs."""

    def decorate(handler: Callable[..., T]) -> Callable[..., T]:
        name = handler.__name__

        @functools.wraps(handler)
        def wrapper(self: TagStorageServicer, request: Any, context: grpc.ServicerContext) -> T:
            try:
                response = handler(self, request, context)
            except TagStoreError as error:
                _abort_refused(context, name, error)
            except Exception:
                _abort_internal(context, name)
            # Faults run at thousands a second: build the line only if it will be written.
            if logger.isEnabledFor(level):
                logger.log(level, kv("rpc", rpc=name, code="OK", **_ids(request)))
            return response

        return wrapper

    return decorate


def _stream_rpc(handler: Callable[..., Iterator[T]]) -> Callable[..., Iterator[T]]:
    """Like :func:`_rpc` for server-streaming handlers: an error ends the stream with its status
    after every message yielded before it has been delivered."""
    name = handler.__name__

    @functools.wraps(handler)
    def wrapper(
        self: TagStorageServicer, request: Any, context: grpc.ServicerContext
    ) -> Iterator[T]:
        try:
            yield from handler(self, request, context)
        except TagStoreError as error:
            _abort_refused(context, name, error)
        except Exception:
            _abort_internal(context, name)
        logger.debug(kv("rpc", rpc=name, code="OK"))

    return wrapper


def _ids(request: Any) -> dict[str, str]:
    fields = {}
    for key in ("vm_id", "device_id"):
        value = getattr(request, key, "")
        if value:
            fields[key] = value
    return fields


def _abort_refused(context: grpc.ServicerContext, rpc: str, error: TagStoreError) -> NoReturn:
    status = to_grpc_status(error)
    logger.info(kv("rpc", rpc=rpc, code=status.code.name, reason=error.reason, error=str(error)))
    context.abort_with_status(status)


def _abort_internal(context: grpc.ServicerContext, rpc: str) -> NoReturn:
    logger.exception(kv("rpc", rpc=rpc, code="INTERNAL"))
    context.abort(grpc.StatusCode.INTERNAL, f"{rpc}: internal error (see the hostd log)")


class _EventQueue:
    """A bounded FIFO fed by a host subscription; when full, the oldest event is dropped."""

    def __init__(self, maxsize: int, include_faults: bool) -> None:
        self._events: collections.deque[tuple[int, Event]] = collections.deque()
        self._maxsize = maxsize
        self._include_faults = include_faults
        self._cond = threading.Condition()
        self._sequence = 0
        self.dropped = 0

    def put(self, event: Event) -> None:
        """The host subscriber: called under the host lock, so it only appends."""
        if event.kind == EVENT_FAULT and not self._include_faults:
            return
        with self._cond:
            self._sequence += 1
            if len(self._events) >= self._maxsize:
                self._events.popleft()
                self.dropped += 1
            self._events.append((self._sequence, event))
            self._cond.notify()

    def wake(self) -> None:
        """Wake a waiting :meth:`get` (the client went away or the server is stopping)."""
        with self._cond:
            self._cond.notify_all()

    def get(self, timeout: float) -> tuple[int, Event] | None:
        """The oldest queued event with its sequence number, or None after ``timeout``."""
        with self._cond:
            if not self._events:
                self._cond.wait(timeout)
            return self._events.popleft() if self._events else None


class TagStorageServicer(pb_grpc.TagStorageServicer):
    """Serves one :class:`Host`. ``lock`` is shared with whoever else reads the host (metrics).

    Each RPC method is documented in ``proto/tagstore/v1/tagstore.proto``; here each one is
    proto → one model call → proto.
    """

    def __init__(
        self,
        host: Host,
        lock: threading.Lock | None = None,
        *,
        journal: Journal | None = None,
        event_queue_size: int = EVENT_QUEUE_SIZE,
    ) -> None:
        self.host = host
        self.lock = lock if lock is not None else threading.Lock()
        self._journal = journal
        self._event_queue_size = event_queue_size
        self._closing = threading.Event()
        self._watchers: set[_EventQueue] = set()

    def close(self) -> None:
        """End every WatchEvents stream so that a graceful stop does not wait for them."""
        self._closing.set()
        for queue in list(self._watchers):
            queue.wake()

    def _call(self, method: Callable[..., T], *args: object) -> T:
        """Call a model method under the lock; journal the call if it changed state.

        A refused call changes nothing, so only successful calls are committed; the commit is
        durable before the caller can send the reply.
        """
        with self.lock:
            record = self._journal.prepare(method.__name__, args) if self._journal else None
            result = method(self.host, *args)
            if record is not None and self._journal is not None:
                self._journal.commit(record)
        return result

    @_rpc(logging.DEBUG)
    def GetHost(self, request: pb.GetHostRequest, context: grpc.ServicerContext) -> pb.HostStatus:
        return convert.host_status_to_proto(self._call(Host.status))

    @_rpc(logging.INFO)
    def CreateVm(self, request: pb.CreateVmRequest, context: grpc.ServicerContext) -> pb.Vm:
        config = convert.vm_config_from_proto(request)
        return convert.vm_to_proto(self._call(Host.create_vm, config))

    @_rpc(logging.DEBUG)
    def GetVm(self, request: pb.GetVmRequest, context: grpc.ServicerContext) -> pb.Vm:
        return convert.vm_to_proto(self._call(Host.get_vm, request.vm_id))

    @_rpc(logging.DEBUG)
    def ListVms(
        self, request: pb.ListVmsRequest, context: grpc.ServicerContext
    ) -> pb.ListVmsResponse:
        vms = self._call(Host.list_vms)
        return pb.ListVmsResponse(
            vms=[convert.vm_to_proto(vm) for vm in sorted(vms, key=lambda vm: vm.vm_id)]
        )

    @_rpc(logging.INFO)
    def DestroyVm(
        self, request: pb.DestroyVmRequest, context: grpc.ServicerContext
    ) -> pb.DestroyVmResponse:
        final = self._call(Host.destroy_vm, request.vm_id)
        return pb.DestroyVmResponse(vm=convert.vm_to_proto(final))

    def _guest_fault(self, request: pb.GuestFaultRequest) -> pb.GuestFaultResponse:
        access = convert.access_from_proto(request.access)
        result = self._call(Host.guest_fault, request.vm_id, request.gpa, request.length, access)
        return convert.fault_result_to_proto(result)

    @_rpc(logging.DEBUG)
    def GuestFault(
        self, request: pb.GuestFaultRequest, context: grpc.ServicerContext
    ) -> pb.GuestFaultResponse:
        return self._guest_fault(request)

    @_stream_rpc
    def StreamGuestFaults(
        self, request_iterator: Iterator[pb.GuestFaultRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.GuestFaultResponse]:
        for request in request_iterator:
            yield self._guest_fault(request)

    @_rpc(logging.INFO)
    def AddMemoryDevice(
        self, request: pb.AddMemoryDeviceRequest, context: grpc.ServicerContext
    ) -> pb.MemoryDevice:
        if convert.memory_device_kind_of(request) == "dimm":
            device = self._call(
                Host.add_dimm, request.vm_id, request.device_id, request.dimm.size_bytes
            )
        else:
            config = convert.virtio_mem_config_from_proto(request.virtio_mem)
            device = self._call(Host.add_virtio_mem, request.vm_id, request.device_id, config)
        return convert.memory_device_to_proto(device)

    @_rpc(logging.INFO)
    def RemoveMemoryDevice(
        self, request: pb.RemoveMemoryDeviceRequest, context: grpc.ServicerContext
    ) -> pb.RemoveMemoryDeviceResponse:
        self._call(Host.remove_memory_device, request.vm_id, request.device_id)
        return pb.RemoveMemoryDeviceResponse()

    @_rpc(logging.INFO)
    def ResizeVirtioMem(
        self, request: pb.ResizeVirtioMemRequest, context: grpc.ServicerContext
    ) -> pb.MemoryDevice:
        device = self._call(
            Host.resize_virtio_mem, request.vm_id, request.device_id, request.requested_size
        )
        return convert.memory_device_to_proto(device)

    @_rpc(logging.DEBUG)
    def VirtioMemRequest(
        self, request: pb.VirtioMemRequestRequest, context: grpc.ServicerContext
    ) -> pb.VirtioMemRequestResponse:
        request_type = convert.virtio_mem_request_type_from_proto(request.type)
        answer = self._call(
            Host.virtio_mem_request,
            request.vm_id,
            request.device_id,
            request_type,
            request.addr,
            request.nb_blocks,
        )
        return convert.virtio_mem_answer_to_proto(answer)

    @_rpc(logging.DEBUG)
    def DiscardGuestMemory(
        self, request: pb.DiscardGuestMemoryRequest, context: grpc.ServicerContext
    ) -> pb.DiscardGuestMemoryResponse:
        result = self._call(Host.discard_guest_memory, request.vm_id, request.gpa, request.length)
        return convert.discard_result_to_proto(result)

    @_rpc(logging.DEBUG)
    def CopyTags(
        self, request: pb.CopyTagsRequest, context: grpc.ServicerContext
    ) -> pb.CopyTagsResponse:
        direction = convert.direction_from_proto(request.direction)
        tags = request.tags if direction is TagCopyDirection.TO_GUEST else b""
        result = self._call(
            Host.copy_tags, request.vm_id, request.gpa, request.length, direction, tags
        )
        return pb.CopyTagsResponse(tags=result)

    @_rpc(logging.DEBUG)
    def CheckInvariants(
        self, request: pb.CheckInvariantsRequest, context: grpc.ServicerContext
    ) -> pb.CheckInvariantsResponse:
        return pb.CheckInvariantsResponse(violations=self._call(Host.check_invariants))

    @_stream_rpc
    def ExportState(
        self, request: pb.ExportStateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ExportStateResponse]:
        # Built under the lock (a consistent cut), streamed after it is released.
        export = self._call(Host.export_state)
        yield from convert.export_to_proto(export, self.host.page_size)

    @_stream_rpc
    def WatchEvents(
        self, request: pb.WatchEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchEventsResponse]:
        queue = _EventQueue(self._event_queue_size, request.include_faults)
        context.add_callback(queue.wake)
        self._watchers.add(queue)
        with self.lock:
            self.host.subscribe(queue.put)
        # Headers go out once the subscription is active: a client that waits for them
        # (``call.initial_metadata()``) sees every event caused after that.
        context.send_initial_metadata(())
        try:
            while context.is_active() and not self._closing.is_set():
                item = queue.get(_WATCH_POLL_SECONDS)
                if item is not None:
                    sequence, event = item
                    yield pb.WatchEventsResponse(
                        event=convert.event_to_proto(event, sequence),
                        dropped_events=queue.dropped,
                    )
        finally:
            with self.lock:
                self.host.unsubscribe(queue.put)
            self._watchers.discard(queue)
