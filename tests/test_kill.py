"""The kill test: a seeded VM lifecycle workload against the real daemon, which is SIGKILLed at
random moments (often in the middle of a call) and restarted on the same state directory.

The client retries every call that got no answer with the same ``request_id`` until it gets
one, so each call takes effect exactly once. The expected state is a second, in-process model
given the same calls in the same order (the model is deterministic). After every restart the
daemon's ExportState must equal the expected model's, CheckInvariants must be empty, and every
tag written and still owned must read back.

CI runs a short form (6 kills); the long form is
``TAGSTORE_KILL_ROUNDS=60 python -m pytest tests/test_kill.py -s --timeout=0`` (bench/README.md).
``TAGSTORE_KILL_SEED`` picks another workload.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest

from hostd.api import convert
from hostd.api.auth import Credentials
from hostd.api.servicer import TagStorageServicer
from hostd.model import Host, default_topology
from hostd.model.errors import TagStoreError
from hostd.model.types import TagCopyDirection
from tagstore.v1 import tagstore_pb2 as pb
from tagstore.v1 import tagstore_pb2_grpc as pb_grpc
from tests.conftest import ADMIN_TOKEN, BOOT_RAM_GPA, GiB, HostdProcess, MiB

pytestmark = pytest.mark.integration

KILL_ROUNDS = int(os.environ.get("TAGSTORE_KILL_ROUNDS", "6"))
SEED = int(os.environ.get("TAGSTORE_KILL_SEED", "8"))
HOST_MEMORY = "2GiB"
PAGE = 4096
# Calls between kills; a kill lands in the middle of the last one (or just after it).
CALLS_PER_ROUND = 25


class Refused(Exception):
    """The expected model refused a call (with this gRPC code)."""

    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code.name)
        self.code = code


class _ExpectedContext:
    """What the in-process servicer of the *expected* model needs of a gRPC context: the admin
    credential, no deadline, and a refusal that becomes :class:`Refused`. (The daemon under
    test is the real process.)"""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {ADMIN_TOKEN}"),)

    def time_remaining(self) -> None:
        return None

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    async def abort(self, code: grpc.StatusCode, details: str = "", *_: object) -> NoReturn:
        if code is grpc.StatusCode.INTERNAL:
            raise AssertionError(f"the expected model failed: {code} {details}")
        raise Refused(code)


class _Expected:
    """The expected model behind the daemon's own servicer (grpc.aio handlers, run on a loop of
    this test's own)."""

    def __init__(self, host: Host) -> None:
        self.loop = asyncio.new_event_loop()
        credentials = Credentials(hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest(), None)
        self.servicer = TagStorageServicer(host, credentials=credentials)

    def call(self, rpc: str, request: Any) -> None:
        self.loop.run_until_complete(getattr(self.servicer, rpc)(request, _ExpectedContext()))

    def close(self) -> None:
        self.servicer.shutdown()
        self.loop.close()


@dataclass
class Workload:
    """A seeded stream of mutating calls over a few VMs."""

    rng: random.Random
    vms: dict[str, dict[str, Any]] = field(default_factory=dict)
    tags: dict[tuple[str, int], bytes] = field(default_factory=dict)
    counter: int = 0

    def next_call(self) -> tuple[str, Any]:
        self.counter += 1
        n = self.counter
        rng = self.rng
        if not self.vms or (len(self.vms) < 6 and rng.random() < 0.15):
            vm_id = f"vm{n}"
            mte = rng.random() < 0.7
            policy = rng.choice(
                [pb.TAG_POLICY_ON_FAULT, pb.TAG_POLICY_EAGER, pb.TAG_POLICY_ON_TAG_ACCESS]
            )
            self.vms[vm_id] = {"mte": mte, "devices": []}
            return "CreateVm", pb.CreateVmRequest(
                vm_id=vm_id,
                mte_enabled=mte,
                tag_policy=policy if mte else pb.TAG_POLICY_UNSPECIFIED,
                boot_memory_bytes=rng.choice([32, 64, 128]) * MiB,
                dimm_slots=2,
                max_memory_bytes=128 * MiB + GiB,
            )
        vm_id = rng.choice(sorted(self.vms))
        vm = self.vms[vm_id]
        roll = rng.random()
        if roll < 0.06:
            del self.vms[vm_id]
            self.tags = {k: v for k, v in self.tags.items() if k[0] != vm_id}
            return "DestroyVm", pb.DestroyVmRequest(vm_id=vm_id)
        if roll < 0.45:
            length = rng.choice([PAGE, 64 * 1024, 2 * MiB, 16 * MiB])
            gpa = BOOT_RAM_GPA + rng.randrange(0, 32 * MiB, PAGE)
            access = rng.choice([pb.ACCESS_READ, pb.ACCESS_WRITE, pb.ACCESS_TAG])
            return "GuestFault", pb.GuestFaultRequest(
                vm_id=vm_id, gpa=gpa, length=length, access=access
            )
        if roll < 0.6 and vm["mte"]:
            gpa = BOOT_RAM_GPA + rng.randrange(0, 32 * MiB, PAGE)
            tags = bytes(rng.randrange(16) for _ in range(PAGE // 16))
            self.tags[(vm_id, gpa)] = tags
            return "CopyTags", pb.CopyTagsRequest(
                vm_id=vm_id,
                gpa=gpa,
                length=PAGE,
                direction=pb.TAG_COPY_DIRECTION_TO_GUEST,
                tags=tags,
            )
        if roll < 0.7:
            device_id = f"dimm{n}"
            vm["devices"].append(device_id)
            return "AddMemoryDevice", pb.AddMemoryDeviceRequest(
                vm_id=vm_id, device_id=device_id, dimm=pb.DimmConfig(size_bytes=64 * MiB)
            )
        if roll < 0.8:
            device_id = f"vmem{n}"
            vm["devices"].append(device_id)
            return "AddMemoryDevice", pb.AddMemoryDeviceRequest(
                vm_id=vm_id,
                device_id=device_id,
                virtio_mem=pb.VirtioMemConfig(
                    region_size=256 * MiB, block_size=2 * MiB, requested_size=64 * MiB
                ),
            )
        if roll < 0.95 and vm["devices"]:
            device_id = rng.choice(vm["devices"])
            kind = rng.choice([pb.VIRTIO_MEM_REQUEST_TYPE_PLUG, pb.VIRTIO_MEM_REQUEST_TYPE_UNPLUG])
            return "VirtioMemRequest", pb.VirtioMemRequestRequest(
                vm_id=vm_id,
                device_id=device_id,
                type=kind,
                addr=rng.choice([0, 0x1_0000_0000, 0x1_4000_0000, 0x1_8000_0000]),
                nb_blocks=rng.choice([1, 4, 16]),
            )
        if vm["devices"]:
            device_id = vm["devices"].pop(rng.randrange(len(vm["devices"])))
            return "RemoveMemoryDevice", pb.RemoveMemoryDeviceRequest(
                vm_id=vm_id, device_id=device_id
            )
        return "GuestFault", pb.GuestFaultRequest(
            vm_id=vm_id, gpa=BOOT_RAM_GPA, length=PAGE, access=pb.ACCESS_WRITE
        )


def call_until_answered(
    daemon: Callable[[], HostdProcess], rpc: str, request: Any
) -> tuple[grpc.StatusCode, Any]:
    """Call ``rpc`` on the current daemon until it answers (retries keep the request id)."""
    deadline = time.monotonic() + 60
    while True:
        with daemon().channel() as channel:
            try:
                return grpc.StatusCode.OK, getattr(pb_grpc.TagStorageStub(channel), rpc)(
                    request, timeout=10
                )
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return e.code(), None
        assert time.monotonic() < deadline, f"{rpc} never answered"
        time.sleep(0.05)


def expected_call(expected: _Expected, rpc: str, request: Any) -> grpc.StatusCode:
    try:
        expected.call(rpc, request)
    except Refused as e:
        return e.code
    return grpc.StatusCode.OK


def verify(process: HostdProcess, expected: Host, workload: Workload) -> None:
    """The daemon's state is the expected model's; invariants hold; tags read back."""
    with process.channel() as channel:
        stub = pb_grpc.TagStorageStub(channel)
        want = convert.export_to_proto(expected.export_state(), PAGE)
        assert want == list(stub.ExportState(pb.ExportStateRequest(), timeout=30))
        assert [] == list(stub.CheckInvariants(pb.CheckInvariantsRequest()).violations)
        for vm_id, gpa in sorted(workload.tags):
            try:
                want_tags = expected.copy_tags(vm_id, gpa, PAGE, TagCopyDirection.FROM_GUEST)
            except TagStoreError:
                continue  # unplugged or unmapped since: the guest gave the memory up
            got = stub.CopyTags(
                pb.CopyTagsRequest(
                    vm_id=vm_id,
                    gpa=gpa,
                    length=PAGE,
                    direction=pb.TAG_COPY_DIRECTION_FROM_GUEST,
                ),
                timeout=10,
            )
            assert want_tags == got.tags


def test_acknowledged_state_survives_random_sigkills(
    hostd_process: Callable[..., HostdProcess], tmp_path: Path
) -> None:
    """SIGKILL at random moments, KILL_ROUNDS times: after each restart the daemon's state is
    what the answered calls imply, its invariants hold and written tags read back."""
    rng = random.Random(SEED)
    state = str(tmp_path / "state")
    args = ("--state-dir", state, "--memory", HOST_MEMORY, "--snapshot-every", "40")
    current = [hostd_process(*args)]
    expected_host = Host(default_topology(2 * GiB))
    expected = _Expected(expected_host)
    workload = Workload(rng)
    kills_mid_call = 0
    for round_number in range(KILL_ROUNDS):
        for i in range(CALLS_PER_ROUND):
            rpc, request = workload.next_call()
            request.request_id = f"r{round_number}-{i}"
            last = i == CALLS_PER_ROUND - 1
            if last:
                # Send the call and kill the daemon while it may be in flight.
                channel = current[0].channel()
                future = getattr(pb_grpc.TagStorageStub(channel), rpc).future(request)
                time.sleep(rng.choice([0.0, 0.0002, 0.0005, 0.001, 0.003]))
                kills_mid_call += not future.done()
                current[0].signal(signal.SIGKILL)
                current[0].wait()
                channel.close()
                current[0] = hostd_process(*args)
            code, _ = call_until_answered(lambda: current[0], rpc, request)
            assert expected_call(expected, rpc, request) == code, (rpc, request)
        verify(current[0], expected_host, workload)
    assert "Traceback" not in current[0].stderr()
    print(f"{KILL_ROUNDS} kills, {kills_mid_call} with the call in flight")
    expected.close()
