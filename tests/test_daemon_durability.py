"""Durability of the real daemon: the default state directory, refusals to start, the boot id,
a full disk, ``hostd state check/reset`` and idempotent retries by request id."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from tagstore.v1 import tagstore_pb2 as pb
from tagstore.v1 import tagstore_pb2_grpc as pb_grpc
from tests.conftest import (
    BOOT_RAM_GPA,
    REPO_ROOT,
    STARTUP_TIMEOUT_S,
    HostdProcess,
    MiB,
    hostd_env,
    run_hostd,
    token_channel,
    wait_serving,
)

pytestmark = pytest.mark.integration

Start = Callable[..., HostdProcess]


def create(stub: pb_grpc.TagStorageStub, vm_id: str, request_id: str = "") -> pb.Vm:
    return stub.CreateVm(  # type: ignore[no-any-return]
        pb.CreateVmRequest(
            vm_id=vm_id,
            mte_enabled=True,
            tag_policy=pb.TAG_POLICY_ON_FAULT,
            boot_memory_bytes=16 * MiB,
            request_id=request_id,
        )
    )


def vm_ids(stub: pb_grpc.TagStorageStub) -> list[str]:
    return sorted(vm.vm_id for vm in stub.ListVms(pb.ListVmsRequest()).vms)


def error_reason(error: grpc.RpcError) -> str:
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "grpc-status-details-bin":
            info = error_details_pb2.ErrorInfo()
            status_pb2.Status.FromString(value).details[0].Unpack(info)
            return info.reason
    return ""


def kill(process: HostdProcess) -> None:
    process.signal(signal.SIGKILL)
    process.wait()


def test_default_state_dir_is_the_xdg_state_home_and_survives_a_restart(
    hostd_process: Start, tmp_path: Path
) -> None:
    """Without --state-dir the state lives in $XDG_STATE_HOME/tagstore, logged at start; the
    admin token is made there too, and is the same after the restart."""
    env = hostd_env(XDG_STATE_HOME=str(tmp_path / "xdg"))
    socket = f"unix:{tmp_path}/d.sock"
    args = ["serve", "--listen", socket, "--metrics-listen", "", "--memory", "4GiB"]
    for expected_vms in (0, 1):
        with open(tmp_path / "log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "hostd", *args], stderr=log, env=env, cwd=REPO_ROOT
            )
        try:
            wait_serving(socket, proc, STARTUP_TIMEOUT_S)
            token = (tmp_path / "xdg" / "tagstore" / "admin.token").read_text().strip()
            with token_channel(socket, token) as channel:
                stub = pb_grpc.TagStorageStub(channel)
                assert expected_vms == len(vm_ids(stub))
                if not expected_vms:
                    create(stub, "vm1")
        finally:
            proc.kill()
            proc.wait()
    log_text = (tmp_path / "log").read_text()
    assert f"state_dir={tmp_path / 'xdg' / 'tagstore'}" in log_text
    assert "restored_vms=1" in log_text


def test_state_directory_env_of_systemd_wins(tmp_path: Path) -> None:
    """$STATE_DIRECTORY (systemd) is preferred over $XDG_STATE_HOME."""
    from hostd.daemon import default_state_dir

    with _environ(STATE_DIRECTORY=str(tmp_path / "sd"), XDG_STATE_HOME=str(tmp_path / "x")):
        assert tmp_path / "sd" == default_state_dir()
    with _environ(STATE_DIRECTORY="", XDG_STATE_HOME=str(tmp_path / "x")):
        assert tmp_path / "x" / "tagstore" == default_state_dir()
    with _environ(STATE_DIRECTORY="", XDG_STATE_HOME="", HOME=str(tmp_path)):
        assert tmp_path / ".local" / "state" / "tagstore" == default_state_dir()


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_ephemeral_daemon_keeps_nothing(hostd_process: Start) -> None:
    """--ephemeral: no state directory; the log says so."""
    proc = hostd_process("--ephemeral")
    assert "state_dir=none" in proc.stderr()


def test_ephemeral_with_state_dir_is_a_usage_error(tmp_path: Path) -> None:
    """The two options exclude each other."""
    result = run_hostd("serve", "--ephemeral", "--state-dir", str(tmp_path))
    assert 2 == result.returncode
    assert "--ephemeral and --state-dir exclude each other" in result.stderr


def test_missing_current_refuses_to_start_in_one_line(hostd_process: Start, tmp_path: Path) -> None:
    """A state directory that lost CURRENT is not started empty over its journal."""
    state = tmp_path / "state"
    first = hostd_process("--state-dir", str(state))
    with first.channel() as channel:
        create(pb_grpc.TagStorageStub(channel), "vm1")
    kill(first)
    (state / "CURRENT").unlink()

    second = hostd_process("--state-dir", str(state), wait=False)
    assert 1 == second.wait()
    errors = [line for line in second.stderr().splitlines() if line.startswith("hostd: ")]
    assert 1 == len(errors)
    assert "CURRENT is missing beside journal-00000001.jsonl" in errors[0]
    assert "Traceback" not in second.stderr()
    assert list((state).glob("journal-*"))  # nothing was overwritten


def test_state_of_a_previous_boot_is_discarded_with_one_log_line(
    hostd_process: Start, tmp_path: Path
) -> None:
    """A faked reboot (HOSTD_BOOT_ID_FILE): the old VMs are gone, the log says why."""
    state, boot = tmp_path / "state", tmp_path / "boot_id"
    boot.write_text("boot-a\n")
    env = {"HOSTD_BOOT_ID_FILE": str(boot)}
    first = hostd_process("--state-dir", str(state), env=env)
    with first.channel() as channel:
        create(pb_grpc.TagStorageStub(channel), "vm1")
    kill(first)
    boot.write_text("boot-b\n")

    second = hostd_process("--state-dir", str(state), env=env)
    with second.channel() as channel:
        assert [] == vm_ids(pb_grpc.TagStorageStub(channel))
    assert 1 == second.stderr().count("state_discarded")
    assert "boot-a" in second.stderr()


def test_state_check_and_reset_commands(hostd_process: Start, tmp_path: Path) -> None:
    """`state check` reports a sound directory; `reset` refuses while a daemon holds it, then
    moves the state aside; a corrupt directory fails `check` naming the file."""
    state = tmp_path / "state"
    proc = hostd_process("--state-dir", str(state))
    with proc.channel() as channel:
        create(pb_grpc.TagStorageStub(channel), "vm1")
    busy = run_hostd("state", "reset", str(state))
    assert 1 == busy.returncode
    assert "in use by another hostd" in busy.stderr
    kill(proc)

    check = run_hostd("state", "check", str(state))
    assert 0 == check.returncode, check.stderr
    assert "1 VM(s)" in check.stdout
    assert check.stdout.rstrip().endswith("ok")

    journal = next(state.glob("journal-*"))
    journal.write_bytes(b"x" + journal.read_bytes())
    bad = run_hostd("state", "check", str(state))
    assert 1 == bad.returncode
    assert f"{journal}:1: unreadable journal record" in bad.stderr

    reset = run_hostd("state", "reset", str(state))
    assert 0 == reset.returncode, reset.stderr
    assert "moved aside to" in reset.stdout
    assert 0 == run_hostd("state", "check", str(state)).returncode


def test_state_check_of_nothing_says_so(tmp_path: Path) -> None:
    """A directory that does not exist is an error, not a traceback."""
    result = run_hostd("state", "check", str(tmp_path / "nope"))
    assert 1 == result.returncode
    assert "no such state directory" in result.stderr


# -- request ids ----------------------------------------------------------------------------------


def test_retried_create_with_the_same_request_id_gets_the_first_answer(
    hostd_process: Start,
) -> None:
    """A retried CreateVm (same id) answers the VM, not ALREADY_EXISTS, and creates nothing;
    the same id survives a SIGKILL and restart."""
    proc = hostd_process()
    with proc.channel() as channel:
        stub = pb_grpc.TagStorageStub(channel)
        first = create(stub, "vm1", request_id="req-1")
        assert first == create(stub, "vm1", request_id="req-1")
        with pytest.raises(grpc.RpcError) as e:
            create(stub, "vm1", request_id="req-2")
        assert grpc.StatusCode.ALREADY_EXISTS == e.value.code()
    state = proc.args[proc.args.index("--state-dir") + 1]
    kill(proc)

    again = hostd_process("--state-dir", state)
    with again.channel() as channel:
        stub = pb_grpc.TagStorageStub(channel)
        assert first == create(stub, "vm1", request_id="req-1")
        assert ["vm1"] == vm_ids(stub)


def test_same_request_id_with_other_arguments_is_invalid_argument(hostd_process: Start) -> None:
    """Reusing an id for another call is refused naming the field, changing nothing."""
    proc = hostd_process()
    with proc.channel() as channel:
        stub = pb_grpc.TagStorageStub(channel)
        create(stub, "vm1", request_id="req-1")
        with pytest.raises(grpc.RpcError) as e:
            create(stub, "vm2", request_id="req-1")
        assert grpc.StatusCode.INVALID_ARGUMENT == e.value.code()
        assert "request_id" in (e.value.details() or "")
        assert "REQUEST_ID_REUSED" == error_reason(e.value)
        assert ["vm1"] == vm_ids(stub)


def test_retried_fault_returns_the_first_fault_result(hostd_process: Start) -> None:
    """A retried fault reports the pages the first attempt mapped, not 'already present'."""
    proc = hostd_process()
    with proc.channel() as channel:
        stub = pb_grpc.TagStorageStub(channel)
        create(stub, "vm1")
        request = pb.GuestFaultRequest(
            vm_id="vm1", gpa=BOOT_RAM_GPA, length=MiB, access=pb.ACCESS_WRITE, request_id="f-1"
        )
        first = stub.GuestFault(request)
        assert first.newly_mapped_pages == MiB // 4096
        assert first == stub.GuestFault(request)


# -- a full disk --------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (needs root and mount; skipped where that is not possible)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path, leave_bytes: int) -> Path:
    """Fill the file system of ``path`` up to ``leave_bytes`` free; returns the filler."""
    filler = path / "filler"
    free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(free - leave_bytes, 0))
    return filler


def test_full_disk_refuses_calls_unapplied_then_recovers(
    hostd_process: Start, small_tmpfs: Path
) -> None:
    """ENOSPC: calls are refused UNAVAILABLE (STATE_UNWRITABLE) having changed nothing; a
    snapshot that cannot be written never fails an applied call; once space is back calls go
    on; SIGTERM exits 0; every acknowledged call is there after a restart."""
    state = small_tmpfs / "state"
    proc = hostd_process("--state-dir", str(state), "--snapshot-every", "3")
    filler = fill(small_tmpfs, 8192)
    acknowledged, refused = [], []
    with proc.channel() as channel:
        stub = pb_grpc.TagStorageStub(channel)
        for i in range(200):
            try:
                create(stub, f"vm{i}")
                acknowledged.append(f"vm{i}")
            except grpc.RpcError as e:
                assert grpc.StatusCode.UNAVAILABLE == e.code(), e.details()
                assert "STATE_UNWRITABLE" == error_reason(e)
                refused.append(f"vm{i}")
                if len(refused) >= 3:
                    break
        assert refused, "the disk never filled"
        assert sorted(acknowledged) == vm_ids(stub)  # nothing refused is visible
        filler.unlink()
        create(stub, "after")
        acknowledged.append("after")
    proc.signal(signal.SIGTERM)
    assert 0 == proc.wait()
    assert "event=snapshot_failed" in proc.stderr()  # the 4 GiB host's snapshot never fits
    assert "Traceback" not in proc.stderr()

    again = hostd_process("--state-dir", str(state))
    with again.channel() as channel:
        assert sorted(acknowledged) == vm_ids(pb_grpc.TagStorageStub(channel))


def test_streamed_fault_retry_with_its_request_id_gets_the_first_result(
    hostd_process: Start,
) -> None:
    """Request ids work per message of StreamGuestFaults too."""
    proc = hostd_process()
    with proc.channel() as channel:
        stub = pb_grpc.TagStorageStub(channel)
        create(stub, "vm1")
        request = pb.GuestFaultRequest(
            vm_id="vm1", gpa=BOOT_RAM_GPA, length=MiB, access=pb.ACCESS_WRITE, request_id="s-1"
        )
        first, again = stub.StreamGuestFaults(iter([request, request]))
        assert MiB // 4096 == first.newly_mapped_pages
        assert first == again


def test_sync_always_keeps_state_across_a_reboot(hostd_process: Start, tmp_path: Path) -> None:
    """--sync always fsyncs every record: its state is trusted after a (faked) reboot."""
    state, boot = tmp_path / "state", tmp_path / "boot_id"
    boot.write_text("boot-a\n")
    env = {"HOSTD_BOOT_ID_FILE": str(boot)}
    first = hostd_process("--state-dir", str(state), "--sync", "always", env=env)
    with first.channel() as channel:
        create(pb_grpc.TagStorageStub(channel), "vm1")
    kill(first)
    boot.write_text("boot-b\n")

    second = hostd_process("--state-dir", str(state), "--sync", "always", env=env)
    with second.channel() as channel:
        assert ["vm1"] == vm_ids(pb_grpc.TagStorageStub(channel))
    assert "state_discarded" not in second.stderr()


def test_state_check_piped_into_head_ends_quietly(tmp_path: Path) -> None:
    """`hostd state check DIR | head` ends without a traceback when the reader goes away (head
    -n 0: the reader is gone before the first line)."""
    state = tmp_path / "state"
    from hostd.model import default_topology
    from hostd.store import Store

    Store.open(state, default_topology(1 << 30)).close()
    result = subprocess.run(
        f"{sys.executable} -m hostd state check {state} | head -n 0",
        shell=True,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=hostd_env(),
        check=False,
    )
    assert "" == result.stdout
    assert "" == result.stderr
