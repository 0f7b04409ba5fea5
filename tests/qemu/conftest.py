"""Fixtures of the QEMU tests: a real arm64 MTE guest under TCG (``qemu_guest``).

They need ``qemu-system-aarch64`` and the guest prepared by ``scripts/prepare_qemu_guest.sh``
(both done by ``bash scripts/ensure_qemu.sh``); without them every test here skips, saying so.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# The vmm-shim fixtures (a HostClient and the in-process CLI of the module's daemon), shared.
from tests.shim.conftest import cli, host  # noqa: F401

ENABLE_HINT = "run `bash scripts/ensure_qemu.sh` (as root) to enable tests/qemu"
# Generous bounds for a busy CI machine (TCG boots in ~10 s on 2 idle cores); they bound a
# hang, they are no performance claim.
BOOT_TIMEOUT_S = 240.0
GUEST_RAM = "256M"
VIRTIO_MEM_REGION = "1G"
VIRTIO_MEM_BLOCK = "2M"
VIRTIO_MEM_REQUESTED = "64M"
READY_LINE = "guest: ready"


def guest_dir() -> Path:
    """Where scripts/prepare_qemu_guest.sh puts the guest (same default as the script)."""
    if "TAGSTORE_QEMU_GUEST_DIR" in os.environ:
        return Path(os.environ["TAGSTORE_QEMU_GUEST_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tagstore" / "qemu-guest"


def qemu_missing() -> str:
    """Why the QEMU tests cannot run here, or "" when they can."""
    if shutil.which("qemu-system-aarch64") is None:
        return f"qemu-system-aarch64 not found: {ENABLE_HINT}"
    missing = [f for f in ("vmlinuz", "initrd.img") if not (guest_dir() / f).is_file()]
    if missing:
        return f"arm64 guest not prepared in {guest_dir()}: {ENABLE_HINT}"
    return ""


@dataclass
class QemuGuest:
    """A running QEMU: ``bridge_qmp`` for the bridge, ``control_qmp`` for the test (a QMP
    socket takes one client at a time)."""

    proc: subprocess.Popen[bytes]
    bridge_qmp: str
    control_qmp: str
    console: Path

    def console_text(self) -> str:
        """What the guest printed on its serial console so far."""
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def kill(self) -> None:
        """SIGKILL QEMU (by its pid) and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def qemu_guest(short_tmp: Path) -> Iterator[QemuGuest]:
    """A booted arm64 guest: ``-M virt,mte=on -cpu max``, 256 MiB of boot RAM and a cold-plugged
    virtio-mem device ``vm0`` (1 GiB region, 2 MiB blocks, 64 MiB requested)."""
    reason = qemu_missing()
    if reason:
        pytest.skip(reason)
    run_dir = Path(short_tmp) / f"qemu-{os.getpid()}-{time.monotonic_ns()}"
    run_dir.mkdir()
    guest = guest_dir()
    bridge_sock, control_sock = run_dir / "bridge.sock", run_dir / "control.sock"
    console = run_dir / "console.log"
    command = [
        "qemu-system-aarch64",
        "-M", "virt,mte=on",
        "-cpu", "max",
        "-accel", "tcg,thread=multi",
        "-smp", "1",
        "-m", f"{GUEST_RAM},maxmem=4G",
        "-nographic", "-nic", "none", "-monitor", "none",
        "-serial", f"file:{console}",
        "-qmp", f"unix:{bridge_sock},server=on,wait=off",
        "-qmp", f"unix:{control_sock},server=on,wait=off",
        "-kernel", str(guest / "vmlinuz"),
        "-initrd", str(guest / "initrd.img"),
        "-append", "console=ttyAMA0 memhp_default_state=online_movable quiet",
        "-object", f"memory-backend-ram,id=vmem0,size={VIRTIO_MEM_REGION}",
        "-device",
        f"virtio-mem-pci,id=vm0,memdev=vmem0,requested-size={VIRTIO_MEM_REQUESTED},"
        f"block-size={VIRTIO_MEM_BLOCK}",
    ]  # fmt: skip
    with open(run_dir / "qemu.log", "wb") as log:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    qemu = QemuGuest(proc, f"unix:{bridge_sock}", f"unix:{control_sock}", console)
    try:
        wait_until(
            lambda: READY_LINE in qemu.console_text() or proc.poll() is not None,
            BOOT_TIMEOUT_S,
            "the guest to boot",
        )
        assert proc.poll() is None, (run_dir / "qemu.log").read_text(errors="replace")
        yield qemu
    finally:
        qemu.kill()
        shutil.rmtree(run_dir, ignore_errors=True)
