"""gRPC benchmark: GuestFault call rates against grpc.health.v1 Health/Check, same server, same run.

    python bench/bench_grpc.py [--seconds 3] [--rounds 3] [--listen unix:/tmp/x.sock]

Starts a real ``hostd serve`` (built-in 64 GiB host, metrics on, as deployed) and measures, from
one client thread with sequential unary calls (the VMM's fault path is synchronous):

1. ``GuestFault`` of one already-mapped 4 KiB page (the hot path: nothing to allocate) vs
   ``Health/Check``. Goal: >= 0.9 of the health check's call rate.
2. ``GuestFault`` of fresh 2 MiB ranges of an MTE guest (allocate 512 pages, reserve their tag
   blocks) vs ``Health/Check``. Goal: >= 0.5.

Each round interleaves batches of 20 calls of each type and adds up the time spent per type,
so that machine noise (shared, 2 cores) hits all of them alike; the figure is the median of
the per-round ratios. Prints figures, asserts nothing about time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tagstore.v1 import tagstore_pb2 as pb
from tagstore.v1 import tagstore_pb2_grpc as pb_grpc

BOOT_RAM_GPA = 0x4000_0000
# Calls of one type in a row before switching to the next type.
BATCH = 20
MiB = 1 << 20
GiB = 1 << 30


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying ``token``."""
    return (("authorization", f"Bearer {token}"),)


def rate(call: Callable[[int], object], seconds: float) -> float:
    """Calls per second of ``call(i)`` made back to back for ``seconds``."""
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline:
        call(n)
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--seconds", type=float, default=1.0, help="per call type per round (approximately)"
    )
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--listen", default="", help="address for the daemon (default: unix socket)")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="tagstore-bench-")
    address = args.listen or f"unix:{tmp}/hostd.sock"
    token_file = Path(tmp) / "admin.token"
    with open(Path(tmp) / "hostd.log", "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hostd",
                "serve",
                "--listen",
                address,
                "--metrics-listen",
                "127.0.0.1:0",
                "--admin-token-file",
                str(token_file),
            ],
            stderr=log,
        )
    try:
        channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(channel).result(timeout=30)
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.TagStorageStub(channel)
        # The admin creates the VMs; faults carry the VM's own token, as a VMM's do.
        admin = bearer(token_file.read_text().strip())
        check = health_pb2.HealthCheckRequest()

        hot_vm = stub.CreateVm(
            pb.CreateVmRequest(
                vm_id="hot",
                mte_enabled=True,
                tag_policy=pb.TAG_POLICY_ON_FAULT,
                boot_memory_bytes=MiB,
            ),
            metadata=admin,
        )
        hot_token = bearer(hot_vm.vm_token)
        hot = pb.GuestFaultRequest(
            vm_id="hot", gpa=BOOT_RAM_GPA, length=4096, access=pb.ACCESS_WRITE
        )
        stub.GuestFault(hot, metadata=hot_token)
        # Room for every fresh 2 MiB fault of every round (the host has ~54 GiB taggable).
        fresh_bytes = 48 * GiB
        fresh_token = bearer(
            stub.CreateVm(
                pb.CreateVmRequest(
                    vm_id="fresh",
                    mte_enabled=True,
                    tag_policy=pb.TAG_POLICY_ON_FAULT,
                    boot_memory_bytes=fresh_bytes,
                ),
                metadata=admin,
            ).vm_token
        )
        next_fresh = [0]

        def fault_fresh(_: int) -> None:
            gpa = BOOT_RAM_GPA + next_fresh[0] * 2 * MiB
            next_fresh[0] += 1
            answer = stub.GuestFault(
                pb.GuestFaultRequest(
                    vm_id="fresh", gpa=gpa, length=2 * MiB, access=pb.ACCESS_WRITE
                ),
                metadata=fresh_token,
            )
            assert answer.newly_mapped_pages == 512

        loops: dict[str, Callable[[int], object]] = {
            "health_check": lambda _: health.Check(check),
            "fault_mapped_page": lambda _: stub.GuestFault(hot, metadata=hot_token),
            "fault_fresh_2mib_mte": fault_fresh,
        }
        for call in loops.values():  # warm up channel, caches and code paths
            for i in range(50):
                call(i)
        # Interleave small batches of each call type and add up the time spent per type, so
        # that the machine's noise (shared, 2 cores) falls on all of them alike.
        rates: dict[str, list[float]] = {k: [] for k in loops}
        for _ in range(args.rounds):
            spent = dict.fromkeys(loops, 0.0)
            calls = dict.fromkeys(loops, 0)
            deadline = time.perf_counter() + args.seconds * len(loops)
            while time.perf_counter() < deadline:
                for k, call in loops.items():
                    t0 = time.perf_counter()
                    for i in range(BATCH):
                        call(i)
                    spent[k] += time.perf_counter() - t0
                    calls[k] += BATCH
            for k in loops:
                rates[k].append(calls[k] / spent[k])
        ratios = {
            k: [r / h for r, h in zip(rates[k], rates["health_check"], strict=True)]
            for k in ("fault_mapped_page", "fault_fresh_2mib_mte")
        }
        violations = stub.CheckInvariants(pb.CheckInvariantsRequest(), metadata=admin).violations
        print(
            f"hostd built-in host, {args.rounds} rounds of ~{args.seconds * len(loops):g} s, "
            f"batches of {BATCH} calls of each type interleaved, one client, sequential calls"
        )
        for k, v in rates.items():
            print(f"  {k:22s} {statistics.median(v):8.0f} calls/s (median)")
        goals = {"fault_mapped_page": 0.9, "fault_fresh_2mib_mte": 0.5}
        for k, v in ratios.items():
            r = statistics.median(v)
            verdict = "meets" if r >= goals[k] else "misses"
            print(f"  {k:22s} / health_check = {r:.2f} ({verdict} the goal >= {goals[k]})")
        print(f"  invariants after the run: {'sound' if not violations else list(violations)}")
        channel.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
