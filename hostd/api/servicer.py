"""The ``tagstore.v1.TagStorage`` servicer: proto → one model call → proto, served by grpc.aio.

Threads and the lock: the servicer runs on one asyncio event loop, so an open stream holds a
coroutine, not a thread. The :class:`~hostd.model.Host` has one owner, ``lock`` (a
``threading.Lock`` shared with the metrics collector); every model call goes through
:meth:`TagStorageServicer._call`, which calls the model under it, in one of two places:

- inline on the event loop, when the call is cheap (faults and tag copies of at most
  :data:`INLINE_MAX_BYTES` without a journal to fsync, and faults on pages already mapped, which
  change nothing and are not journaled), nothing is queued for the model thread and the lock is
  free *now* (``acquire(blocking=False)``): the hot fault path pays no thread hand-off, and the
  loop never waits for the lock;
- otherwise on the single model thread (:data:`MODEL_THREAD`), which waits for the lock. Calls
  there run in arrival order; expensive host-scoped calls (CheckInvariants, ExportState) also
  run one at a time.

Either way the loop stays free: health checks, refusals and streams keep being served while a
long call (or the metrics thread's invariant check) holds the lock; calls that need the host wait
for it on the model thread, in order.

Work whose caller has gone is not done: ``_call`` checks the deadline and cancellation before
queuing, and again on the model thread before and after it waits for the lock. A cancelled call
is never answered (there is nobody to answer) and never logged as an error.

Credentials: ``_call`` authorizes every model call from the method it calls (see
:mod:`hostd.api.auth`): host-scoped methods need the admin token, the others name a VM as their
first argument and accept that VM's token.

Errors: a :class:`~hostd.model.errors.TagStoreError` or :class:`~hostd.api.auth.AuthError`
becomes its status through :func:`hostd.api.errors.to_grpc_status`; anything else is a bug,
logged with its traceback and answered INTERNAL (the daemon keeps serving).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from concurrent import futures
from typing import Any, NoReturn, Protocol, TypeVar, cast

import grpc
import grpc.aio

from hostd.api import convert
from hostd.api.auth import AuthError, Credentials, Principal, UnauthenticatedError
from hostd.api.errors import to_grpc_status
from hostd.api.limits import Limits, StreamSlots, check_id
from hostd.api.requests import MISS, RequestWindow
from hostd.cow import call_on_copy, stream_on_copy
from hostd.logs import kv
from hostd.model import Host, export
from hostd.model.errors import StateUnavailableError, TagStoreError
from hostd.model.events import EVENT_FAULT, Event
from hostd.model.migration import MigrationRole, MigrationStatus
from hostd.model.types import Access, FaultResult, TagCopyDirection
from tagstore.v1 import tagstore_pb2 as pb
from tagstore.v1 import tagstore_pb2_grpc as pb_grpc

logger = logging.getLogger("hostd.api")

T = TypeVar("T")

# How often an idle WatchEvents stream re-checks that the server is still serving.
_WATCH_POLL_SECONDS = 1.0
# Faults and tag copies up to this length may run on the event loop: the model handles them in
# well under a millisecond (bench/bench_model.py: ~4 ms per GiB).
INLINE_MAX_BYTES = 16 * 1024 * 1024
# How often the model thread, while it waits for the lock, looks whether its caller has gone.
_LOCK_POLL_SECONDS = 0.05
MODEL_THREAD = "hostd-model"

# Calls that only the admin token may make; every other model method takes a vm_id first.
HOST_SCOPED: frozenset[Callable[..., Any]] = frozenset(
    {
        Host.status,
        Host.list_vms,
        Host.create_vm,
        Host.check_invariants,
        Host.export_state,
        # Admission creates a VM from another host's manifest; compaction and evacuation move
        # every VM's pages.
        Host.admit_migration,
        Host.compact_tag_region,
        Host.evacuate_host_range,
    }
)
# Expensive host-scoped calls: run on the model thread, one at a time.
EXPENSIVE: frozenset[Callable[..., Any]] = frozenset({Host.check_invariants, Host.export_state})
# The calls whose cost is bounded by their length (vectorised over the range), so that a short
# one is cheap whatever the host holds; they change state, so they run inline only when there is
# no journal to fsync. Views (GetHost, GetVm, ListVms) are not among them: they read every page
# of a VM, and a VM may be 4 TiB of guest memory.
_RANGED: frozenset[Callable[..., Any]] = frozenset({Host.guest_fault, Host.copy_tags})


class Journal(Protocol):
    """Where mutating calls are recorded, ahead of running them (:class:`hostd.store.Store`)."""

    @property
    def syncs(self) -> bool:
        """Whether :meth:`wait_durable` may block (fsync, ``--sync always``)."""

    def begin(self, method: str, args: tuple[object, ...], request_id: str) -> Any:
        """Record a call before it runs; returns a ticket, or None if ``method`` is not
        journaled. Raises (StateUnavailableError) if the record cannot be written: the call
        must not run then, and nothing has changed."""

    def abort(self, ticket: Any) -> None:
        """The call of ``ticket`` raised (it changed nothing)."""

    def commit(self, ticket: Any) -> int:
        """The call of ``ticket`` succeeded; returns a token for :meth:`wait_durable`."""

    def wait_durable(self, token: int) -> None:
        """Return once the records up to ``token`` are as durable as configured (called
        without the lock, so that concurrent calls share one fsync)."""


# The request_id of the call being served (AIP-155), set per unary call and per stream message.
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class _CallerGone(Exception):
    """The caller's deadline passed or it cancelled while the call waited: do not run it."""


def _rpc(level: int) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Decorate a unary handler: map refusals, log the outcome, contain unexpected bugs."""

    def decorate(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        name = handler.__name__

        @functools.wraps(handler)
        async def wrapper(
            self: TagStorageServicer, request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> T:
            request_id = _request_id.set(getattr(request, "request_id", ""))
            try:
                response = await handler(self, request, context)
            except Exception as error:
                await _abort_for(context, name, error)
            finally:
                _request_id.reset(request_id)
            # Faults run at thousands a second: build the line only if it will be written.
            if logger.isEnabledFor(level):
                logger.log(level, kv("rpc", rpc=name, code="OK", **_ids(request)))
            return response

        return wrapper

    return decorate


def _stream_rpc(
    handler: Callable[..., AsyncIterator[T]],
) -> Callable[..., AsyncIterator[T]]:
    """Like :func:`_rpc` for server-streaming handlers: an error ends the stream with its status
    after every message yielded before it has been delivered. Each stream takes a slot of the
    stream limits (per credential and in all) for its lifetime."""
    name = handler.__name__

    @functools.wraps(handler)
    async def wrapper(
        self: TagStorageServicer, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[T]:
        client = ""
        try:
            client = self._principal(context).name
            self._streams.acquire(client)
        except (TagStoreError, AuthError) as error:
            await _abort_refused(context, name, error)
        try:
            async for response in handler(self, request, context):
                yield response
        except Exception as error:
            await _abort_for(context, name, error)
        finally:
            self._streams.release(client)
        logger.debug(kv("rpc", rpc=name, code="OK"))

    return wrapper


def _ids(request: Any) -> dict[str, str]:
    fields = {}
    for key in ("vm_id", "device_id"):
        value = getattr(request, key, "")
        if value:
            fields[key] = value[:64]
    return fields


async def _abort_for(
    context: grpc.aio.ServicerContext[Any, Any], rpc: str, error: Exception
) -> NoReturn:
    """End a call that raised ``error`` with the status it maps to (the one place handlers'
    exceptions become answers)."""
    if isinstance(error, (TagStoreError, AuthError)):
        await _abort_refused(context, rpc, error)
    if isinstance(error, _CallerGone):
        await _abort_gone(context, rpc)
    await _abort_internal(context, rpc, error)


async def _abort_refused(
    context: grpc.aio.ServicerContext[Any, Any], rpc: str, error: TagStoreError | AuthError
) -> NoReturn:
    status = to_grpc_status(error)
    logger.info(
        kv("rpc", rpc=rpc, code=status.code.name, reason=error.reason, error=status.details)
    )
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable: abort raises")


async def _abort_gone(context: grpc.aio.ServicerContext[Any, Any], rpc: str) -> NoReturn:
    # Nobody reads this answer; it only ends the call (and its metrics) with the right code.
    logger.debug(
        kv("rpc", rpc=rpc, code="DEADLINE_EXCEEDED", why="caller gone before the call ran")
    )
    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{rpc}: the caller has gone")
    raise AssertionError("unreachable: abort raises")


async def _abort_internal(
    context: grpc.aio.ServicerContext[Any, Any], rpc: str, error: Exception
) -> NoReturn:
    if context.cancelled() or context.done():
        # The client went away mid-call (a closed stream, an expired deadline): the library's
        # own error about it is not a bug of ours, and there is nobody to answer.
        logger.debug(kv("rpc", rpc=rpc, code="CANCELLED", error=type(error).__name__))
        raise asyncio.CancelledError
    logger.error(kv("rpc", rpc=rpc, code="INTERNAL"), exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"{rpc}: internal error (see the hostd log)")
    raise AssertionError("unreachable: abort raises")


class _EventQueue:
    """A bounded FIFO fed by a host subscription; when full, the oldest event is dropped.

    ``notify`` is called (from whichever thread holds the host lock) when the queue turns
    non-empty after :meth:`pop` found it empty; WatchEvents uses it to wake its coroutine.
    """

    def __init__(
        self, maxsize: int, include_faults: bool, notify: Callable[[], object] | None = None
    ) -> None:
        self._events: collections.deque[tuple[int, Event]] = collections.deque()
        self._maxsize = maxsize
        self._include_faults = include_faults
        self._notify = notify
        self._mutex = threading.Lock()
        self._notified = False
        self._sequence = 0
        self.dropped = 0

    def put(self, event: Event) -> None:
        """The host subscriber: called under the host lock, so it only appends."""
        if event.kind == EVENT_FAULT and not self._include_faults:
            return
        with self._mutex:
            self._sequence += 1
            if len(self._events) >= self._maxsize:
                self._events.popleft()
                self.dropped += 1
            self._events.append((self._sequence, event))
            notify = self._notify is not None and not self._notified
            self._notified = True
        if notify and self._notify is not None:
            self._notify()

    def pop(self) -> tuple[int, Event] | None:
        """The oldest queued event with its sequence number, or None (and re-arm ``notify``)."""
        with self._mutex:
            if self._events:
                return self._events.popleft()
            self._notified = False
            return None


class TagStorageServicer(pb_grpc.TagStorageServicer):
    """Serves one :class:`Host`. ``lock`` is shared with whoever else reads the host (metrics).

    Each RPC method is documented in ``proto/tagstore/v1/tagstore.proto``; here each one is
    proto → one :meth:`_call` → proto. Build it inside the event loop that serves it.
    """

    def __init__(
        self,
        host: Host,
        lock: threading.Lock | None = None,
        *,
        credentials: Credentials,
        journal: Journal | None = None,
        requests: RequestWindow | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.host = host
        self.lock = lock if lock is not None else threading.Lock()
        self._credentials = credentials
        self._journal = journal
        self._requests = requests if requests is not None else RequestWindow()
        self._limits = limits if limits is not None else Limits()
        self._streams = StreamSlots(self._limits)
        self._model_thread = futures.ThreadPoolExecutor(1, thread_name_prefix=MODEL_THREAD)
        self._queued = 0  # calls submitted to the model thread and not finished
        self._expensive = asyncio.Lock()
        self._closing = asyncio.Event()
        self._watchers: set[asyncio.Event] = set()

    def close(self) -> None:
        """End every WatchEvents stream so that a graceful stop does not wait for them.
        Called on the event loop."""
        self._closing.set()
        for ready in list(self._watchers):
            ready.set()

    def shutdown(self) -> None:
        """Stop the model thread (after the server has stopped)."""
        self._model_thread.shutdown(wait=True, cancel_futures=True)

    # -- credentials --------------------------------------------------------------------------

    def _principal(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        return self._credentials.authenticate(context.invocation_metadata())

    def _authorize(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        method: Callable[..., Any],
        args: tuple[object, ...],
    ) -> None:
        self._authorize_principal(self._principal(context), method, args)

    def _authorize_principal(
        self, principal: Principal, method: Callable[..., Any], args: tuple[object, ...]
    ) -> None:
        what = method.__name__
        if principal.revoked:
            # A destroyed VM's token may only repeat one of its remembered calls (its DestroyVm
            # whose answer was lost): that returns the first answer and changes nothing.
            request_id = _request_id.get()
            try:
                remembered = request_id and self._requests.lookup(request_id, what, args)
            except TagStoreError:
                remembered = MISS
            if not remembered or remembered is MISS:
                raise UnauthenticatedError("unknown token (not issued by this daemon, or revoked)")
            return
        if method in HOST_SCOPED:
            self._credentials.require_admin(principal, what)
            return
        vm_id = str(args[0])
        check_id("vm_id", vm_id)
        if len(args) > 1 and isinstance(args[1], str):
            check_id("migration_id" if "migration" in what else "device_id", args[1])
        self._credentials.require_vm(principal, vm_id, what)

    # -- the one way to the model -------------------------------------------------------------

    async def _call(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        method: Callable[..., T],
        *args: object,
        on_success: Callable[[T], None] | None = None,
        before: Callable[[], None] | None = None,
        principal: Principal | None = None,
    ) -> T:
        """Authorize (as ``principal``, else as the call's credential), then call a model
        method under the lock, journaled ahead if it may change state.

        A retry of a remembered ``request_id`` gets the first answer and runs nothing (but
        ``on_success`` again: a retried CreateVm gets a fresh token, the one lost with the first
        answer is forgotten). The record is written before the call runs (a call that cannot be
        recorded is refused having changed nothing), and is as durable as configured before the
        reply; ``on_success`` (which persists credentials) runs before the reply too.
        """
        if principal is None:
            principal = self._principal(context)
        self._authorize_principal(principal, method, args)
        remaining = context.time_remaining()
        if (remaining is not None and remaining <= 0) or context.cancelled():
            raise _CallerGone
        request_id = _request_id.get()
        if method in EXPENSIVE:
            deadline = _deadline(remaining)
            # One at a time: a burst of checks queues here, on the loop, where a caller that
            # gives up costs nothing (its coroutine is cancelled). They read a copy-on-write
            # image of the host (hostd.cow): the lock is held only for the fork, so neither the
            # loop nor the model thread waits for them.
            async with self._expensive:
                if _expired(deadline) or context.cancelled():
                    raise _CallerGone
                work = functools.partial(method, self.host, *args)
                return await asyncio.to_thread(call_on_copy, self.lock, work)
        if self._queued == 0 and self._cheap(method, args) and self.lock.acquire(blocking=False):
            try:
                result, token = self._locked(method, args, on_success, request_id, before)
            finally:
                self.lock.release()
        else:
            result, token = await self._on_model_thread(
                context, _deadline(remaining), method, args, on_success, request_id, before
            )
        if token is not None and self._journal is not None and self._journal.syncs:
            # Outside the lock: concurrent calls share one fsync (group commit).
            await asyncio.to_thread(self._journal.wait_durable, token)
        return result

    def _cheap(self, method: Callable[..., Any], args: tuple[object, ...]) -> bool:
        # A journal that fsyncs makes every mutation wait: those go through the model thread.
        if method in _RANGED and (self._journal is None or not self._journal.syncs):
            length = args[2]
            return isinstance(length, int) and length <= INLINE_MAX_BYTES
        return False

    def _locked(
        self,
        method: Callable[..., T],
        args: tuple[object, ...],
        on_success: Callable[[T], None] | None,
        request_id: str,
        before: Callable[[], None] | None = None,
    ) -> tuple[T, int | None]:
        """The model call itself, and the token of its journal record; the caller holds the
        lock."""
        name = method.__name__
        answer = self._requests.lookup(request_id, name, args) if request_id else MISS
        if answer is not MISS:
            remembered = cast(T, answer)
            if on_success is not None:
                on_success(remembered)
            return remembered, None
        self._check_limits(method, args)
        if before is not None:
            before()
        journal = self._journal
        ticket = journal.begin(name, args, request_id) if journal is not None else None
        try:
            result = method(self.host, *args)
        except BaseException:
            if ticket is not None and journal is not None:
                journal.abort(ticket)
            raise
        token = journal.commit(ticket) if ticket is not None and journal is not None else None
        if request_id:
            self._requests.remember(request_id, name, args, result)
        if on_success is not None:
            on_success(result)
        return result, token

    def _check_limits(self, method: Callable[..., Any], args: tuple[object, ...]) -> None:
        if method is Host.create_vm or method is Host.admit_migration:
            self._limits.check_new_vm(len(self.host.vms))
        elif method is Host.add_dimm or method is Host.add_virtio_mem:
            vm = self.host.vms.get(str(args[0]))
            if vm is not None:
                self._limits.check_new_device(vm.vm_id, len(vm.devices))

    async def _on_model_thread(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        deadline: float | None,
        method: Callable[..., T],
        args: tuple[object, ...],
        on_success: Callable[[T], None] | None,
        request_id: str,
        before: Callable[[], None] | None,
    ) -> tuple[T, int | None]:
        gone = threading.Event()

        def run() -> tuple[T, int | None]:
            while not self.lock.acquire(timeout=_LOCK_POLL_SECONDS):
                if gone.is_set() or _expired(deadline):
                    raise _CallerGone
            try:
                if gone.is_set() or _expired(deadline):
                    raise _CallerGone
                return self._locked(method, args, on_success, request_id, before)
            finally:
                self.lock.release()

        if context.cancelled() or _expired(deadline):
            raise _CallerGone
        loop = asyncio.get_running_loop()
        self._queued += 1
        try:
            return await loop.run_in_executor(self._model_thread, run)
        except asyncio.CancelledError:
            gone.set()  # a call still queued is dropped; one already running finishes
            raise
        finally:
            self._queued -= 1

    async def _with_lock(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (a subscription change, not a model call) under the lock, off the loop."""
        if self.lock.acquire(blocking=False):
            try:
                fn()
            finally:
                self.lock.release()
            return

        def run() -> None:
            with self.lock:
                fn()

        await asyncio.get_running_loop().run_in_executor(self._model_thread, run)

    # -- RPCs ---------------------------------------------------------------------------------

    @_rpc(logging.DEBUG)
    async def GetHost(
        self, request: pb.GetHostRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.HostStatus:
        return convert.host_status_to_proto(await self._call(context, Host.status))

    @_rpc(logging.INFO)
    async def CreateVm(
        self, request: pb.CreateVmRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Vm:
        config = convert.vm_config_from_proto(request)
        # Derived from the request_id when there is one: a retry answers the same token.
        token = self._credentials.new_vm_token(config.vm_id, _request_id.get())

        def register() -> None:
            # Before the VM exists, so that a token that cannot be saved refuses the call with
            # nothing applied. An existing id is left alone: the model refuses the call.
            if config.vm_id in self.host.vms:
                return
            try:
                self._credentials.register_vm(config.vm_id, token)
            except OSError as e:
                raise StateUnavailableError(
                    f"the VM's token cannot be saved ({e.strerror}): the call was not made",
                    reason="STATE_UNWRITABLE",
                ) from None

        vm = await self._call(context, Host.create_vm, config, before=register)
        answer = convert.vm_to_proto(vm)
        answer.vm_token = token  # the one answer that carries it
        return answer

    @_rpc(logging.DEBUG)
    async def GetVm(
        self, request: pb.GetVmRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Vm:
        return convert.vm_to_proto(await self._call(context, Host.get_vm, request.vm_id))

    @_rpc(logging.DEBUG)
    async def ListVms(
        self, request: pb.ListVmsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListVmsResponse:
        vms = await self._call(context, Host.list_vms)
        return pb.ListVmsResponse(
            vms=[convert.vm_to_proto(vm) for vm in sorted(vms, key=lambda vm: vm.vm_id)]
        )

    @_rpc(logging.INFO)
    async def DestroyVm(
        self, request: pb.DestroyVmRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DestroyVmResponse:
        final = await self._call(
            context,
            Host.destroy_vm,
            request.vm_id,
            on_success=lambda vm: self._credentials.revoke_vm(vm.vm_id),
        )
        return pb.DestroyVmResponse(vm=convert.vm_to_proto(final))

    def _fault_now(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        principal: Principal,
        args: tuple[str, int, int, Access],
    ) -> FaultResult | None:
        """The fault path of :meth:`_call`, answered on the loop when nothing is queued for
        the model thread and the lock is free now. A fault on pages already mapped (vCPUs
        racing on a page) without a request_id changes nothing: one look at the pages answers
        it, with no journal record (the store would write none either; its count in the fault
        counters is lost on a crash). Other cheap faults run here as :meth:`_call` would run
        them. None: the fault must wait for the model thread (:meth:`_call` takes it there,
        authorizing it again)."""
        self._authorize_principal(principal, Host.guest_fault, args)
        remaining = context.time_remaining()
        if (remaining is not None and remaining <= 0) or context.cancelled():
            raise _CallerGone
        if self._queued or not self.lock.acquire(blocking=False):
            return None
        try:
            request_id = _request_id.get()
            if not request_id:
                present = self.host.guest_fault_if_present(*args)
                if present is not None:
                    return present
            if not self._cheap(Host.guest_fault, args):
                return None
            result, _ = self._locked(Host.guest_fault, args, None, request_id)
            # _cheap: no journal that fsyncs, so nothing to wait for.
            return result
        finally:
            self.lock.release()

    async def _guest_fault(
        self,
        request: pb.GuestFaultRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        principal: Principal,
    ) -> pb.GuestFaultResponse:
        args = (
            request.vm_id,
            request.gpa,
            request.length,
            convert.access_from_proto(request.access),
        )
        result = self._fault_now(context, principal, args)
        if result is None:
            result = await self._call(context, Host.guest_fault, *args, principal=principal)
        return convert.fault_result_to_proto(result)

    @_rpc(logging.DEBUG)
    async def GuestFault(
        self, request: pb.GuestFaultRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GuestFaultResponse:
        return await self._guest_fault(request, context, self._principal(context))

    @_stream_rpc
    async def StreamGuestFaults(
        self,
        request_iterator: AsyncIterator[pb.GuestFaultRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.GuestFaultResponse]:
        # A stream's metadata is fixed when it opens: read it once. The token in it is still
        # checked for every message (a lookup of the remembered header value), so that a
        # token revoked while the stream is open refuses the next message.
        metadata = context.invocation_metadata()
        authenticate = self._credentials.authenticate
        async for request in request_iterator:
            request_id = _request_id.set(request.request_id)
            try:
                response = await self._guest_fault(request, context, authenticate(metadata))
            finally:
                _request_id.reset(request_id)
            yield response

    @_rpc(logging.INFO)
    async def AddMemoryDevice(
        self, request: pb.AddMemoryDeviceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MemoryDevice:
        if convert.memory_device_kind_of(request) == "dimm":
            device = await self._call(
                context, Host.add_dimm, request.vm_id, request.device_id, request.dimm.size_bytes
            )
        else:
            config = convert.virtio_mem_config_from_proto(request.virtio_mem)
            device = await self._call(
                context, Host.add_virtio_mem, request.vm_id, request.device_id, config
            )
        return convert.memory_device_to_proto(device)

    @_rpc(logging.INFO)
    async def RemoveMemoryDevice(
        self, request: pb.RemoveMemoryDeviceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RemoveMemoryDeviceResponse:
        await self._call(context, Host.remove_memory_device, request.vm_id, request.device_id)
        return pb.RemoveMemoryDeviceResponse()

    @_rpc(logging.INFO)
    async def ResizeVirtioMem(
        self, request: pb.ResizeVirtioMemRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MemoryDevice:
        device = await self._call(
            context,
            Host.resize_virtio_mem,
            request.vm_id,
            request.device_id,
            request.requested_size,
        )
        return convert.memory_device_to_proto(device)

    @_rpc(logging.DEBUG)
    async def VirtioMemRequest(
        self, request: pb.VirtioMemRequestRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.VirtioMemRequestResponse:
        request_type = convert.virtio_mem_request_type_from_proto(request.type)
        answer = await self._call(
            context,
            Host.virtio_mem_request,
            request.vm_id,
            request.device_id,
            request_type,
            request.addr,
            request.nb_blocks,
        )
        return convert.virtio_mem_answer_to_proto(answer)

    @_rpc(logging.DEBUG)
    async def DiscardGuestMemory(
        self, request: pb.DiscardGuestMemoryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DiscardGuestMemoryResponse:
        result = await self._call(
            context, Host.discard_guest_memory, request.vm_id, request.gpa, request.length
        )
        return convert.discard_result_to_proto(result)

    @_rpc(logging.INFO)
    async def ReportVmmDifference(
        self, request: pb.ReportVmmDifferenceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReportVmmDifferenceResponse:
        await self._call(
            context,
            Host.report_vmm_difference,
            request.vm_id,
            request.device_id,
            request.reporter,
            request.what,
        )
        return pb.ReportVmmDifferenceResponse()

    @_rpc(logging.DEBUG)
    async def CopyTags(
        self, request: pb.CopyTagsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CopyTagsResponse:
        direction = convert.direction_from_proto(request.direction)
        tags = request.tags if direction is TagCopyDirection.TO_GUEST else b""
        result = await self._call(
            context, Host.copy_tags, request.vm_id, request.gpa, request.length, direction, tags
        )
        return pb.CopyTagsResponse(tags=result)

    @_rpc(logging.DEBUG)
    async def CheckInvariants(
        self, request: pb.CheckInvariantsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CheckInvariantsResponse:
        violations = await self._call(context, Host.check_invariants)
        return pb.CheckInvariantsResponse(violations=violations)

    @_stream_rpc
    async def ExportState(
        self, request: pb.ExportStateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        # Built by a child on a copy-on-write image (a consistent cut; the lock is held only
        # for the fork), streamed as the child serialises it; one at a time, like checks. A
        # client that goes away stops the stream at the next chunk, and the child is killed.
        # The child's bytes go out as they are (``add_to_server``): decoding and re-encoding
        # each message here would hold the GIL that the guests' faults wait for.
        self._authorize(context, Host.export_state, ())
        async with self._expensive:
            messages = stream_on_copy(self.lock, self._serialized_export)
            pending: asyncio.Future[bytes | None] | None = None
            try:
                while True:
                    pending = asyncio.ensure_future(asyncio.to_thread(next, messages, None))
                    # Shielded: a caller that goes away must not end this future before the
                    # thread leaves next().
                    data = await asyncio.shield(pending)
                    pending = None
                    if data is None:
                        break
                    yield data
            finally:
                if pending is None:
                    await asyncio.to_thread(messages.close)
                else:
                    # The caller went away while a thread is still inside next(): close the
                    # stream (and kill the copy) once that returns, not concurrently with it.
                    pending.add_done_callback(lambda f: _close_after(f, messages))

    def _serialized_export(self) -> Iterator[bytes]:
        """Run in the copy's process: the export as serialised messages, each sent as soon as
        it is encoded (the whole export never sits in the child's memory)."""
        stream = export.stream(self.host)
        for message in convert.export_stream_to_proto(stream, self.host.page_size):
            yield message.SerializeToString()

    @_stream_rpc
    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        self._credentials.require_admin(self._principal(context), "WatchEvents")
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        queue = _EventQueue(
            self._limits.event_queue_size,
            request.include_faults,
            notify=functools.partial(loop.call_soon_threadsafe, ready.set),
        )
        self._watchers.add(ready)
        try:
            # Inside the try: a client that goes away while the subscription waits for the
            # lock still gets unsubscribed (on the model thread, after the subscription).
            await self._with_lock(lambda: self.host.subscribe(queue.put))
            # Headers go out once the subscription is active: a client that waits for them
            # (``call.initial_metadata()``) sees every event caused after that.
            await context.send_initial_metadata(())
            while not self._closing.is_set():
                item = queue.pop()
                if item is None:
                    ready.clear()
                    if (item := queue.pop()) is None:
                        # A slow reader only holds this coroutine; the bounded queue drops
                        # its oldest events rather than grow.
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(ready.wait(), _WATCH_POLL_SECONDS)
                        continue
                sequence, event = item
                yield pb.WatchEventsResponse(
                    event=convert.event_to_proto(event, sequence), dropped_events=queue.dropped
                )
        finally:
            self._watchers.discard(ready)
            await asyncio.shield(self._with_lock(lambda: self.host.unsubscribe(queue.put)))

    # -- live migration: each step is one model call; the wall clock is read here, because
    # the model keeps no clock of its own (deadlines are passed in).

    @_rpc(logging.INFO)
    async def StartMigration(
        self, request: pb.StartMigrationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MigrationManifest:
        manifest = await self._call(
            context,
            Host.start_migration,
            request.vm_id,
            request.migration_id,
            time.time(),
            request.timeout_seconds,
        )
        return convert.manifest_to_proto(manifest)

    @_rpc(logging.INFO)
    async def AdmitMigration(
        self, request: pb.AdmitMigrationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MigrationStatus:
        manifest = convert.manifest_from_proto(request.manifest)
        status = await self._call(
            context, Host.admit_migration, manifest, time.time(), request.lease_seconds
        )
        return convert.migration_status_to_proto(status)

    @_rpc(logging.DEBUG)
    async def ReadMigrationChunk(
        self, request: pb.ReadMigrationChunkRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReadMigrationChunkResponse:
        chunk = await self._migration_step(context, Host.read_migration_chunk, request)
        if chunk is None:
            return pb.ReadMigrationChunkResponse(round_done=True)
        return pb.ReadMigrationChunkResponse(chunk=convert.tag_chunk_to_proto(chunk))

    @_rpc(logging.DEBUG)
    async def WriteMigrationChunk(
        self, request: pb.WriteMigrationChunkRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MigrationStatus:
        chunk = convert.tag_chunk_from_proto(request.chunk)
        status = await self._call(
            context,
            Host.write_migration_chunk,
            request.vm_id,
            request.migration_id,
            chunk,
            time.time(),
        )
        return convert.migration_status_to_proto(status)

    async def _migration_step(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        method: Callable[..., T],
        request: pb.MigrationStepRequest | pb.ReadMigrationChunkRequest,
        on_success: Callable[[T], None] | None = None,
    ) -> T:
        """One step of a VM's migration: the model call on (vm_id, migration_id), now."""
        return await self._call(
            context,
            method,
            request.vm_id,
            request.migration_id,
            time.time(),
            on_success=on_success,
        )

    @_rpc(logging.INFO)
    async def NextMigrationRound(
        self, request: pb.MigrationStepRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.NextMigrationRoundResponse:
        pages = await self._migration_step(context, Host.next_migration_round, request)
        return pb.NextMigrationRoundResponse(round_pages=pages)

    @_rpc(logging.INFO)
    async def PauseMigration(
        self, request: pb.MigrationStepRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MigrationStatus:
        status = await self._migration_step(context, Host.pause_migration, request)
        return convert.migration_status_to_proto(status)

    @_rpc(logging.INFO)
    async def HandoverMigration(
        self, request: pb.MigrationStepRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MigrationStatus:
        status = await self._migration_step(context, Host.handover_migration, request)
        return convert.migration_status_to_proto(status)

    @_rpc(logging.INFO)
    async def CommitMigration(
        self, request: pb.MigrationStepRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MigrationReport:
        vm_id, migration_id = request.vm_id, request.migration_id
        # As CreateVm's: derived from the request_id when there is one, so that a driver whose
        # commit reply was lost gets the same token from its retry (the remembered answer).
        token = self._credentials.new_vm_token(vm_id, _request_id.get())

        def register() -> None:
            # Before the commit, so that a token that cannot be saved refuses it with nothing
            # applied; only for the incoming migration that this commit will end (any other
            # call is refused by the model and must not leave a token behind).
            m = self.host.migrations.get(vm_id)
            if m is None or m.migration_id != migration_id or m.role is not MigrationRole.INCOMING:
                return
            try:
                self._credentials.register_vm(vm_id, token)
            except OSError as e:
                raise StateUnavailableError(
                    f"the VM's token cannot be saved ({e.strerror}): the commit was not made",
                    reason="STATE_UNWRITABLE",
                ) from None

        report = await self._call(
            context, Host.commit_migration, vm_id, migration_id, time.time(), before=register
        )
        answer = convert.migration_report_to_proto(report)
        answer.vm_token = token
        return answer

    @_rpc(logging.INFO)
    async def CompleteMigration(
        self, request: pb.MigrationStepRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MigrationReport:
        # The VM is gone from this host: its token is too (it runs with the destination's).
        report = await self._migration_step(
            context,
            Host.complete_migration,
            request,
            on_success=lambda r: self._credentials.revoke_vm(r.vm_id),
        )
        return convert.migration_report_to_proto(report)

    @_rpc(logging.INFO)
    async def AbortMigration(
        self, request: pb.MigrationStepRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MigrationStatus:
        status = await self._migration_step(
            context, Host.abort_migration, request, on_success=self._revoke_incoming
        )
        return convert.migration_status_to_proto(status)

    def _revoke_incoming(self, status: MigrationStatus) -> None:
        """An incoming VM that was dropped takes its token (if a commit made one) with it."""
        if status.role is MigrationRole.INCOMING:
            self._credentials.revoke_vm(status.vm_id)

    @_rpc(logging.DEBUG)
    async def GetMigration(
        self, request: pb.GetMigrationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MigrationStatus:
        return convert.migration_status_to_proto(
            await self._call(context, Host.get_migration, request.vm_id)
        )

    def expire_migrations(self) -> int:
        """End migrations whose deadline passed (the daemon's timer thread calls this); returns
        how many. Journals a call only when one is due."""
        now = time.time()
        with self.lock:
            deadline = self.host.next_migration_deadline()
            if deadline is None or deadline >= now:
                return 0
            result, _ = self._locked(Host.expire_migrations, (now,), None, "")
            for status in result:
                self._revoke_incoming(status)
            return len(result)

    # -- host page migration

    @_rpc(logging.INFO)
    async def CompactTagRegion(
        self, request: pb.CompactTagRegionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CompactTagRegionResponse:
        return convert.compaction_to_proto(
            await self._call(context, Host.compact_tag_region, request.region)
        )

    @_rpc(logging.INFO)
    async def EvacuateHostRange(
        self, request: pb.EvacuateHostRangeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.EvacuateHostRangeResponse:
        result = await self._call(
            context, Host.evacuate_host_range, request.pfn_start, request.nr_pages
        )
        return convert.evacuation_to_proto(result)


def _close_after(done: asyncio.Future[Any], messages: Generator[bytes, None, None]) -> None:
    """Close a copy's message stream after the read that was under way ended (its result or
    error no longer has a reader)."""
    if not done.cancelled():
        done.exception()
    messages.close()


def _deadline(remaining: float | None) -> float | None:
    """The monotonic deadline of a call with ``remaining`` seconds left (``time_remaining``)."""
    return None if remaining is None else time.monotonic() + remaining


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


class _HandlerTable:
    """Stands in for the server while the generated code registers the service, to keep its
    table of method handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers come again, by name, through the call below

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.service, self.handlers = service, dict(handlers)


def _already_serialized(message: bytes) -> bytes:
    return message


def add_to_server(servicer: TagStorageServicer, server: grpc.aio.Server) -> None:
    """Register the TagStorage service on a server, as the generated code does, except that
    ExportState's messages are sent as the bytes the copy-on-write child serialised."""
    table = _HandlerTable()
    pb_grpc.add_TagStorageServicer_to_server(servicer, table)
    if "ExportState" not in table.handlers:
        raise RuntimeError("the generated TagStorage registration changed shape: regenerate it")
    export = table.handlers["ExportState"]
    table.handlers["ExportState"] = export._replace(  # type: ignore[attr-defined]
        response_serializer=_already_serialized
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(table.service, table.handlers),)
    )
    # The grpc.aio typing stubs lag grpcio: the generated code makes the same call.
    server.add_registered_method_handlers(table.service, table.handlers)  # type: ignore[attr-defined]
