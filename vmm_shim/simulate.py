"""``vmm-shim simulate SCENARIO``: drive a mix of VMs through their lives against hostd.

The scenario (:mod:`vmm_shim.scenario`) and the seed give a :class:`~vmm_shim.scenario.Plan`;
:class:`Simulator` carries it out through :mod:`vmm_shim` calls only (create; boot faults;
working-set faults with ``fault_stream``; tag writes with ``copy_tags_to_guest``; virtio-mem
resizes then ``drive_virtio_mem``; DIMM add/remove; destroy), samples the host after every step
and ends with checks. The guest addresses a VM touches come from its own seeded generator, so
the same scenario, seed and topology give the same calls, the same answers and the same
summary (all but the latency and wall-time figures, see :data:`TIMING_KEYS`).

Summary figures (``RunResult.summary``):

- ``ram_given_back_mean`` / ``_min``: (tag storage bytes - tag reserved bytes) / host RAM,
  sampled after every step (0 under the static carve-out, which never lends tag storage).
- ``reserved_over_min_needed_mean``: tag reserved bytes / (sum over regions of
  ``tag_blocks_min_needed`` x block bytes), averaged over the samples where tags were needed.
- ``evacuated_pages_per_gib``: pages evacuated out of tag storage (the daemon's ``evacuation``
  events on ``WatchEvents``; the counters are not in the API) per GiB of guest memory mapped
  over the run (each VM's, DIMM's and virtio-mem block's ``mapped_bytes`` when it is given
  back: every byte that was populated, counted once).
- ``tag_reserve_failed_blocks``: tag blocks whose reservation failed (``tag_reserve_failed``
  events; the fault was replayed elsewhere), and ``resource_exhausted``: calls refused with
  RESOURCE_EXHAUSTED, by kind (``create``, ``faults``, ``dimm_add`` ...).
- ``virtio_mem_nacks``: PLUG requests answered NACK while driving virtio-mem devices (only
  "beyond requested_size"); ``virtio_mem_busy``: answered BUSY (a preallocating device that
  could not back the blocks; the guest retries later).
- ``discarded_bytes``: memory guests gave back through free page reporting (DiscardGuestMemory);
  ``huge_page_share``: of the guest memory mapped when VMs were destroyed, the share backed by
  whole huge folios (THP by default).
- ``fault_latency_p50_us`` / ``_p99_us``: client-side latency of each fault.
- checks: ``invariant_violations`` (``CheckInvariants`` at the end) and ``host_back_to_start``
  (after every VM is destroyed: the same free, data, tagged, reserved and lent bytes as before
  the first VM, hence no reservation left in dynamic mode).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vmm_shim.client import (
    BOOT_RAM_GPA,
    HostClient,
    HostInfo,
    ResourceExhausted,
    TagStoreClientError,
    VmHandle,
)
from vmm_shim.scenario import (
    HUGETLB_BYTES,
    POLICIES,
    THP_BYTES,
    Action,
    Plan,
    Scenario,
    ScenarioError,
    VmClass,
    VmPlan,
    find_scenario,
    load_scenario,
    make_plan,
)
from vmm_shim.units import GiB, format_size, one_line, parse_size

__all__ = [
    "TIMING_KEYS",
    "HostdServer",
    "RunConfig",
    "RunResult",
    "Simulator",
    "add_cli",
    "checks_pass",
    "deterministic_summary",
    "format_summary",
    "run_scenario",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
PLACEMENTS = ("tag-block-aware", "naive")
TAG_STORAGE_MODES = ("dynamic", "static")
# Summary fields that measure time: excluded when runs are compared for determinism.
TIMING_KEYS = frozenset({"fault_latency_p50_us", "fault_latency_p99_us", "wall_seconds"})
VIRTIO_MEM_DEVICE = "vmem0"
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
EVENT_SYNC_TIMEOUT_S = 10.0
# Per-call deadline: a fault_stream of a few hundred faults on a loaded 2-core machine.
CALL_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class RunConfig:
    """The host topology and the policy under test. ``policy`` is the tag policy given to MTE
    VMs of "inherit" classes; under ``tag_storage="static"`` it is ON_FAULT (the carve-out
    reserves everything at boot, so when tags are provided does not change reservations)."""

    memory: int
    page_size: str = "4K"
    placement: str = "tag-block-aware"
    tag_storage: str = "dynamic"
    policy: str = "ON_FAULT"

    @property
    def label(self) -> str:
        """``STATIC`` or the policy name, as the report's rows name runs."""
        return "STATIC" if self.tag_storage == "static" else self.policy


@dataclass
class RunResult:
    """What one run gives: the config, the summary, and the per-step samples (``series``)."""

    scenario: str
    seed: int
    config: RunConfig
    summary: dict[str, Any]
    series: dict[str, list[int]]

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "seed": self.seed,
            "config": asdict(self.config),
            "label": self.config.label,
            "summary": self.summary,
            "series": self.series,
        }


def deterministic_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary without its timing figures: equal for runs with the same inputs."""
    return {k: v for k, v in summary.items() if k not in TIMING_KEYS}


# -- the daemon --------------------------------------------------------------------------------


class HostdServer:
    """A ``hostd serve`` subprocess on a unix socket in a fresh temp dir; a context manager.

    The daemon's log goes to a file in that dir; :meth:`log_tail` shows it when it fails.
    """

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.dir = Path(tempfile.mkdtemp(prefix="tagstore-sim-", dir="/tmp"))
        self.address = f"unix:{self.dir}/hostd.sock"
        self.log_path = self.dir / "hostd.log"
        # The daemon makes its admin token here at start; the simulator drives it with that.
        self.token_path = self.dir / "admin.token"
        self.token = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> HostdServer:
        args = [
            sys.executable,
            "-m",
            "hostd",
            "serve",
            "--listen",
            self.address,
            "--admin-token-file",
            str(self.token_path),
            "--metrics-listen",
            "",
            "--ephemeral",  # a simulation's host is thrown away with it
            "--memory",
            str(self.config.memory),
            "--page-size",
            self.config.page_size,
            "--placement",
            self.config.placement,
            "--tag-storage",
            self.config.tag_storage,
        ]
        repo = Path(__file__).resolve().parents[1]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                args,
                cwd=repo if (repo / "hostd").is_dir() else None,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        with HostClient(self.address, timeout_s=1.0) as client:
            while not client.health():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"hostd did not start (exit code {self.proc.returncode})\n{self.log_tail()}"
                    )
                time.sleep(0.05)
        self.token = self.token_path.read_text().strip()
        return self

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; removes the temp dir."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> HostdServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# -- events ------------------------------------------------------------------------------------


class EventTally:
    """Sums ``WatchEvents`` counts by kind on a background thread (evacuations, failed
    reservations: the daemon exposes no counters through the API)."""

    def __init__(self, client: HostClient) -> None:
        self.counts: dict[str, int] = {}
        self.events: dict[str, int] = {}
        self.dropped = 0
        self.error: str = ""
        self._cond = threading.Condition()
        self._stream = client.watch_events()
        self._thread = threading.Thread(target=self._run, name="event-tally", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self._stream:
                with self._cond:
                    self.counts[event.kind] = self.counts.get(event.kind, 0) + event.count
                    self.events[event.kind] = self.events.get(event.kind, 0) + 1
                    self.dropped = max(self.dropped, event.dropped_events)
                    self._cond.notify_all()
        except TagStoreClientError as e:
            self.error = str(e)

    def wait_for(self, kind: str, n_events: int, timeout: float) -> bool:
        """Block until ``n_events`` events of ``kind`` were seen (the stream is in order, so
        everything caused before them has been counted too)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.events.get(kind, 0) >= n_events, timeout)

    def close(self) -> None:
        self._stream.cancel()
        self._thread.join(5.0)


# -- the simulator -----------------------------------------------------------------------------


@dataclass
class _Vm:
    """A live VM as the simulator tracks it: its handle, class, generator and working set."""

    plan: VmPlan
    cls: VmClass
    handle: VmHandle
    rng: np.random.Generator
    # Working-set chunks by memory region ("boot", "vmem0", "dimm<n>"): (gpa, length) rows.
    pools: dict[str, np.ndarray] = field(default_factory=dict)
    dimms: list[str] = field(default_factory=list)
    next_dimm: int = 0
    vmem_gpa: int = 0
    vmem_plugged: int = 0


class _Progress:
    """A one-line progress bar on stderr (only when enabled)."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label = label
        self.total = max(total, 1)
        self.enabled = enabled
        self._last = 0.0

    def update(self, done: int, text: str = "", *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        width = 30
        filled = width * done // self.total
        bar = "#" * filled + "." * (width - filled)
        sys.stderr.write(f"\r{self.label} [{bar}] {done}/{self.total} {text}\x1b[K")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _chunks(gpa: int, size: int, chunk: int) -> np.ndarray:
    """(gpa, length) rows covering ``[gpa, gpa + size)`` in ``chunk``-sized pieces."""
    starts = np.arange(gpa, gpa + size, chunk, dtype=np.int64)
    lengths = np.minimum(chunk, gpa + size - starts)
    return np.stack([starts, lengths], axis=1) if starts.size else np.empty((0, 2), np.int64)


def _working_set(rng: np.random.Generator, rows: np.ndarray, share: float) -> np.ndarray:
    """A random ``share`` of ``rows`` (at least one if there are any), in address order."""
    if rows.shape[0] == 0 or share <= 0:
        return rows[:0]
    k = max(1, round(share * rows.shape[0]))
    pick = np.sort(rng.choice(rows.shape[0], size=k, replace=False))
    return rows[pick]


class Simulator:
    """Carries out a :class:`Plan` on a host through ``client``; one use per instance.

    ``calls`` is the call log: one line per call, with its answer (``ok`` or the error code).
    """

    def __init__(
        self,
        client: HostClient,
        scenario: Scenario,
        plan: Plan,
        config: RunConfig,
        *,
        progress: bool = False,
    ) -> None:
        self.client = client
        self.scenario = scenario
        self.plan = plan
        self.config = config
        self.classes = {c.name: c for c in scenario.classes}
        self.vms: dict[str, _Vm] = {}
        self.calls: list[str] = []
        self.latencies: list[float] = []
        self.resource_exhausted: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.counts: dict[str, int] = {
            "vms_created": 0,
            "vms_destroyed": 0,
            "vm_create_failed": 0,
            "faults": 0,
            "faults_refused": 0,
            "tag_writes": 0,
            "resizes": 0,
            "virtio_mem_acks": 0,
            "virtio_mem_nacks": 0,
            "virtio_mem_busy": 0,
            "dimms_added": 0,
            "dimms_removed": 0,
            "guest_mapped_bytes": 0,
            "discards": 0,
            "discarded_bytes": 0,
            "mapped_at_destroy_bytes": 0,
            "huge_at_destroy_bytes": 0,
        }
        self.series: dict[str, list[int]] = {
            k: []
            for k in (
                "step",
                "tag_storage_bytes",
                "tag_reserved_bytes",
                "min_needed_bytes",
                "tag_lent_bytes",
                "free_bytes",
                "tagged_bytes",
                "vm_count",
            )
        }
        self._progress = _Progress(
            f"{scenario.name} {config.label} {config.placement}", plan.steps, progress
        )
        self.page_size = 0

    # -- bookkeeping

    def _log(self, line: str, error: TagStoreClientError | None = None) -> None:
        self.calls.append(f"{line} -> {error.code if error else 'ok'}")

    def _refused(self, kind: str, error: TagStoreClientError) -> None:
        if isinstance(error, ResourceExhausted):
            self.resource_exhausted[kind] = self.resource_exhausted.get(kind, 0) + 1
        else:
            key = f"{kind}:{error.code}:{error.reason}"
            self.errors[key] = self.errors.get(key, 0) + 1

    def _call(self, kind: str, line: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """Run one client call; a refusal is logged and counted, not raised."""
        try:
            result = fn()
        except TagStoreClientError as e:
            self._log(line, e)
            self._refused(kind, e)
            return False, None
        self._log(line)
        return True, result

    def _sample(self, step: int, status: HostInfo) -> None:
        s = self.series
        s["step"].append(step)
        s["tag_storage_bytes"].append(status.tag_storage_bytes)
        s["tag_reserved_bytes"].append(status.tag_reserved_bytes)
        s["min_needed_bytes"].append(
            sum(r.tag_blocks_min_needed * r.block_size for r in status.regions)
        )
        s["tag_lent_bytes"].append(status.tag_lent_bytes)
        s["free_bytes"].append(status.free_bytes)
        s["tagged_bytes"].append(status.tagged_bytes)
        s["vm_count"].append(status.vm_count)

    # -- actions

    def _max_memory(self, vm: VmPlan, cls: VmClass) -> int:
        extra = 0
        if cls.virtio_mem:
            extra += cls.virtio_mem.region_size + cls.virtio_mem.block_size
        if cls.dimm:
            extra += cls.dimm.slots * cls.dimm.size
        return vm.boot_memory + extra if extra else 0

    def _fault(self, vm: _Vm, gpa: int, length: int, access: str) -> bool:
        line = f"fault {vm.plan.vm_id} {gpa:#x}+{length:#x} {access}"
        ok, outcome = self._call("faults", line, lambda: vm.handle.fault(gpa, length, access))
        self.counts["faults"] += 1
        if ok:
            self.latencies.append(outcome.seconds)
        else:
            self.counts["faults_refused"] += 1
        return ok

    def _create(self, plan: VmPlan) -> None:
        cls = self.classes[plan.cls]
        line = (
            f"create {plan.vm_id} mte={int(plan.mte)} policy={plan.policy or '-'} "
            f"boot={plan.boot_memory:#x} backing={plan.backing} pinned={int(plan.pinned)}"
        )
        slots = cls.dimm.slots if cls.dimm else 0
        backing = {"small": 0, "thp": THP_BYTES, "hugetlb": HUGETLB_BYTES}[plan.backing]
        backing_bytes = backing[self.page_size] if backing else 0
        ok, handle = self._call(
            "create",
            line,
            lambda: self.client.create_vm(
                plan.vm_id,
                mte_enabled=plan.mte,
                tag_policy=plan.policy or None,
                boot_memory_bytes=plan.boot_memory,
                dimm_slots=slots,
                max_memory_bytes=self._max_memory(plan, cls),
                pinned=plan.pinned,
                backing_page_size=backing_bytes,
            ),
        )
        if not ok:
            self.counts["vm_create_failed"] += 1
            return
        self.counts["vms_created"] += 1
        vm = _Vm(plan, cls, handle, np.random.default_rng(plan.seed))
        self.vms[plan.vm_id] = vm
        boot_rows = _chunks(BOOT_RAM_GPA, plan.boot_memory, cls.fault_size)
        vm.pools["boot"] = _working_set(vm.rng, boot_rows, cls.working_set)
        # Boot: the kernel and early user space touch the start of RAM (in <= 1 GiB faults).
        touch = int(plan.boot_memory * cls.boot_touch) // cls.fault_size * cls.fault_size
        for gpa, length in _chunks(BOOT_RAM_GPA, touch, 1 << 30):
            if not self._fault(vm, int(gpa), int(length), "WRITE"):
                break
        if cls.virtio_mem:
            vcfg = cls.virtio_mem
            ok, dev = self._call(
                "virtio_mem_add",
                f"virtio-mem add {plan.vm_id} region={vcfg.region_size:#x} "
                f"block={vcfg.block_size:#x}",
                lambda: vm.handle.add_virtio_mem(
                    VIRTIO_MEM_DEVICE,
                    region_size=vcfg.region_size,
                    block_size=vcfg.block_size,
                    prealloc=vcfg.prealloc,
                ),
            )
            if ok:
                vm.vmem_gpa = dev.gpa
                if vcfg.requested:
                    self._resize(vm, vcfg.requested)

    def _accesses(self, vm: _Vm, n: int) -> list[str]:
        read, write, tag = vm.cls.access
        if not vm.plan.mte:
            read, tag = read + tag, 0.0
        picks = vm.rng.choice(3, size=n, p=[read, write, tag])
        names = ("READ", "WRITE", "TAG")
        return [names[int(i)] for i in picks]

    def _faults(self, vm: _Vm, n: int) -> None:
        pool = np.concatenate([vm.pools[k] for k in sorted(vm.pools)])
        if pool.shape[0] == 0:
            return
        rows = pool[vm.rng.integers(0, pool.shape[0], size=n)]
        accesses = self._accesses(vm, n)
        faults = [(int(g), int(ln), a) for (g, ln), a in zip(rows, accesses, strict=True)]
        done = 0
        error: TagStoreClientError | None = None
        try:
            for outcome in vm.handle.fault_stream(faults, timeout_s=CALL_TIMEOUT_S):
                self.latencies.append(outcome.seconds)
                done += 1
        except TagStoreClientError as e:
            error = e
            self._refused("faults", e)
        self.counts["faults"] += done + (1 if error else 0)
        if error:
            self.counts["faults_refused"] += 1
        digest = hashlib.sha256(repr(faults).encode()).hexdigest()[:16]
        self._log(f"fault_stream {vm.plan.vm_id} n={n} done={done} faults={digest}", error)

    def _tag_write(self, vm: _Vm, size: int) -> None:
        boot = vm.plan.boot_memory
        pool = vm.pools["boot"]
        start = int(pool[int(vm.rng.integers(pool.shape[0])), 0]) if pool.shape[0] else 0
        gpa = min(start, BOOT_RAM_GPA + boot - size)
        tags = vm.rng.integers(0, 16, size=size // 16, dtype=np.uint8).tobytes()
        self.counts["tag_writes"] += 1
        self._call(
            "tag_write",
            f"tags write {vm.plan.vm_id} {gpa:#x}+{size:#x}",
            lambda: vm.handle.copy_tags_to_guest(gpa, tags),
        )

    def _discard(self, vm: _Vm, size: int) -> None:
        """Free page reporting: the guest gives ``size`` bytes of its boot RAM back."""
        boot = vm.plan.boot_memory
        pool = vm.pools["boot"]
        start = int(pool[int(vm.rng.integers(pool.shape[0])), 0]) if pool.shape[0] else 0
        gpa = max(BOOT_RAM_GPA, min(start, BOOT_RAM_GPA + boot - size))
        ok, outcome = self._call(
            "discard",
            f"discard {vm.plan.vm_id} {gpa:#x}+{size:#x}",
            lambda: vm.handle.discard(gpa, size),
        )
        if ok:
            self.counts["discards"] += 1
            self.counts["discarded_bytes"] += outcome.discarded_bytes
            # Memory given back is counted as mapped once, like memory unplugged.
            self.counts["guest_mapped_bytes"] += outcome.discarded_bytes

    def _resize(self, vm: _Vm, size: int) -> None:
        vid = vm.plan.vm_id
        if not vm.vmem_gpa:
            return
        cfg = vm.cls.virtio_mem
        assert cfg is not None
        ok, before = self._call(
            "resize", f"virtio-mem show {vid}", lambda: vm.handle.device(VIRTIO_MEM_DEVICE)
        )
        if not ok:
            return
        self.counts["resizes"] += 1
        ok, _ = self._call(
            "resize",
            f"virtio-mem resize {vid} {size:#x}",
            lambda: vm.handle.resize_virtio_mem(VIRTIO_MEM_DEVICE, size),
        )
        if not ok:
            return
        ok, drive = self._call(
            "resize", f"virtio-mem drive {vid}", lambda: vm.handle.drive_virtio_mem("vmem0")
        )
        if not ok:
            return
        self.counts["virtio_mem_acks"] += drive.acks
        self.counts["virtio_mem_nacks"] += drive.nacks
        self.counts["virtio_mem_busy"] += drive.busy
        self.calls[-1] += f" plugged={drive.plugged_size:#x} nacks={drive.nacks}"
        ok, after = self._call(
            "resize", f"virtio-mem show {vid}", lambda: vm.handle.device(VIRTIO_MEM_DEVICE)
        )
        if ok:
            # Memory unplugged is given back: count what was mapped in it.
            self.counts["guest_mapped_bytes"] += max(0, before.mapped_bytes - after.mapped_bytes)
        old, new = vm.vmem_plugged, drive.plugged_size
        vm.vmem_plugged = new
        pool = vm.pools.get(VIRTIO_MEM_DEVICE, np.empty((0, 2), np.int64))
        chunk = min(vm.cls.fault_size, cfg.block_size)
        if new > old:
            rows = _chunks(vm.vmem_gpa + old, new - old, chunk)
            pool = np.concatenate([pool, _working_set(vm.rng, rows, vm.cls.working_set)])
        else:
            pool = pool[pool[:, 0] + pool[:, 1] <= vm.vmem_gpa + new]
        vm.pools[VIRTIO_MEM_DEVICE] = pool

    def _dimm_add(self, vm: _Vm, size: int) -> None:
        dev_id = f"dimm{vm.next_dimm}"
        vm.next_dimm += 1
        ok, dev = self._call(
            "dimm_add",
            f"dimm add {vm.plan.vm_id} {dev_id} {size:#x}",
            lambda: vm.handle.add_dimm(dev_id, size),
        )
        if not ok:
            return
        self.counts["dimms_added"] += 1
        vm.dimms.append(dev_id)
        rows = _chunks(dev.gpa, dev.size, vm.cls.fault_size)
        vm.pools[dev_id] = _working_set(vm.rng, rows, vm.cls.working_set)

    def _dimm_remove(self, vm: _Vm) -> None:
        if not vm.dimms:
            return
        dev_id = vm.dimms[-1]
        ok, dev = self._call(
            "dimm_remove", f"dimm show {vm.plan.vm_id} {dev_id}", lambda: vm.handle.device(dev_id)
        )
        ok, _ = self._call(
            "dimm_remove",
            f"dimm remove {vm.plan.vm_id} {dev_id}",
            lambda: vm.handle.remove_device(dev_id),
        )
        if not ok:
            return
        if dev is not None:
            self.counts["guest_mapped_bytes"] += dev.mapped_bytes
        self.counts["dimms_removed"] += 1
        vm.dimms.pop()
        del vm.pools[dev_id]

    def _destroy(self, vm: _Vm) -> None:
        vid = vm.plan.vm_id
        _, info = self._call("destroy", f"vm show {vid}", vm.handle.info)
        ok, _ = self._call("destroy", f"vm destroy {vid}", vm.handle.destroy)
        if ok:
            self.counts["vms_destroyed"] += 1
            if info is not None:
                self.counts["guest_mapped_bytes"] += info.mapped_bytes
                self.counts["mapped_at_destroy_bytes"] += info.mapped_bytes
                self.counts["huge_at_destroy_bytes"] += info.huge_page_bytes
            del self.vms[vid]

    def _do(self, action: Action) -> None:
        if action.kind == "create":
            self._create(self.plan.vms[action.vm])
            return
        vm = self.vms.get(action.vm)
        if vm is None:
            return  # its creation was refused: nothing to do
        if action.kind == "faults":
            self._faults(vm, action.n)
        elif action.kind == "tag_write":
            self._tag_write(vm, action.size)
        elif action.kind == "resize":
            self._resize(vm, action.size)
        elif action.kind == "dimm_add":
            self._dimm_add(vm, action.size)
        elif action.kind == "dimm_remove":
            self._dimm_remove(vm)
        elif action.kind == "discard":
            self._discard(vm, action.size)
        elif action.kind == "destroy":
            self._destroy(vm)
        else:  # pragma: no cover - make_plan only emits the kinds above
            raise ValueError(f"unknown action {action.kind!r}")

    # -- the run

    def run(self) -> dict[str, Any]:
        """Carry out the plan; returns the summary (``self.series`` holds the samples)."""
        t0 = time.monotonic()
        start = self.client.host_status()
        self.page_size = start.page_size
        tally = EventTally(self.client)
        try:
            for step, actions in enumerate(self.plan.actions):
                for action in actions:
                    self._do(action)
                if step < self.plan.steps:
                    self._sample(step, self.client.host_status())
                    self._progress.update(step + 1, f"{len(self.vms)} VMs")
            self._progress.update(self.plan.steps, f"{len(self.vms)} VMs", force=True)
            self._progress.done()
            # Every destroy emitted a vm_destroyed event after everything it caused.
            synced = tally.wait_for(
                "vm_destroyed", self.counts["vms_destroyed"], EVENT_SYNC_TIMEOUT_S
            )
        finally:
            tally.close()
        end = self.client.host_status()
        violations = self.client.check_invariants()
        return self._summary(start, end, violations, tally, synced, time.monotonic() - t0)

    def _summary(
        self,
        start: HostInfo,
        end: HostInfo,
        violations: list[str],
        tally: EventTally,
        events_synced: bool,
        wall_seconds: float,
    ) -> dict[str, Any]:
        s = self.series
        total = start.total_bytes
        static = start.tag_storage_mode == "STATIC"
        given = [
            0.0 if static else (ts - tr) / total
            for ts, tr in zip(s["tag_storage_bytes"], s["tag_reserved_bytes"], strict=True)
        ]
        ratios = [
            tr / mn
            for tr, mn in zip(s["tag_reserved_bytes"], s["min_needed_bytes"], strict=True)
            if mn > 0
        ]
        evacuated = tally.counts.get("evacuation", 0)
        mapped = self.counts["guest_mapped_bytes"]
        lat = np.asarray(self.latencies) * 1e6
        leaks = [
            f"{name}: {getattr(start, name)} at start, {getattr(end, name)} at the end"
            for name in (
                "free_bytes",
                "data_bytes",
                "tagged_bytes",
                "tag_reserved_bytes",
                "tag_lent_bytes",
                "tag_blocks_reserved",
                "vm_count",
            )
            if getattr(start, name) != getattr(end, name)
        ]
        if not static and end.tag_reserved_bytes:
            leaks.append(f"tag_reserved_bytes: {end.tag_reserved_bytes} left in dynamic mode")
        summary: dict[str, Any] = {
            "host_memory_bytes": total,
            "tag_storage_bytes": start.tag_storage_bytes,
            "tag_storage_mode": start.tag_storage_mode,
            "placement": start.placement,
            "policy": self.config.label,
            "steps": self.plan.steps,
            "ram_given_back_mean": float(np.mean(given)) if given else 0.0,
            "ram_given_back_min": float(np.min(given)) if given else 0.0,
            "reserved_over_min_needed_mean": float(np.mean(ratios)) if ratios else None,
            "tag_lent_max_bytes": max(s["tag_lent_bytes"], default=0),
            "free_min_bytes": min(s["free_bytes"], default=0),
            "evacuated_pages": evacuated,
            "evacuation_source": "WatchEvents evacuation events",
            "guest_mapped_bytes": mapped,
            "evacuated_pages_per_gib": evacuated / (mapped / GiB) if mapped else 0.0,
            "huge_page_share": (
                self.counts["huge_at_destroy_bytes"] / self.counts["mapped_at_destroy_bytes"]
                if self.counts["mapped_at_destroy_bytes"]
                else 0.0
            ),
            "tag_blocks_reserved_events": tally.counts.get("tag_blocks_reserved", 0),
            "tag_reserve_failed_blocks": tally.counts.get("tag_reserve_failed", 0),
            "resource_exhausted": dict(sorted(self.resource_exhausted.items())),
            "resource_exhausted_total": sum(self.resource_exhausted.values()),
            "other_errors": dict(sorted(self.errors.items())),
            **self.counts,
            "arrivals_dropped": self.plan.arrivals_dropped,
            "fault_latency_p50_us": float(np.percentile(lat, 50)) if lat.size else None,
            "fault_latency_p99_us": float(np.percentile(lat, 99)) if lat.size else None,
            "events_dropped": tally.dropped,
            "events_synced": events_synced and not tally.error,
            "invariant_violations": violations,
            "host_back_to_start": not leaks,
            "leaks": leaks,
            "calls": len(self.calls),
            "call_log_sha256": hashlib.sha256("\n".join(self.calls).encode()).hexdigest(),
            "wall_seconds": wall_seconds,
        }
        return summary


def checks_pass(summary: dict[str, Any]) -> bool:
    """The end-of-run checks: sound state, host back to start, no unexpected errors."""
    return (
        not summary["invariant_violations"]
        and summary["host_back_to_start"]
        and not summary["other_errors"]
        and summary["events_synced"]
    )


def run_scenario(
    scenario: Scenario,
    config: RunConfig,
    seed: int | None = None,
    *,
    host: str | None = None,
    progress: bool = False,
    keep_calls: list[str] | None = None,
    token: str | None = None,
) -> RunResult:
    """Run ``scenario`` against a fresh daemon with ``config`` (or the daemon at ``host``, with
    the admin ``token``, whose topology then wins over ``config``'s). ``keep_calls`` receives
    the call log."""
    seed = scenario.seed if seed is None else seed
    plan = make_plan(scenario, seed, config.policy)
    with contextlib.ExitStack() as stack:
        if host is None:
            server = stack.enter_context(HostdServer(config))
            host, token = server.address, server.token
        client = stack.enter_context(HostClient(host, token=token, timeout_s=CALL_TIMEOUT_S))
        status = client.host_status()
        config = RunConfig(
            memory=status.total_bytes,
            page_size=f"{status.page_size // 1024}K",
            placement=status.placement.lower().replace("_", "-"),
            tag_storage=status.tag_storage_mode.lower(),
            policy=config.policy,
        )
        sim = Simulator(client, scenario, plan, config, progress=progress)
        summary = sim.run()
    if keep_calls is not None:
        keep_calls.extend(sim.calls)
    return RunResult(scenario.name, seed, config, summary, sim.series)


# -- output ------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a two-column table."""
    ratio = summary["reserved_over_min_needed_mean"]
    p50, p99 = summary["fault_latency_p50_us"], summary["fault_latency_p99_us"]
    rows = [
        (
            "host",
            f"{format_size(summary['host_memory_bytes'])}, tag storage "
            f"{format_size(summary['tag_storage_bytes'])} ({summary['tag_storage_mode'].lower()}, "
            f"{summary['placement'].lower()})",
        ),
        ("policy", summary["policy"]),
        (
            "RAM given back (mean / min)",
            f"{_pct(summary['ram_given_back_mean'])} / {_pct(summary['ram_given_back_min'])}",
        ),
        ("tag reserved / min needed (mean)", "-" if ratio is None else f"{ratio:.2f}"),
        (
            "evacuated pages per GiB mapped",
            f"{summary['evacuated_pages_per_gib']:.1f} "
            f"({summary['evacuated_pages']} pages, "
            f"{format_size(summary['guest_mapped_bytes'])} mapped)",
        ),
        ("failed tag block reservations", str(summary["tag_reserve_failed_blocks"])),
        (
            "RESOURCE_EXHAUSTED refusals",
            f"{summary['resource_exhausted_total']} {summary['resource_exhausted'] or ''}".strip(),
        ),
        (
            "virtio-mem plugs NACKed / BUSY",
            f"{summary['virtio_mem_nacks']} / {summary.get('virtio_mem_busy', 0)}",
        ),
        (
            "given back by free page reporting",
            f"{format_size(summary.get('discarded_bytes', 0))} "
            f"({summary.get('discards', 0)} discards)",
        ),
        ("huge-page-backed share at destroy", _pct(summary.get("huge_page_share"))),
        (
            "fault latency p50 / p99",
            "-" if p50 is None else f"{p50:.0f} us / {p99:.0f} us ({summary['faults']} faults)",
        ),
        (
            "VMs created / destroyed",
            f"{summary['vms_created']} / {summary['vms_destroyed']} "
            f"({summary['vm_create_failed']} refused, {summary['arrivals_dropped']} dropped)",
        ),
        (
            "invariants",
            "ok"
            if not summary["invariant_violations"]
            else "; ".join(summary["invariant_violations"][:3]),
        ),
        (
            "host back to start",
            "yes" if summary["host_back_to_start"] else "NO: " + "; ".join(summary["leaks"]),
        ),
    ]
    if summary["other_errors"]:
        rows.append(("unexpected errors", json.dumps(summary["other_errors"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# -- CLI ---------------------------------------------------------------------------------------


def add_cli(subparsers: Any) -> None:
    """Register ``simulate`` on the ``vmm-shim`` command line."""
    p = subparsers.add_parser(
        "simulate",
        help="run a VM lifecycle scenario against hostd",
        description=(
            "Run a scenario (a TOML file, or the name of a shipped one: "
            + ", ".join(
                f.stem for f in sorted((Path(__file__).parent / "scenarios").glob("*.toml"))
            )
            + ") against a fresh hostd started for it, or against --host."
        ),
    )
    p.add_argument("scenario", metavar="SCENARIO", help="scenario file or shipped name")
    p.add_argument("--seed", type=int, default=None, help="default: the scenario's seed")
    p.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="summary as JSON on stdout"
    )
    p.add_argument(
        "--host",
        dest="sim_host",
        default=None,
        metavar="ADDR",
        help="use this running hostd (its topology) instead of starting one",
    )
    p.add_argument("--memory", default=None, help="host RAM (default: the scenario's)")
    p.add_argument("--placement", choices=PLACEMENTS, default="tag-block-aware")
    p.add_argument("--tag-storage", choices=TAG_STORAGE_MODES, default="dynamic")
    p.add_argument(
        "--policy",
        choices=[x.lower().replace("_", "-") for x in POLICIES],
        default="on-fault",
        help="tag policy of 'inherit' VM classes (default on-fault)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=simulate_command)


def simulate_command(args: argparse.Namespace) -> int:
    """``vmm-shim simulate``: 0 when the final checks pass, 1 when not, 2 for a bad scenario."""
    try:
        scenario = load_scenario(find_scenario(args.scenario))
        memory = scenario.host.memory if args.memory is None else parse_size(args.memory)
    except (ScenarioError, ValueError) as e:
        print(one_line(f"vmm-shim simulate: error: {e}"), file=sys.stderr)
        return EXIT_USAGE
    policy = args.policy.upper().replace("-", "_")
    config = RunConfig(memory, scenario.host.page_size, args.placement, args.tag_storage, policy)
    progress = not args.no_progress and sys.stderr.isatty()
    if args.sim_host is None:
        print(
            "vmm-shim simulate: starting a hostd of its own (--host ADDR uses a running one)",
            file=sys.stderr,
        )
    try:
        result = run_scenario(
            scenario,
            config,
            args.seed,
            host=args.sim_host,
            progress=progress,
            token=getattr(args, "token", None) if args.sim_host is not None else None,
        )
    except (TagStoreClientError, RuntimeError) as e:
        print(one_line(f"vmm-shim simulate: error: {e}"), file=sys.stderr)
        return EXIT_FAILED
    if getattr(args, "json", False):
        print(json.dumps(result.summary, indent=2))
    else:
        print(f"scenario {scenario.name}, seed {result.seed}")
        print(format_summary(result.summary))
    return EXIT_OK if checks_pass(result.summary) else EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="python -m vmm_shim.simulate")
    add_cli(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["simulate", *sys.argv[1:]])
    sys.exit(ns.func(ns))
