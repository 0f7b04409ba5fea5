"""The monitoring stack end to end: the real hostd daemon, a real Prometheus scraping it every
second with deploy/prometheus/alerts.yml loaded, and the Grafana dashboard's queries.

Also `promtool check rules`, `promtool test rules` and `promtool check metrics`. Without
Prometheus installed these tests are skipped, except under CI (``CI`` set), where they fail:
run ``scripts/ensure_prometheus.sh`` first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from prometheus_client.parser import text_string_to_metric_families

from tagstore.v1 import tagstore_pb2 as pb
from tagstore.v1 import tagstore_pb2_grpc as pb_grpc
from tests.conftest import BOOT_RAM_GPA, GiB, HostdProcess, MiB

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY = REPO_ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tagstore.json"
JOB = "tagstore-hostd"
# Bounds how long a broken setup can hang a test; not a performance claim.
DEADLINE_S = 60.0
# What the dashboard's $__rate_interval becomes (at least four 1 s scrapes).
RATE_INTERVAL = "1m"


def require(tool: str) -> str:
    """Path of ``tool``; skip without it, but fail under CI where it must be installed."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed (scripts/ensure_prometheus.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return bytes(resp.read())


def wait_for(what: str, check: Callable[[], bool]) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


@dataclass
class Prometheus:
    """A Prometheus server subprocess and a tiny client of its HTTP API."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            body = http_get(f"{self.url}/api/v1/{path}?{query}")
        except urllib.error.HTTPError as e:  # 400/422 carry the PromQL error
            body = e.read()
        return json.loads(body)

    def query(self, expr: str) -> dict[str, Any]:
        """Instant query; asserts success and returns ``data``."""
        answer = self.api("query", query=expr)
        assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
        return dict(answer["data"])

    def vector(self, expr: str) -> list[dict[str, Any]]:
        return list(self.query(expr)["result"])


def rules_of(path: Path) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel of the dashboard."""
    doc = json.loads(DASHBOARD.read_text())
    out = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Expand Grafana variables the way Grafana would before sending the query."""
    for name, value in variables.items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    leftover = re.findall(r"\$\{?\w+", expr)
    assert not leftover, f"unexpanded Grafana variables {leftover} in {expr}"
    return expr


# --- promtool on the shipped files ------------------------------------------------------------


def test_alert_rules_pass_promtool_check_rules() -> None:
    """alerts.yml is valid and lint-clean for Prometheus."""
    promtool = require("promtool")
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_passes_its_promtool_unit_tests() -> None:
    """alerts_test.yml passes, and it tests every alert both firing and not firing."""
    promtool = require("promtool")
    result = subprocess.run(
        [promtool, "test", "rules", str(ALERTS_TEST)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ALERTS_TEST.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else silent).add(check["alertname"])
    alerts = {rule["alert"] for rule in rules_of(ALERTS)}
    assert alerts == firing
    assert alerts == silent


def test_every_alert_has_severity_summary_and_description() -> None:
    """Each rule carries the labels and annotations that routing and runbooks rely on."""
    for rule in rules_of(ALERTS):
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]


def test_the_shipped_prometheus_config_is_valid() -> None:
    """deploy/prometheus/prometheus.yml passes `promtool check config` (rules included)."""
    promtool = require("promtool")
    config = DEPLOY / "prometheus" / "prometheus.yml"
    result = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_has_a_stable_uid_and_the_variables_it_uses() -> None:
    """uid tagstore-host; datasource, instance and vm variables; every panel on $datasource."""
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "tagstore-host"
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["vm"]["definition"] == "label_values(tagstore_vm_mapped_bytes, vm)"
    for panel in doc["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]


# --- the live stack ---------------------------------------------------------------------------


@dataclass
class Stack:
    hostd: HostdProcess
    metrics_url: str
    prometheus: Prometheus
    stub: pb_grpc.TagStorageStub
    live_vms: list[str]


def run_workload(stub: pb_grpc.TagStorageStub) -> list[str]:
    """A VM lifecycle that touches every metric family; returns the VMs left running.

    A non-MTE VM fills memory so that tag storage is lent; an MTE VM's tag accesses then take
    lent blocks back (evacuation). DIMM and virtio-mem hotplug, tag copies, a NOT_FOUND error
    and a destroyed VM complete it.
    """

    def create(
        vm_id: str, mte: bool, policy: pb.TagPolicy, boot: int, slots: int = 0, max_: int = 0
    ) -> None:
        stub.CreateVm(
            pb.CreateVmRequest(
                vm_id=vm_id,
                mte_enabled=mte,
                tag_policy=policy,
                boot_memory_bytes=boot,
                dimm_slots=slots,
                max_memory_bytes=max_,
            )
        )

    def fault(vm_id: str, gpa: int, length: int, access: pb.Access) -> None:
        stub.GuestFault(pb.GuestFaultRequest(vm_id=vm_id, gpa=gpa, length=length, access=access))

    unspecified = pb.TAG_POLICY_UNSPECIFIED
    create("mon-filler", False, unspecified, GiB)
    create("mon-plain", False, unspecified, 3 * GiB)
    fault("mon-filler", BOOT_RAM_GPA, GiB, pb.ACCESS_WRITE)
    for i in range(3):
        fault("mon-plain", BOOT_RAM_GPA + i * GiB, GiB, pb.ACCESS_WRITE)
    stub.DestroyVm(pb.DestroyVmRequest(vm_id="mon-filler"))

    create("mon-mte", True, pb.TAG_POLICY_ON_FAULT, 256 * MiB, slots=2, max_=256 * MiB + GiB)
    fault("mon-mte", BOOT_RAM_GPA, 64 * MiB, pb.ACCESS_READ)
    fault("mon-mte", BOOT_RAM_GPA, 256 * MiB, pb.ACCESS_TAG)
    responses = stub.StreamGuestFaults(
        iter(
            pb.GuestFaultRequest(
                vm_id="mon-mte", gpa=BOOT_RAM_GPA + i * MiB, length=MiB, access=pb.ACCESS_WRITE
            )
            for i in range(8)
        )
    )
    assert len(list(responses)) == 8
    stub.AddMemoryDevice(
        pb.AddMemoryDeviceRequest(
            vm_id="mon-mte", device_id="dimm0", dimm=pb.DimmConfig(size_bytes=128 * MiB)
        )
    )
    device = stub.AddMemoryDevice(
        pb.AddMemoryDeviceRequest(
            vm_id="mon-mte",
            device_id="vmem0",
            virtio_mem=pb.VirtioMemConfig(
                region_size=256 * MiB, block_size=2 * MiB, requested_size=16 * MiB
            ),
        )
    )
    for kind in (pb.VIRTIO_MEM_REQUEST_TYPE_PLUG, pb.VIRTIO_MEM_REQUEST_TYPE_STATE):
        stub.VirtioMemRequest(
            pb.VirtioMemRequestRequest(
                vm_id="mon-mte", device_id="vmem0", type=kind, addr=device.gpa, nb_blocks=4
            )
        )
    stub.CopyTags(
        pb.CopyTagsRequest(
            vm_id="mon-mte",
            gpa=BOOT_RAM_GPA,
            length=4096,
            direction=pb.TAG_COPY_DIRECTION_FROM_GUEST,
        )
    )
    stub.RemoveMemoryDevice(pb.RemoveMemoryDeviceRequest(vm_id="mon-mte", device_id="dimm0"))
    with pytest.raises(Exception, match="NOT_FOUND"):
        stub.GetVm(pb.GetVmRequest(vm_id="mon-no-such-vm"))
    stub.ListVms(pb.ListVmsRequest())
    stub.GetHost(pb.GetHostRequest())
    return ["mon-mte", "mon-plain"]


def start_prometheus(tmp: Path, metrics_port: int) -> Prometheus:
    """Prometheus on a free port, scraping hostd every second, with alerts.yml loaded."""
    binary = require("prometheus")
    shutil.copy(ALERTS, tmp / "alerts.yml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = tmp / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            cwd=tmp,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    prom = Prometheus(proc, f"http://127.0.0.1:{port}", log_path)

    def ready() -> bool:
        assert proc.poll() is None, f"prometheus exited:\n{log_path.read_text()}"
        try:
            http_get(f"{prom.url}/-/ready")
        except OSError:
            return False
        return True

    wait_for("Prometheus to become ready", ready)
    return prom


@pytest.fixture(scope="module")
def stack(
    hostd_process: Callable[..., HostdProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """hostd with metrics on a free port, Prometheus scraping it, a workload in between."""
    require("prometheus")
    metrics_port = free_port()
    hostd = hostd_process("--metrics-listen", f"127.0.0.1:{metrics_port}")
    prom = start_prometheus(tmp_path_factory.mktemp("prometheus"), metrics_port)
    try:
        up = f'up{{job="{JOB}"}} == 1'
        wait_for("a first successful scrape of hostd", lambda: bool(prom.vector(up)))
        with hostd.channel() as channel:
            stub = pb_grpc.TagStorageStub(channel)
            live = run_workload(stub)
            # The workload is done when Prometheus has seen its end (the last VM count) and
            # holds enough later samples for rate() over RATE_INTERVAL.
            wait_for(
                "Prometheus to scrape the workload",
                lambda: (
                    bool(prom.vector("sum(tagstore_vms) == 2"))
                    and bool(prom.vector(f"count_over_time(up{{job='{JOB}'}}[1m]) >= 5"))
                ),
            )
            wait_for(
                "every alert rule to be evaluated",
                lambda: all(
                    r.get("health") == "ok"
                    for g in prom.api("rules")["data"]["groups"]
                    for r in g["rules"]
                ),
            )
            yield Stack(hostd, f"http://127.0.0.1:{metrics_port}/metrics", prom, stub, live)
    finally:
        prom.proc.send_signal(signal.SIGTERM)
        prom.proc.wait(timeout=DEADLINE_S)


def test_prometheus_scrapes_hostd_without_errors(stack: Stack) -> None:
    """The target is up and its last scrape was accepted (OpenMetrics or text format)."""
    targets = stack.prometheus.api("targets")["data"]["activeTargets"]
    (target,) = [t for t in targets if t["labels"]["job"] == JOB]
    assert (target["health"], target["lastError"]) == ("up", "")
    assert stack.prometheus.vector(f'scrape_samples_scraped{{job="{JOB}"}} > 100')


@pytest.mark.parametrize(("title", "expr"), dashboard_exprs())
def test_every_dashboard_query_returns_data(stack: Stack, title: str, expr: str) -> None:
    """Each panel query, with Grafana's variables expanded, returns at least one series."""
    variables = {
        "__rate_interval": RATE_INTERVAL,
        "__interval": "1s",
        "instance": ".+",
        "vm": "(" + "|".join(stack.live_vms) + ")",
    }
    result = stack.prometheus.query(substitute(expr, variables))["result"]
    assert result, f"panel {title!r}: no data for {expr}"


def test_dashboard_variables_list_the_hosts_and_vms(stack: Stack) -> None:
    """The instance and vm variables' label_values() queries find the host and its VMs."""
    vms = stack.prometheus.api("label/vm/values", **{"match[]": "tagstore_vm_mapped_bytes"})
    assert sorted(stack.live_vms) == sorted(vms["data"])
    hosts = stack.prometheus.api("label/instance/values", **{"match[]": "tagstore_build_info"})
    assert len(hosts["data"]) == 1


@pytest.mark.parametrize("rule", rules_of(ALERTS), ids=lambda r: str(r["alert"]))
def test_every_alert_expression_evaluates_on_live_data(stack: Stack, rule: dict[str, Any]) -> None:
    """Each alert's expression is a valid query over the live series (a result, no error)."""
    data = stack.prometheus.query(rule["expr"])
    assert data["resultType"] == "vector"


def test_alert_states_match_the_small_host(stack: Stack) -> None:
    """On a 4 GiB host no EAGER VM of 4 GiB fits (pending/firing); hostd is not down."""
    states = {
        r["name"]: r["state"]
        for g in stack.prometheus.api("rules")["data"]["groups"]
        for r in g["rules"]
    }
    assert states["TagStorageNearlyExhausted"] in ("pending", "firing")
    assert states["HostdDown"] == "inactive"
    assert states["InvariantCheckStale"] == "inactive"


def test_promtool_check_metrics_is_clean_on_the_live_endpoint(stack: Stack) -> None:
    """The naming linter has nothing to say about hostd's /metrics after a workload."""
    promtool = require("promtool")
    body = http_get(stack.metrics_url)
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    samples = {}
    for family in text_string_to_metric_families(http_get(url).decode()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def test_metrics_agree_with_get_host_and_list_vms(stack: Stack) -> None:
    """With the workload over, /metrics and GetHost/ListVms describe the same instant."""
    metrics = scrape(stack.metrics_url)
    host = stack.stub.GetHost(pb.GetHostRequest())
    vms = stack.stub.ListVms(pb.ListVmsRequest()).vms

    def m(name: str, **labels: str) -> float:
        return metrics[(name, frozenset(labels.items()))]

    def host_state(state: str) -> float:
        return m("tagstore_host_memory_bytes", state=state)

    states = ("free", "data", "tagged", "tag_reserved", "tag_lent", "tag_free")
    assert host.total_bytes == sum(host_state(s) for s in states)
    assert host.free_bytes == host_state("free") + host_state("tag_free")
    assert host.data_bytes == host_state("data") + host_state("tag_lent")
    assert host.tagged_bytes == host_state("tagged")
    assert host.tag_reserved_bytes == host_state("tag_reserved")
    assert host.tag_lent_bytes == host_state("tag_lent")
    assert host.tag_storage_bytes == sum(host_state(s) for s in states if s.startswith("tag_"))
    assert host.page_size == m("tagstore_page_size_bytes")
    assert host.vm_count == sum(v for (n, _), v in metrics.items() if n == "tagstore_vms")
    for region in host.regions:

        def r(state: str, name: str = region.name) -> float:
            return m("tagstore_memory_bytes", region=name, state=state)

        assert region.total_bytes == sum(r(s) for s in states)
        assert region.free_bytes == r("free") + r("tag_free")
        assert region.tagged_bytes == r("tagged")
        assert region.tag_lent_bytes == r("tag_lent")
        assert region.tagged_capacity_bytes == m(
            "tagstore_tagged_capacity_bytes", region=region.name
        )
        if region.tag_blocks_total:
            assert region.tag_blocks_reserved == m(
                "tagstore_tag_blocks_reserved", region=region.name
            )
            assert region.tag_blocks_min_needed == m(
                "tagstore_tag_blocks_min_needed", region=region.name
            )
    assert host.tag_blocks_reserved > 0
    assert sorted(stack.live_vms) == sorted(v.vm_id for v in vms)
    for vm in vms:
        assert vm.mapped_bytes == m("tagstore_vm_mapped_bytes", vm=vm.vm_id)
        assert vm.tagged_bytes == m("tagstore_vm_tagged_bytes", vm=vm.vm_id)


def test_the_workload_shows_in_the_counters(stack: Stack) -> None:
    """Evacuation, hotplug, tag copies and RPC errors of the workload reached Prometheus."""
    prom = stack.prometheus
    for expr in (
        "sum(tagstore_evacuated_pages_total) > 0",
        'tagstore_page_migrations_total{reason="evacuation"} > 0',
        'tagstore_dimm_operations_total{operation="unplug"} == 1',
        'tagstore_virtio_mem_requests_total{type="PLUG", response="ACK"} == 1',
        'tagstore_tag_copy_bytes_total{direction="FROM_GUEST"} > 0',
        'grpc_server_handled_total{grpc_method="GetVm", grpc_code="NOT_FOUND"} == 1',
        'grpc_server_msg_received_total{grpc_method="StreamGuestFaults"} == 8',
        'sum(tagstore_guest_fault_duration_seconds_count{access="TAG"}) >= 1',
        "tagstore_tag_reservation_duration_seconds_count > 0",
        "tagstore_invariant_check_timestamp_seconds > 0",
    ):
        assert prom.vector(expr), expr
