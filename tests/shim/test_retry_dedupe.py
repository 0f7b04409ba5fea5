"""A retry after hostd applied a call and its answer was lost applies nothing twice: the client
repeats the call with the same request_id and the real daemon answers it with the first answer.

Between client and daemon sits :class:`tests.shim.servers.LosingProxy`, which lets the daemon
answer and then tells the client UNAVAILABLE, as a broken connection would. These tests need
hostd's request_id deduplication (issue 8, server side); they skip, saying so, while the daemon
under test does not deduplicate, and run as soon as it does.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import HostdProcess
from tests.shim.conftest import admin_token
from tests.shim.servers import LosingProxy, serve
from vmm_shim import HostClient
from vmm_shim.units import MiB

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def proxied(daemon: HostdProcess) -> Iterator[tuple[HostClient, LosingProxy]]:
    """A client whose calls reach the module's daemon through a LosingProxy."""
    with daemon.channel() as target:
        proxy = LosingProxy(target)
        server, address = serve(proxy)
        with HostClient(address, token=admin_token(daemon), max_attempts=3) as client:
            yield client, proxy
        server.stop(None)


def test_a_create_vm_whose_answer_was_lost_succeeds_on_retry_and_creates_one_vm(
    proxied: tuple[HostClient, LosingProxy], vm_id: str
) -> None:
    """The retry gets the first answer (with the VM's token), not ALREADY_EXISTS."""
    client, proxy = proxied
    proxy.lose.add("CreateVm")
    vm = client.create_vm(vm_id, mte_enabled=True, boot_memory_bytes=64 * MiB)
    assert 2 == proxy.forwarded.count("CreateVm")
    assert [vm_id] == [v.vm_id for v in client.list_vms() if v.vm_id == vm_id]
    assert vm.info().boot_memory_bytes == 64 * MiB
    assert [] == client.check_invariants()


def test_a_fault_whose_answer_was_lost_reports_the_first_outcome_on_retry(
    proxied: tuple[HostClient, LosingProxy], vm_id: str
) -> None:
    """The retry answers what the fault did (512 pages mapped), not what a second fault would
    (nothing)."""
    client, proxy = proxied
    vm = client.create_vm(vm_id, mte_enabled=True, boot_memory_bytes=64 * MiB)
    proxy.lose.add("GuestFault")
    outcome = vm.fault(vm.boot_gpa, 2 * MiB)
    assert 512 == outcome.newly_mapped_pages
    assert 2 * MiB == vm.info().mapped_bytes


def test_a_plug_whose_answer_was_lost_is_acked_on_retry_and_plugs_once(
    proxied: tuple[HostClient, LosingProxy], vm_id: str
) -> None:
    """A retried PLUG answers ACK (not ERROR for plugging a plugged block)."""
    client, proxy = proxied
    vm = client.create_vm(
        vm_id, mte_enabled=True, boot_memory_bytes=64 * MiB, max_memory_bytes=64 * MiB + 256 * MiB
    )
    dev = vm.add_virtio_mem("vmem0", region_size=256 * MiB, block_size=2 * MiB)
    vm.resize_virtio_mem("vmem0", 4 * MiB)
    proxy.lose.add("VirtioMemRequest")
    assert "ACK" == vm.virtio_mem_plug("vmem0", dev.gpa, 2)
    assert 4 * MiB == vm.device("vmem0").plugged_size
    assert [] == client.check_invariants()


def test_a_destroy_whose_answer_was_lost_succeeds_on_retry(
    proxied: tuple[HostClient, LosingProxy], vm_id: str
) -> None:
    """The retry gets the first answer, not NOT_FOUND for the VM it destroyed."""
    client, proxy = proxied
    vm = client.create_vm(vm_id, mte_enabled=False, boot_memory_bytes=64 * MiB)
    proxy.lose.add("DestroyVm")
    vm.destroy()
    assert vm_id not in [v.vm_id for v in client.list_vms()]
