"""``vmm-shim qemu`` when QEMU is absent or the input is nonsense: clear errors, exit codes 1
(refused or unreachable) and 2 (usage), and hostd's side still shown. Needs no QEMU."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.shim.conftest import CliRun
from vmm_shim import HostClient

pytestmark = pytest.mark.integration

Cli = Callable[..., CliRun]
MiB = 1 << 20


@pytest.fixture
def nobody(short_tmp: Path, vm_id: str) -> str:
    """A QMP address where nothing listens."""
    return f"unix:{short_tmp}/{vm_id[:40]}-absent.sock"


@pytest.fixture
def not_qmp(short_tmp: Path, vm_id: str) -> Iterator[str]:
    """A unix socket whose peer answers with something that is not QMP."""
    path = f"{short_tmp}/{vm_id[:40]}-http.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield f"unix:{path}"
    server.close()
    thread.join(timeout=5)


@pytest.mark.parametrize("address", ["nowhere", "unix:", "host:notaport", "tcp:host:70000"])
def test_malformed_qmp_address_is_a_usage_error_naming_it(cli: Cli, address: str) -> None:
    """A --qmp that is neither unix:PATH nor host:port is exit 2 and the message quotes it."""
    run = cli("qemu", "attach", "g", "--qmp", address)
    assert 2 == run.code
    assert f"invalid QMP address {address!r}" in run.err


def test_attach_with_nothing_listening_fails_naming_the_socket(cli: Cli, nobody: str) -> None:
    """No QEMU at --qmp: exit 1 with one error line naming the address; hostd is untouched."""
    run = cli("qemu", "attach", "g-absent", "--qmp", nobody)
    assert 1 == run.code
    assert run.err.startswith("error: QEMU QmpConnectionError: cannot connect to QMP at " + nobody)
    assert "g-absent" not in cli("vm", "list").out


def test_a_peer_that_is_not_qmp_is_refused(cli: Cli, not_qmp: str) -> None:
    """Something other than QEMU at --qmp, for a VM hostd does not know either: status has
    nothing to show, exits 1 and says why QEMU's side is missing (the peer is not QMP)."""
    run = cli("qemu", "status", "g", "--qmp", not_qmp)
    assert 1 == run.code
    assert 1 == len(run.err.splitlines())
    assert "not QMP" in run.err


def test_status_without_qemu_shows_hostd_side(
    cli: Cli, host: HostClient, vm_id: str, nobody: str
) -> None:
    """QEMU gone: status still prints hostd's registration, and says QEMU is unreachable."""
    host.create_vm(vm_id, mte_enabled=True, tag_policy="EAGER", boot_memory_bytes=64 * MiB)
    run = cli("qemu", "status", vm_id, "--qmp", nobody)
    assert 0 == run.code, run.err
    assert "QEMU : unreachable" in run.out
    assert "hostd: MTE on (EAGER), boot RAM 64MiB" in run.out
    document = json.loads(cli("qemu", "status", vm_id, "--json").out)
    assert (vm_id, 64 * MiB) == (document["vm_id"], document["hostd"]["boot_memory_bytes"])
    assert "not asked (no --qmp)" == document["qemu"]["error"]


def test_detach_destroys_the_vm_and_a_second_detach_is_not_found(
    cli: Cli, host: HostClient, vm_id: str
) -> None:
    """detach needs no QEMU: the VM is destroyed in hostd; detaching it again is NOT_FOUND."""
    host.create_vm(vm_id, mte_enabled=False, tag_policy=None, boot_memory_bytes=64 * MiB)
    assert 0 == cli("qemu", "detach", vm_id).code
    assert vm_id not in [v.vm_id for v in host.list_vms()]
    again = cli("qemu", "detach", vm_id)
    assert 1 == again.code
    assert again.err.startswith("error: NOT_FOUND")


@pytest.mark.parametrize(
    "args",
    [
        ["qemu", "resize", "g", "vm0", "1GiB"],  # no --qmp
        ["qemu", "resize", "g", "vm0", "lots", "--qmp", "unix:/x"],
        ["qemu", "attach", "g", "--qmp", "unix:/x", "--policy", "sometimes"],
        ["qemu", "attach", "g", "--qmp", "unix:/x", "--poll-interval", "0"],
        ["qemu", "attach", "g", "--qmp", "unix:/x", "--grace", "nan"],
        ["qemu"],
    ],
)
def test_nonsense_arguments_are_usage_errors(cli: Cli, args: list[str]) -> None:
    """Missing or malformed arguments: exit 2 before anything is contacted."""
    assert 2 == cli(*args).code
