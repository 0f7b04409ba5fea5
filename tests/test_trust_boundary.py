"""The trust boundary of the real daemon: who may call what, what the listener lets in, and how
limits and hostile values are refused (issue 9, docs/SECURITY.md)."""

from __future__ import annotations

import datetime
import grp
import os
import signal
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tagstore.v1 import tagstore_pb2 as pb
from tagstore.v1 import tagstore_pb2_grpc as pb_grpc
from tests.conftest import (
    ADMIN_TOKEN,
    BOOT_RAM_GPA,
    STARTUP_TIMEOUT_S,
    GiB,
    HostdProcess,
    MiB,
    bearer,
    raw_channel,
    run_hostd,
)
from tests.test_daemon_api import error_info
from tests.test_daemon_lifecycle import free_tcp_port

pytestmark = pytest.mark.integration

Stub = pb_grpc.TagStorageStub
Start = Callable[..., HostdProcess]
PAGE = 4096


@pytest.fixture(scope="module")
def anon(daemon: HostdProcess) -> Iterator[Stub]:
    """A client of the module's daemon that sends no credential unless told to."""
    with raw_channel(daemon.address) as channel:
        yield pb_grpc.TagStorageStub(channel)


def _create(stub: Stub, vm_id: str) -> pb.Vm:
    vm = stub.CreateVm(
        pb.CreateVmRequest(
            vm_id=vm_id,
            mte_enabled=True,
            tag_policy=pb.TAG_POLICY_ON_FAULT,
            boot_memory_bytes=16 * MiB,
            dimm_slots=2,
            max_memory_bytes=16 * MiB + GiB,
        )
    )
    stub.AddMemoryDevice(
        pb.AddMemoryDeviceRequest(
            vm_id=vm_id,
            device_id="vmem0",
            virtio_mem=pb.VirtioMemConfig(
                region_size=256 * MiB, block_size=2 * MiB, requested_size=16 * MiB
            ),
        )
    )
    stub.GuestFault(pb.GuestFaultRequest(vm_id=vm_id, gpa=BOOT_RAM_GPA, length=PAGE, access=1))
    return vm


@pytest.fixture(scope="module")
def two_vms(stub: Stub) -> tuple[pb.Vm, pb.Vm]:
    """VMs ``tb-a`` and ``tb-b``, each with a virtio-mem device and one faulted page."""
    return _create(stub, "tb-a"), _create(stub, "tb-b")


def state_of(stub: Stub, vm_id: str) -> tuple[Any, ...]:
    """What a refused call must leave alone: the VM, the host's memory, the VMs."""
    vm = stub.GetVm(pb.GetVmRequest(vm_id=vm_id))
    host = stub.GetHost(pb.GetHostRequest())
    return (
        vm.SerializeToString(),
        host.SerializeToString(),
        len(stub.ListVms(pb.ListVmsRequest()).vms),
    )


def vm_scoped_calls(vm_id: str) -> list[tuple[str, Any]]:
    """One request of every VM-scoped RPC, aimed at ``vm_id`` (StreamGuestFaults separately)."""
    dev = BOOT_RAM_GPA + 16 * MiB
    return [
        ("GetVm", pb.GetVmRequest(vm_id=vm_id)),
        (
            "GuestFault",
            pb.GuestFaultRequest(vm_id=vm_id, gpa=BOOT_RAM_GPA + PAGE, length=PAGE, access=2),
        ),
        (
            "CopyTags",
            pb.CopyTagsRequest(
                vm_id=vm_id, gpa=BOOT_RAM_GPA, length=PAGE, direction=1, tags=bytes(256)
            ),
        ),
        ("CopyTags", pb.CopyTagsRequest(vm_id=vm_id, gpa=BOOT_RAM_GPA, length=PAGE, direction=2)),
        (
            "AddMemoryDevice",
            pb.AddMemoryDeviceRequest(
                vm_id=vm_id, device_id="dimm9", dimm=pb.DimmConfig(size_bytes=128 * MiB)
            ),
        ),
        ("RemoveMemoryDevice", pb.RemoveMemoryDeviceRequest(vm_id=vm_id, device_id="vmem0")),
        (
            "ResizeVirtioMem",
            pb.ResizeVirtioMemRequest(vm_id=vm_id, device_id="vmem0", requested_size=64 * MiB),
        ),
        (
            "VirtioMemRequest",
            pb.VirtioMemRequestRequest(
                vm_id=vm_id, device_id="vmem0", type=1, addr=dev, nb_blocks=1
            ),
        ),
        ("DestroyVm", pb.DestroyVmRequest(vm_id=vm_id)),
    ]


HOST_SCOPED_CALLS: list[tuple[str, Any]] = [
    ("GetHost", pb.GetHostRequest()),
    ("ListVms", pb.ListVmsRequest()),
    ("CreateVm", pb.CreateVmRequest(vm_id="tb-new", boot_memory_bytes=4 * MiB)),
    ("CheckInvariants", pb.CheckInvariantsRequest()),
]
HOST_SCOPED_STREAMS: list[tuple[str, Any]] = [
    ("ExportState", pb.ExportStateRequest()),
    ("WatchEvents", pb.WatchEventsRequest()),
]


def _first(method: Callable[..., Any], request: Any, **kwargs: Any) -> Any:
    """The first message of a server-streaming call."""
    return next(method(request, **kwargs))


def _code(call: Callable[..., Any], *args: Any, **kwargs: Any) -> grpc.StatusCode:
    """The status code of ``call(*args, **kwargs)`` (OK if it returns)."""
    try:
        call(*args, **kwargs)
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_a_vm_token_is_refused_for_every_call_on_another_vm_and_changes_nothing(
    stub: Stub, anon: Stub, two_vms: tuple[pb.Vm, pb.Vm]
) -> None:
    """With VM A's token, every VM-scoped RPC naming VM B is PERMISSION_DENIED; B is untouched."""
    a, b = two_vms
    before = state_of(stub, b.vm_id)
    for rpc, request in vm_scoped_calls(b.vm_id):
        with pytest.raises(grpc.RpcError) as caught:
            getattr(anon, rpc)(request, metadata=bearer(a.vm_token), timeout=10)
        assert grpc.StatusCode.PERMISSION_DENIED == caught.value.code(), rpc
        assert "PERMISSION_DENIED" == error_info(caught.value).reason
        assert a.vm_token not in str(caught.value.details())
    faults = iter(
        [pb.GuestFaultRequest(vm_id=b.vm_id, gpa=BOOT_RAM_GPA + PAGE, length=PAGE, access=2)]
    )
    with pytest.raises(grpc.RpcError) as caught:
        list(anon.StreamGuestFaults(faults, metadata=bearer(a.vm_token), timeout=10))
    assert grpc.StatusCode.PERMISSION_DENIED == caught.value.code()
    assert before == state_of(stub, b.vm_id)


def test_a_vm_token_works_for_its_own_vm(anon: Stub, two_vms: tuple[pb.Vm, pb.Vm]) -> None:
    """The token CreateVm answered is enough for the VM's own faults, tags and devices."""
    a, _ = two_vms
    token = bearer(a.vm_token)
    answer = anon.GuestFault(
        pb.GuestFaultRequest(vm_id=a.vm_id, gpa=BOOT_RAM_GPA + 2 * PAGE, length=PAGE, access=2),
        metadata=token,
    )
    assert 1 == answer.newly_mapped_pages
    assert a.vm_id == anon.GetVm(pb.GetVmRequest(vm_id=a.vm_id), metadata=token).vm_id
    faults = [pb.GuestFaultRequest(vm_id=a.vm_id, gpa=BOOT_RAM_GPA, length=PAGE, access=2)] * 3
    assert 3 == len(list(anon.StreamGuestFaults(iter(faults), metadata=token)))


def test_a_token_revoked_while_its_stream_is_open_refuses_the_next_message(
    stub: Stub, anon: Stub
) -> None:
    """A fault stream opened with a VM's token, then the VM destroyed and created again under
    the same id (with a new token): the stream's next fault is UNAUTHENTICATED and the new VM
    keeps its pages unmapped."""
    old = _create(stub, "tb-revoked")
    fault = pb.GuestFaultRequest(vm_id=old.vm_id, gpa=BOOT_RAM_GPA, length=PAGE, access=2)
    fresh = pb.GuestFaultRequest(vm_id=old.vm_id, gpa=BOOT_RAM_GPA + PAGE, length=PAGE, access=2)
    replaced = threading.Event()

    def faults() -> Iterator[pb.GuestFaultRequest]:
        yield fault
        replaced.wait(10)
        yield fault
        yield fresh

    stream = anon.StreamGuestFaults(faults(), metadata=bearer(old.vm_token), timeout=30)
    assert 0 == next(stream).newly_mapped_pages
    stub.DestroyVm(pb.DestroyVmRequest(vm_id=old.vm_id))
    new = _create(stub, old.vm_id)
    assert new.vm_token != old.vm_token
    mapped = stub.GetVm(pb.GetVmRequest(vm_id=new.vm_id)).mapped_bytes
    replaced.set()
    with pytest.raises(grpc.RpcError) as caught:
        list(stream)
    assert grpc.StatusCode.UNAUTHENTICATED == caught.value.code()
    assert mapped == stub.GetVm(pb.GetVmRequest(vm_id=new.vm_id)).mapped_bytes


def test_calls_without_a_valid_token_are_unauthenticated(
    stub: Stub, anon: Stub, two_vms: tuple[pb.Vm, pb.Vm]
) -> None:
    """No token, an unknown token or a malformed header: UNAUTHENTICATED for every RPC."""
    _, b = two_vms
    before = state_of(stub, b.vm_id)
    calls = vm_scoped_calls(b.vm_id) + HOST_SCOPED_CALLS
    for metadata in [(), bearer("tsv_not-a-token"), (("authorization", "Basic YWRtaW4="),)]:
        for rpc, request in calls:
            code = _code(getattr(anon, rpc), request, metadata=metadata, timeout=10)
            assert grpc.StatusCode.UNAUTHENTICATED == code, (rpc, metadata)
        for rpc, request in HOST_SCOPED_STREAMS:
            code = _code(_first, getattr(anon, rpc), request, metadata=metadata, timeout=10)
            assert grpc.StatusCode.UNAUTHENTICATED == code, (rpc, metadata)
    assert before == state_of(stub, b.vm_id)


def test_host_scoped_calls_refuse_vm_tokens(
    stub: Stub, anon: Stub, two_vms: tuple[pb.Vm, pb.Vm]
) -> None:
    """GetHost, ListVms, CreateVm, CheckInvariants, ExportState, WatchEvents need the admin."""
    a, _ = two_vms
    for rpc, request in HOST_SCOPED_CALLS:
        code = _code(getattr(anon, rpc), request, metadata=bearer(a.vm_token), timeout=10)
        assert grpc.StatusCode.PERMISSION_DENIED == code, rpc
    for rpc, request in HOST_SCOPED_STREAMS:
        code = _code(_first, getattr(anon, rpc), request, metadata=bearer(a.vm_token), timeout=10)
        assert grpc.StatusCode.PERMISSION_DENIED == code, rpc
    assert "tb-new" not in [vm.vm_id for vm in stub.ListVms(pb.ListVmsRequest()).vms]


def test_only_create_vm_answers_a_token_and_no_log_holds_one(
    daemon: HostdProcess, stub: Stub, two_vms: tuple[pb.Vm, pb.Vm]
) -> None:
    """GetVm, ListVms and DestroyVm answers carry no token; the daemon's log names none."""
    a, b = two_vms
    assert "" == stub.GetVm(pb.GetVmRequest(vm_id=a.vm_id)).vm_token
    assert all(vm.vm_token == "" for vm in stub.ListVms(pb.ListVmsRequest()).vms)
    log = daemon.stderr()
    for token in (a.vm_token, b.vm_token, ADMIN_TOKEN):
        assert token not in log


def test_a_destroyed_vms_token_is_revoked_and_a_new_vm_of_its_id_gets_another(
    stub: Stub, anon: Stub
) -> None:
    """DestroyVm with the VM's own token works once; the token is unknown afterwards."""
    first = _create(stub, "tb-reborn")
    anon.DestroyVm(pb.DestroyVmRequest(vm_id="tb-reborn"), metadata=bearer(first.vm_token))
    second = _create(stub, "tb-reborn")
    assert first.vm_token != second.vm_token
    code = _code(
        lambda: anon.GetVm(pb.GetVmRequest(vm_id="tb-reborn"), metadata=bearer(first.vm_token))
    )
    assert grpc.StatusCode.UNAUTHENTICATED == code
    stub.DestroyVm(pb.DestroyVmRequest(vm_id="tb-reborn"))


def test_vm_tokens_survive_a_restart_and_only_their_digests_are_stored(
    hostd_process: Start, tmp_path: Path
) -> None:
    """With --state-dir, a VM token keeps working after SIGTERM and restart; the file holding the
    digests is owner-only and does not contain the token."""
    state = tmp_path / "state"
    first = hostd_process("--state-dir", str(state))
    with first.channel() as channel:
        vm = _create(pb_grpc.TagStorageStub(channel), "tb-durable")
    first.signal(signal.SIGTERM)
    assert 0 == first.wait()
    tokens_file = state / "vm-tokens.json"
    assert 0o600 == stat.S_IMODE(tokens_file.stat().st_mode)
    assert vm.vm_token not in tokens_file.read_text()

    second = hostd_process("--state-dir", str(state))
    with raw_channel(second.address) as channel:
        vm_stub = pb_grpc.TagStorageStub(channel)
        again = vm_stub.GetVm(pb.GetVmRequest(vm_id="tb-durable"), metadata=bearer(vm.vm_token))
    assert "tb-durable" == again.vm_id


def test_the_admin_token_is_made_owner_only_at_first_start_and_its_path_logged(
    hostd_process: Start, short_tmp: Path
) -> None:
    """A missing admin token file is created mode 0600 in a 0700 directory; the log names the
    file, never the token; a restart reuses it."""
    token_file = short_tmp / "fresh-admin" / "admin.token"
    daemon = hostd_process("--admin-token-file", str(token_file))
    token = token_file.read_text().strip()
    assert 0o600 == stat.S_IMODE(token_file.stat().st_mode)
    assert 0o700 == stat.S_IMODE(token_file.parent.stat().st_mode)
    assert str(token_file) in daemon.stderr()
    assert token not in daemon.stderr()
    with raw_channel(daemon.address) as channel:
        host = pb_grpc.TagStorageStub(channel).GetHost(pb.GetHostRequest(), metadata=bearer(token))
    assert 4 * GiB == host.total_bytes


def test_an_admin_token_file_others_can_read_refuses_start(short_tmp: Path) -> None:
    """A token file with group or world permissions is a leaked token: hostd will not use it."""
    token_file = short_tmp / "leaky.token"
    token_file.write_text("tsa_leaky\n")
    token_file.chmod(0o644)
    result = run_hostd("serve", "--listen", f"unix:{short_tmp}/leaky.sock", "--metrics-listen", "",
                       "--memory", "1GiB", "--admin-token-file", str(token_file))  # fmt: skip
    assert 1 == result.returncode
    assert "chmod 600" in result.stderr


def test_the_unix_socket_is_owner_only_by_default(daemon: HostdProcess) -> None:
    """Nobody but the daemon's user can connect to its socket unless --socket-group says so."""
    path = Path(daemon.address.removeprefix("unix:"))
    assert 0o600 == stat.S_IMODE(path.stat().st_mode)


def test_socket_group_opens_the_socket_to_that_group(hostd_process: Start) -> None:
    """--socket-group GROUP: the socket belongs to GROUP, mode 0660."""
    group = grp.getgrgid(os.getgid()).gr_name
    daemon = hostd_process("--socket-group", group)
    path = Path(daemon.address.removeprefix("unix:"))
    assert (0o660, os.getgid()) == (stat.S_IMODE(path.stat().st_mode), path.stat().st_gid)


def test_an_unknown_socket_group_refuses_start(short_tmp: Path) -> None:
    """A group that does not exist is named, and nothing is served."""
    result = run_hostd("serve", "--listen", f"unix:{short_tmp}/nogroup.sock", "--metrics-listen",
                       "", "--memory", "1GiB", "--socket-group", "no-such-group-tb")  # fmt: skip
    assert 1 == result.returncode
    assert "no-such-group-tb" in result.stderr


@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0", "example.org:50051"])
def test_plaintext_tcp_beyond_loopback_refuses_start_naming_the_tls_flags(address: str) -> None:
    """Only loopback TCP may be served without TLS; the refusal says which flags fix it."""
    result = run_hostd("serve", "--listen", address, "--metrics-listen", "", "--memory", "1GiB")
    assert 1 == result.returncode
    assert "--tls-cert" in result.stderr and "--tls-key" in result.stderr
    assert "Traceback" not in result.stderr


# -- mutual TLS ---------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer else (_name(cn), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(obj: Any) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    out = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("tagstore test CA", ca_key, None, ca=True)
    files = {"ca": _pem(ca)}
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        files[f"{role}_cert"] = _pem(_cert(f"{role}.test", key, (ca.subject, ca_key), ca=False))
        files[f"{role}_key"] = _pem(key)
    paths = {}
    for name, data in files.items():
        paths[name] = out / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


def test_mutual_tls_serves_a_client_with_a_certificate_and_refuses_one_without(
    hostd_process: Start, pki: dict[str, Path]
) -> None:
    """--tls-cert/--tls-key/--tls-client-ca: a client presenting a certificate of the CA gets
    answers (with its token); a client without one cannot even connect."""
    address = f"127.0.0.1:{free_tcp_port()}"
    daemon = hostd_process("--listen", address, "--tls-cert", str(pki["server_cert"]),
                           "--tls-key", str(pki["server_key"]),
                           "--tls-client-ca", str(pki["ca"]), wait=False)  # fmt: skip
    ca = pki["ca"].read_bytes()
    good = grpc.ssl_channel_credentials(
        ca, pki["client_key"].read_bytes(), pki["client_cert"].read_bytes()
    )
    with grpc.secure_channel(address, good) as channel:
        grpc.channel_ready_future(channel).result(timeout=STARTUP_TIMEOUT_S)
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert health_pb2.HealthCheckResponse.SERVING == health.status
        host = pb_grpc.TagStorageStub(channel).GetHost(
            pb.GetHostRequest(), metadata=bearer(ADMIN_TOKEN), timeout=10
        )
        assert 4 * GiB == host.total_bytes
    with grpc.secure_channel(address, grpc.ssl_channel_credentials(ca)) as channel:
        code = _code(
            lambda: health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        )
    assert grpc.StatusCode.UNAVAILABLE == code
    assert daemon.proc.poll() is None


def test_half_a_tls_configuration_refuses_start(pki: dict[str, Path]) -> None:
    """--tls-cert without --tls-key (or a client CA without a certificate) is refused."""
    result = run_hostd("serve", "--listen", "127.0.0.1:0", "--metrics-listen", "", "--memory",
                       "1GiB", "--tls-cert", str(pki["server_cert"]))  # fmt: skip
    assert 1 == result.returncode
    assert "--tls-key" in result.stderr


# -- limits and hostile values ------------------------------------------------------------------


def test_a_10000_character_vm_id_is_invalid_argument_with_a_short_message(stub: Stub) -> None:
    """A huge id is INVALID_ARGUMENT (not RESOURCE_EXHAUSTED from an oversized error); the
    message and ErrorInfo echo only a prefix of it."""
    huge = "v" * 10_000
    for rpc, request in [
        ("GetVm", pb.GetVmRequest(vm_id=huge)),
        ("CreateVm", pb.CreateVmRequest(vm_id=huge, boot_memory_bytes=4 * MiB)),
        ("GuestFault", pb.GuestFaultRequest(vm_id=huge, gpa=BOOT_RAM_GPA, length=PAGE, access=1)),
        ("RemoveMemoryDevice", pb.RemoveMemoryDeviceRequest(vm_id="tb-a", device_id=huge)),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            getattr(stub, rpc)(request)
        assert grpc.StatusCode.INVALID_ARGUMENT == caught.value.code(), rpc
        assert len(caught.value.details()) < 600
        assert all(len(v) < 100 for v in error_info(caught.value).metadata.values())


def test_a_range_that_wraps_past_2_64_is_invalid_argument(
    stub: Stub, two_vms: tuple[pb.Vm, pb.Vm]
) -> None:
    """gpa + length beyond 2^64 is a bad argument, whatever the VM's memory looks like."""
    a, _ = two_vms
    for rpc, request in [
        (
            "GuestFault",
            pb.GuestFaultRequest(vm_id=a.vm_id, gpa=2**64 - PAGE, length=2 * PAGE, access=1),
        ),
        (
            "CopyTags",
            pb.CopyTagsRequest(vm_id=a.vm_id, gpa=2**64 - PAGE, length=2 * PAGE, direction=2),
        ),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            getattr(stub, rpc)(request)
        assert grpc.StatusCode.INVALID_ARGUMENT == caught.value.code(), rpc


def test_vms_devices_and_streams_beyond_their_caps_are_resource_exhausted(
    hostd_process: Start,
) -> None:
    """--max-vms, --max-devices-per-vm, --max-streams(-per-client): the call past a cap is
    RESOURCE_EXHAUSTED with an ErrorInfo naming the resource, and nothing changes."""
    daemon = hostd_process("--max-vms", "2", "--max-devices-per-vm", "2", "--max-streams", "3",
                           "--max-streams-per-client", "2")  # fmt: skip
    with daemon.channel() as channel, raw_channel(daemon.address) as anon_channel:
        stub, anon = pb_grpc.TagStorageStub(channel), pb_grpc.TagStorageStub(anon_channel)
        first = _create(stub, "cap-1")
        _create(stub, "cap-2")
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreateVm(pb.CreateVmRequest(vm_id="cap-3", boot_memory_bytes=4 * MiB))
        assert (grpc.StatusCode.RESOURCE_EXHAUSTED, "VMS_EXHAUSTED") == (
            caught.value.code(), error_info(caught.value).reason)  # fmt: skip
        assert 2 == len(stub.ListVms(pb.ListVmsRequest()).vms)

        add = pb.AddMemoryDeviceRequest(
            vm_id="cap-1", device_id="d1", dimm=pb.DimmConfig(size_bytes=128 * MiB)
        )
        devices = len(stub.GetVm(pb.GetVmRequest(vm_id="cap-1")).regions)
        code = _code(lambda: stub.AddMemoryDevice(add))
        assert grpc.StatusCode.RESOURCE_EXHAUSTED == code
        assert devices == len(stub.GetVm(pb.GetVmRequest(vm_id="cap-1")).regions)

        watches = [stub.WatchEvents(pb.WatchEventsRequest()) for _ in range(2)]
        for watch in watches:
            watch.initial_metadata()
        with pytest.raises(grpc.RpcError) as caught:
            next(stub.WatchEvents(pb.WatchEventsRequest(), timeout=10))
        assert (grpc.StatusCode.RESOURCE_EXHAUSTED, "STREAMS_EXHAUSTED") == (
            caught.value.code(), error_info(caught.value).reason)  # fmt: skip
        # Another credential has slots of its own, up to the cap in all.
        fault = pb.GuestFaultRequest(vm_id="cap-1", gpa=BOOT_RAM_GPA, length=PAGE, access=1)
        assert 1 == len(
            list(anon.StreamGuestFaults(iter([fault]), metadata=bearer(first.vm_token)))
        )
        blocker = threading.Event()

        def held() -> Iterator[pb.GuestFaultRequest]:
            yield fault
            blocker.wait(10)

        open_stream = anon.StreamGuestFaults(held(), metadata=bearer(first.vm_token))
        next(open_stream)
        code = _code(
            lambda: list(
                anon.StreamGuestFaults(iter([fault]), metadata=bearer(first.vm_token), timeout=10)
            )
        )
        assert grpc.StatusCode.RESOURCE_EXHAUSTED == code, "3 streams open in all"
        blocker.set()
        list(open_stream)
        for watch in watches:
            watch.cancel()
    assert "INTERNAL" not in daemon.stderr()


def test_abandoned_streams_and_expired_deadlines_are_never_internal(daemon: HostdProcess) -> None:
    """Streams cancelled mid-way and calls whose 1 ms deadline passes end quietly: no INTERNAL
    answer, no internal error logged, and the daemon answers the next call."""
    with daemon.channel() as channel:
        stub = pb_grpc.TagStorageStub(channel)
        vm = _create(stub, "tb-storm")
        fault = pb.GuestFaultRequest(vm_id=vm.vm_id, gpa=BOOT_RAM_GPA, length=PAGE, access=1)
        codes = set()
        for i in range(40):
            stream = stub.StreamGuestFaults(iter([fault] * 1000))
            for _ in range(i % 3):
                next(stream)
            stream.cancel()
            watch = stub.WatchEvents(pb.WatchEventsRequest(include_faults=True))
            watch.cancel()
            for rpc, request in [
                ("CheckInvariants", pb.CheckInvariantsRequest()),
                ("GuestFault", fault),
            ]:
                codes.add(_code(getattr(stub, rpc), request, timeout=0.001))
        assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}
        assert 0 == stub.GuestFault(fault, timeout=30).newly_mapped_pages
    log = daemon.stderr()
    assert "INTERNAL" not in log and "Traceback" not in log
