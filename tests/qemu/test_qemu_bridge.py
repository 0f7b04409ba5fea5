"""The QEMU bridge end to end: a real arm64 MTE guest under TCG, whose own virtio-mem driver plugs
and unplugs, mirrored into the real hostd by ``vmm-shim qemu attach --follow`` (a subprocess).

The tests share one guest and one bridge and run in file order: each step starts from where the
previous one left the guest. After every step hostd's plugged size equals QEMU's and
``CheckInvariants`` is empty.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ADMIN_TOKEN, REPO_ROOT, HostdProcess
from tests.qemu.conftest import QemuGuest, qemu_missing, wait_until
from vmm_shim import HostClient, InvalidArgument
from vmm_shim.cli import main
from vmm_shim.qemu_bridge import QemuBridge, QemuBridgeError
from vmm_shim.qemu_qmp import QmpClient

pytestmark = [
    pytest.mark.skipif(bool(qemu_missing()), reason=qemu_missing()),
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(600),
]

MiB = 1 << 20
VM_ID = "qemu-guest"
DEVICE = "vm0"
# The guest driver and the bridge's poll (1 s) settle well within this on an idle machine.
SETTLE_TIMEOUT_S = 120.0
GRACE_S = 2.0
# Too small to back the whole 1 GiB virtio-mem region (with 256 MiB of boot RAM) under EAGER.
SMALL_HOST = "1GiB"


@dataclass
class Hostd:
    """The module's daemon; replaced when a test restarts it (same address)."""

    process: HostdProcess
    state_dir: Path

    @property
    def restart_args(self) -> list[str]:
        """A smaller host (1 GiB) on the same address, with a state store."""
        return [
            "--listen", self.address, "--memory", SMALL_HOST, "--state-dir", str(self.state_dir),
        ]  # fmt: skip

    @property
    def address(self) -> str:
        return self.process.address


@dataclass
class Follower:
    """``vmm-shim qemu attach --follow`` running as a subprocess."""

    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def hostd(hostd_process: Callable[..., HostdProcess], short_tmp: Path) -> Hostd:
    """A daemon of its own (the tests restart it, then with a state store)."""
    return Hostd(hostd_process(), short_tmp / f"qemu-hostd-state-{time.monotonic_ns()}")


@pytest.fixture(scope="module")
def follower(hostd: Hostd, qemu_guest: QemuGuest, short_tmp: Path) -> Iterator[Follower]:
    """The bridge, attached to the guest and following it (poll every second)."""
    log = short_tmp / "qemu-follower.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "vmm_shim.cli", "--host", hostd.address,
                "qemu", "attach", VM_ID, "--qmp", qemu_guest.bridge_qmp,
                "--follow", "--poll-interval", "1", "--grace", str(GRACE_S),
            ],
            cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
        )  # fmt: skip
    follower = Follower(proc, log)
    try:
        yield follower
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture
def bridge(hostd: Hostd, qemu_guest: QemuGuest, follower: Follower) -> Iterator[QemuBridge]:
    """The test's own bridge on QEMU's second QMP socket (for resize and reads)."""
    with QemuBridge.connect(
        VM_ID, qmp_address=qemu_guest.control_qmp, host_address=hostd.address, token=ADMIN_TOKEN
    ) as b:
        wait_until(lambda: _registered(b), SETTLE_TIMEOUT_S, "the follower to attach")
        yield b


def _registered(bridge: QemuBridge) -> bool:
    return any(v.vm_id == VM_ID for v in bridge.host.list_vms())


def _in_sync(bridge: QemuBridge) -> bool:
    qemu = bridge.machine().device(DEVICE)
    return qemu.plugged_size == bridge.vm.device(DEVICE).plugged_size


def _resize_and_settle(bridge: QemuBridge, size: int) -> None:
    bridge.resize(DEVICE, size)
    wait_until(
        lambda: bridge.machine().device(DEVICE).plugged_size == size,
        SETTLE_TIMEOUT_S,
        f"the guest driver to reach {size:#x}",
    )
    wait_until(lambda: _in_sync(bridge), SETTLE_TIMEOUT_S, "hostd to mirror QEMU")


def test_attach_registers_the_guest_as_qemu_sees_it(bridge: QemuBridge) -> None:
    """attach creates the VM with QEMU's MTE flag and boot RAM, EAGER, and the virtio-mem device
    with QEMU's region and block size; hostd's plugged size follows QEMU's at once. A second
    attach accepts the matching registration and changes nothing."""
    wait_until(lambda: _in_sync(bridge), SETTLE_TIMEOUT_S, "hostd to mirror QEMU")
    machine = bridge.machine()
    vm = bridge.vm.info()
    assert (True, 256 * MiB) == (machine.mte_enabled, machine.boot_memory_bytes)
    assert (True, "EAGER", 256 * MiB) == (vm.mte_enabled, vm.tag_policy, vm.boot_memory_bytes)
    qemu, dev = machine.device(DEVICE), vm.device(DEVICE)
    assert (1024 * MiB, 2 * MiB, 64 * MiB) == (qemu.region_size, qemu.block_size, qemu.plugged_size)
    assert ("VIRTIO_MEM", 1024 * MiB, 2 * MiB) == (dev.kind, dev.size, dev.block_size)
    assert (64 * MiB, 64 * MiB) == (dev.requested_size, dev.plugged_size)
    # EAGER: boot RAM and every plugged block are tagged, with tag storage reserved.
    assert 64 * MiB == dev.tagged_bytes
    assert 256 * MiB + 64 * MiB == vm.tagged_bytes
    assert [] == bridge.host.check_invariants()
    # Attaching again (a restarted bridge) finds the matching registration and nothing to do.
    again = bridge.attach()
    assert [(DEVICE, 64 * MiB, 64 * MiB, 0, "")] == [
        (s.device_id, s.qemu_plugged_size, s.hostd_plugged_size, s.requests, s.problem)
        for s in again
    ]


def test_guest_resizes_are_mirrored_and_tag_storage_follows_under_eager(
    bridge: QemuBridge,
) -> None:
    """Up to 320 MiB and down to 0 through the guest's own driver: after each, hostd's plugged
    size is QEMU's, tag storage for the plugged blocks is reserved, and released after unplug."""
    _resize_and_settle(bridge, 320 * MiB)
    dev = bridge.vm.device(DEVICE)
    reserved_up = bridge.host.host_status().tag_reserved_bytes
    assert (320 * MiB, 320 * MiB, 320 * MiB) == (
        dev.requested_size,
        dev.plugged_size,
        dev.tagged_bytes,
    )
    assert [] == bridge.host.check_invariants()

    _resize_and_settle(bridge, 0)
    dev = bridge.vm.device(DEVICE)
    reserved_down = bridge.host.host_status().tag_reserved_bytes
    assert (0, 0, 0) == (dev.requested_size, dev.plugged_size, dev.tagged_bytes)
    assert 256 * MiB == bridge.vm.info().tagged_bytes
    # One tag byte per 32 data bytes: unplugging 320 MiB released at least 10 MiB of tags.
    assert reserved_up - reserved_down >= 320 * MiB // 32
    assert [] == bridge.host.check_invariants()

    _resize_and_settle(bridge, 128 * MiB)
    assert 128 * MiB == bridge.vm.device(DEVICE).tagged_bytes
    assert [] == bridge.host.check_invariants()


def test_resize_refused_by_hostd_leaves_qemus_requested_size_unchanged(
    bridge: QemuBridge, qemu_guest: QemuGuest
) -> None:
    """hostd is asked first: its refusal (beyond the device's region) is the error, and neither
    QEMU's requested-size nor hostd's changes."""
    with pytest.raises(InvalidArgument) as refused:
        bridge.resize(DEVICE, 2048 * MiB)
    assert "requested_size" == refused.value.metadata.get("field")
    assert 128 * MiB == bridge.machine().device(DEVICE).requested_size
    assert 128 * MiB == bridge.vm.device(DEVICE).requested_size
    assert _in_sync(bridge)
    assert [] == bridge.host.check_invariants()


def test_attach_refuses_a_registration_that_does_not_match_qemu(
    bridge: QemuBridge, hostd: Hostd, qemu_guest: QemuGuest
) -> None:
    """A VM already registered with other boot RAM is not silently reused: attach names the
    difference and changes nothing."""
    other = "qemu-guest-mismatch"
    with HostClient(hostd.address, token=ADMIN_TOKEN) as host:
        host.create_vm(other, mte_enabled=True, tag_policy="EAGER", boot_memory_bytes=128 * MiB)
        mismatched = QemuBridge(host, bridge.qmp, other)
        with pytest.raises(QemuBridgeError, match="boot RAM is 0x10000000 in QEMU, 0x8000000"):
            mismatched.attach()
        assert [] == [d.device_id for d in host.get_vm(other).regions if d.kind != "BOOT_RAM"]
        host.vm(other).destroy()


def test_status_shows_qemu_and_hostd_side_by_side(
    hostd: Hostd, qemu_guest: QemuGuest, follower: Follower, capsys: pytest.CaptureFixture[str]
) -> None:
    """``vmm-shim qemu status`` prints one row per device with both sides' sizes, in sync."""
    capsys.readouterr()
    code = main(["--host", hostd.address, "qemu", "status", VM_ID, "--qmp", qemu_guest.control_qmp])
    out = capsys.readouterr().out
    assert 0 == code, out
    row = next(line.split() for line in out.splitlines() if line.startswith(DEVICE))
    assert [DEVICE, "1GiB", "2MiB", "128MiB", "128MiB", "128MiB", "128MiB", "128MiB"] == row[:8]
    assert "in sync" == " ".join(row[8:])


def test_hostd_restarted_without_state_gets_the_vm_registered_again(
    hostd: Hostd,
    hostd_process: Callable[..., HostdProcess],
    qemu_guest: QemuGuest,
    follower: Follower,
) -> None:
    """hostd killed and started again with an empty store (on a smaller host, 1 GiB): the
    following bridge reconnects, registers the VM again and mirrors the plugged size QEMU has."""
    hostd.process.proc.kill()
    hostd.process.proc.wait()
    hostd.process = hostd_process(*hostd.restart_args)
    with HostClient(hostd.address, token=ADMIN_TOKEN) as host:
        wait_until(
            lambda: (
                any(v.vm_id == VM_ID for v in host.list_vms())
                and host.get_vm(VM_ID).device(DEVICE).plugged_size == 128 * MiB
            ),
            SETTLE_TIMEOUT_S,
            f"the bridge to register the VM again\n{follower.output()}",
        )
        assert [] == host.check_invariants()
    assert follower.proc.poll() is None


def test_hostd_restarted_with_its_store_keeps_the_vm_and_the_bridge_carries_on(
    hostd: Hostd,
    hostd_process: Callable[..., HostdProcess],
    qemu_guest: QemuGuest,
    follower: Follower,
) -> None:
    """hostd stopped and started again on its state store: the VM is still registered as the
    bridge left it, and mirroring goes on (a resize through the bridge settles on both sides)."""
    hostd.process.signal(signal.SIGTERM)
    assert 0 == hostd.process.wait()
    hostd.process = hostd_process(*hostd.restart_args)
    with QemuBridge.connect(
        VM_ID, qmp_address=qemu_guest.control_qmp, host_address=hostd.address, token=ADMIN_TOKEN
    ) as bridge:
        assert 128 * MiB == bridge.vm.device(DEVICE).plugged_size
        _resize_and_settle(bridge, 192 * MiB)
        _resize_and_settle(bridge, 128 * MiB)
        assert 128 * MiB == bridge.vm.device(DEVICE).tagged_bytes
        assert [] == bridge.host.check_invariants()
    assert follower.proc.poll() is None


def test_a_plug_hostd_cannot_back_is_reported_not_ignored(
    bridge: QemuBridge,
    qemu_guest: QemuGuest,
    follower: Follower,
) -> None:
    """requested-size set in QEMU behind hostd's back (plain qom-set, no admission), beyond what
    the 1 GiB host can back: the guest plugs it all, hostd is asked to follow and backs what it
    can, and the difference is logged, counted in hostd and published there as an event (and
    left for the next test to see in ``qemu status``)."""
    assert bridge.qmp is not None
    events = bridge.host.watch_events()
    stop = threading.Timer(SETTLE_TIMEOUT_S, events.cancel)
    stop.start()
    bridge.qmp.qom_set(f"/machine/peripheral/{DEVICE}", "requested-size", 1024 * MiB)
    wait_until(
        lambda: bridge.machine().device(DEVICE).plugged_size == 1024 * MiB,
        SETTLE_TIMEOUT_S,
        "the guest driver to plug the whole region",
    )
    # Reported either way hostd refuses: a PLUG it cannot back (NACK or BUSY), or QEMU's
    # requested size itself (ResizeVirtioMem refusing what the host cannot back).
    reported = re.compile(r"vm0: hostd (answered (NACK|BUSY) to PLUG|refuses QEMU's requested)")
    wait_until(
        lambda: reported.search(follower.output()) is not None,
        SETTLE_TIMEOUT_S,
        f"the bridge to report the difference\n{follower.output()}",
    )
    assert "was not admitted by hostd" in follower.output()
    try:
        difference = next(e for e in events if e.kind == "vmm_difference")
    finally:
        stop.cancel()
        events.cancel()
    assert (VM_ID, "qemu-bridge") == (difference.vm_id, difference.detail["reporter"])
    assert DEVICE in difference.detail["what"]
    dev = bridge.vm.device(DEVICE)
    # hostd backs what it can (at least what was plugged before), not everything.
    assert 128 * MiB <= dev.plugged_size < 1024 * MiB
    assert dev.plugged_size == dev.tagged_bytes
    assert [] == bridge.host.check_invariants()


def test_status_shows_the_difference_until_a_resize_through_the_bridge_resolves_it(
    hostd: Hostd, qemu_guest: QemuGuest, follower: Follower, capsys: pytest.CaptureFixture[str]
) -> None:
    """The difference left by the previous test is DIFFERS in ``qemu status``; resizing back to
    what the host can back (through the bridge) brings both sides together again."""
    capsys.readouterr()
    main(["--host", hostd.address, "qemu", "status", VM_ID, "--qmp", qemu_guest.control_qmp])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(DEVICE))
    assert row.endswith("DIFFERS")

    with QemuBridge.connect(
        VM_ID, qmp_address=qemu_guest.control_qmp, host_address=hostd.address, token=ADMIN_TOKEN
    ) as bridge:
        _resize_and_settle(bridge, 128 * MiB)
        assert 128 * MiB == bridge.vm.device(DEVICE).plugged_size
        assert [] == bridge.host.check_invariants()


def test_qemu_killed_the_vm_is_destroyed_after_the_grace_period(
    hostd: Hostd, qemu_guest: QemuGuest, follower: Follower
) -> None:
    """QEMU gone for the grace period: the bridge destroys the VM in hostd, which frees its
    memory and tag storage, and exits 0."""
    with QmpClient(qemu_guest.control_qmp) as qmp:
        assert 128 * MiB == qmp.memory_devices()[0]["data"]["size"]
    qemu_guest.kill()
    assert 0 == follower.proc.wait(timeout=SETTLE_TIMEOUT_S), follower.output()
    assert "destroyed in hostd" in follower.output()
    with HostClient(hostd.address, token=ADMIN_TOKEN) as host:
        assert [] == host.list_vms()
        status = host.host_status()
        assert (0, 0, 0) == (status.vm_count, status.tagged_bytes, status.tag_reserved_bytes)
        assert [] == host.check_invariants()
