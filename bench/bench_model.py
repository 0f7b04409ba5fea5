"""Model benchmarks: memory per host page and guest fault throughput on a 1 TiB host.

Prints figures; asserts nothing about time (machines here are shared and noisy). Each figure
is a ratio against a baseline measured in the same run.

    python bench/bench_model.py [--memory 1TiB] [--repeat 3]

1. Process memory per host page: RSS growth from before the host is built to after it is fully
   populated by VMs (every page in use: tagged, untagged, reserved or lent), divided by the
   number of host pages. Goal: at most 8 bytes (Linux's struct page is 64).
2. Fault throughput: faulting a whole 64 GiB MTE guest (ON_FAULT) in 1 GiB ranges, against a
   plain numpy write of the same state arrays (page flags, owners, stage-2 map) for the same
   pages. Goal: a few times the plain write.
3. Placement: tag blocks reserved per minimum needed after VM churn, naive vs tag-block-aware.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hostd.model import (
    BOOT_RAM_GPA,
    Access,
    GiB,
    Host,
    MiB,
    Placement,
    ResourceExhaustedError,
    TagPolicy,
    VmConfig,
    default_topology,
    parse_size,
)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def fault_all(host: Host, vm_id: str, size_bytes: int, access: Access = Access.WRITE) -> None:
    for off in range(0, size_bytes, GiB):
        host.guest_fault(vm_id, BOOT_RAM_GPA + off, min(GiB, size_bytes - off), access)


def memory_per_page(memory_bytes: int) -> dict[str, float]:
    """Build the host, fill every page with VM memory, report bytes of RSS per host page."""
    gc.collect()
    before = rss_bytes()
    host = Host(default_topology(memory_bytes))
    pages = host.mem.nr_pages
    # MTE guests take most taggable memory; non-MTE guests fill the rest, lending tag storage.
    status = host.status()
    taggable = sum(r.memory_size_bytes for r in status.regions if r.tag_size_bytes)
    mte_vm_bytes = min(56 * GiB, memory_bytes // 16)
    nr_mte = int(taggable * 0.8) // mte_vm_bytes
    for i in range(nr_mte):
        host.create_vm(VmConfig(f"mte{i}", True, TagPolicy.ON_FAULT, mte_vm_bytes))
        fault_all(host, f"mte{i}", mte_vm_bytes)
    i = 0
    while (free := host.status().usage.all_free_bytes) > 0:
        size = min(free, 64 * GiB)
        host.create_vm(VmConfig(f"plain{i}", False, TagPolicy.ON_FAULT, size))
        fault_all(host, f"plain{i}", size)
        i += 1
    usage = host.status().usage
    assert usage.all_free_bytes == 0, usage
    assert host.check_invariants() == []
    gc.collect()
    after = rss_bytes()
    arrays = host.mem.flags.nbytes + host.mem.owner.nbytes + host.mem.ts_gfn.nbytes
    arrays += sum(vm.stage2.nbytes for vm in host.vms.values())
    return {
        "host_pages": pages,
        "vms": len(host.vms),
        "tag_lent_bytes": usage.tag_lent_bytes,
        "rss_bytes_per_page": (after - before) / pages,
        "state_array_bytes_per_page": arrays / pages,
    }


def fault_throughput(memory_bytes: int, guest_bytes: int, repeat: int) -> dict[str, float]:
    """Model fault of a whole MTE guest in 1 GiB ranges vs a plain write of the same arrays."""
    model_s: list[float] = []
    plain_s: list[float] = []
    slice_s: list[float] = []
    for r in range(repeat):
        host = Host(default_topology(memory_bytes))
        host.create_vm(VmConfig("g", True, TagPolicy.ON_FAULT, guest_bytes))
        t0 = time.perf_counter()
        fault_all(host, "g", guest_bytes)
        model_s.append(time.perf_counter() - t0)
        assert host.get_vm("g").tagged_bytes == guest_bytes
        # The baseline writes the same three state arrays for the same number of pages, once
        # through index arrays (as a write of arbitrary pages must) and once as slices (the
        # floor: contiguous memory, no indices).
        flags = np.zeros_like(host.mem.flags)
        owner = np.zeros_like(host.mem.owner)
        stage2 = np.zeros(guest_bytes // host.page_size, dtype=np.uint32)
        per = GiB // host.page_size
        t0 = time.perf_counter()
        for off in range(0, stage2.size, per):
            idx = np.arange(off, off + per, dtype=np.int64) + r
            flags[idx] = 6
            owner[idx] = 1
            stage2[idx - r] = idx + 1
        plain_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for off in range(0, stage2.size, per):
            flags[off : off + per] = 6
            owner[off : off + per] = 1
            stage2[off : off + per] = np.arange(off + 1, off + per + 1, dtype=np.uint32)
        slice_s.append(time.perf_counter() - t0)
        del host, flags, owner, stage2
        gc.collect()
    best_model, best_plain = min(model_s), min(plain_s)
    return {
        "guest_bytes": guest_bytes,
        "model_seconds": best_model,
        "plain_write_seconds": best_plain,
        "ratio": best_model / best_plain,
        "slice_write_seconds": min(slice_s),
        "ratio_to_slice_write": best_model / min(slice_s),
        "model_gib_per_second": guest_bytes / GiB / best_model,
    }


def placement_after_churn(memory_bytes: int, steps: int = 3000) -> dict[str, float]:
    """Reserved tag blocks ÷ minimum needed after MTE and non-MTE guests fault small ranges
    in turn (so their pages interleave in physical memory) and come and go."""
    out: dict[str, float] = {}
    for placement in Placement:
        host = Host(default_topology(memory_bytes), placement)
        rng = np.random.default_rng(7)
        live: dict[str, int] = {}
        ratios: list[float] = []
        for i in range(steps):
            roll = rng.random()
            if roll < 0.03 or not live:
                vm_id, size = f"vm{i}", int(rng.integers(1, 5)) * 128 * MiB
                host.create_vm(VmConfig(vm_id, bool(rng.random() < 0.5), TagPolicy.ON_FAULT, size))
                live[vm_id] = size
            elif roll < 0.05:
                vm_id = sorted(live)[int(rng.integers(len(live)))]
                host.destroy_vm(vm_id)
                del live[vm_id]
            else:
                vm_id = sorted(live)[int(rng.integers(len(live)))]
                chunk = int(rng.integers(1, 17)) * 64 * 1024
                off = int(rng.integers(0, (live[vm_id] - chunk) // 4096)) * 4096
                try:
                    host.guest_fault(vm_id, BOOT_RAM_GPA + off, chunk, Access.WRITE)
                except ResourceExhaustedError:
                    host.destroy_vm(vm_id)
                    del live[vm_id]
            status = host.status()
            if status.tag_blocks_min_needed:
                ratios.append(status.tag_blocks_reserved / status.tag_blocks_min_needed)
        out[placement.value] = float(np.mean(ratios))
        assert host.check_invariants() == []
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--memory", default="1TiB", help="host RAM (default 1TiB)")
    ap.add_argument("--guest", default="64GiB", help="guest size for the fault figure")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    memory = parse_size("--memory", args.memory)
    guest = parse_size("--guest", args.guest)

    # Memory first, while the process has allocated nothing else that it could reuse.
    figures = {"memory_per_page": memory_per_page(memory)}
    gc.collect()
    figures["fault_throughput"] = fault_throughput(memory, guest, args.repeat)
    figures["placement_reserved_over_min_after_churn"] = placement_after_churn(2 * GiB)
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    m, f, p = (
        figures["memory_per_page"],
        figures["fault_throughput"],
        figures["placement_reserved_over_min_after_churn"],
    )
    print(
        f"host: {args.memory}, {m['host_pages']:,} pages of 4 KiB, {m['vms']} VMs, fully populated"
    )
    print(f"  process memory per host page (RSS): {m['rss_bytes_per_page']:.2f} bytes (goal <= 8)")
    print(f"  state arrays per host page:         {m['state_array_bytes_per_page']:.2f} bytes")
    print(f"fault a {args.guest} MTE guest in 1 GiB ranges (best of {args.repeat}):")
    print(
        f"  model {f['model_seconds']:.3f} s ({f['model_gib_per_second']:.1f} GiB/s), "
        f"plain numpy write {f['plain_write_seconds']:.3f} s, ratio {f['ratio']:.1f}x"
    )
    print(
        f"  (against contiguous slice writes, the floor: {f['slice_write_seconds']:.3f} s, "
        f"ratio {f['ratio_to_slice_write']:.1f}x)"
    )
    print("tag blocks reserved / minimum needed, mean over a churn of 3000 steps (2 GiB host):")
    for k, v in p.items():
        print(f"  {k:16s} {v:.3f}")


if __name__ == "__main__":
    main()
