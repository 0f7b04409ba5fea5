"""How the vmm_shim virtio-mem driver loop reacts to NACK and BUSY, as Linux's driver does
(drivers/virtio/virtio_mem.c): NACK means "the config changed" and is acted on at once; BUSY
means "not now" and is retried later on a backoff timer, so the loop stops and says so. Also
memory given back (DiscardGuestMemory) and pinned VMs through the real daemon and the CLI."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.conftest import ADMIN_TOKEN, HostdProcess
from tests.shim.conftest import CliRun
from vmm_shim import FailedPrecondition, HostClient, ResourceExhausted, VmHandle
from vmm_shim.units import GiB, MiB

pytestmark = pytest.mark.integration

BLOCK = 2 * MiB


@pytest.fixture(scope="module")
def small(hostd_process: Callable[..., HostdProcess]) -> Iterator[HostClient]:
    """A daemon on a 256 MiB host: 128 MiB of taggable memory."""
    daemon = hostd_process("--memory", "256MiB")
    with HostClient(daemon.address, token=ADMIN_TOKEN) as client:
        yield client


def mte_vm(host: HostClient, vm_id: str, boot: int = 16 * MiB) -> VmHandle:
    return host.create_vm(
        vm_id,
        mte_enabled=True,
        tag_policy="ON_FAULT",
        boot_memory_bytes=boot,
        max_memory_bytes=boot + GiB,
    )


def test_driver_stops_on_busy_so_that_the_guest_retries_later(small: HostClient) -> None:
    """A prealloc device that cannot back the next blocks answers BUSY; the driver loop stops
    there (Linux retries on a timer), having plugged nothing of that request, and the host stays
    sound; once memory is free again, the retry plugs everything."""
    vm = mte_vm(small, "busy")
    vm.add_virtio_mem("pre", region_size=512 * MiB, block_size=BLOCK, prealloc=True)
    vm.resize_virtio_mem("pre", 64 * MiB)  # the host can back it now ...
    hog = mte_vm(small, "hog", 96 * MiB)
    hog.fault(hog.boot_gpa, 96 * MiB, "WRITE")  # ... and no longer
    result = vm.drive_virtio_mem("pre")
    assert 1 == result.busy
    assert 0 == result.nacks
    assert (0, 64 * MiB) == (result.plugged_size, result.requested_size)
    assert [] == small.check_invariants()
    hog.destroy()
    assert vm.drive_virtio_mem("pre").plugged_size == 64 * MiB, "the later retry succeeds"
    vm.destroy()


class _OperatorShrinksBeforeFirstPlug(VmHandle):
    """The operator's `qom-set requested-size` lands between the guest's read of the config
    and its first PLUG."""

    shrink_to = 0

    def _virtio_mem_request(
        self, device_id: str, kind: str, addr: int = 0, nb_blocks: int = 0
    ) -> tuple[str, str]:
        if kind == "PLUG" and self.shrink_to:
            self.resize_virtio_mem(device_id, self.shrink_to)
            self.shrink_to = 0
        return super()._virtio_mem_request(device_id, kind, addr, nb_blocks)


def test_driver_rereads_the_config_at_once_on_nack(small: HostClient) -> None:
    """A PLUG NACKed because requested_size shrank meanwhile is not a failure: the driver
    re-reads the config at once and plugs up to the new requested size."""
    mte_vm(small, "nack")
    vm = _OperatorShrinksBeforeFirstPlug(small, "nack")
    vm.add_virtio_mem("vmem0", region_size=512 * MiB, block_size=BLOCK)
    vm.resize_virtio_mem("vmem0", 64 * MiB)
    vm.shrink_to = 4 * MiB
    result = vm.drive_virtio_mem("vmem0")
    assert (1, 0) == (result.nacks, result.busy)
    assert 4 * MiB == result.plugged_size == result.requested_size
    assert [] == small.check_invariants()
    vm.destroy()


# ----------------------------------------------------------------- memory given back, pinned


def test_discard_through_the_daemon_gives_memory_and_tag_storage_back(host: HostClient) -> None:
    """DiscardGuestMemory (free page reporting / balloon) frees the range's pages, tags and
    emptied tag blocks on the real daemon; the VM reports what it gave back."""
    vm = mte_vm(host, "giver", 64 * MiB)
    vm.fault(vm.boot_gpa, 8 * MiB, "WRITE")
    before = host.host_status()
    outcome = vm.discard(vm.boot_gpa, 8 * MiB)
    assert (8 * MiB, 8 * MiB) == (outcome.discarded_bytes, outcome.tagged_bytes)
    assert 0 < outcome.tag_blocks_released
    after = host.host_status()
    assert before.tag_blocks_reserved - outcome.tag_blocks_released == after.tag_blocks_reserved
    assert (0, 8 * MiB) == (vm.info().mapped_bytes, vm.info().discarded_bytes)
    assert [] == host.check_invariants()
    vm.destroy()


def test_pinned_vm_through_the_daemon_is_backed_and_refuses_discard(host: HostClient) -> None:
    """A pinned VM is backed at creation; a discard on it is FAILED_PRECONDITION VM_PINNED."""
    vm = host.create_vm("pinned", mte_enabled=False, boot_memory_bytes=16 * MiB, pinned=True)
    info = vm.info()
    assert (True, 16 * MiB) == (info.pinned, info.mapped_bytes)
    with pytest.raises(FailedPrecondition) as caught:
        vm.discard(vm.boot_gpa, MiB)
    assert "VM_PINNED" == caught.value.reason
    vm.destroy()


def test_cli_discard_prints_what_was_given_back(cli: Callable[..., CliRun]) -> None:
    """``vmm-shim discard VM GPA LENGTH`` prints the bytes and tag blocks given back; nonsense
    arguments are a usage error, not a traceback."""
    assert 0 == cli("vm", "create", "cli-giver", "--memory", "64MiB").code
    assert 0 == cli("fault", "cli-giver", "0x40000000", "2MiB").code
    run = cli("discard", "cli-giver", "0x40000000", "4MiB")
    assert (0, "discarded 2MiB (2MiB tagged), released") == (run.code, run.out[:38])
    bad = cli("discard", "cli-giver", "0x40000001", "4MiB")
    assert 0 != bad.code
    assert "GPA" in bad.err  # the argument as the user knows it
    assert 0 == cli("vm", "destroy", "cli-giver").code


def test_resize_of_a_prealloc_device_beyond_the_host_is_resource_exhausted(
    small: HostClient,
) -> None:
    """The QEMU bridge's admission check: ResizeVirtioMem on a prealloc device that the host
    could not back is RESOURCE_EXHAUSTED with an ErrorInfo naming the device, and changes
    nothing; a size it can back is accepted."""
    vm = mte_vm(small, "admit")
    vm.add_virtio_mem("pre", region_size=512 * MiB, block_size=BLOCK, prealloc=True)
    with pytest.raises(ResourceExhausted) as caught:
        vm.resize_virtio_mem("pre", 256 * MiB)  # a 256 MiB host has 128 MiB of taggable RAM
    assert "TAGGABLE_MEMORY_EXHAUSTED" == caught.value.reason
    assert "pre" == caught.value.metadata["device_id"]
    assert 0 == vm.device("pre").requested_size
    assert 32 * MiB == vm.resize_virtio_mem("pre", 32 * MiB).requested_size
    assert [] == small.check_invariants()
    vm.destroy()
