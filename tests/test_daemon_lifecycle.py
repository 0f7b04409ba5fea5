"""The daemon process: shutdown, address conflicts, persistence across SIGKILL, check-config,
metrics wiring."""

from __future__ import annotations

import signal
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from tagstore.v1 import tagstore_pb2 as pb
from tagstore.v1 import tagstore_pb2_grpc as pb_grpc
from tests.conftest import BOOT_RAM_GPA, HostdProcess, MiB, run_hostd

pytestmark = pytest.mark.integration

Start = Callable[..., HostdProcess]
TAGS = bytes(i % 16 for i in range(4096 // 16))

VALID_TOPOLOGY = """
page_size = "4K"
mte_perm = true
[[tag_region]]
memory_base = 0x8000_0000
memory_size = "1GiB"
tag_base = 0xC000_0000
tag_size = "32MiB"
block_size = 0x2000
"""


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_sigterm_ends_open_streams_and_exits_zero(hostd_process: Start) -> None:
    daemon = hostd_process()
    with daemon.channel() as channel:
        stub = pb_grpc.TagStorageStub(channel)
        watch = stub.WatchEvents(pb.WatchEventsRequest())
        watch.initial_metadata()
        daemon.signal(signal.SIGTERM)
        assert [] == list(watch), "the event stream ends cleanly on shutdown"
    assert 0 == daemon.wait()
    assert "event=stopped" in daemon.stderr()


def test_second_daemon_on_the_same_tcp_address_fails_clearly(hostd_process: Start) -> None:
    address = f"127.0.0.1:{free_tcp_port()}"
    first = hostd_process("--listen", address)
    second = hostd_process("--listen", address, wait=False)
    assert 0 != second.wait()
    assert f"cannot listen on '{address}'" in second.stderr()
    assert first.proc.poll() is None


def test_second_daemon_on_the_same_unix_socket_fails_clearly(
    hostd_process: Start, short_tmp: Path
) -> None:
    address = f"unix:{short_tmp}/shared.sock"
    first = hostd_process("--listen", address)
    second = hostd_process("--listen", address, wait=False)
    assert 0 != second.wait()
    assert "another server is accepting connections there" in second.stderr()
    with first.channel() as channel:
        pb_grpc.TagStorageStub(channel).GetHost(pb.GetHostRequest())


def test_acknowledged_state_survives_sigkill(hostd_process: Start, tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    first = hostd_process("--state-dir", state)
    with first.channel() as channel:
        stub = pb_grpc.TagStorageStub(channel)
        stub.CreateVm(
            pb.CreateVmRequest(
                vm_id="vm1",
                mte_enabled=True,
                tag_policy=pb.TAG_POLICY_ON_FAULT,
                boot_memory_bytes=16 * MiB,
            )
        )
        stub.GuestFault(
            pb.GuestFaultRequest(vm_id="vm1", gpa=BOOT_RAM_GPA, length=MiB, access=pb.ACCESS_WRITE)
        )
        stub.CopyTags(
            pb.CopyTagsRequest(
                vm_id="vm1",
                gpa=BOOT_RAM_GPA,
                length=4096,
                direction=pb.TAG_COPY_DIRECTION_TO_GUEST,
                tags=TAGS,
            )
        )
        before = stub.GetVm(pb.GetVmRequest(vm_id="vm1"))
    first.signal(signal.SIGKILL)
    first.wait()

    second = hostd_process("--state-dir", state)
    with second.channel() as channel:
        stub = pb_grpc.TagStorageStub(channel)
        assert before == stub.GetVm(pb.GetVmRequest(vm_id="vm1"))
        read = stub.CopyTags(
            pb.CopyTagsRequest(
                vm_id="vm1",
                gpa=BOOT_RAM_GPA,
                length=4096,
                direction=pb.TAG_COPY_DIRECTION_FROM_GUEST,
            )
        )
        assert TAGS == read.tags
        assert [] == list(stub.CheckInvariants(pb.CheckInvariantsRequest()).violations)
    assert "replayed=3" in second.stderr()


def test_state_dir_of_another_topology_refuses_start(hostd_process: Start, tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    first = hostd_process("--state-dir", state)
    first.signal(signal.SIGTERM)
    assert 0 == first.wait()

    second = hostd_process("--state-dir", state, "--memory", "8GiB", wait=False)
    assert 1 == second.wait()
    assert "saved for another host configuration" in second.stderr()


def test_serve_with_an_invalid_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(VALID_TOPOLOGY.replace('"32MiB"', '"16MiB"'))
    result = run_hostd("serve", "--config", str(config), "--metrics-listen", "")
    assert 2 == result.returncode
    assert "tag_region[0].tag_size" in result.stderr


def test_check_config_accepts_a_valid_topology_with_a_summary(tmp_path: Path) -> None:
    config = tmp_path / "host.toml"
    config.write_text(VALID_TOPOLOGY)
    result = run_hostd("check-config", str(config))
    assert 0 == result.returncode, result.stderr
    assert "valid" in result.stdout
    assert "tag_region[0]: memory 0x80000000+0x40000000" in result.stdout


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (('page_size = "4K"', 'page_size = "8K"'), "page_size"),
        (("block_size = 0x2000", "block_size = 0x1001"), "tag_region[0].block_size"),
        (("tag_base = 0xC000_0000", "tag_base = 0x9000_0000"), "tag_region[0].tag_base"),
    ],
)
def test_check_config_rejects_an_invalid_topology_naming_field_and_value(
    tmp_path: Path, change: tuple[str, str], field: str
) -> None:
    config = tmp_path / "host.toml"
    config.write_text(VALID_TOPOLOGY.replace(*change))
    result = run_hostd("check-config", str(config))
    assert 2 == result.returncode
    assert field in result.stderr


def test_check_config_of_a_missing_file_exits_2(tmp_path: Path) -> None:
    result = run_hostd("check-config", str(tmp_path / "absent.toml"))
    assert 2 == result.returncode
    assert "cannot read" in result.stderr


def test_metrics_endpoint_serves_grpc_and_model_metrics(hostd_process: Start) -> None:
    daemon = hostd_process("--metrics-listen", f"127.0.0.1:{free_tcp_port()}")
    with daemon.channel() as channel:
        pb_grpc.TagStorageStub(channel).GetHost(pb.GetHostRequest())
    url = next(
        part.removeprefix("metrics=")
        for part in daemon.stderr().split()
        if part.startswith("metrics=http")
    )
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    assert 'grpc_server_handled_total{grpc_code="OK",grpc_method="GetHost"' in text
    assert "tagstore_" in text


def test_unreachable_listen_address_fails_clearly(hostd_process: Start) -> None:
    daemon = hostd_process("--listen", "unix:/nonexistent-dir/hostd.sock", wait=False)
    assert 1 == daemon.wait()
    assert "cannot listen on 'unix:/nonexistent-dir/hostd.sock'" in daemon.stderr()


def test_channel_to_a_stopped_daemon_is_unavailable(hostd_process: Start) -> None:
    daemon = hostd_process()
    daemon.signal(signal.SIGINT)
    assert 0 == daemon.wait()
    with daemon.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.TagStorageStub(channel).GetHost(pb.GetHostRequest(), timeout=5)
    assert grpc.StatusCode.UNAVAILABLE == caught.value.code()
