"""Prometheus metrics of hostd: one collector for model state and counters, gRPC metrics.

Everything here reads the model; nothing here changes it. The layout follows client_python:

- The registry is injected (``TagStoreMetrics(host, lock, registry)``), never the global one,
  so tests and several daemons in one process do not collide.
- One custom collector (:class:`_HostCollector`) derives every gauge and counter from the model
  *at scrape time*, under the daemon's lock: memory by page state, tag blocks, VMs, and the
  monotonic :class:`~hostd.model.types.HostCounters`. Nothing is cached, so a scrape can never
  be stale and the model never pays for metrics between scrapes.
- Fault and reservation latencies are histograms the model keeps among its counters
  (:class:`~hostd.model.types.LatencyHistogram`); the collector exposes them, so metrics add
  no work to a fault.
- The invariant check is too expensive for a scrape; a background thread runs it every
  ``invariant_check_interval_s`` and the collector reports the last result.
- gRPC server metrics come from one interceptor, with the names of go-grpc-prometheus.

``docs/metrics.md`` lists every metric with its labels and meaning.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.metadata
import inspect
import logging
import platform
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer, make_server

import grpc
import grpc.aio
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from hostd.cow import call_on_copy
from hostd.model.migration import MigrationOutcome, MigrationPhase, MigrationRole
from hostd.model.types import (
    DCACHE_INVALIDATE,
    TAG_CACHE_INVALIDATE,
    Access,
    HostCounters,
    HostStatus,
    LatencyHistogram,
    MemoryUsage,
    MigrationReason,
    TagCopyDirection,
    TagPolicy,
    VirtioMemRequestType,
    VirtioMemResponse,
    VmStatus,
)

if TYPE_CHECKING:
    from hostd.model.host import Host

__all__ = [
    "FAULT_OUTCOMES",
    "GRPC_HANDLING_BUCKETS_SECONDS",
    "MEMORY_STATES",
    "MetricsHttpServer",
    "TagStoreMetrics",
]

_log = logging.getLogger(__name__)

# The six page states of MemoryUsage, in the order of its fields; they partition a region.
MEMORY_STATES: tuple[str, ...] = (
    "free",
    "data",
    "tagged",
    "tag_reserved",
    "tag_lent",
    "tag_free",
)

# Fault outcomes the model records in HostCounters.faults: newly "mapped" pages, all pages
# already "present", or an "error" (the call raised). Pre-populated with 0 so that rate()
# works from the first scrape). Outcomes the model adds later still appear once they happen.
FAULT_OUTCOMES: tuple[str, ...] = ("mapped", "present", "error")

# Label value of tag_policy for VMs without MTE, where the policy does not apply.
NO_TAG_POLICY = "NONE"


# RPCs are served in-process from memory: 100 us .. 10 s.
GRPC_HANDLING_BUCKETS_SECONDS: tuple[float, ...] = (
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def _usage_by_state(usage: MemoryUsage) -> Iterator[tuple[str, int]]:
    yield "free", usage.free_bytes
    yield "data", usage.data_bytes
    yield "tagged", usage.tagged_bytes
    yield "tag_reserved", usage.tag_reserved_bytes
    yield "tag_lent", usage.tag_lent_bytes
    yield "tag_free", usage.tag_free_bytes


def _label(value: object) -> str:
    """Label value of an enum member or a plain key of HostCounters."""
    return str(getattr(value, "value", value))


def _vm_tag_policy(vm: VmStatus) -> str:
    return vm.tag_policy.value if vm.mte_enabled else NO_TAG_POLICY


@dataclass(frozen=True)
class _InvariantResult:
    violations: int
    timestamp_s: float


@dataclass(frozen=True)
class _Snapshot:
    """What one scrape reads from the model, copied under the lock."""

    status: HostStatus
    counters: HostCounters
    vms: tuple[VmStatus, ...]
    # (role, phase) of each migration in progress.
    migrations: tuple[tuple[str, str], ...] = ()


class _HostCollector(Collector):
    """Derives every state gauge and every model counter from the host at scrape time."""

    def __init__(
        self,
        host: Host,
        lock: threading.Lock,
        invariants: Callable[[], _InvariantResult | None],
    ) -> None:
        self._host = host
        self._lock = lock
        self._invariants = invariants

    def _snapshot(self) -> _Snapshot:
        # Everything comes from one critical section, so a scrape is one consistent instant:
        # the per-region states sum to the host-wide ones and counters match the state.
        with self._lock:
            return _Snapshot(
                status=self._host.status(),
                counters=copy.deepcopy(self._host.counters),
                vms=tuple(self._host.list_vms()),
                migrations=tuple(
                    (m.role.value, m.phase.value) for m in self._host.migrations.values()
                ),
            )

    def describe(self) -> Iterable[Metric]:
        """The metric families, without samples: lets the registry check names unscraped."""
        return _families(None, None)

    def collect(self) -> Iterable[Metric]:
        return _families(self._snapshot(), self._invariants())


# (type, name, help, labels) of every family the collector exports, in exposition order.
# Counter names omit "_total" (client_python appends it). The counters of reserved and released
# blocks are "reservations"/"releases" because "tagstore_tag_blocks_reserved" is the gauge: a
# counter family of the same name would collide with it in the OpenMetrics exposition.
_COLLECTOR_SPECS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("gauge", "tagstore_memory_bytes",
     "Bytes of a memory region by page state; the states partition the region.",
     ("region", "state")),
    ("gauge", "tagstore_host_memory_bytes",
     "Bytes of host memory by page state; the states partition all host memory.", ("state",)),
    ("gauge", "tagstore_page_size_bytes",
     "Host page size (turns the page counters into bytes).", ()),
    ("gauge", "tagstore_tag_blocks", "Tag blocks in the tag storage of a region.", ("region",)),
    ("gauge", "tagstore_tag_blocks_reserved",
     "Tag blocks currently reserved (holding tags) in a region.", ("region",)),
    ("gauge", "tagstore_tag_blocks_min_needed",
     "Fewest tag blocks that could hold the tags of the region's tagged pages.", ("region",)),
    ("gauge", "tagstore_tagged_capacity_bytes",
     "Data bytes of a region that could still become tagged (free taggable pages).",
     ("region",)),
    ("gauge", "tagstore_vms",
     "VMs by tag policy and MTE flag (tag_policy is NONE for VMs without MTE).",
     ("tag_policy", "mte")),
    ("gauge", "tagstore_vm_mapped_bytes", "Guest memory of a VM backed by host pages.",
     ("vm",)),
    ("gauge", "tagstore_vm_tagged_bytes", "Guest memory of a VM backed by tagged host pages.",
     ("vm",)),
    ("counter", "tagstore_guest_faults", "Guest stage-2 faults handled, by access and outcome.",
     ("access", "outcome")),
    ("counter", "tagstore_tag_block_reservations",
     "Tag blocks reserved (taken for tags) in a region.", ("region",)),
    ("counter", "tagstore_tag_block_releases",
     "Tag blocks released (returned to lendable tag storage) in a region.", ("region",)),
    ("counter", "tagstore_tag_block_reserve_failures",
     "Tag block reservations that failed in a region (busy after retries, no storage).",
     ("region",)),
    ("counter", "tagstore_evacuated_pages",
     "Host pages of lent data migrated out of a region's tag storage to reserve it.",
     ("region",)),
    ("counter", "tagstore_page_migrations", "Guest pages moved to another host page, by reason.",
     ("reason",)),
    ("counter", "tagstore_vmm_differences",
     "Differences a VMM reported it could not reconcile with hostd (QEMU bridge), by reporter.",
     ("reporter",)),
    ("counter", "tagstore_fault_replays",
     "Guest faults replayed after a failed tag reservation moved the page.", ()),
    ("counter", "tagstore_virtio_mem_requests",
     "virtio-mem guest requests, by request type and device response.", ("type", "response")),
    ("counter", "tagstore_dimm_operations",
     "Virtual DIMM hotplug operations, by operation (plug, unplug).", ("operation",)),
    ("counter", "tagstore_cache_maintenance_bytes",
     "Bytes of cache maintenance done to switch memory between tag and data use, by kind.",
     ("kind",)),
    ("counter", "tagstore_tag_copy_bytes",
     "Tag bytes copied by KVM_ARM_MTE_COPY_TAGS (one tag per byte), by direction.",
     ("direction",)),
    ("gauge", "tagstore_migrations_in_progress",
     "Live migrations in progress on this host, by role and phase.", ("role", "phase")),
    ("counter", "tagstore_migrations",
     "Live migrations ended on this host, by role and outcome.", ("role", "outcome")),
    ("counter", "tagstore_migration_wire_bytes",
     "Bytes of tag chunks sent (OUTGOING) or received (INCOMING) by completed migrations.",
     ("role",)),
    ("counter", "tagstore_migration_rounds",
     "Pre-copy rounds started after the first, over all outgoing migrations.", ()),
    ("gauge", "tagstore_invariant_violations",
     "Model invariants violated at the last check (0 when the model is sound).", ()),
    ("gauge", "tagstore_invariant_check_timestamp_seconds",
     "Unix time at which the last invariant check finished.", ()),
)  # fmt: skip


def _new_families() -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
    families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
    for kind, name, doc, labels in _COLLECTOR_SPECS:
        cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
        families[name] = cls(name, doc, labels=list(labels))
    return families


def _families(snap: _Snapshot | None, inv: _InvariantResult | None) -> list[Metric]:
    """Build the collector's metric families from a snapshot (no samples when ``snap`` is None)."""
    f = _new_families()
    if inv is not None:
        f["tagstore_invariant_violations"].add_metric([], inv.violations)
        f["tagstore_invariant_check_timestamp_seconds"].add_metric([], inv.timestamp_s)
    if snap is None:
        return list(f.values())

    status, c = snap.status, snap.counters
    f["tagstore_page_size_bytes"].add_metric([], status.page_size_bytes)
    for state, value in _usage_by_state(status.usage):
        f["tagstore_host_memory_bytes"].add_metric([state], value)
    for r in status.regions:
        for state, value in _usage_by_state(r.usage):
            f["tagstore_memory_bytes"].add_metric([r.name, state], value)
        f["tagstore_tagged_capacity_bytes"].add_metric([r.name], r.tagged_capacity_bytes)
        if r.tag_blocks_total:  # untaggable ranges have no tag blocks
            f["tagstore_tag_blocks"].add_metric([r.name], r.tag_blocks_total)
            f["tagstore_tag_blocks_reserved"].add_metric([r.name], r.tag_blocks_reserved)
            f["tagstore_tag_blocks_min_needed"].add_metric([r.name], r.tag_blocks_min_needed)

    vm_counts = {(p.value, "true"): 0 for p in TagPolicy}
    vm_counts[(NO_TAG_POLICY, "false")] = 0
    for vm in snap.vms:
        key = (_vm_tag_policy(vm), "true" if vm.mte_enabled else "false")
        vm_counts[key] = vm_counts.get(key, 0) + 1
        f["tagstore_vm_mapped_bytes"].add_metric([vm.vm_id], vm.mapped_bytes)
        f["tagstore_vm_tagged_bytes"].add_metric([vm.vm_id], vm.tagged_bytes)
    for (policy, mte), n in sorted(vm_counts.items()):
        f["tagstore_vms"].add_metric([policy, mte], n)

    # Counters: every known label value starts at 0 so that rate() and increase() see the
    # first event; keys the model adds that are not listed here are reported as they come.
    regions = [r.name for r in status.regions if r.tag_blocks_total]
    tables: list[tuple[str, dict[Any, int], dict[Any, int]]] = [
        ("tagstore_guest_faults", {(a.value, o): 0 for a in Access for o in FAULT_OUTCOMES},
         c.faults),
        ("tagstore_tag_block_reservations", dict.fromkeys(regions, 0), c.tag_blocks_reserved),
        ("tagstore_tag_block_releases", dict.fromkeys(regions, 0), c.tag_blocks_released),
        ("tagstore_tag_block_reserve_failures", dict.fromkeys(regions, 0),
         c.tag_block_reserve_failures),
        ("tagstore_evacuated_pages", dict.fromkeys(regions, 0), c.evacuated_pages),
        ("tagstore_page_migrations", {m.value: 0 for m in MigrationReason}, c.page_migrations),
        ("tagstore_virtio_mem_requests",
         {(t.value, r.value): 0 for t in VirtioMemRequestType for r in VirtioMemResponse},
         c.virtio_mem_requests),
        ("tagstore_dimm_operations", {"plug": 0, "unplug": 0}, c.dimm_operations),
        ("tagstore_cache_maintenance_bytes", {DCACHE_INVALIDATE: 0, TAG_CACHE_INVALIDATE: 0},
         c.cache_maintenance_bytes),
        ("tagstore_tag_copy_bytes", {d.value: 0 for d in TagCopyDirection}, c.tags_copied_bytes),
        ("tagstore_migrations",
         {(r.value, o.value): 0 for r in MigrationRole for o in MigrationOutcome}, c.migrations),
        ("tagstore_migration_wire_bytes", {r.value: 0 for r in MigrationRole}, c.migration_bytes),
        ("tagstore_vmm_differences", {"qemu-bridge": 0}, c.vmm_differences),
    ]  # fmt: skip
    for name, zeros, table in tables:
        _add_table(f[name], zeros, table)
    f["tagstore_fault_replays"].add_metric([], c.fault_replays)
    f["tagstore_migration_rounds"].add_metric([], c.migration_rounds)
    in_progress = {(r.value, p.value): 0 for r in MigrationRole for p in MigrationPhase}
    for key in snap.migrations:
        in_progress[key] = in_progress.get(key, 0) + 1
    for (role, phase), n in sorted(in_progress.items()):
        f["tagstore_migrations_in_progress"].add_metric([role, phase], n)
    faults = HistogramMetricFamily(
        "tagstore_guest_fault_duration_seconds",
        "Time the host took to handle a guest fault, by access.",
        labels=["access"],
    )
    for access, histogram in sorted(c.fault_seconds.items()):
        faults.add_metric([access], _buckets(histogram), histogram.sum_seconds)
    reservations = HistogramMetricFamily(
        "tagstore_tag_reservation_duration_seconds",
        "Time to reserve a batch of tag blocks, evacuation of lent data included.",
    )
    reservations.add_metric([], _buckets(c.reservation_seconds), c.reservation_seconds.sum_seconds)
    durations = _labelled_histograms(
        "tagstore_migration_duration_seconds",
        "Live migrations ended on this host: seconds from start (source) or admission "
        "(destination) to the end, by role and outcome.",
        ["role", "outcome"],
        c.migration_seconds,
    )
    phases = _labelled_histograms(
        "tagstore_migration_phase_duration_seconds",
        "Seconds live migrations spent in each phase, by role and phase (PAUSED is the "
        "guest's downtime on the source).",
        ["role", "phase"],
        c.migration_phase_seconds,
    )
    return [*f.values(), faults, reservations, durations, phases]


def _labelled_histograms(
    name: str,
    documentation: str,
    labels: list[str],
    table: Mapping[tuple[str, str], LatencyHistogram],
) -> HistogramMetricFamily:
    """One histogram family with a series per key of the model's ``table`` (label values)."""
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for key, histogram in sorted(table.items()):
        family.add_metric(list(key), _buckets(histogram), histogram.sum_seconds)
    return family


def _buckets(histogram: LatencyHistogram) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs of a model histogram, ending with ``+Inf``."""
    out: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip(
        (*(floatToGoString(b) for b in histogram.bounds), "+Inf"),
        histogram.counts,
        strict=True,
    ):
        total += n
        out.append((bound, total))
    return out


def _add_table(
    family: GaugeMetricFamily | CounterMetricFamily, zeros: dict[Any, int], table: dict[Any, int]
) -> None:
    """Add one sample per key of ``zeros`` and of ``table``; a key is a label value or a tuple."""
    merged = dict(zeros)
    for key, value in table.items():
        norm = tuple(_label(k) for k in key) if isinstance(key, tuple) else _label(key)
        merged[norm] = merged.get(norm, 0) + value
    for key, value in sorted(merged.items()):
        labels = list(key) if isinstance(key, tuple) else [key]
        family.add_metric(labels, value)


# --- gRPC server metrics -------------------------------------------------------------------


def _grpc_type(handler: grpc.RpcMethodHandler[Any, Any]) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


def _split_method(full_method: str) -> tuple[str, str]:
    """``"/pkg.Service/Method"`` → ``("pkg.Service", "Method")``."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


def _final_code(context: grpc.ServicerContext, error: BaseException | None) -> str:
    """The status an RPC ended with: what the handler set (``set_code``, ``abort``) wins."""
    code_fn = getattr(context, "code", None)
    code = code_fn() if callable(code_fn) else None
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(error, GeneratorExit):
        return grpc.StatusCode.CANCELLED.name
    if error is not None:
        return grpc.StatusCode.UNKNOWN.name
    return grpc.StatusCode.OK.name


class _GrpcServerMetrics:
    """The go-grpc-prometheus server metrics, in a registry of our own choosing."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_service", "grpc_method", "grpc_type"]
        self.started = Counter(
            "grpc_server_started",
            "RPCs started on the server.",
            labels,
            registry=registry,
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, regardless of success or failure.",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time the server took to handle an RPC (a whole stream for streaming RPCs).",
            labels,
            buckets=GRPC_HANDLING_BUCKETS_SECONDS,
            registry=registry,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received",
            "Stream messages received by the server (requests of streaming-request RPCs).",
            labels,
            registry=registry,
        )
        self.msg_sent = Counter(
            "grpc_server_msg_sent",
            "Stream messages sent by the server (responses of streaming-response RPCs).",
            labels,
            registry=registry,
        )

    def preregister(self, service: str, method: str, grpc_type: str) -> None:
        """Create the series of one method with value 0 (go-grpc-prometheus InitializeMetrics)."""
        labels = (service, method, grpc_type)
        self.started.labels(*labels)
        self.handled.labels(*labels, grpc.StatusCode.OK.name)
        self.handling_seconds.labels(*labels)
        if grpc_type in ("client_stream", "bidi_stream"):
            self.msg_received.labels(*labels)
        if grpc_type in ("server_stream", "bidi_stream"):
            self.msg_sent.labels(*labels)


# Wrapped handlers kept per method name; far more than any server here registers, so that a
# generic handler answering arbitrary names cannot grow the cache without bound.
_MAX_CACHED_METHODS = 1024


class _MethodSeries:
    """The series of one method, looked up once: ``labels()`` validates its arguments and takes
    the family's lock, which the fault path would otherwise pay several times per call."""

    __slots__ = ("_by_code", "_handled", "_labels", "received", "seconds", "sent", "started")

    def __init__(self, m: _GrpcServerMetrics, labels: tuple[str, str, str], handler: Any) -> None:
        self._labels = labels
        self._handled = m.handled
        self._by_code: dict[str, Any] = {}
        self.started = m.started.labels(*labels)
        self.seconds = m.handling_seconds.labels(*labels)
        # Message counters exist only for the streaming side(s) of a method, as when
        # preregistered: a unary method has no msg_received series at all.
        self.received = m.msg_received.labels(*labels) if handler.request_streaming else None
        self.sent = m.msg_sent.labels(*labels) if handler.response_streaming else None

    def finish(self, start: float, context: Any, err: BaseException | None) -> None:
        if isinstance(err, asyncio.CancelledError):
            code = grpc.StatusCode.CANCELLED.name
        else:
            code = _final_code(context, err)
        handled = self._by_code.get(code)
        if handled is None:
            handled = self._by_code[code] = self._handled.labels(*self._labels, code)
        handled.inc()
        self.seconds.observe(time.perf_counter() - start)


class _AioMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts, times and classifies every RPC of a ``grpc.aio`` server (go-grpc-prometheus
    names and labels).

    aio handlers are coroutines (unary responses, or streams written with ``context.write``)
    or async generators (streamed responses); request streams are async iterators. A method's
    wrapped handler is built once and reused for as long as the server hands out the same
    handler for it, so a call pays for its counters, not for building closures.
    """

    def __init__(self, metrics: _GrpcServerMetrics) -> None:
        self._m = metrics
        # method name -> (the server's handler, its wrapped form)
        self._wrapped: dict[
            str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]
        ] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED itself
            return None  # type: ignore[return-value]  # the stubs say it cannot be None; it can
        name = handler_call_details.method
        cached = self._wrapped.get(name)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(name, handler)
        if len(self._wrapped) < _MAX_CACHED_METHODS:
            self._wrapped[name] = (handler, wrapped)
        return wrapped

    def _wrap(
        self, full_method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        service, method = _split_method(full_method)
        series = _MethodSeries(self._m, (service, method, _grpc_type(handler)), handler)
        received = series.received
        started = series.started
        finish = series.finish

        async def count_requests(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            assert received is not None
            inc = received.inc
            async for request in requests:
                inc()
                yield request

        def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(behavior):

                async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                    assert series.sent is not None
                    sent = series.sent.inc
                    started.inc()
                    start = time.perf_counter()
                    if received is not None:
                        request = count_requests(request)
                    err: BaseException | None = None
                    try:
                        async for response in behavior(request, context):
                            sent()
                            yield response
                    except BaseException as e:  # GeneratorExit too: the client went away
                        err = e
                        raise
                    finally:
                        finish(start, context, err)

                return stream

            if received is not None:

                async def unary_with_requests(request: Any, context: Any) -> Any:
                    started.inc()
                    start = time.perf_counter()
                    try:
                        response = await behavior(count_requests(request), context)
                    except BaseException as e:
                        finish(start, context, e)
                        raise
                    finish(start, context, None)
                    return response

                return unary_with_requests

            async def unary(request: Any, context: Any) -> Any:
                started.inc()
                start = time.perf_counter()
                try:
                    response = await behavior(request, context)
                except BaseException as e:
                    finish(start, context, e)
                    raise
                finish(start, context, None)
                return response

            return unary

        des, ser = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), des, ser)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), des, ser)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), des, ser)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), des, ser)
        return handler


# --- HTTP exposition -----------------------------------------------------------------------


def parse_listen_address(addr: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` → ``(host, port)``; a plain ``ValueError`` if not."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"metrics listen address {addr!r}: expected HOST:PORT, e.g. 0.0.0.0:9464")
    return host.strip("[]"), int(port)


class MetricsHttpServer:
    """The ``/metrics`` endpoint, served by a thread per request on a background thread."""

    def __init__(self, addr: str, registry: CollectorRegistry) -> None:
        host, port = parse_listen_address(addr)
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
            if environ.get("PATH_INFO", "") in ("/metrics", "/metrics/"):
                return metrics_app(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"hostd serves Prometheus metrics at /metrics\n"]

        family = _address_family(host)

        class _Server(ThreadingWSGIServer):
            address_family = family

        self._httpd: WSGIServer = make_server(
            host, port, app, server_class=_Server, handler_class=_SilentHandler
        )
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="hostd-metrics-http", daemon=True
        )
        self._thread.start()

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        """The bound port (useful when the address asked for port 0)."""
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def shutdown(self) -> None:
        """Stop serving and close the socket; idempotent."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()


def _address_family(host: str) -> int:
    infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return int(infos[0][0])


# --- the public object ---------------------------------------------------------------------


def _version() -> str:
    try:
        return importlib.metadata.version("tagstore")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class TagStoreMetrics:
    """All metrics of one hostd: built on a host and the lock that serialises calls to it.

    ``registry`` defaults to a new private :class:`CollectorRegistry`. A background thread checks
    the model's invariants every ``invariant_check_interval_s`` seconds (None: only once), the
    first time at once.
    Call :meth:`close` to stop the thread and the HTTP servers.
    """

    def __init__(
        self,
        host: Host,
        lock: threading.Lock,
        registry: CollectorRegistry | None = None,
        invariant_check_interval_s: float | None = 30.0,
    ) -> None:
        if invariant_check_interval_s is not None and invariant_check_interval_s <= 0:
            raise ValueError(
                f"invariant_check_interval_s={invariant_check_interval_s}: must be positive"
            )
        self.registry = registry if registry is not None else CollectorRegistry()
        self._host = host
        self._lock = lock
        self._interval_s = invariant_check_interval_s
        self._invariants: _InvariantResult | None = None
        self._servers: list[MetricsHttpServer] = []

        self.registry.register(_HostCollector(host, lock, lambda: self._invariants))
        Info(
            "tagstore_build",
            "Build of the running hostd (value 1).",
            registry=self.registry,
        ).info({"version": _version(), "python_version": platform.python_version()})
        self._grpc = _GrpcServerMetrics(self.registry)

        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._check_loop, name="hostd-invariant-check", daemon=True
        )
        self._thread.start()

    def check_invariants_now(self) -> int:
        """Run the model's invariant check and publish it; returns violations.

        The check reads a copy-on-write image of the host in a forked child
        (:mod:`hostd.cow`): the lock is held only for the fork, so faults are not stalled by a
        check that takes seconds on a large host. A check that raises counts as one violation:
        the model could not vouch for itself.
        """
        try:
            problems = call_on_copy(self._lock, self._host.check_invariants)
            violations = len(problems)
            for problem in problems:
                _log.error("invariant violated: %s", problem)
        except Exception:
            _log.exception("invariant check failed")
            violations = 1
        self._invariants = _InvariantResult(violations, time.time())
        return violations

    def _check_loop(self) -> None:
        # With no interval the check runs once, at start (None waits for close()).
        while True:
            self.check_invariants_now()
            if self._stop.wait(self._interval_s):
                return

    def aio_server_interceptor(self) -> grpc.aio.ServerInterceptor:
        """The interceptor that records ``grpc_server_*`` metrics; pass it to
        ``grpc.aio.server`` (what hostd serves with)."""
        return _AioMetricsInterceptor(self._grpc)

    def preregister_grpc_service(self, service: Any) -> None:
        """Create zero-valued ``grpc_server_*`` series for every method of a service.

        ``service`` is a protobuf ``ServiceDescriptor`` (``tagstore_pb2.DESCRIPTOR
        .services_by_name["TagStorage"]``); optional, so that rates exist before the first call.
        """
        for method in service.methods:
            if method.client_streaming and method.server_streaming:
                kind = "bidi_stream"
            elif method.client_streaming:
                kind = "client_stream"
            elif method.server_streaming:
                kind = "server_stream"
            else:
                kind = "unary"
            self._grpc.preregister(service.full_name, method.name, kind)

    def start_http_server(self, addr: str) -> MetricsHttpServer:
        """Serve ``/metrics`` on ``addr`` (``"host:port"``, port 0 picks one) from a thread."""
        server = MetricsHttpServer(addr, self.registry)
        self._servers.append(server)
        return server

    def close(self) -> None:
        """Stop the invariant thread and the HTTP servers; idempotent."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        for server in self._servers:
            server.shutdown()
        self._servers.clear()
