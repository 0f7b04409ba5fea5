"""Fixtures of the model tests, layered by lifecycle: ``host`` (4 GiB, 4K pages) → ``mte_vm`` →
``vm_with_virtio_mem``; ``small_host`` is a tiny hand-made host for exhaustion scenarios.

Helpers: :func:`assert_sound` (``check_invariants() == []``), :func:`snapshot` and
:func:`assert_unchanged` (``save_state()`` arrays before and after a refused call).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from hostd.model import (
    BOOT_RAM_GPA,
    Access,
    GiB,
    Host,
    HostTopology,
    KiB,
    MiB,
    Placement,
    TagPolicy,
    TagStorageMode,
    VirtioMemConfig,
    VmConfig,
    default_topology,
    parse_topology,
)

PAGE = 4 * KiB
MTE_VM = "mte"
VMEM = "vmem0"
VMEM_BLOCK = 2 * MiB
VMEM_REGION = 2 * GiB
# Device memory of a VM with 256 MiB of boot RAM starts at the next 1 GiB boundary.
DEVICE_GPA = 0x8000_0000

# The small host: one tag region of 64 MiB (+2 MiB of tags, 8 KiB blocks = 2 pages, one block
# covers 64 data pages) and 16 MiB of untaggable memory, 4K pages.
SMALL_DATA_PAGES = 16384
SMALL_TAG_PAGES = 512
SMALL_UNTAGGED_PAGES = 4096
SMALL_SPAN_PAGES = 64
SMALL_BLOCK_PAGES = 2


def small_topology(
    *, mode: str = "dynamic", mte_perm: bool = True, page_size: str = "4K"
) -> HostTopology:
    """One tag region (64 MiB data at 0x8000_0000, its 2 MiB of tags right after) and 16 MiB of
    untaggable memory at 0x1_0000_0000."""
    return parse_topology(
        {
            "page_size": page_size,
            "mte_perm": mte_perm,
            "tag_storage": mode,
            "tag_region": [
                {
                    "memory_base": 0x8000_0000,
                    "memory_size": "64MiB",
                    "tag_base": 0x8000_0000 + 64 * MiB,
                    "tag_size": "2MiB",
                    "block_size": 0x2000,
                }
            ],
            "untagged_range": [{"base": 0x1_0000_0000, "size": "16MiB"}],
        }
    )


def assert_sound(host: Host) -> None:
    """The host's state keeps every invariant."""
    assert [] == host.check_invariants()


def snapshot(host: Host) -> dict[str, np.ndarray]:
    """Copies of the arrays ``save_state`` persists."""
    return {k: v.copy() for k, v in host.save_state().arrays.items()}


def assert_unchanged(host: Host, before: dict[str, np.ndarray]) -> None:
    """``save_state`` arrays equal ``before`` (a refused call changed nothing)."""
    after = host.save_state().arrays
    assert sorted(before) == sorted(after)
    for key, value in before.items():
        assert np.array_equal(value, after[key]), key
    assert_sound(host)


def pages_of(host: Host, vm_id: str, gpa: int, nr_pages: int) -> np.ndarray:
    """Host page indices mapped at ``[gpa, gpa + nr_pages)`` of ``vm_id`` (-1: unmapped)."""
    vm = host.vms[vm_id]
    first = vm.gfn_offset(gpa)
    return vm.stage2[first : first + nr_pages].astype(np.int64) - 1


def flags_of(host: Host, vm_id: str, gpa: int, nr_pages: int) -> np.ndarray:
    """Page flags (``physmem.TG_*`` / ``TS_*`` / ``UT_*``) of mapped guest pages."""
    return host.mem.flags[pages_of(host, vm_id, gpa, nr_pages)]


def mte_config(vm_id: str = MTE_VM, policy: TagPolicy = TagPolicy.ON_FAULT, **kw: Any) -> VmConfig:
    """An MTE VM: 256 MiB of boot RAM, 2 DIMM slots, 2 GiB of device memory."""
    args: dict[str, Any] = {
        "boot_memory_bytes": 256 * MiB,
        "dimm_slots": 2,
        "max_memory_bytes": 256 * MiB + 2 * GiB,
    }
    args.update(kw)
    return VmConfig(vm_id, True, policy, **args)


def fill(host: Host, vm_id: str, nr_pages: int, *, mte: bool = False) -> None:
    """Create ``vm_id`` with ``nr_pages`` of boot RAM and fault all of it (1 GiB per call)."""
    host.create_vm(VmConfig(vm_id, mte, boot_memory_bytes=nr_pages * host.page_size))
    total = nr_pages * host.page_size
    for off in range(0, total, GiB):
        host.guest_fault(vm_id, BOOT_RAM_GPA + off, min(GiB, total - off), Access.WRITE)
    assert_sound(host)


def lay_out(
    host: Host,
    dimms: list[tuple[str, int]],
    remove: list[str],
    boot_pages: int = SMALL_UNTAGGED_PAGES,
) -> dict[str, int]:
    """Create 'plain' (boot RAM: all untaggable memory), fault DIMMs of the given page counts in
    order, then remove the DIMMs named in ``remove``. Returns each DIMM's gpa."""
    host.create_vm(
        VmConfig(
            "plain",
            False,
            boot_memory_bytes=boot_pages * PAGE,
            dimm_slots=len(dimms),
            max_memory_bytes=boot_pages * PAGE + 256 * MiB,
        )
    )
    host.guest_fault("plain", BOOT_RAM_GPA, boot_pages * PAGE, Access.WRITE)
    gpas = {}
    for name, nr in dimms:
        gpas[name] = host.add_dimm("plain", name, nr * PAGE).gpa
        host.guest_fault("plain", gpas[name], nr * PAGE, Access.WRITE)
    for name in remove:
        host.remove_memory_device("plain", name)
    assert_sound(host)
    return gpas


@pytest.fixture
def host() -> Host:
    """A fresh 4 GiB host (default topology, 4K pages, mte_perm, dynamic tag storage)."""
    return Host(default_topology(4 * GiB))


@pytest.fixture
def fresh_status(host: Host) -> Any:
    """``host.status()`` before the test did anything."""
    return host.status()


@pytest.fixture
def make_host() -> Callable[..., Host]:
    """Factory of small hosts: ``make_host(placement=..., mode=..., mte_perm=...)``."""

    def make(
        placement: Placement = Placement.TAG_BLOCK_AWARE,
        mode: TagStorageMode = TagStorageMode.DYNAMIC,
        mte_perm: bool = True,
    ) -> Host:
        return Host(small_topology(mode=mode.value.lower(), mte_perm=mte_perm), placement)

    return make


@pytest.fixture
def small_host(make_host: Callable[..., Host]) -> Host:
    """A fresh small host (see :func:`small_topology`)."""
    return make_host()


@pytest.fixture
def mte_vm(host: Host) -> str:
    """An ON_FAULT MTE VM on ``host`` (256 MiB boot RAM, 2 DIMM slots, 2 GiB device memory)."""
    host.create_vm(mte_config())
    assert_sound(host)
    return MTE_VM


@pytest.fixture
def vm_with_virtio_mem(host: Host, mte_vm: str) -> str:
    """``mte_vm`` plus virtio-mem ``vmem0``: 2 GiB region, 2 MiB blocks, nothing requested."""
    host.add_virtio_mem(mte_vm, VMEM, VirtioMemConfig(VMEM_REGION, VMEM_BLOCK))
    assert_sound(host)
    return mte_vm
