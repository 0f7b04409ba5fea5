"""Durability benchmark on a fully populated host: fault latency during an invariant check,
ExportState and a snapshot; daemon peak memory; restart time to SERVING.

    python bench/bench_durability.py [--memory 256GiB] [--seconds 5]

Starts a real ``hostd serve --memory M --state-dir DIR`` (4 KiB pages), fills every page with
VM memory over gRPC (MTE guests on most taggable memory, plain guests on the rest, lending tag
storage), then:

1. Fault latency: p50 / p99 of a mapped-page ``GuestFault`` (one client, sequential) while the
   daemon is idle, and while another client runs ``CheckInvariants`` / ``ExportState`` back to
   back, and while snapshots are being written. Goal: p99 during a check within 2x of idle.
2. Peak memory: the daemon's VmHWM (peak RSS) per host page after populating and after each
   of the above (its forked children are separate processes: their peak private memory is
   measured in runs of their own, since reading it walks their page tables).
   Goal: <= 8 bytes per host page.
3. Restart: SIGKILL, then time from exec to the health service answering SERVING, with the
   journal since the last snapshot replayed (a large VM destroyed and a new one faulted in, and
   then the longest journal the default ``--snapshot-every`` allows); and after a graceful stop
   (a snapshot, empty journal). Goal: <= 5 s for 256 GiB, <= 15 s for 1 TiB.

Prints figures; asserts nothing about time (shared 2-core machine).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from credentials import admin_channel  # bench/credentials.py, beside this script

from hostd.model import parse_size
from hostd.store import DEFAULT_SNAPSHOT_EVERY
from tagstore.v1 import tagstore_pb2 as pb
from tagstore.v1 import tagstore_pb2_grpc as pb_grpc

BOOT_RAM_GPA = 0x4000_0000
GiB = 1 << 30
PAGE = 4096


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Daemon:
    def __init__(self, tmp: Path, memory: str, state: Path) -> None:
        self.address = f"unix:{tmp}/hostd.sock"
        self.args = [
            sys.executable, "-m", "hostd", "serve", "--listen", self.address,
            "--metrics-listen", "", "--memory", memory, "--state-dir", str(state),
            "--invariant-check-interval", "3600", "--admin-token-file", str(tmp / "admin.token"),
        ]  # fmt: skip
        self.token_file = tmp / "admin.token"
        self.log = tmp / "hostd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start; seconds from exec to SERVING."""
        t0 = time.perf_counter()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, stderr=log)
        # Without these, the channel backs off exponentially (1 s, 1.6 s, 2.6 s, ...) while the
        # socket does not exist yet, and the figure would be the client's backoff schedule.
        options = [
            ("grpc.initial_reconnect_backoff_ms", 20),
            ("grpc.min_reconnect_backoff_ms", 20),
            ("grpc.max_reconnect_backoff_ms", 20),
        ]
        with grpc.insecure_channel(self.address, options=options) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.perf_counter() - t0
                except grpc.RpcError:
                    pass
                if self.proc.poll() is not None:
                    raise RuntimeError(f"hostd exited:\n{self.log.read_text()[-2000:]}")
                time.sleep(0.02)

    def hwm_bytes(self) -> int:
        assert self.proc is not None
        return status_kib(self.proc.pid, "VmHWM") * 1024

    def rss_bytes(self) -> int:
        assert self.proc is not None
        return status_kib(self.proc.pid, "VmRSS") * 1024

    def stop(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=600)


def populate(stub: pb_grpc.TagStorageStub, memory_bytes: int) -> int:
    host = stub.GetHost(pb.GetHostRequest())
    taggable = sum(r.memory_size for r in host.regions if r.tag_size)
    mte_vm_bytes = min(56 * GiB, memory_bytes // 16)
    vms = 0

    def fill(vm_id: str, mte: bool, size: int) -> None:
        nonlocal vms
        stub.CreateVm(
            pb.CreateVmRequest(
                vm_id=vm_id,
                mte_enabled=mte,
                tag_policy=pb.TAG_POLICY_ON_FAULT if mte else pb.TAG_POLICY_UNSPECIFIED,
                boot_memory_bytes=size,
            ),
            timeout=600,
        )
        vms += 1
        for off in range(0, size, GiB):
            stub.GuestFault(
                pb.GuestFaultRequest(
                    vm_id=vm_id,
                    gpa=BOOT_RAM_GPA + off,
                    length=min(GiB, size - off),
                    access=pb.ACCESS_WRITE,
                ),
                timeout=600,
            )

    for i in range(int(taggable * 0.8) // mte_vm_bytes):
        fill(f"mte{i}", True, mte_vm_bytes)
    i = 0
    while (free := stub.GetHost(pb.GetHostRequest()).free_bytes) > 0:
        fill(f"plain{i}", False, min(free, 64 * GiB))
        i += 1
    return vms


def fault_latencies(stub: pb_grpc.TagStorageStub, seconds: float) -> list[float]:
    hot = pb.GuestFaultRequest(vm_id="mte0", gpa=BOOT_RAM_GPA, length=PAGE, access=pb.ACCESS_WRITE)
    out = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        stub.GuestFault(hot)
        out.append(time.perf_counter() - t0)
    return out


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1] * 1e3


def children_private_bytes(pid: int) -> int:
    """Private memory (not shared with the daemon) of the daemon's forked children now."""
    total = 0
    children: list[str] = []
    # Each thread's children are listed under that thread (the forks come from gRPC threads).
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            children += (task / "children").read_text().split()
    for child in children:
        try:
            for line in Path(f"/proc/{child}/smaps_rollup").read_text().splitlines():
                if line.startswith(("Private_Dirty:", "Private_Clean:")):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def load_loop(address: str, token_file: Path, what: str) -> int:
    """``--load``: run ``what`` back to back until stdin closes; print how many completed.

    A process of its own: a load thread in the measuring process would decode the export's
    messages under the same GIL as the fault calls it is meant to disturb only through the
    daemon.
    """
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    done = 0
    with admin_channel(address, token_file) as channel:
        other = pb_grpc.TagStorageStub(channel)
        other.GetHost(pb.GetHostRequest(), timeout=60)
        print("ready", flush=True)
        while not stop.is_set():
            if what == "check":
                assert not other.CheckInvariants(
                    pb.CheckInvariantsRequest(), timeout=600
                ).violations
            else:
                for _ in other.ExportState(pb.ExportStateRequest(), timeout=600):
                    pass
            done += 1
    print(done, flush=True)
    return 0


def _start_load(daemon: Daemon, what: str) -> subprocess.Popen[str]:
    load = subprocess.Popen(
        [sys.executable, __file__, "--load", what, "--address", daemon.address,
         "--token-file", str(daemon.token_file)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert load.stdout is not None
    # Its start-up (an interpreter, gRPC) is not part of what is measured.
    assert load.stdout.readline().strip() == "ready"
    return load


def _stop_load(load: subprocess.Popen[str]) -> int:
    out, _ = load.communicate("", timeout=600)
    return int(out.strip() or 0)


def under_load(
    stub: pb_grpc.TagStorageStub, daemon: Daemon, seconds: float, what: str
) -> tuple[list[float], int]:
    """Fault latencies while another client process runs ``what`` back to back; returns
    (latencies, how many ``what`` completed)."""
    load = _start_load(daemon, what)
    try:
        latencies = fault_latencies(stub, seconds)
    finally:
        done = _stop_load(load)
    return latencies, done


def children_peak(daemon: Daemon, seconds: float, what: str, pid: int) -> tuple[int, int]:
    """Peak private memory of the daemon's children while another client runs ``what`` back
    to back, and how many completed. Apart from the latency runs: reading a child's
    ``smaps_rollup`` walks its page tables, CPU time the latency runs should not share."""
    load = _start_load(daemon, what)
    peak = 0
    deadline = time.perf_counter() + seconds
    try:
        while time.perf_counter() < deadline:
            peak = max(peak, children_private_bytes(pid))
            time.sleep(0.05)
    finally:
        done = _stop_load(load)
    return peak, done


def fork_ms(memory_bytes: int, repeat: int = 20) -> list[float]:
    """Milliseconds an ``os.fork()`` takes in a process holding a populated host of this size
    (the time the daemon holds its lock for a check, an export or a snapshot)."""
    from hostd.model import Access, Host, TagPolicy, VmConfig, default_topology

    host = Host(default_topology(memory_bytes))
    size = memory_bytes // 2
    host.create_vm(VmConfig("g", True, TagPolicy.ON_FAULT, size))
    for off in range(0, size, GiB):
        host.guest_fault("g", BOOT_RAM_GPA + off, GiB, Access.WRITE)
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        out.append((time.perf_counter() - t0) * 1e3)
        os.waitpid(pid, 0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--memory", default="256GiB")
    ap.add_argument("--seconds", type=float, default=5.0, help="per latency measurement")
    ap.add_argument("--load", choices=("check", "export"), help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    ap.add_argument("--token-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load:
        return load_loop(args.address, args.token_file, args.load)
    memory_bytes = parse_size("memory", args.memory)
    pages = memory_bytes // PAGE
    tmp = Path(tempfile.mkdtemp(prefix="tagstore-durability-"))
    state = tmp / "state"
    daemon = Daemon(tmp, args.memory, state)
    try:
        first_start = daemon.start()
        # The process before any page of the host is touched (interpreter, gRPC, empty arrays
        # not yet faulted in): subtracted to get the state's share, as bench_model.py does.
        baseline = daemon.rss_bytes()
        channel = admin_channel(daemon.address, daemon.token_file)
        stub = pb_grpc.TagStorageStub(channel)
        t0 = time.perf_counter()
        vms = populate(stub, memory_bytes)
        print(
            f"host: {args.memory}, {pages:,} pages of 4 KiB, {vms} VMs, fully populated over gRPC "
            f"in {time.perf_counter() - t0:.1f} s (first start {first_start:.2f} s)"
        )
        hwm = {"populated": daemon.hwm_bytes()}
        idle = fault_latencies(stub, args.seconds)
        assert daemon.proc is not None
        pid = daemon.proc.pid
        during_check, checks = under_load(stub, daemon, args.seconds, "check")
        check_child, checks_watched = children_peak(daemon, args.seconds, "check", pid)
        hwm["after checks"] = daemon.hwm_bytes()
        during_export, exports = under_load(stub, daemon, args.seconds, "export")
        export_child, exports_watched = children_peak(daemon, args.seconds, "export", pid)
        hwm["after exports"] = daemon.hwm_bytes()
        print("fault latency of a mapped page (one client, sequential calls):")
        print(f"  idle            p50 {pct(idle, 0.5):6.2f} ms  p99 {pct(idle, 0.99):6.2f} ms")
        for label, values, n in (
            ("during checks", during_check, checks),
            ("during exports", during_export, exports),
        ):
            ratio = pct(values, 0.99) / pct(idle, 0.99)
            print(
                f"  {label:15s} p50 {pct(values, 0.5):6.2f} ms  p99 {pct(values, 0.99):6.2f} ms"
                f"  max {max(values) * 1e3:7.2f} ms  p99 / idle p99 = {ratio:.2f} "
                f"({n} completed; goal <= 2)"
            )
        # Snapshot: a graceful stop writes one; then restart from it (nothing to replay).
        daemon.stop(signal.SIGTERM)
        clean = daemon.start()
        hwm_restart_clean = daemon.hwm_bytes()
        channel.close()
        channel = admin_channel(daemon.address, daemon.token_file)
        stub = pb_grpc.TagStorageStub(channel)
        # A journal to replay: faults of fresh pages freed by destroying one plain VM.
        stub.DestroyVm(pb.DestroyVmRequest(vm_id="plain0"))
        stub.CreateVm(pb.CreateVmRequest(vm_id="again", boot_memory_bytes=4 * GiB))
        for off in range(0, 4 * GiB, 2 << 20):
            stub.GuestFault(
                pb.GuestFaultRequest(
                    vm_id="again", gpa=BOOT_RAM_GPA + off, length=2 << 20, access=pb.ACCESS_WRITE
                )
            )
        channel.close()
        daemon.stop(signal.SIGKILL)
        killed = daemon.start()
        hwm_restart_killed = daemon.hwm_bytes()
        replayed = [ln for ln in daemon.log.read_text().splitlines() if "event=serving" in ln][-1]
        # The longest replay the defaults allow: a journal one record short of a snapshot,
        # of single-page faults (each a record that changes the host).
        channel = admin_channel(daemon.address, daemon.token_file)
        stub = pb_grpc.TagStorageStub(channel)
        journal = max(state.glob("journal-*.jsonl"))
        more = DEFAULT_SNAPSHOT_EVERY - 1 - len(journal.read_bytes().splitlines())
        stub.CreateVm(pb.CreateVmRequest(vm_id="long", boot_memory_bytes=more * PAGE))
        for i in range(more - 1):
            stub.GuestFault(
                pb.GuestFaultRequest(
                    vm_id="long", gpa=BOOT_RAM_GPA + i * PAGE, length=PAGE, access=pb.ACCESS_WRITE
                )
            )
        channel.close()
        long_records = len(max(state.glob("journal-*.jsonl")).read_bytes().splitlines())
        daemon.stop(signal.SIGKILL)
        killed_long = daemon.start()
        hwm_restart_long = daemon.hwm_bytes()
        replayed_long = [ln for ln in daemon.log.read_text().splitlines() if "event=serving" in ln]
        print("restart to SERVING:")
        print(f"  after a graceful stop (snapshot, empty journal): {clean:.2f} s")
        print(f"  after SIGKILL (journal replayed):               {killed:.2f} s")
        print(f"    {replayed.split('event=serving ')[1]}")
        print(f"  after SIGKILL, {long_records:,}-record journal:          {killed_long:.2f} s")
        print(f"    {replayed_long[-1].split('event=serving ')[1]}")
        hwm["restart (snapshot)"] = hwm_restart_clean
        hwm["restart (snapshot + replay)"] = hwm_restart_killed
        hwm["restart (longest journal)"] = hwm_restart_long
        print(
            "daemon peak RSS (VmHWM) per host page, whole process / minus the process before "
            f"the host was touched ({baseline / 2**20:.0f} MiB) (goal <= 8):"
        )
        for label, value in hwm.items():
            print(f"  {label:28s} {value / pages:5.2f} / {(value - baseline) / pages:5.2f} bytes")
        print(
            "forked children's private memory per host page, peak (not in the daemon's RSS; "
            "a separate run of the same length, no faults):"
        )
        print(f"  {'check':28s} {check_child / pages:5.2f} bytes ({checks_watched} completed)")
        print(f"  {'export':28s} {export_child / pages:5.2f} bytes ({exports_watched} completed)")
        daemon.stop(signal.SIGTERM)
        forks = fork_ms(memory_bytes)
        print(
            f"os.fork() of a process holding this host (half mapped), the time the lock is "
            f"held: median {statistics.median(forks):.1f} ms, max {max(forks):.1f} ms"
        )
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
