"""gRPC benchmark: GuestFault call rates against grpc.health.v1 Health/Check, same server, same run,
with the default durability (a state directory) and without (``--ephemeral``).

    python bench/bench_grpc.py [--seconds 1] [--rounds 9] [--sync none|always]

Starts two real ``hostd serve`` daemons (built-in 64 GiB host, metrics on, as deployed): one
keeping state in a fresh state directory (the default), one ``--ephemeral``. From one client
thread with sequential unary calls (the VMM's fault path is synchronous) it measures on each:

1. ``GuestFault`` of one already-mapped 4 KiB page (the hot path: nothing to allocate) vs
   ``Health/Check``. Goal with the default durability: >= 0.9 of the health check's call rate.
2. ``GuestFault`` of fresh 2 MiB ranges of an MTE guest (allocate 512 pages, reserve their tag
   blocks) vs ``Health/Check``. Goal: >= 0.5.
3. Mapped-page faults sent over one ``StreamGuestFaults`` stream (messages per second) vs the
   unary ``Health/Check``. Goal: >= 3x.

Each round interleaves batches of every call type on both daemons and adds up the time spent
per type, so that machine noise (shared, 2 cores) hits all of them alike; the figure is the
median of the per-round ratios. Prints figures, asserts nothing about time.
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
# Messages per StreamGuestFaults stream.
STREAM_BATCH = 200
MiB = 1 << 20
GiB = 1 << 30
GOALS = {"fault_mapped_page": 0.9, "fault_fresh_2mib_mte": 0.5, "stream_mapped_page": 3.0}


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying ``token``."""
    return (("authorization", f"Bearer {token}"),)


class Bench:
    """One daemon and its call loops."""

    def __init__(self, label: str, tmp: Path, serve_args: list[str]) -> None:
        self.label = label
        self.address = f"unix:{tmp}/{label}.sock"
        self.log = open(tmp / f"{label}.log", "wb")  # noqa: SIM115 - closed in close()
        token_file = tmp / f"{label}.token"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hostd",
                "serve",
                "--listen",
                self.address,
                "--metrics-listen",
                "127.0.0.1:0",
                "--admin-token-file",
                str(token_file),
                *serve_args,
            ],
            stderr=self.log,
        )
        self.channel = grpc.insecure_channel(self.address)
        grpc.channel_ready_future(self.channel).result(timeout=60)
        self.stub = pb_grpc.TagStorageStub(self.channel)
        health = health_pb2_grpc.HealthStub(self.channel)
        check = health_pb2.HealthCheckRequest()
        stub = self.stub
        # The admin creates the VMs; faults carry the VM's own token, as a VMM's do.
        self.admin = admin = bearer(token_file.read_text().strip())
        hot_token = bearer(
            stub.CreateVm(
                pb.CreateVmRequest(
                    vm_id="hot",
                    mte_enabled=True,
                    tag_policy=pb.TAG_POLICY_ON_FAULT,
                    boot_memory_bytes=MiB,
                ),
                metadata=admin,
            ).vm_token
        )
        hot = pb.GuestFaultRequest(
            vm_id="hot", gpa=BOOT_RAM_GPA, length=4096, access=pb.ACCESS_WRITE
        )
        stub.GuestFault(hot, metadata=hot_token)
        # Room for every fresh 2 MiB fault of every round (the host has ~54 GiB taggable).
        fresh_token = bearer(
            stub.CreateVm(
                pb.CreateVmRequest(
                    vm_id="fresh",
                    mte_enabled=True,
                    tag_policy=pb.TAG_POLICY_ON_FAULT,
                    boot_memory_bytes=48 * GiB,
                ),
                metadata=admin,
            ).vm_token
        )
        next_fresh = [0]

        def fault_fresh() -> int:
            for _ in range(BATCH):
                gpa = BOOT_RAM_GPA + next_fresh[0] * 2 * MiB
                next_fresh[0] += 1
                answer = stub.GuestFault(
                    pb.GuestFaultRequest(
                        vm_id="fresh", gpa=gpa, length=2 * MiB, access=pb.ACCESS_WRITE
                    ),
                    metadata=fresh_token,
                )
                assert answer.newly_mapped_pages == 512
            return BATCH

        def repeat(call: Callable[[], object]) -> Callable[[], int]:
            def batch() -> int:
                for _ in range(BATCH):
                    call()
                return BATCH

            return batch

        def stream() -> int:
            answers = list(stub.StreamGuestFaults(iter([hot] * STREAM_BATCH), metadata=hot_token))
            assert len(answers) == STREAM_BATCH
            return STREAM_BATCH

        # Each loop runs one batch and returns how many calls (messages) it made.
        self.loops: dict[str, Callable[[], int]] = {
            "health_check": repeat(lambda: health.Check(check)),
            "fault_mapped_page": repeat(lambda: stub.GuestFault(hot, metadata=hot_token)),
            "fault_fresh_2mib_mte": fault_fresh,
            "stream_mapped_page": stream,
        }

    def close(self) -> list[str]:
        violations = list(
            self.stub.CheckInvariants(pb.CheckInvariantsRequest(), metadata=self.admin).violations
        )
        self.channel.close()
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()
        return violations


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--seconds", type=float, default=1.0, help="per call type per round (approximately)"
    )
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--sync", default="none", choices=["none", "always"], help="of the durable one")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tagstore-bench-"))
    benches = [
        Bench("durable", tmp, ["--state-dir", str(tmp / "state"), "--sync", args.sync]),
        Bench("ephemeral", tmp, ["--ephemeral"]),
    ]
    try:
        for bench in benches:  # warm up channels, caches and code paths
            for loop in bench.loops.values():
                loop()
        rates: dict[tuple[str, str], list[float]] = {
            (b.label, k): [] for b in benches for k in b.loops
        }
        for _ in range(args.rounds):
            spent = dict.fromkeys(rates, 0.0)
            calls = dict.fromkeys(rates, 0)
            deadline = time.perf_counter() + args.seconds * len(rates)
            while time.perf_counter() < deadline:
                for bench in benches:
                    for k, loop in bench.loops.items():
                        t0 = time.perf_counter()
                        calls[(bench.label, k)] += loop()
                        spent[(bench.label, k)] += time.perf_counter() - t0
            for key in rates:
                rates[key].append(calls[key] / spent[key])
        print(
            f"hostd built-in host, {args.rounds} rounds of ~{args.seconds * len(rates):g} s, "
            f"batches of every call type on both daemons interleaved, one client, sequential calls "
            f"(streams: {STREAM_BATCH} messages each)"
        )
        for bench in benches:
            mode = f"state dir, --sync {args.sync}" if bench.label == "durable" else "--ephemeral"
            print(f"{bench.label} ({mode}):")
            for k in bench.loops:
                print(
                    f"  {k:22s} {statistics.median(rates[(bench.label, k)]):8.0f} calls/s (median)"
                )
            health = rates[(bench.label, "health_check")]
            for k, goal in GOALS.items():
                r = statistics.median(
                    x / h for x, h in zip(rates[(bench.label, k)], health, strict=True)
                )
                verdict = "meets" if r >= goal else "misses"
                print(f"  {k:22s} / health_check = {r:.2f} ({verdict} the goal >= {goal})")
        for bench in benches:
            violations = bench.close()
            print(f"  {bench.label}: invariants after the run: {violations or 'sound'}")
    finally:
        for bench in benches:
            if bench.proc.poll() is None:
                bench.proc.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
