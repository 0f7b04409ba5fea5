"""``vmm-shim report``: every shipped scenario under every tag storage policy, as a Markdown
table, PNG plots and the raw results (``docs/report/`` by default).

Runs per scenario: the static carve-out once (tag-block-aware placement: the carve-out reserves
all tag storage at boot, so placement cannot change what is reserved), and dynamic reuse with
each tag policy (ON_FAULT, EAGER, ON_TAG_ACCESS) under both placements (naive and
tag-block-aware). Each run starts its own hostd; at most two runs at a time.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from vmm_shim.scenario import (
    POLICIES,
    ScenarioError,
    find_scenario,
    load_scenario,
    shipped_scenarios,
)
from vmm_shim.simulate import RunConfig, checks_pass, run_scenario
from vmm_shim.units import format_size, one_line

__all__ = ["QUICK_SCALE", "add_cli", "report_configs", "run_report", "write_report"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
MAX_JOBS = 2
# --quick: this share of each scenario's steps (a smoke run of the whole pipeline).
QUICK_SCALE = 0.2
LABELS = ("STATIC", *POLICIES)
COLORS = {
    "STATIC": "#7f7f7f",
    "ON_FAULT": "#1f77b4",
    "EAGER": "#d62728",
    "ON_TAG_ACCESS": "#2ca02c",
}


def report_configs(memory: int, page_size: str) -> list[RunConfig]:
    """The runs of one scenario: static once, then each policy under each placement."""
    configs = [RunConfig(memory, page_size, "tag-block-aware", "static", "ON_FAULT")]
    for policy in POLICIES:
        for placement in ("naive", "tag-block-aware"):
            configs.append(RunConfig(memory, page_size, placement, "dynamic", policy))
    return configs


def _run_one(path: str, config: RunConfig, seed: int | None, scale: float) -> dict[str, Any]:
    scenario = load_scenario(path)
    if scale != 1.0:
        scenario = scenario.scaled(scale)
    result = run_scenario(scenario, config, seed)
    return result.to_json()


def run_report(
    paths: Sequence[Path],
    *,
    seed: int | None = None,
    scale: float = 1.0,
    jobs: int = MAX_JOBS,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Run every scenario of ``paths`` under :func:`report_configs`; results in a fixed order."""
    work = []
    for path in paths:
        scenario = load_scenario(path)  # validate all before starting anything
        for config in report_configs(scenario.host.memory, scenario.host.page_size):
            work.append((str(path), config))
    results: list[dict[str, Any]] = []
    t0 = time.monotonic()
    with ProcessPoolExecutor(max_workers=max(1, min(jobs, MAX_JOBS))) as pool:
        futures = [pool.submit(_run_one, p, c, seed, scale) for p, c in work]
        for i, future in enumerate(futures, 1):
            results.append(future.result())
            if progress:
                r = results[-1]
                sys.stderr.write(
                    f"\r[{i}/{len(futures)}] {r['scenario']} {r['label']} "
                    f"{r['config']['placement']} ({time.monotonic() - t0:.0f}s)\x1b[K"
                )
                sys.stderr.flush()
    if progress:
        sys.stderr.write("\n")
    return results


# -- output ------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _table(results: list[dict[str, Any]]) -> str:
    head = (
        "| scenario | tag storage / policy | placement | RAM given back mean | min "
        "| reserved ÷ min needed | evacuated pages / GiB | failed reservations (blocks) "
        "| RESOURCE_EXHAUSTED | NACKed / BUSY plugs | given back by free page reporting "
        "| huge-page share | fault p50 µs | fault p99 µs | VMs created / destroyed | checks |"
    )
    rows = [head, "|" + "---|" * 16]
    for r in results:
        s = r["summary"]
        placement = "(n/a)" if r["label"] == "STATIC" else r["config"]["placement"]
        rows.append(
            f"| {r['scenario']} | {r['label']} | {placement} "
            f"| {_pct(s['ram_given_back_mean'])} | {_pct(s['ram_given_back_min'])} "
            f"| {_num(s['reserved_over_min_needed_mean'])} "
            f"| {s['evacuated_pages_per_gib']:.1f} | {s['tag_reserve_failed_blocks']} "
            f"| {s['resource_exhausted_total']} "
            f"| {s['virtio_mem_nacks']} / {s.get('virtio_mem_busy', 0)} "
            f"| {format_size(s.get('discarded_bytes', 0))} "
            f"| {_pct(s.get('huge_page_share'))} "
            f"| {_num(s['fault_latency_p50_us'], '.0f')} "
            f"| {_num(s['fault_latency_p99_us'], '.0f')} "
            f"| {s['vms_created']} / {s['vms_destroyed']} "
            f"| {'ok' if checks_pass(s) else 'FAILED'} |"
        )
    return "\n".join(rows)


def _plots(results: list[dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: list[str] = []
    scenarios = list(dict.fromkeys(r["scenario"] for r in results))
    mib = float(1 << 20)

    # 1. Tag storage reserved vs the minimum needed, over time (tag-block-aware placement).
    for sc in scenarios:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for r in results:
            if r["scenario"] != sc or r["config"]["placement"] != "tag-block-aware":
                continue
            se, color = r["series"], COLORS[r["label"]]
            reserved = [x / mib for x in se["tag_reserved_bytes"]]
            needed = [x / mib for x in se["min_needed_bytes"]]
            # With a ratio of 1 the "min needed" line would hide exactly under "reserved": say
            # so in the legend instead of drawing an invisible line.
            same = r["label"] != "STATIC" and reserved == needed
            label = f"{r['label']} reserved" + (" (= min needed)" if same else "")
            ax.plot(se["step"], reserved, color=color, label=label)
            if r["label"] != "STATIC" and not same:
                ax.plot(
                    se["step"],
                    needed,
                    color=color,
                    linestyle=(0, (2, 2)),
                    linewidth=1.8,
                    zorder=3,
                    label=f"{r['label']} min needed",
                )
        ax.set_title(f"{sc}\ntag storage reserved vs minimum needed (tag-block-aware)", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("MiB")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(alpha=0.3)
        name = f"tag-reserved-{sc}.png"
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        names.append(name)

    def bars(
        metric: str,
        title: str,
        ylabel: str,
        name: str,
        scale: float = 1.0,
        *,
        carve_out: bool = False,
        static_note: str = "",
    ) -> None:
        # The static carve-out gives back nothing and evacuates nothing: a zero-height bar is
        # invisible, so it is drawn as its own reference (the carve-out line) or named instead.
        runs = [
            (lab, pl) for lab in LABELS if lab != "STATIC" for pl in ("naive", "tag-block-aware")
        ]
        runs = [
            (lab, pl)
            for lab, pl in runs
            if any(r["label"] == lab and r["config"]["placement"] == pl for r in results)
        ]
        fig, ax = plt.subplots(figsize=(11, 4.8))
        width = 0.8 / max(len(runs), 1)
        for j, (lab, pl) in enumerate(runs):
            values = []
            for sc in scenarios:
                match = [
                    r
                    for r in results
                    if r["scenario"] == sc and r["label"] == lab and r["config"]["placement"] == pl
                ]
                v = match[0]["summary"][metric] if match else None
                values.append(0.0 if v is None else v * scale)
            ax.bar(
                [i + j * width for i in range(len(scenarios))],
                values,
                width,
                color=COLORS[lab],
                alpha=0.55 if pl == "naive" else 1.0,
                hatch="//" if pl == "naive" else None,
                label=f"{lab} ({pl})",
            )
        if carve_out:
            for i, sc in enumerate(scenarios):
                first = next(r for r in results if r["scenario"] == sc)["summary"]
                level = first["tag_storage_bytes"] / first["host_memory_bytes"] * scale
                ax.hlines(
                    level,
                    i - width / 2,
                    i + width * (len(runs) - 0.5),
                    colors="black",
                    linestyles="--",
                    label="tag carve-out (all of it; STATIC gives back 0)" if i == 0 else None,
                )
        if static_note:
            ax.plot([], [], " ", label=static_note)
        ax.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(scenarios))])
        ax.set_xticklabels(scenarios, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        names.append(name)

    bars(
        "ram_given_back_mean",
        "RAM given back (mean over the run), % of host RAM",
        "% of host RAM",
        "ram-given-back.png",
        100.0,
        carve_out=True,
    )
    bars(
        "evacuated_pages_per_gib",
        "Pages evacuated from tag storage per GiB of guest memory mapped",
        "pages / GiB",
        "evacuations.png",
        static_note="STATIC: 0 (never lends tag storage)",
    )

    # 4. Fault latency percentiles (tag-block-aware placement; static for reference).
    fig, ax = plt.subplots(figsize=(11, 4.8))
    labels = [lab for lab in LABELS if any(r["label"] == lab for r in results)]
    width = 0.8 / max(len(labels), 1)
    for j, lab in enumerate(labels):
        p50, p99 = [], []
        for sc in scenarios:
            match = [
                r
                for r in results
                if r["scenario"] == sc
                and r["label"] == lab
                and r["config"]["placement"] == "tag-block-aware"
            ]
            s = match[0]["summary"] if match else {}
            p50.append(s.get("fault_latency_p50_us") or 0.0)
            p99.append(s.get("fault_latency_p99_us") or 0.0)
        xs = [i + j * width for i in range(len(scenarios))]
        ax.bar(xs, p99, width, color=COLORS[lab], alpha=0.35)
        ax.bar(xs, p50, width, color=COLORS[lab], label=f"{lab} (p50 solid, p99 light)")
    ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(scenarios))])
    ax.set_xticklabels(scenarios, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("µs (client side, log scale)")
    ax.set_title("Fault latency p50 / p99 (tag-block-aware placement)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "fault-latency.png", dpi=100)
    plt.close(fig)
    names.append("fault-latency.png")
    return names


def _findings(results: list[dict[str, Any]]) -> list[str]:
    """A few sentences computed from the results (so they stay true when regenerated)."""
    lines = []
    for sc in dict.fromkeys(r["scenario"] for r in results):
        runs = [r for r in results if r["scenario"] == sc and r["label"] != "STATIC"]
        if not runs:
            continue
        storage = runs[0]["summary"]["tag_storage_bytes"] / runs[0]["summary"]["host_memory_bytes"]
        best = max(runs, key=lambda r: r["summary"]["ram_given_back_mean"])
        worst = min(runs, key=lambda r: r["summary"]["ram_given_back_mean"])
        evac = {
            r["label"]: r["summary"]["evacuated_pages_per_gib"]
            for r in runs
            if r["config"]["placement"] == "tag-block-aware"
        }
        fails = sum(r["summary"]["resource_exhausted_total"] for r in runs)
        nacks = {r["label"]: r["summary"]["virtio_mem_nacks"] for r in runs}
        busy = {r["label"]: r["summary"].get("virtio_mem_busy", 0) for r in runs}
        given = {
            r["label"]: r["summary"].get("discarded_bytes", 0)
            for r in runs
            if r["config"]["placement"] == "tag-block-aware"
        }
        huge = [r["summary"].get("huge_page_share", 0.0) for r in runs]
        lines.append(
            f"- **{sc}**: of the {100 * storage:.2f}% carved out for tags, dynamic reuse gives "
            f"back {_pct(worst['summary']['ram_given_back_mean'])} "
            f"({worst['label']}, {worst['config']['placement']}) to "
            f"{_pct(best['summary']['ram_given_back_mean'])} "
            f"({best['label']}, {best['config']['placement']}) of host RAM on average. "
            "Evacuated pages per GiB mapped (tag-block-aware): "
            + ", ".join(f"{k} {v:.1f}" for k, v in evac.items())
            + f". RESOURCE_EXHAUSTED refusals over all dynamic runs: {fails}"
            + (
                "; NACKed plugs: " + ", ".join(f"{k} {v}" for k, v in nacks.items() if v)
                if any(nacks.values())
                else ""
            )
            + (
                "; BUSY plugs (preallocation failed): "
                + ", ".join(f"{k} {v}" for k, v in busy.items() if v)
                if any(busy.values())
                else ""
            )
            + (
                "; free page reporting gave back (tag-block-aware) "
                + ", ".join(f"{k} {format_size(v)}" for k, v in given.items())
                if any(given.values())
                else ""
            )
            + f"; huge-page-backed share of guest memory {_pct(min(huge))} to {_pct(max(huge))}."
        )
    return lines


def write_report(
    results: list[dict[str, Any]],
    out: Path,
    *,
    command: str,
    seed_text: str,
    quick: bool,
) -> list[str]:
    """Write ``results.json``, the PNG plots and ``README.md`` into ``out``; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plots = _plots(results, out)
    today = datetime.date.today().isoformat()
    all_ok = all(checks_pass(r["summary"]) for r in results)
    first = results[0]["summary"] if results else {}
    host_text = (
        f"{first.get('host_memory_bytes', 0) >> 30} GiB"
        if results
        and all(r["summary"]["host_memory_bytes"] == first["host_memory_bytes"] for r in results)
        else "per scenario"
    )
    text = [
        "# Dynamic tag storage reuse: policy report",
        "",
        "How much of the ~3% MTE tag carve-out does dynamic reuse give back for a realistic mix",
        "of VMs, and at what cost? Every shipped scenario (`vmm_shim/scenarios/`) is run against",
        "a real `hostd` under the static carve-out and under dynamic reuse with each tag policy",
        "and both placements (`vmm-shim simulate` does one such run).",
        "",
        f"Generated {today}{' with --quick (shortened runs)' if quick else ''}; seed: "
        f"{seed_text}; host: {host_text} (built-in topology, 4 KiB pages). Regenerate with:",
        "",
        "```",
        command,
        "```",
        "",
        "## Results",
        "",
        _table(results),
        "",
        "Columns: *RAM given back* = (tag storage - tag reserved) ÷ host RAM, sampled after every",
        "step (mean and minimum; 0 for the static carve-out, which never lends). *Reserved ÷ min",
        "needed* = tag reserved bytes ÷ (Σ regions `tag_blocks_min_needed` x block size), mean",
        "over the steps where tags were needed (static: the whole carve-out is reserved).",
        "*Evacuated pages / GiB*: pages migrated out of lent tag storage (counted from the",
        "daemon's `evacuation` events on `WatchEvents`, as the counters are not in the API) per",
        "GiB of guest memory mapped over the run. *Failed reservations*: tag blocks whose",
        "reservation failed (`tag_reserve_failed` events; the fault moved and replayed).",
        "*RESOURCE_EXHAUSTED*: calls refused for lack of memory or tag storage (faults, creates",
        "of EAGER or pinned guests, resizes of preallocating devices). *NACKed / BUSY plugs*:",
        "virtio-mem PLUG requests answered NACK (only ever beyond requested_size, as QEMU) or",
        "BUSY (a preallocating device could not back the blocks; the guest retries later).",
        "*Given back by free page reporting*: guest memory discarded (`DiscardGuestMemory`).",
        "*Huge-page share*: of the guest memory mapped when VMs were destroyed, the share backed",
        "by whole huge folios (guests run on THP unless a class says otherwise, as QEMU runs",
        "them). EAGER is preallocation (QEMU `prealloc=on` for an MTE guest). Fault",
        "latency is client side, over gRPC, on a shared machine: compare policies within a run",
        "set, not with other machines. Static runs once: placement does not change what it",
        "reserves. *Checks*: `CheckInvariants` empty and, after every VM is destroyed, the host",
        "back to its start state (no reservation left in dynamic mode)."
        + ("" if all_ok else " **Some runs FAILED their checks.**"),
        "",
        "## What it shows",
        "",
        *_findings(results),
        "",
        "## Plots",
        "",
        *[f"![{p}]({p})" for p in plots],
        "",
        "Raw results (summaries and per-step samples): [`results.json`](results.json).",
        "",
    ]
    (out / "README.md").write_text("\n".join(text))
    return ["README.md", "results.json", *plots]


# -- CLI ---------------------------------------------------------------------------------------


def add_cli(subparsers: Any) -> None:
    """Register ``report`` on the ``vmm-shim`` command line."""
    p = subparsers.add_parser(
        "report",
        help="run every scenario under every policy and write the report",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--out", default="docs/report", help="output directory (docs/report)")
    p.add_argument(
        "--scenarios", nargs="+", default=None, metavar="SCENARIO", help="default: all shipped"
    )
    # argparse treats help as a %-format: the extra % keeps the percent sign a literal.
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"run {QUICK_SCALE * 100:.0f}%% of each scenario's steps",
    )
    p.add_argument("--seed", type=int, default=None, help="default: each scenario's seed")
    p.add_argument("--jobs", type=int, default=MAX_JOBS, choices=range(1, MAX_JOBS + 1))
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=report_command)


def report_command(args: argparse.Namespace) -> int:
    """``vmm-shim report``: 0 when every run passed its checks, 1 if not, 2 for bad input."""
    # Checked before any simulation runs: the plots come last and need matplotlib.
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        print(
            "vmm-shim report: error: the plots need matplotlib: pip install 'tagstore[report]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        paths = (
            [find_scenario(s) for s in args.scenarios] if args.scenarios else shipped_scenarios()
        )
        scenarios = [load_scenario(p) for p in paths]
    except ScenarioError as e:
        print(one_line(f"vmm-shim report: error: {e}"), file=sys.stderr)
        return EXIT_USAGE
    progress = not args.no_progress and sys.stderr.isatty()
    results = run_report(
        paths,
        seed=args.seed,
        scale=QUICK_SCALE if args.quick else 1.0,
        jobs=args.jobs,
        progress=progress,
    )
    command = "vmm-shim report --out " + args.out
    if args.scenarios:
        command += " --scenarios " + " ".join(args.scenarios)
    if args.quick:
        command += " --quick"
    if args.seed is not None:
        command += f" --seed {args.seed}"
        seed_text = str(args.seed)
    else:
        seed_text = ", ".join(f"{s.name} {s.seed}" for s in scenarios) + " (the scenarios' own)"
    files = write_report(
        results, Path(args.out), command=command, seed_text=seed_text, quick=args.quick
    )
    print(f"wrote {', '.join(files)} to {args.out}")
    return EXIT_OK if all(checks_pass(r["summary"]) for r in results) else EXIT_FAILED
