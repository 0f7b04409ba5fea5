"""What the client puts on the wire, seen by a real gRPC server in the test process
(:class:`tests.shim.servers.ScriptedHost`): the bearer token on every call and stream, a VM's
own token on its calls, one request_id per logical call repeated by every retry, and which
failures are retried."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from tests.shim.servers import ScriptedHost, serve
from vmm_shim import (
    DeadlineExceeded,
    HostClient,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)

ADMIN = "admin-secret-0123456789"
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
GPA = 0x4000_0000


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedHost, str]]:
    """A ScriptedHost that requires credentials (admin token ``ADMIN``), and its address;
    clients' channels carry only what the client sends."""
    host = ScriptedHost(admin_token=ADMIN)
    server, address = serve(host.handler())
    yield host, address
    server.stop(None)


def create(host: HostClient, vm_id: str = "vm1") -> object:
    return host.create_vm(vm_id, mte_enabled=True, boot_memory_bytes=64 << 20)


# -- credentials -------------------------------------------------------------------------------


def test_every_call_and_stream_carries_the_clients_bearer_token(
    scripted: tuple[ScriptedHost, str],
) -> None:
    """Host-scoped unary calls and both server streams send ``authorization: Bearer <token>``."""
    server, address = scripted
    with HostClient(address, token=ADMIN) as host:
        host.host_status()
        host.list_vms()
        host.check_invariants()
        host.get_vm("vm1")
        host.export_state()
        with host.watch_events() as events:
            next(events)
    seen = {a.method: a.authorization for a in server.attempts}
    assert {
        "GetHost": f"Bearer {ADMIN}",
        "ListVms": f"Bearer {ADMIN}",
        "CheckInvariants": f"Bearer {ADMIN}",
        "GetVm": f"Bearer {ADMIN}",
        "ExportState": f"Bearer {ADMIN}",
        "WatchEvents": f"Bearer {ADMIN}",
    } == seen


def test_a_created_vms_handle_uses_the_vm_token_hostd_issued(
    scripted: tuple[ScriptedHost, str],
) -> None:
    """CreateVm goes with the admin token; the handle it returns sends the VM's own token on
    every call of that VM, the fault stream included."""
    server, address = scripted
    with HostClient(address, token=ADMIN) as host:
        vm = host.create_vm("vm1", mte_enabled=True, boot_memory_bytes=64 << 20)
        vm.info()
        vm.fault(GPA, 4096)
        vm.copy_tags_to_guest(GPA, bytes(256))
        vm.copy_tags_from_guest(GPA, 4096)
        vm.add_dimm("dimm0", 128 << 20)
        vm.resize_virtio_mem("vmem0", 0)
        vm.virtio_mem_plug("vmem0", GPA, 1)
        vm.virtio_mem_state("vmem0", GPA, 1)
        vm.remove_device("dimm0")
        list(vm.fault_stream([(GPA, 4096, "READ")]))
        vm.destroy()
    assert "vm-token-of-vm1" == vm.vm_token
    (created, *vm_calls) = server.attempts
    assert ("CreateVm", f"Bearer {ADMIN}") == (created.method, created.authorization)
    assert len(vm_calls) == 11
    assert {"Bearer vm-token-of-vm1"} == {a.authorization for a in vm_calls}


def test_a_handle_made_from_a_saved_vm_token_drives_that_vm_without_the_admin_token(
    scripted: tuple[ScriptedHost, str],
) -> None:
    """``host.vm(id, token=...)`` on a client with no token of its own: the VM's calls pass,
    a host-scoped call is UNAUTHENTICATED."""
    server, address = scripted
    with HostClient(address, token=ADMIN) as admin:
        token = admin.create_vm("vm1", mte_enabled=True, boot_memory_bytes=64 << 20).vm_token
    with HostClient(address) as anonymous:
        anonymous.vm("vm1", token=token).fault(GPA, 4096)
        with pytest.raises(Unauthenticated):
            anonymous.host_status()
    assert "Bearer vm-token-of-vm1" == server.of("GuestFault")[0].authorization


def test_another_vms_token_is_permission_denied(scripted: tuple[ScriptedHost, str]) -> None:
    """The client surfaces the server's PERMISSION_DENIED as its own class."""
    _, address = scripted
    with HostClient(address, token=ADMIN) as host:
        token_a = host.create_vm("a", mte_enabled=True, boot_memory_bytes=64 << 20).vm_token
        host.create_vm("b", mte_enabled=True, boot_memory_bytes=64 << 20)
        with pytest.raises(PermissionDenied):
            host.vm("b", token=token_a).destroy()


def test_without_a_token_no_authorization_is_sent(scripted: tuple[ScriptedHost, str]) -> None:
    """No token, or an empty one, sends no header at all (and the server refuses the call)."""
    server, address = scripted
    for token in (None, ""):
        with (
            HostClient(address, token=token, max_attempts=1) as host,
            pytest.raises(Unauthenticated),
        ):
            host.host_status()
    assert [None, None] == [a.authorization for a in server.attempts]


def test_tokens_never_appear_in_reprs_or_errors(scripted: tuple[ScriptedHost, str]) -> None:
    """repr() of the client and of a VM handle, and a refusal's text, do not contain a token."""
    _, address = scripted
    with HostClient(address, token=ADMIN) as host:
        vm = host.create_vm("vm1", mte_enabled=True, boot_memory_bytes=64 << 20)
        with (
            HostClient(address, token=vm.vm_token, max_attempts=1) as vm_client,
            pytest.raises(PermissionDenied) as refused,
        ):
            vm_client.host_status()
        texts = [repr(host), repr(vm), str(refused.value), repr(refused.value)]
    assert not [t for t in texts if ADMIN in t or vm.vm_token in t], texts


@pytest.mark.parametrize("token", ["two words", "line\nbreak", "tök", "Bearer"])
def test_a_token_that_cannot_be_a_bearer_token_is_refused_without_echoing_it(token: str) -> None:
    """A token with spaces, control characters or non-ASCII letters is a ValueError at
    construction (gRPC would refuse it on every call), and the message does not repeat it."""
    if token == "Bearer":
        HostClient(token=token).close()  # a plain word is a valid token
        return
    with pytest.raises(ValueError, match="token: not a bearer token") as refused:
        HostClient(token=token)
    assert token not in str(refused.value)


# -- request ids and retries -------------------------------------------------------------------


def test_a_mutating_call_is_retried_on_unavailable_with_the_same_request_id(
    scripted: tuple[ScriptedHost, str],
) -> None:
    """The first attempt is refused UNAVAILABLE; the retry carries the same request_id."""
    server, address = scripted
    server.fail["CreateVm"] = [UNAVAILABLE, UNAVAILABLE]
    with HostClient(address, token=ADMIN) as host:
        create(host)
    ids = [a.request.request_id for a in server.of("CreateVm")]  # type: ignore[attr-defined]
    assert 3 == len(ids) and 1 == len(set(ids)) and ids[0]


def test_a_mutating_call_is_retried_after_an_attempt_deadline_with_the_same_request_id(
    scripted: tuple[ScriptedHost, str],
) -> None:
    """An attempt that outlives ``attempt_timeout_s`` is repeated within the call's timeout."""
    server, address = scripted
    server.delay_s["GuestFault"] = [1.0]
    with HostClient(address, token=ADMIN, timeout_s=5.0, attempt_timeout_s=0.3) as host:
        host.vm("vm1").fault(GPA, 4096)
    ids = [a.request.request_id for a in server.of("GuestFault")]  # type: ignore[attr-defined]
    assert 2 == len(ids) and ids[0] == ids[1] and ids[0]


def test_each_logical_call_gets_a_fresh_request_id(scripted: tuple[ScriptedHost, str]) -> None:
    """Two calls with the same arguments are two operations: two distinct ids (uuid4)."""
    server, address = scripted
    with HostClient(address, token=ADMIN) as host:
        vm = host.vm("vm1")
        vm.virtio_mem_plug("vmem0", GPA, 1)
        vm.virtio_mem_plug("vmem0", GPA, 1)
    ids = [a.request.request_id for a in server.of("VirtioMemRequest")]  # type: ignore[attr-defined]
    assert 2 == len(set(ids)) and all(len(i) == 36 for i in ids)


def test_a_caller_supplied_request_id_is_sent_unchanged(scripted: tuple[ScriptedHost, str]) -> None:
    """``request_id=`` lets a VMM repeat a call across its own restarts."""
    server, address = scripted
    with HostClient(address, token=ADMIN) as host:
        host.create_vm("vm1", mte_enabled=True, boot_memory_bytes=1 << 26, request_id="op-42")
    assert "op-42" == server.of("CreateVm")[0].request.request_id  # type: ignore[attr-defined]


def test_every_mutating_request_carries_a_request_id_and_reads_do_not(
    scripted: tuple[ScriptedHost, str],
) -> None:
    """Mutations carry an id; reads (GetVm, STATE, tag reads) carry none, so hostd keeps no
    answer for them."""
    server, address = scripted
    with HostClient(address, token=ADMIN) as host:
        vm = create(host)
        vm.fault(GPA, 4096)  # type: ignore[attr-defined]
        vm.copy_tags_to_guest(GPA, bytes(256))  # type: ignore[attr-defined]
        vm.add_virtio_mem("vmem0", region_size=1 << 30, block_size=2 << 20)  # type: ignore[attr-defined]
        vm.resize_virtio_mem("vmem0", 2 << 20)  # type: ignore[attr-defined]
        vm.virtio_mem_plug("vmem0", GPA, 1)  # type: ignore[attr-defined]
        vm.virtio_mem_unplug("vmem0", GPA, 1)  # type: ignore[attr-defined]
        vm.virtio_mem_unplug_all("vmem0")  # type: ignore[attr-defined]
        vm.remove_device("vmem0")  # type: ignore[attr-defined]
        vm.destroy()  # type: ignore[attr-defined]
        vm.copy_tags_from_guest(GPA, 4096)  # type: ignore[attr-defined]
        vm.virtio_mem_state("vmem0", GPA, 1)  # type: ignore[attr-defined]
        vm.info()  # type: ignore[attr-defined]
    with_id = [
        (a.method, getattr(a.request, "type", None))
        for a in server.attempts
        if getattr(a.request, "request_id", "")
    ]
    assert 10 == len(with_id)
    without = [a.method for a in server.attempts if not getattr(a.request, "request_id", "")]
    assert ["CopyTags", "VirtioMemRequest", "GetVm"] == without


def test_reads_are_retried_on_deadline_exceeded_and_unavailable(
    scripted: tuple[ScriptedHost, str],
) -> None:
    """A read repeats like a mutation: two failed attempts, then the answer."""
    server, address = scripted
    server.fail["GetHost"] = [DEADLINE, UNAVAILABLE]
    with HostClient(address, token=ADMIN) as host:
        host.host_status()
    assert 3 == len(server.of("GetHost"))


def test_retries_stop_after_max_attempts(scripted: tuple[ScriptedHost, str]) -> None:
    """A daemon that keeps answering UNAVAILABLE gets ``max_attempts`` attempts, then the
    caller gets Unavailable."""
    server, address = scripted
    server.fail["DestroyVm"] = [UNAVAILABLE] * 10
    with HostClient(address, token=ADMIN, max_attempts=3) as host, pytest.raises(Unavailable):
        host.vm("vm1").destroy()
    assert 3 == len(server.of("DestroyVm"))


def test_a_call_that_outlives_its_whole_timeout_is_deadline_exceeded(
    scripted: tuple[ScriptedHost, str],
) -> None:
    """When every attempt's deadline passes and the call's timeout is spent, the caller gets
    DeadlineExceeded."""
    server, address = scripted
    server.delay_s["GetHost"] = [2.0] * 5
    with HostClient(address, token=ADMIN, timeout_s=0.5) as host, pytest.raises(DeadlineExceeded):
        host.host_status()


def test_other_refusals_are_not_retried(scripted: tuple[ScriptedHost, str]) -> None:
    """NOT_FOUND is an answer: one attempt."""
    server, address = scripted
    server.fail["GetVm"] = [grpc.StatusCode.NOT_FOUND]
    with HostClient(address, token=ADMIN) as host, pytest.raises(NotFound):
        host.get_vm("vm1")
    assert 1 == len(server.of("GetVm"))


# -- values a request cannot carry ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (
            lambda h: h.create_vm("x", mte_enabled=True, boot_memory_bytes=1 << 64),
            "boot_memory_bytes",
        ),
        (
            lambda h: h.create_vm("x", mte_enabled=True, boot_memory_bytes=1, dimm_slots=1 << 32),
            "dimm_slots",
        ),
        (lambda h: h.create_vm("x", mte_enabled=True, boot_memory_bytes=-1), "boot_memory_bytes"),
        (lambda h: h.create_vm("x", mte_enabled=True, boot_memory_bytes=1.5), "boot_memory_bytes"),
        (lambda h: h.create_vm("x\udcff", mte_enabled=True, boot_memory_bytes=1), "vm_id"),
        (
            lambda h: h.create_vm(
                "x", mte_enabled=True, tag_policy="SOMETIMES", boot_memory_bytes=1
            ),
            "tag_policy",
        ),
        (lambda h: h.vm("x").fault(1 << 64, 4096), "gpa"),
        (lambda h: h.vm("x").fault(0, 4096, access="EXECUTE"), "access"),
        (lambda h: h.vm("x").add_dimm("d", 10**5000), "size_bytes"),
        (lambda h: h.vm("x").virtio_mem_plug("d", 0, 1 << 64), "nb_blocks"),
        (lambda h: h.vm("x").copy_tags_to_guest(0, "0123"), "tags"),
    ],
)
def test_a_value_the_request_cannot_carry_is_invalid_argument_before_sending(
    scripted: tuple[ScriptedHost, str], call: object, field: str
) -> None:
    """Out-of-range integers, wrong types, text that is not UTF-8 and unknown enum words are the
    client's own InvalidArgument, naming the field, and nothing is sent."""
    server, address = scripted
    with HostClient(address, token=ADMIN) as host, pytest.raises(InvalidArgument) as refused:
        call(host)  # type: ignore[operator]
    assert (field, "INVALID_ARGUMENT") == (refused.value.metadata["field"], refused.value.code)
    assert len(str(refused.value)) < 200
    assert [] == server.attempts
