"""Unit tests of hostd.metrics against a real model Host: the collector, the event histograms,
the invariant check and the /metrics endpoint. No Prometheus server is involved here."""

from __future__ import annotations

import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from hostd.metrics import FAULT_OUTCOMES, MEMORY_STATES, TagStoreMetrics, parse_listen_address
from hostd.model import Host, default_topology
from hostd.model.types import (
    BOOT_RAM_GPA,
    Access,
    GiB,
    MiB,
    TagCopyDirection,
    TagPolicy,
    VirtioMemConfig,
    VirtioMemRequestType,
    VirtioMemResponse,
    VmConfig,
)

# Long enough that the background thread checks only once, at start; tests call
# check_invariants_now() when they need a fresh result.
NO_PERIODIC_CHECK_S = 3600.0


@pytest.fixture
def host() -> Host:
    return Host(default_topology(4 * GiB))


@pytest.fixture
def lock() -> threading.Lock:
    return threading.Lock()


@pytest.fixture
def metrics(host: Host, lock: threading.Lock) -> Iterator[TagStoreMetrics]:
    m = TagStoreMetrics(host, lock, CollectorRegistry(), NO_PERIODIC_CHECK_S)
    yield m
    m.close()


def value(m: TagStoreMetrics, name: str, **labels: str) -> float:
    """One sample of the registry; fails the test when the series does not exist."""
    v = m.registry.get_sample_value(name, labels)
    assert v is not None, f"no sample {name}{labels}"
    return v


def run_workload(host: Host, lock: threading.Lock) -> None:
    """An MTE VM with a DIMM and virtio-mem, a non-MTE VM, faults of every access, tag copies."""
    with lock:
        host.create_vm(
            VmConfig(
                "mte-a",
                True,
                TagPolicy.ON_FAULT,
                boot_memory_bytes=256 * MiB,
                dimm_slots=2,
                max_memory_bytes=2 * GiB,
            )
        )
        host.create_vm(VmConfig("plain-b", False, boot_memory_bytes=256 * MiB))
        host.create_vm(VmConfig("eager-c", True, TagPolicy.EAGER, boot_memory_bytes=128 * MiB))
        host.guest_fault("plain-b", BOOT_RAM_GPA, 256 * MiB, Access.WRITE)
        host.guest_fault("mte-a", BOOT_RAM_GPA, 64 * MiB, Access.READ)
        host.guest_fault("mte-a", BOOT_RAM_GPA, 128 * MiB, Access.TAG)
        host.add_dimm("mte-a", "dimm0", 128 * MiB)
        dev = host.add_virtio_mem("mte-a", "vmem0", VirtioMemConfig(512 * MiB, 2 * MiB, 64 * MiB))
        host.virtio_mem_request("mte-a", "vmem0", VirtioMemRequestType.PLUG, dev.gpa, 4)
        host.copy_tags("mte-a", BOOT_RAM_GPA, 4096, TagCopyDirection.FROM_GUEST)


def test_each_region_is_partitioned_by_the_six_states(
    metrics: TagStoreMetrics, host: Host, lock: threading.Lock
) -> None:
    """Per region, the state gauges add up to the region's memory (data + tag storage)."""
    run_workload(host, lock)
    for region in host.status().regions:
        total = sum(
            value(metrics, "tagstore_memory_bytes", region=region.name, state=s)
            for s in MEMORY_STATES
        )
        assert region.memory_size_bytes + region.tag_size_bytes == total


def test_host_states_are_the_sum_of_the_region_states(
    metrics: TagStoreMetrics, host: Host, lock: threading.Lock
) -> None:
    """tagstore_host_memory_bytes{state} equals the sum over regions, and its total is all RAM."""
    run_workload(host, lock)
    regions = [r.name for r in host.status().regions]
    for state in MEMORY_STATES:
        per_region = sum(
            value(metrics, "tagstore_memory_bytes", region=r, state=state) for r in regions
        )
        assert per_region == value(metrics, "tagstore_host_memory_bytes", state=state)
    total = sum(value(metrics, "tagstore_host_memory_bytes", state=s) for s in MEMORY_STATES)
    assert host.topology.total_bytes == total


def test_gauges_equal_host_status_after_a_workload(
    metrics: TagStoreMetrics, host: Host, lock: threading.Lock
) -> None:
    """Every state gauge is the value host.status() reports at the same instant."""
    run_workload(host, lock)
    status = host.status()
    assert status.usage.tagged_bytes == value(metrics, "tagstore_host_memory_bytes", state="tagged")
    assert status.usage.tag_lent_bytes == value(
        metrics, "tagstore_host_memory_bytes", state="tag_lent"
    )
    assert status.page_size_bytes == value(metrics, "tagstore_page_size_bytes")
    for r in status.regions:
        assert r.tagged_capacity_bytes == value(
            metrics, "tagstore_tagged_capacity_bytes", region=r.name
        )
        if r.tag_blocks_total:
            assert r.tag_blocks_total == value(metrics, "tagstore_tag_blocks", region=r.name)
            assert r.tag_blocks_reserved == value(
                metrics, "tagstore_tag_blocks_reserved", region=r.name
            )
            assert r.tag_blocks_min_needed == value(
                metrics, "tagstore_tag_blocks_min_needed", region=r.name
            )
    assert status.tag_blocks_reserved > 0


def test_untaggable_ranges_have_no_tag_block_series(metrics: TagStoreMetrics, host: Host) -> None:
    """Ranges without tag storage report memory but no tag block gauges."""
    untagged = [r.name for r in host.status().regions if not r.tag_blocks_total]
    assert untagged
    for name in untagged:
        assert metrics.registry.get_sample_value("tagstore_tag_blocks", {"region": name}) is None
        assert value(metrics, "tagstore_memory_bytes", region=name, state="free") > 0


def test_a_scrape_reads_the_model_at_scrape_time(
    metrics: TagStoreMetrics, host: Host, lock: threading.Lock
) -> None:
    """Nothing is cached: a change of the model shows in the very next scrape."""
    assert value(metrics, "tagstore_host_memory_bytes", state="tagged") == 0
    run_workload(host, lock)
    assert host.status().usage.tagged_bytes == value(
        metrics, "tagstore_host_memory_bytes", state="tagged"
    )


def test_counters_equal_host_counters(
    metrics: TagStoreMetrics, host: Host, lock: threading.Lock
) -> None:
    """Each counter family is derived from HostCounters with the same keys."""
    run_workload(host, lock)
    c = host.counters
    for (access, outcome), n in c.faults.items():
        assert n == value(metrics, "tagstore_guest_faults_total", access=access, outcome=outcome)
    for region, n in c.tag_blocks_reserved.items():
        assert n == value(metrics, "tagstore_tag_block_reservations_total", region=region)
    for kind, n in c.cache_maintenance_bytes.items():
        assert n == value(metrics, "tagstore_cache_maintenance_bytes_total", kind=kind)
    for (typ, resp), n in c.virtio_mem_requests.items():
        assert n == value(metrics, "tagstore_virtio_mem_requests_total", type=typ, response=resp)
    assert c.dimm_operations["plug"] == value(
        metrics, "tagstore_dimm_operations_total", operation="plug"
    )
    assert c.tags_copied_bytes["FROM_GUEST"] == value(
        metrics, "tagstore_tag_copy_bytes_total", direction="FROM_GUEST"
    )
    assert c.fault_replays == value(metrics, "tagstore_fault_replays_total")
    assert sum(c.tag_blocks_reserved.values()) > 0


def test_known_label_values_exist_with_zero_before_the_first_event(
    metrics: TagStoreMetrics,
) -> None:
    """rate() needs a series before its first increment: known label values start at 0."""
    for access in Access:
        for outcome in FAULT_OUTCOMES:
            assert (
                value(metrics, "tagstore_guest_faults_total", access=access.value, outcome=outcome)
                == 0
            )
        assert (
            value(metrics, "tagstore_guest_fault_duration_seconds_count", access=access.value) == 0
        )
    for typ in VirtioMemRequestType:
        for resp in VirtioMemResponse:
            assert (
                value(
                    metrics,
                    "tagstore_virtio_mem_requests_total",
                    type=typ.value,
                    response=resp.value,
                )
                == 0
            )
    for region in ("tag0", "tag1"):
        for name in (
            "tagstore_tag_block_reservations_total",
            "tagstore_tag_block_releases_total",
            "tagstore_tag_block_reserve_failures_total",
            "tagstore_evacuated_pages_total",
        ):
            assert value(metrics, name, region=region) == 0
    for reason in ("evacuation", "tag_access", "reserve_failed"):
        assert value(metrics, "tagstore_page_migrations_total", reason=reason) == 0
    assert value(metrics, "tagstore_tag_reservation_duration_seconds_count") == 0


def test_vms_are_counted_by_policy_and_non_mte_vms_have_policy_none(
    metrics: TagStoreMetrics, host: Host, lock: threading.Lock
) -> None:
    """tagstore_vms{tag_policy,mte}: one series per policy for MTE VMs, NONE without MTE."""
    run_workload(host, lock)
    assert value(metrics, "tagstore_vms", tag_policy="ON_FAULT", mte="true") == 1
    assert value(metrics, "tagstore_vms", tag_policy="EAGER", mte="true") == 1
    assert value(metrics, "tagstore_vms", tag_policy="ON_TAG_ACCESS", mte="true") == 0
    assert value(metrics, "tagstore_vms", tag_policy="NONE", mte="false") == 1


def test_per_vm_series_follow_the_vm_and_vanish_with_it(
    metrics: TagStoreMetrics, host: Host, lock: threading.Lock
) -> None:
    """tagstore_vm_*_bytes{vm} equal VmStatus, and a destroyed VM's series disappear."""
    run_workload(host, lock)
    for vm in host.list_vms():
        assert vm.mapped_bytes == value(metrics, "tagstore_vm_mapped_bytes", vm=vm.vm_id)
        assert vm.tagged_bytes == value(metrics, "tagstore_vm_tagged_bytes", vm=vm.vm_id)
    with lock:
        host.destroy_vm("plain-b")
    assert metrics.registry.get_sample_value("tagstore_vm_mapped_bytes", {"vm": "plain-b"}) is None
    assert (
        metrics.registry.get_sample_value("tagstore_vm_mapped_bytes", {"vm": "mte-a"}) is not None
    )


def test_each_guest_fault_is_observed_once_by_access(
    metrics: TagStoreMetrics, host: Host, lock: threading.Lock
) -> None:
    """The fault histogram counts one observation per guest_fault call, labelled by access."""
    run_workload(host, lock)
    assert value(metrics, "tagstore_guest_fault_duration_seconds_count", access="WRITE") == 1
    assert value(metrics, "tagstore_guest_fault_duration_seconds_count", access="READ") == 1
    assert value(metrics, "tagstore_guest_fault_duration_seconds_count", access="TAG") == 1
    faults = sum(host.counters.faults.values())
    observed = sum(
        value(metrics, "tagstore_guest_fault_duration_seconds_count", access=a.value)
        for a in Access
    )
    assert faults == observed


def test_tag_reservations_are_observed(
    metrics: TagStoreMetrics, host: Host, lock: threading.Lock
) -> None:
    """Every batch of reserved tag blocks is timed in tagstore_tag_reservation_duration_seconds."""
    run_workload(host, lock)
    assert value(metrics, "tagstore_tag_reservation_duration_seconds_count") >= 1


def test_metrics_add_no_work_to_model_calls(host: Host, lock: threading.Lock) -> None:
    """The model keeps its own latency histograms: metrics subscribe to no model event, so a
    fault pays nothing for them; close() is idempotent."""
    m = TagStoreMetrics(host, lock, CollectorRegistry(), NO_PERIODIC_CHECK_S)
    assert [] == host._subscribers
    run_workload(host, lock)
    m.close()
    m.close()
    assert value(m, "tagstore_guest_fault_duration_seconds_count", access="READ") >= 1


def test_a_sound_model_reports_zero_invariant_violations(
    metrics: TagStoreMetrics, host: Host, lock: threading.Lock
) -> None:
    """check_invariants_now() publishes the violation count and the time of the check."""
    run_workload(host, lock)
    assert metrics.check_invariants_now() == 0
    assert value(metrics, "tagstore_invariant_violations") == 0
    assert value(metrics, "tagstore_invariant_check_timestamp_seconds") > 0


class _BrokenHost(Host):
    """A host whose invariant check finds two violations or raises."""

    raise_in_check = False

    def check_invariants(self) -> list[str]:
        if self.raise_in_check:
            raise RuntimeError("checker bug")
        return ["first broken rule", "second broken rule"]


def test_invariant_violations_are_counted() -> None:
    """tagstore_invariant_violations is the number of violations of the last check."""
    m = TagStoreMetrics(
        _BrokenHost(default_topology(4 * GiB)),
        threading.Lock(),
        CollectorRegistry(),
        NO_PERIODIC_CHECK_S,
    )
    try:
        assert m.check_invariants_now() == 2
        assert value(m, "tagstore_invariant_violations") == 2
    finally:
        m.close()


def test_an_invariant_check_that_raises_counts_as_one_violation() -> None:
    """A check that crashes cannot vouch for the model: it reports one violation."""
    host = _BrokenHost(default_topology(4 * GiB))
    host.raise_in_check = True
    m = TagStoreMetrics(host, threading.Lock(), CollectorRegistry(), NO_PERIODIC_CHECK_S)
    try:
        assert m.check_invariants_now() == 1
        assert value(m, "tagstore_invariant_violations") == 1
    finally:
        m.close()


def test_the_first_invariant_check_runs_at_start(host: Host, lock: threading.Lock) -> None:
    """The background thread checks at once; close() waits for it, so the result is there."""
    m = TagStoreMetrics(host, lock, CollectorRegistry(), NO_PERIODIC_CHECK_S)
    m.close()
    assert value(m, "tagstore_invariant_violations") == 0


def test_invariant_check_interval_must_be_positive(host: Host, lock: threading.Lock) -> None:
    """A non-positive interval is misuse: plain ValueError naming the parameter."""
    with pytest.raises(ValueError, match="invariant_check_interval_s"):
        TagStoreMetrics(host, lock, CollectorRegistry(), 0)


def test_the_registry_is_injected_and_the_global_one_is_untouched(
    host: Host, lock: threading.Lock
) -> None:
    """Two TagStoreMetrics in one process do not collide and never touch REGISTRY."""
    a = TagStoreMetrics(host, lock, CollectorRegistry(), NO_PERIODIC_CHECK_S)
    b = TagStoreMetrics(host, lock, None, NO_PERIODIC_CHECK_S)
    try:
        assert a.registry is not b.registry
        assert b.registry is not REGISTRY
        assert REGISTRY.get_sample_value("tagstore_page_size_bytes") is None
        assert value(b, "tagstore_page_size_bytes") == 4096
    finally:
        a.close()
        b.close()


def test_build_info_names_version_and_python(metrics: TagStoreMetrics) -> None:
    """tagstore_build_info is 1 with the package and Python versions as labels."""
    families = {f.name: f for f in metrics.registry.collect()}
    (sample,) = families["tagstore_build"].samples
    assert sample.name == "tagstore_build_info"
    assert sample.value == 1
    assert {"version", "python_version"} == set(sample.labels)


def test_every_family_has_help_and_follows_unit_suffix_rules(
    metrics: TagStoreMetrics, host: Host, lock: threading.Lock
) -> None:
    """Names: tagstore_/grpc_server_ prefix, help text, base units, no vm label except per VM."""
    run_workload(host, lock)
    for family in metrics.registry.collect():
        assert family.documentation, family.name
        assert family.name.startswith(("tagstore_", "grpc_server_")), family.name
        assert not family.name.endswith(("_ms", "_milliseconds", "_kib", "_mib")), family.name
        for sample in family.samples:
            if "vm" in sample.labels:
                assert family.name in ("tagstore_vm_mapped_bytes", "tagstore_vm_tagged_bytes")


# --- the /metrics endpoint ---------------------------------------------------------------------


def test_metrics_endpoint_serves_the_registry_and_nothing_else(
    metrics: TagStoreMetrics, host: Host, lock: threading.Lock
) -> None:
    """GET /metrics returns the text format; other paths are 404; shutdown() frees the port."""
    run_workload(host, lock)
    server = metrics.start_http_server("127.0.0.1:0")
    with urllib.request.urlopen(server.url) as resp:
        body = resp.read().decode()
    names = {f.name for f in text_string_to_metric_families(body)}
    assert {"tagstore_memory_bytes", "tagstore_guest_faults", "grpc_server_handled"} <= names
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/")
    assert e.value.code == 404
    server.shutdown()
    server.shutdown()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=5)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_finds_nothing_to_lint_in_the_exposition(
    metrics: TagStoreMetrics, host: Host, lock: threading.Lock
) -> None:
    """`promtool check metrics` (the Prometheus naming linter) reports no problem."""
    run_workload(host, lock)
    server = metrics.start_http_server("127.0.0.1:0")
    with urllib.request.urlopen(server.url) as resp:
        body = resp.read()
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::1]:9464", ("::1", 9464)),
        ("localhost:80", ("localhost", 80)),
    ],
)
def test_listen_address_is_host_colon_port(addr: str, expected: tuple[str, int]) -> None:
    """HOST:PORT and [IPv6]:PORT are accepted."""
    assert expected == parse_listen_address(addr)


@pytest.mark.parametrize("addr", ["9464", ":9464", "host:", "host:http", "host:70000"])
def test_a_listen_address_without_host_and_port_is_refused(addr: str) -> None:
    """Anything else is a ValueError that quotes the address."""
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen_address(addr)
