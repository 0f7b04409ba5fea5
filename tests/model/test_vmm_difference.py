"""A VMM's report of a difference it could not reconcile with hostd (the QEMU bridge): counted
and published, never silent, and it changes no VM state."""

from __future__ import annotations

import pytest

from hostd.model import Host, InvalidArgumentError, NotFoundError
from hostd.model.events import EVENT_VMM_DIFFERENCE, Event

from .conftest import assert_unchanged, snapshot


def test_a_reported_difference_is_counted_per_reporter_and_published(
    host: Host, mte_vm: str
) -> None:
    """The report bumps the reporter's counter and emits a ``vmm_difference`` event naming the
    VM, the device and what differs; no page, mapping or device changes."""
    seen: list[Event] = []
    host.subscribe(seen.append)
    before = snapshot(host)
    host.report_vmm_difference(mte_vm, "", "qemu-bridge", "vmem0: QEMU 1GiB, hostd 128MiB")
    host.report_vmm_difference(mte_vm, "", "qemu-bridge", "again")
    assert {"qemu-bridge": 2} == host.counters.vmm_differences
    assert [EVENT_VMM_DIFFERENCE] * 2 == [e.kind for e in seen]
    assert {"reporter": "qemu-bridge", "what": "vmem0: QEMU 1GiB, hostd 128MiB"} == seen[0].detail
    assert mte_vm == seen[0].vm_id
    assert_unchanged(host, before)


@pytest.mark.parametrize(
    ("device_id", "reporter", "what", "error"),
    [
        ("no-such-device", "qemu-bridge", "x", NotFoundError),
        ("", "has space", "x", InvalidArgumentError),
        ("", "qemu-bridge", "", InvalidArgumentError),
        ("", "qemu-bridge", "x" * 513, InvalidArgumentError),
    ],
)
def test_a_malformed_report_is_refused_and_counts_nothing(
    host: Host, mte_vm: str, device_id: str, reporter: str, what: str, error: type[Exception]
) -> None:
    """An unknown device, a reporter that is not an id, or an empty or over-long account is
    refused; nothing is counted."""
    with pytest.raises(error):
        host.report_vmm_difference(mte_vm, device_id, reporter, what)
    assert {} == host.counters.vmm_differences


def test_a_report_for_an_unknown_vm_is_not_found(host: Host) -> None:
    """The VM must exist."""
    with pytest.raises(NotFoundError):
        host.report_vmm_difference("nobody", "", "qemu-bridge", "x")
