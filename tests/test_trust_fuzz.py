"""Hostile clients against the live daemon: random and mutated messages to every RPC, with
valid, foreign, garbage and missing credentials, boundary numbers, huge lengths, unknown enum
values, odd unicode ids, streams closed early and raw bytes.

Pass: nothing that parses as its request type is answered UNKNOWN or INTERNAL (bytes that do not
parse may get the gRPC library's own "Exception deserializing request"), health keeps answering,
CheckInvariants is empty at the end, the control VM and its tags are unchanged, and the daemon
logs no internal error.

CI sends a few thousand requests; ``TAGSTORE_TRUST_FUZZ_REQUESTS=100000`` runs the long form
(bench/README.md records its last run).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tagstore.v1 import tagstore_pb2 as pb
from tagstore.v1 import tagstore_pb2_grpc as pb_grpc
from tests.conftest import ADMIN_TOKEN, BOOT_RAM_GPA, GiB, HostdProcess, MiB, bearer, raw_channel

pytestmark = pytest.mark.integration

REQUESTS = int(os.environ.get("TAGSTORE_TRUST_FUZZ_REQUESTS", "3000"))
SEED = int(os.environ.get("TAGSTORE_TRUST_FUZZ_SEED", "9"))
PAGE = 4096
DEVICE_GPA = BOOT_RAM_GPA + 64 * MiB
SERVICE = "/tagstore.v1.TagStorage/"
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

NUMBERS = [0, 1, PAGE - 1, PAGE, PAGE + 1, 2 * MiB, 2**31 - 1, 2**32, 2**63 - 1, 2**63,
           2**64 - PAGE, 2**64 - 1, BOOT_RAM_GPA, DEVICE_GPA, 4 * GiB, 2**40]  # fmt: skip
ENUMS = [-(2**31), -1, 0, 1, 2, 3, 4, 7, 99, 2**31 - 1]
ODD_IDS = ["", "a" * 10_000, "ü名前", "\u202eevil", "fz\n", "fz\x00", "../../etc", " ", "é" * 64,
           "a" * 63, "a" * 64, "\U0001f600", "control"]  # fmt: skip


class Fuzzer:
    """Random requests and credentials; ``rng`` makes a run reproducible from its seed."""

    def __init__(self, rng: random.Random, tokens: dict[str, str]) -> None:
        self.rng = rng
        self.tokens = tokens

    def number(self) -> int:
        r = self.rng.random()
        if r < 0.4:
            return self.rng.choice(NUMBERS)
        if r < 0.7:
            return BOOT_RAM_GPA + self.rng.randrange(0, 4096) * PAGE
        if r < 0.85:
            return self.rng.randrange(1, 64) * PAGE
        return self.rng.getrandbits(64)

    def length(self) -> int:
        return self.rng.choice([PAGE, 2 * PAGE, 2 * MiB, self.number()])

    def enum(self) -> int:
        return self.rng.choice(ENUMS) if self.rng.random() < 0.5 else self.rng.randint(1, 3)

    def vm_id(self, trusted: bool) -> str:
        pool = ["fz", "fz", "fz", "fz-other", "nope", *ODD_IDS]
        vm_id = self.rng.choice(pool)
        # The admin and the control VM's own token may change the control VM: they never name
        # it. Every other credential may, and must be refused.
        return "fz" if trusted and vm_id == "control" else vm_id

    def device_id(self) -> str:
        return self.rng.choice(["vmem0", "dimm0", "boot-ram", "nope", *ODD_IDS])

    def credential(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        kind = self.rng.choice(
            ["admin", "admin", "fz", "fz", "control", "none", "garbage", "huge", "basic", "gone"]
        )
        values = {
            "admin": bearer(ADMIN_TOKEN),
            "fz": bearer(self.tokens["fz"]),
            "control": bearer(self.tokens["control"]),
            "gone": bearer(self.tokens["gone"]),
            "none": (),
            "garbage": bearer("tsv_" + "x" * self.rng.randrange(0, 60)),
            "huge": bearer("t" * 10_000),
            "basic": (("authorization", "Basic " + "A" * 20),),
        }
        return kind, values[kind]

    def request(self, rpc: str, trusted: bool) -> Any:
        vm_id = self.vm_id(trusted)
        n, e = self.number, self.enum
        if rpc == "CreateVm":
            return pb.CreateVmRequest(
                vm_id=self.rng.choice([f"fz-new-{self.rng.randrange(20)}", vm_id]),
                mte_enabled=self.rng.random() < 0.5, tag_policy=e(),
                boot_memory_bytes=self.rng.choice([4 * MiB, n()]),
                dimm_slots=self.rng.choice([0, 2, 2**32 - 1]),
                max_memory_bytes=self.rng.choice([0, n()]))  # fmt: skip
        if rpc == "GuestFault":
            return pb.GuestFaultRequest(vm_id=vm_id, gpa=n(), length=self.length(), access=e())
        if rpc == "CopyTags":
            length = self.length()
            size = (
                min(length // 16, 1 << 16) if self.rng.random() < 0.5 else self.rng.randrange(300)
            )
            tags = bytes(self.rng.randrange(0, 20) for _ in range(size))
            return pb.CopyTagsRequest(vm_id=vm_id, gpa=n(), length=length, direction=e(), tags=tags)
        if rpc == "AddMemoryDevice":
            if self.rng.random() < 0.5:
                size_bytes = self.rng.choice([128 * MiB, n()])
                return pb.AddMemoryDeviceRequest(
                    vm_id=vm_id,
                    device_id=self.device_id(),
                    dimm=pb.DimmConfig(size_bytes=size_bytes),
                )
            return pb.AddMemoryDeviceRequest(vm_id=vm_id, device_id=self.device_id(),
                virtio_mem=pb.VirtioMemConfig(region_size=self.rng.choice([256 * MiB, n()]),
                    block_size=self.rng.choice([2 * MiB, n()]), requested_size=n()))  # fmt: skip
        if rpc == "RemoveMemoryDevice":
            return pb.RemoveMemoryDeviceRequest(vm_id=vm_id, device_id=self.device_id())
        if rpc == "ResizeVirtioMem":
            return pb.ResizeVirtioMemRequest(
                vm_id=vm_id, device_id=self.device_id(), requested_size=n()
            )
        if rpc == "VirtioMemRequest":
            return pb.VirtioMemRequestRequest(vm_id=vm_id, device_id=self.device_id(), type=e(),
                addr=self.rng.choice([DEVICE_GPA + self.rng.randrange(128) * 2 * MiB, n()]),
                nb_blocks=self.rng.choice([0, 1, 2, 0xFFFF, 2**32 - 1]))  # fmt: skip
        if rpc == "GetVm":
            return pb.GetVmRequest(vm_id=vm_id)
        if rpc == "DestroyVm":
            return pb.DestroyVmRequest(vm_id=self.rng.choice(["fz-other", "nope", *ODD_IDS[:-1]]))
        return REQUEST_TYPES[rpc]()

    def mutate(self, data: bytes) -> bytes:
        buf = bytearray(data or b"\x00")
        for _ in range(self.rng.randint(1, 4)):
            op = self.rng.random()
            i = self.rng.randrange(len(buf))
            if op < 0.5:
                buf[i] = self.rng.randrange(256)
            elif op < 0.75:
                buf.insert(i, self.rng.randrange(256))
            elif len(buf) > 1:
                del buf[i]
        if self.rng.random() < 0.1:
            return self.rng.randbytes(self.rng.randrange(0, 64))
        return bytes(buf)


REQUEST_TYPES: dict[str, type[Any]] = {
    "GetHost": pb.GetHostRequest, "CreateVm": pb.CreateVmRequest, "GetVm": pb.GetVmRequest,
    "ListVms": pb.ListVmsRequest, "DestroyVm": pb.DestroyVmRequest,
    "GuestFault": pb.GuestFaultRequest, "AddMemoryDevice": pb.AddMemoryDeviceRequest,
    "RemoveMemoryDevice": pb.RemoveMemoryDeviceRequest,
    "ResizeVirtioMem": pb.ResizeVirtioMemRequest, "VirtioMemRequest": pb.VirtioMemRequestRequest,
    "CopyTags": pb.CopyTagsRequest, "CheckInvariants": pb.CheckInvariantsRequest,
}  # fmt: skip
STREAMS = ["StreamGuestFaults", "ExportState", "WatchEvents"]


def _vm(stub: pb_grpc.TagStorageStub, vm_id: str) -> pb.Vm:
    vm = stub.CreateVm(
        pb.CreateVmRequest(vm_id=vm_id, mte_enabled=True, tag_policy=pb.TAG_POLICY_ON_FAULT,
                           boot_memory_bytes=64 * MiB, dimm_slots=2,
                           max_memory_bytes=64 * MiB + GiB)
    )  # fmt: skip
    stub.AddMemoryDevice(
        pb.AddMemoryDeviceRequest(vm_id=vm_id, device_id="vmem0", virtio_mem=pb.VirtioMemConfig(
            region_size=256 * MiB, block_size=2 * MiB, requested_size=16 * MiB))
    )  # fmt: skip
    return vm


@pytest.fixture
def fuzz_daemon(hostd_process: Callable[..., HostdProcess]) -> Iterator[HostdProcess]:
    """A daemon of its own: the fuzzer creates and destroys VMs."""
    daemon = hostd_process()
    yield daemon
    daemon.proc.kill()
    daemon.wait()


def test_hostile_requests_never_answer_unknown_or_internal_and_leave_the_host_sound(
    fuzz_daemon: HostdProcess,
) -> None:
    """A few thousand random, mutated and early-closed calls with every kind of credential."""
    rng = random.Random(SEED)
    with raw_channel(fuzz_daemon.address) as channel:
        stub = pb_grpc.TagStorageStub(channel)
        admin = bearer(ADMIN_TOKEN)
        admin_stub = pb_grpc.TagStorageStub(channel)

        control = admin_stub.CreateVm(
            pb.CreateVmRequest(vm_id="control", mte_enabled=True, tag_policy=1,
                               boot_memory_bytes=4 * MiB), metadata=admin)  # fmt: skip
        control_tags = bytes(rng.randrange(16) for _ in range(2 * PAGE // 16))
        read_control = pb.CopyTagsRequest(vm_id="control", gpa=BOOT_RAM_GPA, length=2 * PAGE,
                                          direction=pb.TAG_COPY_DIRECTION_FROM_GUEST)  # fmt: skip
        admin_stub.CopyTags(
            pb.CopyTagsRequest(vm_id="control", gpa=BOOT_RAM_GPA, length=2 * PAGE,
                               direction=pb.TAG_COPY_DIRECTION_TO_GUEST, tags=control_tags),
            metadata=admin)  # fmt: skip
        control_before = admin_stub.GetVm(pb.GetVmRequest(vm_id="control"), metadata=admin)

        fz = _vm(pb_grpc.TagStorageStub(fuzz_daemon.channel()), "fz")
        gone = _vm(pb_grpc.TagStorageStub(fuzz_daemon.channel()), "gone")
        stub.DestroyVm(pb.DestroyVmRequest(vm_id="gone"), metadata=admin)
        tokens = {"fz": fz.vm_token, "control": control.vm_token, "gone": gone.vm_token}
        fuzzer = Fuzzer(rng, tokens)
        health = health_pb2_grpc.HealthStub(channel)

        seen: dict[str, int] = {}
        bad: list[str] = []

        def record(rpc: str, kind: str, error: grpc.RpcError | None, parses: bool = True) -> None:
            code = grpc.StatusCode.OK if error is None else error.code()
            seen[code.name] = seen.get(code.name, 0) + 1
            details = (error.details() or "") if error is not None else ""
            library_refusal = "deserializ" in details or "Error parsing message" in details
            if code in NEVER and (parses or not library_refusal):
                bad.append(f"{rpc} with {kind}: {code.name} {error.details() if error else ''}")

        for i in range(REQUESTS):
            kind, metadata = fuzzer.credential()
            trusted = kind in ("admin", "control")
            roll = rng.random()
            if roll < 0.1:
                rpc = rng.choice(STREAMS)
                try:
                    if rpc == "StreamGuestFaults":
                        faults = [
                            fuzzer.request("GuestFault", trusted) for _ in range(rng.randint(1, 6))
                        ]
                        call = stub.StreamGuestFaults(iter(faults), metadata=metadata, timeout=30)
                    else:
                        request = pb.WatchEventsRequest(include_faults=rng.random() < 0.5) if (
                            rpc == "WatchEvents") else pb.ExportStateRequest()  # fmt: skip
                        call = getattr(stub, rpc)(request, metadata=metadata, timeout=30)
                    for _ in range(rng.randint(0, 3) if rpc != "WatchEvents" else 0):
                        next(call, None)
                    call.cancel()  # closed early (a no-op once it has ended)
                    list(call)
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.CANCELLED:
                        record(rpc, kind, e)
                continue
            rpc = rng.choice(list(REQUEST_TYPES))
            request = fuzzer.request(rpc, trusted)
            if roll < 0.3:
                data = fuzzer.mutate(request.SerializeToString())
                try:
                    REQUEST_TYPES[rpc].FromString(data)
                    parses = True
                except Exception:
                    parses = False
                raw = channel.unary_unary(SERVICE + rpc)
                try:
                    raw(data, metadata=metadata, timeout=30)
                    record(rpc, kind, None)
                except grpc.RpcError as e:
                    record(rpc, kind, e, parses)
                continue
            try:
                getattr(stub, rpc)(request, metadata=metadata, timeout=30)
                record(rpc, kind, None)
            except grpc.RpcError as e:
                record(rpc, kind, e)
            if i % 97 == 0:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=30).status
                assert health_pb2.HealthCheckResponse.SERVING == status

        assert [] == bad, f"codes seen: {seen}"
        assert [] == list(
            admin_stub.CheckInvariants(pb.CheckInvariantsRequest(), metadata=admin).violations
        )
        assert control_tags == admin_stub.CopyTags(read_control, metadata=admin).tags
        assert control_before == admin_stub.GetVm(pb.GetVmRequest(vm_id="control"), metadata=admin)
        assert seen.get("OK", 0) > 0 and seen.get("PERMISSION_DENIED", 0) > 0
    log = fuzz_daemon.stderr()
    internal = [line for line in log.splitlines() if "INTERNAL" in line or "Traceback" in line]
    assert [] == internal, log[log.find(internal[0]) :][:3000] if internal else ""
