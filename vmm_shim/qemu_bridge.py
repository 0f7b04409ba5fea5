"""``QemuBridge``: keeps hostd's view of a running QEMU guest equal to QEMU's (docs/qemu.md).

QEMU is the source of truth for what the guest was given; hostd must back it. The bridge reads
the machine over QMP (:mod:`vmm_shim.qemu_qmp`) and talks to hostd only through
:class:`vmm_shim.client.HostClient`:

- **attach** registers the VM (CreateVm: MTE on/off, boot RAM) and its virtio-mem devices
  (AddMemoryDevice) in hostd, or checks that an existing registration matches the machine.
- **resize** is admission: hostd's ResizeVirtioMem first, QEMU's ``requested-size`` only if hostd
  accepted it. A size hostd refuses never reaches the guest.
- **sync** mirrors: QMP reports only each device's plugged *size*, not which blocks, so hostd gets
  the virtio-mem PLUG/UNPLUG requests Linux's driver would have sent (lowest unplugged blocks
  first when plugging, from the top when unplugging) until hostd's plugged size equals QEMU's.
  What cannot be reconciled is logged and returned as :attr:`VirtioMemSync.problem`.
- **follow** runs sync on every ``MEMORY_DEVICE_SIZE_CHANGE`` and every ``poll_interval_s`` (the
  event is rate-limited by QEMU, so the poll catches merged changes); it re-registers after hostd
  lost the VM (a restart without a state store) and destroys the VM in hostd when QEMU has been
  gone for ``grace_s``.

Guest block *identities* are a model: hostd places blocks where Linux would, not necessarily where
this guest did. Sizes, and so tag storage reserved under EAGER, are exact.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmm_shim.client import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT_S,
    DeviceInfo,
    HostClient,
    NotFound,
    TagStoreClientError,
    Unavailable,
    VmHandle,
    VmInfo,
    next_block_run,
)
from vmm_shim.qemu_qmp import DEFAULT_QMP_TIMEOUT_S, QmpClient, QmpConnectionError, QmpError

__all__ = [
    "DEFAULT_GRACE_S",
    "DEFAULT_POLL_INTERVAL_S",
    "QemuBridge",
    "QemuBridgeError",
    "QemuMachine",
    "QemuVirtioMem",
    "VirtioMemSync",
]

log = logging.getLogger("vmm_shim.qemu")

DEFAULT_POLL_INTERVAL_S = 2.0
# How long QEMU may be unreachable before its VM is destroyed in hostd (a QMP socket that comes
# back within it is re-attached: QEMU restarted under the same socket).
DEFAULT_GRACE_S = 10.0
# A virtio-mem request's nb_blocks is a le16.
MAX_NB_BLOCKS = 0xFFFF
# Bytes mirrored per PLUG/UNPLUG request: Linux's driver works one Linux memory block (128 MiB
# on arm64 with 4K pages) at a time, so a host that cannot back everything still backs a prefix.
MIRROR_BATCH_BYTES = 128 << 20
# How the bridge names itself in hostd's difference reports (the metric's reporter label).
REPORTER = "qemu-bridge"
# Requests one sync may send per device before it reports the difference as a problem.
MAX_SYNC_REQUESTS = 4096
# QMP paths.
MACHINE_PATH = "/machine"
PERIPHERAL_PATH = "/machine/peripheral"
SIZE_CHANGE_EVENT = "MEMORY_DEVICE_SIZE_CHANGE"


class QemuBridgeError(Exception):
    """The bridge cannot do what was asked: a registration that does not match the machine, an
    unknown device, a QEMU that refused the new requested-size (hostd was rolled back)."""


# -- QEMU's view -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QemuVirtioMem:
    """A virtio-mem device as ``query-memory-devices`` shows it (sizes in bytes)."""

    device_id: str
    memaddr: int
    block_size: int
    region_size: int
    requested_size: int
    plugged_size: int


@dataclass(frozen=True, slots=True)
class QemuMachine:
    """What QMP tells about the machine: MTE, boot RAM and memory devices.

    ``unmirrored`` names memory devices the bridge does not mirror (DIMMs, virtio-pmem ...).
    """

    mte_enabled: bool
    boot_memory_bytes: int
    virtio_mem: list[QemuVirtioMem]
    unmirrored: list[str] = field(default_factory=list)

    def device(self, device_id: str) -> QemuVirtioMem:
        """The virtio-mem device ``device_id``; QemuBridgeError if QEMU has none."""
        for dev in self.virtio_mem:
            if dev.device_id == device_id:
                return dev
        known = ", ".join(d.device_id for d in self.virtio_mem) or "none"
        raise QemuBridgeError(f"QEMU has no virtio-mem device {device_id!r} (it has: {known})")


@dataclass(frozen=True, slots=True)
class VirtioMemSync:
    """One device after a sync: both sides' sizes, requests sent, and what is still wrong.

    ``problem`` is empty when hostd's plugged size equals QEMU's.
    """

    device_id: str
    qemu_requested_size: int
    qemu_plugged_size: int
    hostd_requested_size: int
    hostd_plugged_size: int
    requests: int = 0
    problem: str = ""


def read_machine(qmp: QmpClient) -> QemuMachine:
    """The machine as QMP shows it (``qom-get /machine mte``, ``query-memory-size-summary``,
    ``query-memory-devices``)."""
    try:
        mte = bool(qmp.qom_get(MACHINE_PATH, "mte"))
    except QmpError:  # a machine without the property (not 'virt') has no MTE
        mte = False
    summary = qmp.execute("query-memory-size-summary")
    devices: list[QemuVirtioMem] = []
    unmirrored: list[str] = []
    for entry in qmp.memory_devices():
        data = entry.get("data", {})
        if entry.get("type") != "virtio-mem":
            unmirrored.append(f"{entry.get('type')}:{data.get('id', '?')}")
            continue
        devices.append(
            QemuVirtioMem(
                device_id=str(data.get("id") or data.get("memdev", "?")),
                memaddr=int(data["memaddr"]),
                block_size=int(data["block-size"]),
                region_size=int(data["max-size"]),
                requested_size=int(data["requested-size"]),
                plugged_size=int(data["size"]),
            )
        )
    return QemuMachine(
        mte_enabled=mte,
        boot_memory_bytes=int(summary["base-memory"]),
        virtio_mem=sorted(devices, key=lambda d: d.memaddr),
        unmirrored=unmirrored,
    )


# -- hostd's block map, read with STATE requests -------------------------------------------------


def _hostd_plugged_blocks(vm: VmHandle, dev: DeviceInfo) -> list[bool]:
    """Which blocks of the device's region hostd has plugged (bisecting MIXED ranges of the
    usable region; blocks beyond it are unplugged by definition)."""
    nb_usable = dev.usable_region_size // dev.block_size
    plugged = [False] * (dev.size // dev.block_size)
    if dev.plugged_size == 0 or nb_usable == 0:
        return plugged
    pending = [
        (first, min(MAX_NB_BLOCKS, nb_usable - first))
        for first in range(0, nb_usable, MAX_NB_BLOCKS)
    ]
    while pending:
        first, count = pending.pop()
        state = vm.virtio_mem_state(dev.device_id, dev.gpa + first * dev.block_size, count)
        if state == "PLUGGED":
            plugged[first : first + count] = [True] * count
        elif state == "MIXED":
            half = count // 2
            pending += [(first, half), (first + half, count - half)]
    return plugged


# -- the bridge --------------------------------------------------------------------------------


class QemuBridge:
    """One QEMU guest mirrored into one hostd VM; a context manager (closes both connections).

    Build it with :meth:`connect` (it opens the QMP connection and the :class:`HostClient` from
    the caller's arguments), or from an open ``HostClient`` and :class:`QmpClient`.
    """

    def __init__(self, host: HostClient, qmp: QmpClient | None, vm_id: str) -> None:
        self.host = host
        self.qmp = qmp
        self.vm_id = vm_id
        self.vm = host.vm(vm_id)
        # The difference last reported to hostd per device, so that a poll repeats none.
        self._reported: dict[str, str] = {}
        self._qmp_address = qmp.address if qmp is not None else ""
        self._qmp_timeout_s = qmp.timeout_s if qmp is not None else DEFAULT_QMP_TIMEOUT_S

    @classmethod
    def connect(
        cls,
        vm_id: str,
        *,
        qmp_address: str | None,
        host_address: str = DEFAULT_ADDRESS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        qmp_timeout_s: float = DEFAULT_QMP_TIMEOUT_S,
        **host_options: Any,
    ) -> QemuBridge:
        """Connect to QEMU (``unix:PATH`` or ``host:port``; None for hostd only) and hostd.
        ``host_options`` go to :class:`HostClient` as they are (e.g. credentials)."""
        host = HostClient(host_address, timeout_s=timeout_s, **host_options)
        try:
            qmp = QmpClient(qmp_address, timeout_s=qmp_timeout_s) if qmp_address else None
        except BaseException:
            host.close()
            raise
        bridge = cls(host, qmp, vm_id)
        bridge._qmp_address = qmp_address or ""
        return bridge

    def close(self) -> None:
        """Close the QMP connection and the hostd client (QEMU and the VM keep running)."""
        if self.qmp is not None:
            self.qmp.close()
        self.host.close()

    def __enter__(self) -> QemuBridge:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _qemu(self) -> QmpClient:
        if self.qmp is None:
            raise QemuBridgeError("no QMP connection: pass --qmp unix:PATH")
        return self.qmp

    def machine(self) -> QemuMachine:
        """QEMU's view of the machine, read now."""
        return read_machine(self._qemu())

    # -- registration ----------------------------------------------------------------------

    def attach(
        self, *, tag_policy: str | None = "EAGER", max_memory_bytes: int = 0
    ) -> list[VirtioMemSync]:
        """Register the VM and its virtio-mem devices in hostd, or check that the existing
        registration matches QEMU (QemuBridgeError naming every difference); then sync.

        ``tag_policy`` applies to an MTE guest only (EAGER by default: QMP shows no guest
        faults, so a policy that waits for faults would reserve nothing). ``max_memory_bytes``
        0 means boot RAM plus each device's region and one block of alignment slack.
        """
        machine = self.machine()
        try:
            info: VmInfo | None = self.vm.info()
        except NotFound:
            info = None
        if info is None:
            self._register(machine, tag_policy, max_memory_bytes)
        else:
            self._check_registration(machine, info)
        return self.sync(machine)

    def _register(self, machine: QemuMachine, tag_policy: str | None, max_memory: int) -> None:
        device_bytes = sum(d.region_size + d.block_size for d in machine.virtio_mem)
        self.host.create_vm(
            self.vm_id,
            mte_enabled=machine.mte_enabled,
            tag_policy=tag_policy if machine.mte_enabled else None,
            boot_memory_bytes=machine.boot_memory_bytes,
            max_memory_bytes=max_memory or machine.boot_memory_bytes + device_bytes,
        )
        log.info(
            "registered VM %s in hostd: MTE %s, boot RAM %#x, %d virtio-mem device(s)",
            self.vm_id,
            "on" if machine.mte_enabled else "off",
            machine.boot_memory_bytes,
            len(machine.virtio_mem),
        )
        for dev in machine.virtio_mem:
            self._add_device(dev)

    def _add_device(self, dev: QemuVirtioMem) -> None:
        self.vm.add_virtio_mem(
            dev.device_id,
            region_size=dev.region_size,
            block_size=dev.block_size,
            requested_size=dev.requested_size,
        )
        log.info("registered virtio-mem %s/%s in hostd", self.vm_id, dev.device_id)

    def _check_registration(self, machine: QemuMachine, info: VmInfo) -> None:
        differences = []
        if info.mte_enabled != machine.mte_enabled:
            differences.append(
                f"MTE is {'on' if machine.mte_enabled else 'off'} in QEMU, "
                f"{'on' if info.mte_enabled else 'off'} in hostd"
            )
        if info.boot_memory_bytes != machine.boot_memory_bytes:
            differences.append(
                f"boot RAM is {machine.boot_memory_bytes:#x} in QEMU, "
                f"{info.boot_memory_bytes:#x} in hostd"
            )
        for dev in machine.virtio_mem:
            try:
                hd = info.device(dev.device_id)
            except KeyError:
                continue  # added to hostd by sync (a device QEMU hot-added)
            if (hd.kind, hd.size, hd.block_size) != ("VIRTIO_MEM", dev.region_size, dev.block_size):
                differences.append(
                    f"device {dev.device_id}: virtio-mem of {dev.region_size:#x} bytes in "
                    f"{dev.block_size:#x} blocks in QEMU, {hd.kind} of {hd.size:#x} bytes in "
                    f"{hd.block_size:#x} blocks in hostd"
                )
        if differences:
            raise QemuBridgeError(
                f"VM {self.vm_id!r} is registered in hostd but does not match QEMU: "
                + "; ".join(differences)
                + " (detach it first to register it again)"
            )

    # -- admission -------------------------------------------------------------------------

    def resize(self, device_id: str, requested_size: int) -> DeviceInfo:
        """Admit ``requested_size`` in hostd, then set it in QEMU. A refusal from hostd is raised
        as its :class:`TagStoreClientError` and QEMU is left alone; if QEMU then refuses, hostd
        is set back and QemuBridgeError says why."""
        qemu_dev = self.machine().device(device_id)
        before = self.vm.device(device_id).requested_size
        admitted = self.vm.resize_virtio_mem(device_id, requested_size)
        try:
            self._qemu().qom_set(f"{PERIPHERAL_PATH}/{device_id}", "requested-size", requested_size)
        except Exception as e:
            self.vm.resize_virtio_mem(device_id, before)
            raise QemuBridgeError(
                f"QEMU refused requested-size {requested_size:#x} for {device_id} "
                f"(hostd set back to {before:#x}): {e}"
            ) from e
        log.info(
            "%s/%s: requested size %#x -> %#x (admitted by hostd)",
            self.vm_id,
            device_id,
            qemu_dev.requested_size,
            requested_size,
        )
        return admitted

    # -- mirroring -------------------------------------------------------------------------

    def sync(self, machine: QemuMachine | None = None) -> list[VirtioMemSync]:
        """Make hostd's plugged size of every virtio-mem device equal QEMU's; returns one
        :class:`VirtioMemSync` per device (QEMU's and hostd's devices alike)."""
        machine = machine if machine is not None else self.machine()
        info = self.vm.info()
        results = []
        for dev in machine.virtio_mem:
            try:
                info.device(dev.device_id)
            except KeyError:
                try:
                    self._add_device(dev)
                except TagStoreClientError as e:
                    results.append(self._report(dev, None, 0, f"hostd refused the device: {e}"))
                    continue
            results.append(self._sync_device(dev))
        qemu_ids = {d.device_id for d in machine.virtio_mem}
        for hd in info.regions:
            if hd.kind == "VIRTIO_MEM" and hd.device_id not in qemu_ids:
                results.append(self._sync_vanished(hd))
        return results

    def _report(
        self, dev: QemuVirtioMem, hd: DeviceInfo | None, requests: int, problem: str
    ) -> VirtioMemSync:
        if problem:
            log.warning("%s/%s: %s", self.vm_id, dev.device_id, problem)
            # A device hostd does not have is reported against the VM as a whole.
            self._report_to_hostd(dev.device_id, hd is not None, problem)
        else:
            self._reported.pop(dev.device_id, None)
        return VirtioMemSync(
            dev.device_id,
            dev.requested_size,
            dev.plugged_size,
            hd.requested_size if hd else 0,
            hd.plugged_size if hd else 0,
            requests,
            problem,
        )

    def _report_to_hostd(self, device_id: str, in_hostd: bool, problem: str) -> None:
        """Count the difference in hostd (metric and event) once per new difference."""
        if self._reported.get(device_id) == problem:
            return
        try:
            self.vm.report_difference(
                device_id if in_hostd else "", f"{device_id}: {problem}", reporter=REPORTER
            )
        except TagStoreClientError as e:
            log.warning(
                "%s/%s: could not report the difference to hostd: %s", self.vm_id, device_id, e
            )
            return
        self._reported[device_id] = problem

    def _sync_device(self, dev: QemuVirtioMem) -> VirtioMemSync:
        hd = self.vm.device(dev.device_id)
        target = dev.plugged_size // dev.block_size
        plugged = _hostd_plugged_blocks(self.vm, hd)
        nb_plugged = sum(plugged)
        requests = 0
        raised_requested = reread = False
        batch = min(MAX_NB_BLOCKS, max(1, MIRROR_BATCH_BYTES // dev.block_size))
        while nb_plugged != target:
            if requests >= MAX_SYNC_REQUESTS:
                hd = self.vm.device(dev.device_id)
                return self._report(
                    dev,
                    hd,
                    requests,
                    f"not reconciled after {requests} requests (hostd {hd.plugged_size:#x}, "
                    f"QEMU {dev.plugged_size:#x}); continuing at the next sync",
                )
            plug = nb_plugged < target
            first, count = next_block_run(plugged, plug, min(abs(target - nb_plugged), batch))
            addr = hd.gpa + first * hd.block_size
            if plug:
                answer = self.vm.virtio_mem_plug(dev.device_id, addr, count)
            else:
                answer = self.vm.virtio_mem_unplug(dev.device_id, addr, count)
            requests += 1
            if answer == "ACK":
                plugged[first : first + count] = [plug] * count
                nb_plugged += count if plug else -count
                continue
            hd = self.vm.device(dev.device_id)
            if not reread:
                # Another mirror (e.g. `resize --wait` beside `attach --follow`) may have changed
                # the blocks since they were read: read them again, once, before judging.
                reread = True
                plugged = _hostd_plugged_blocks(self.vm, hd)
                nb_plugged = sum(plugged)
                continue
            if answer == "NACK" and not raised_requested and dev.requested_size > hd.requested_size:
                # The guest plugged past hostd's requested size: requested-size was set in QEMU
                # without admission. hostd follows QEMU, which the guest already obeys.
                log.warning(
                    "%s/%s: QEMU's requested-size %#x was not admitted by hostd (%#x); "
                    "asking hostd for it now",
                    self.vm_id,
                    dev.device_id,
                    dev.requested_size,
                    hd.requested_size,
                )
                raised_requested = True
                try:
                    hd = self.vm.resize_virtio_mem(dev.device_id, dev.requested_size)
                except TagStoreClientError as e:
                    return self._report(
                        dev, hd, requests, f"hostd refuses QEMU's requested-size: {e}"
                    )
                continue
            what = "PLUG" if plug else "UNPLUG"
            why = {
                "NACK": "beyond hostd's requested size, or hostd cannot back them",
                "BUSY": "hostd cannot back the blocks now",
                "ERROR": "hostd's block state differs from the bridge's",
            }.get(answer, answer)
            return self._report(
                dev,
                hd,
                requests,
                f"hostd answered {answer} to {what} of {count} block(s) at {addr:#x} ({why}): "
                f"hostd has {hd.plugged_size:#x} bytes plugged, QEMU {dev.plugged_size:#x}",
            )
        hd = self.vm.device(dev.device_id)
        if requests:
            log.info(
                "%s/%s: hostd plugged size now %#x (QEMU %#x), %d request(s)",
                self.vm_id,
                dev.device_id,
                hd.plugged_size,
                dev.plugged_size,
                requests,
            )
        return self._report(dev, hd, requests, "")

    def _sync_vanished(self, hd: DeviceInfo) -> VirtioMemSync:
        """A device hostd has and QEMU no longer has (``device_del``): QEMU removes a virtio-mem
        device only with nothing plugged, so hostd unplugs everything and removes it too."""
        gone = QemuVirtioMem(hd.device_id, 0, hd.block_size, hd.size, 0, 0)
        answer = self.vm.virtio_mem_unplug_all(hd.device_id)
        if answer != "ACK":
            return self._report(gone, hd, 1, f"absent from QEMU; hostd answered {answer}")
        self.vm.remove_device(hd.device_id)
        log.info("%s/%s: removed from hostd (absent from QEMU)", self.vm_id, hd.device_id)
        return self._report(gone, None, 1, "")

    # -- lifecycle -------------------------------------------------------------------------

    def detach(self) -> None:
        """Destroy the VM in hostd (its memory and tag storage are freed); QEMU is not touched."""
        self.vm.destroy()
        log.info("VM %s destroyed in hostd (detached)", self.vm_id)

    def follow(
        self,
        *,
        tag_policy: str | None = "EAGER",
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        grace_s: float = DEFAULT_GRACE_S,
        stop: threading.Event | None = None,
        on_sync: Callable[[list[VirtioMemSync]], None] | None = None,
    ) -> str:
        """Mirror until QEMU is gone (then destroy the VM in hostd: returns ``"qemu-gone"``) or
        ``stop`` is set (returns ``"stopped"``, the VM stays registered). hostd unreachable is
        waited out; a VM hostd lost (restarted without a store) is registered again."""
        stop = stop if stop is not None else threading.Event()
        next_poll = 0.0
        # After either side came back, check the registration again (attach), not just sizes.
        recheck = False
        while not stop.is_set():
            try:
                event = self._qemu().next_event(max(0.0, next_poll - time.monotonic()))
            except QmpConnectionError as e:
                log.warning("QEMU unreachable (%s); destroying VM after %gs", e, grace_s)
                if self._wait_for_qemu(grace_s, stop):
                    next_poll, recheck = 0.0, True
                    continue
                if stop.is_set():
                    break
                self._destroy_when_reachable(stop)
                return "qemu-gone"
            due = time.monotonic() >= next_poll
            if (event is None or event.get("event") != SIZE_CHANGE_EVENT) and not due:
                continue
            try:
                try:
                    results = self.attach(tag_policy=tag_policy) if recheck else self.sync()
                except NotFound:
                    # hostd lost the VM (restarted without a store, or destroyed behind us).
                    log.warning("VM %s not found in hostd: registering it again", self.vm_id)
                    results = self.attach(tag_policy=tag_policy)
                recheck = False
                if on_sync is not None:
                    on_sync(results)
            except QmpConnectionError:
                pass  # seen again, and handled, by next_event
            except Unavailable as e:
                log.warning("hostd unreachable (%s); retrying", e)
                recheck = True
            except (TagStoreClientError, QemuBridgeError) as e:
                log.error("%s", e)
            next_poll = time.monotonic() + poll_interval_s
        return "stopped"

    def _wait_for_qemu(self, grace_s: float, stop: threading.Event) -> bool:
        """Try to reconnect to the QMP socket until ``grace_s`` passed; True if QEMU is back."""
        if self.qmp is not None:
            self.qmp.close()
        deadline = time.monotonic() + grace_s
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                self.qmp = QmpClient(self._qmp_address, timeout_s=self._qmp_timeout_s)
            except OSError:
                stop.wait(min(1.0, max(0.0, deadline - time.monotonic())))
                continue
            log.info("QEMU is back at %s: checking the registration", self._qmp_address)
            return True
        return False

    def _destroy_when_reachable(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.vm.destroy()
            except NotFound:
                pass
            except Unavailable as e:
                log.warning("hostd unreachable (%s); will destroy VM %s later", e, self.vm_id)
                stop.wait(1.0)
                continue
            log.info("QEMU gone: VM %s destroyed in hostd", self.vm_id)
            return
