"""Stream-load benchmark: health checks and GetHost while 64 StreamGuestFaults streams and 8 slow
WatchEvents readers are open, against the same calls on the idle daemon; then storms of
abandoned work.

    python bench/bench_streams.py [--calls 1000] [--streams 64] [--watchers 8]

Starts a real ``hostd serve`` (built-in 64 GiB host, metrics on, as deployed) and prints:

1. latency percentiles of sequential ``Health/Check`` and ``GetHost`` calls, idle and under the
   stream load (goal: health p99 <= 50 ms under load; the issue measured 296 s before grpc.aio);
2. a storm of ``CheckInvariants`` calls with a 1 ms deadline for ``--storm-seconds``: how many
   the daemon ran anyway (from its ``grpc_server_handled_total`` metric) and how long the first
   4 KiB fault after the storm took;
3. the daemon's RSS before and after ``--cancel-storm`` streams opened and cancelled.

Prints figures, asserts nothing about time.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stream_load import BOOT_RAM_GPA, StreamLoad

from tagstore.v1 import tagstore_pb2 as pb
from tagstore.v1 import tagstore_pb2_grpc as pb_grpc

MiB = 1 << 20


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying ``token``."""
    return (("authorization", f"Bearer {token}"),)


def latencies_ms(call: Callable[[], object], n: int) -> list[float]:
    """Milliseconds of ``n`` sequential calls."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def percentiles(values: list[float]) -> str:
    q = statistics.quantiles(values, n=100, method="inclusive")
    return f"p50 {q[49]:6.2f} ms  p99 {q[98]:6.2f} ms  max {max(values):6.2f} ms"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def metric(metrics_url: str, name: str, method: str) -> float:
    """The sum of ``name``'s samples for ``method`` (every code)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'grpc_method="{method}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--calls", type=int, default=1000, help="calls per measurement")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--watchers", type=int, default=8)
    ap.add_argument(
        "--fault-interval", type=float, default=0.25, help="seconds between a stream's faults"
    )
    ap.add_argument("--storm-seconds", type=float, default=10.0)
    ap.add_argument("--cancel-storm", type=int, default=2000)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tagstore-bench-"))
    address = f"unix:{tmp}/hostd.sock"
    token_file = tmp / "admin.token"
    metrics_port = 0
    with open(tmp / "hostd.log", "wb") as log:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            metrics_port = s.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, "-m", "hostd", "serve", "--listen", address,
             "--metrics-listen", f"127.0.0.1:{metrics_port}",
             "--admin-token-file", str(token_file)],
            stderr=log,
        )  # fmt: skip
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(channel).result(timeout=60)
        admin = bearer(token_file.read_text().strip())
        stub = pb_grpc.TagStorageStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        vm = stub.CreateVm(
            pb.CreateVmRequest(vm_id="load", boot_memory_bytes=64 * MiB), metadata=admin
        )
        vm_md = bearer(vm.vm_token)
        fault = pb.GuestFaultRequest(vm_id="load", gpa=BOOT_RAM_GPA, length=4096, access=1)
        stub.GuestFault(fault, metadata=vm_md)

        def check() -> object:
            return health.Check(health_pb2.HealthCheckRequest(), timeout=60)

        def get_host() -> object:
            return stub.GetHost(pb.GetHostRequest(), metadata=admin, timeout=60)

        latencies_ms(check, 100)  # warm up
        idle = {
            "health": latencies_ms(check, args.calls),
            "GetHost": latencies_ms(get_host, args.calls),
        }
        # The VMM's fault streams carry its VM token; the watchers are the admin's.
        fault_load = StreamLoad(
            address, vm_md, "load", nr_fault_streams=args.streams, nr_watchers=0
        )
        watch_load = StreamLoad(
            address, admin, "load", nr_fault_streams=0, nr_watchers=args.watchers
        )
        with fault_load as faults, watch_load as watch:
            loaded = {
                "health": latencies_ms(check, args.calls),
                "GetHost": latencies_ms(get_host, args.calls),
            }
            errors = faults.errors + watch.errors
        print(f"hostd built-in 64 GiB host; {args.calls} sequential calls per line; load: "
              f"{args.streams} StreamGuestFaults streams (a 4 KiB fault every "
              f"{args.fault_interval:g} s each), {args.watchers} WatchEvents(include_faults) "
              "readers taking one event a second")  # fmt: skip
        for name in ("health", "GetHost"):
            print(f"  {name:8s} idle        {percentiles(idle[name])}")
            print(f"  {name:8s} under load  {percentiles(loaded[name])}")
        p99 = statistics.quantiles(loaded["health"], n=100, method="inclusive")[98]
        verdict = "meets" if p99 <= 50 else "misses"
        print(f"  health p99 under load {p99:.2f} ms ({verdict} the goal <= 50 ms)")
        print(f"  stream errors: {errors or 'none'}")

        ended_before = metric(metrics_url, "grpc_server_handled_total", "CheckInvariants")
        seconds_before = metric(metrics_url, "grpc_server_handling_seconds_sum", "CheckInvariants")
        sent = 0
        t_end = time.perf_counter() + args.storm_seconds
        while time.perf_counter() < t_end:
            with contextlib.suppress(grpc.RpcError):
                stub.CheckInvariants(pb.CheckInvariantsRequest(), metadata=admin, timeout=0.001)
            sent += 1
        t0 = time.perf_counter()
        stub.GuestFault(fault, metadata=vm_md, timeout=600)
        first_fault_ms = (time.perf_counter() - t0) * 1e3
        time.sleep(1)
        ended = metric(metrics_url, "grpc_server_handled_total", "CheckInvariants") - ended_before
        seconds = (
            metric(metrics_url, "grpc_server_handling_seconds_sum", "CheckInvariants")
            - seconds_before
        )
        answered_ok = 0
        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        for line in text.splitlines():
            if (
                'grpc_method="CheckInvariants"' in line
                and 'grpc_code="OK"' in line
                and (line.startswith("grpc_server_handled_total{"))
            ):
                answered_ok = int(float(line.rsplit(" ", 1)[1]))
        print(f"CheckInvariants with a 1 ms deadline for {args.storm_seconds:g} s: {sent} sent, "
              f"{int(ended)} ended on the server, {answered_ok} answered OK, "
              f"{seconds:.1f} s of handler time in all")  # fmt: skip
        print(f"  first 4 KiB fault after the storm: {first_fault_ms:.2f} ms")

        def cancel_storm() -> None:
            for i in range(args.cancel_storm):
                stream = stub.StreamGuestFaults(iter([fault] * 100), metadata=vm_md)
                if i % 2:
                    next(stream)
                stream.cancel()
                watch_call = stub.WatchEvents(
                    pb.WatchEventsRequest(include_faults=True), metadata=admin
                )
                watch_call.cancel()
            time.sleep(2)

        rss = [rss_kib(proc.pid)]
        for _ in range(3):
            cancel_storm()
            rss.append(rss_kib(proc.pid))
        internal = (tmp / "hostd.log").read_text().count("INTERNAL")
        print(f"3 storms of {args.cancel_storm} StreamGuestFaults + WatchEvents opened and "
              f"cancelled: RSS before and after each, MiB: "
              f"{', '.join(f'{r / 1024:.1f}' for r in rss)}; "
              f"INTERNAL in the log: {internal}")  # fmt: skip
        channel.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
