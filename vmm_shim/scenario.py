"""Scenario files for ``vmm-shim simulate``: the schema, the loader and the plan.

A scenario is a TOML file (read with :mod:`tomllib`) describing a host and a mix of VMs. Every
random choice is drawn from one seeded :class:`numpy.random.Generator`, in a fixed order, by
:func:`make_plan`: the same scenario, seed and policy give the same :class:`Plan` (the same
sequence of actions), and so the same sequence of calls against a daemon. Sizes are strings
such as ``"2MiB"`` or ``"4GiB"`` (or integers, in bytes); rates are per simulated step.

Schema (unknown keys are refused; defaults in brackets)::

    name = "mixed-25pct-mte"            # [file name]
    description = "..."                 # [""] one sentence, shown in the report
    steps = 240                         # simulated steps (> 0); VMs alive at the end are
                                        # destroyed in a final drain phase
    seed = 1                            # [1] default seed (``--seed`` overrides)

    [host]
    memory = "32GiB"                    # RAM of the built-in host (hostd --memory)
    page_size = "4K"                    # ["4K"] "4K", "16K" or "64K"

    [arrivals]
    initial = 8                         # [0] VMs created at step 0
    rate = 0.4                          # Poisson mean of VMs arriving per step (>= 0)
    max_vms = 24                        # [64] arrivals beyond this many live VMs are dropped

    [[vm_class]]                        # at least one
    name = "web"                        # [a-z0-9-], unique; VM ids are "<name>-<n>"
    weight = 3.0                        # [1.0] relative share of arrivals (> 0)
    mte_share = 0.05                    # [0.0] probability that a VM of the class uses MTE
    tag_policy = "inherit"              # ["inherit"] "inherit" (the policy under test),
                                        #   "ON_FAULT", "EAGER" or "ON_TAG_ACCESS"
    boot_memory = { dist = "choice", values = ["1GiB", "2GiB"], weights = [3, 1] }
                                        # or { dist = "fixed", value = "2GiB" }
                                        # or { dist = "uniform", min = "1GiB", max = "4GiB" }
                                        #   (uniform: rounded down to a multiple of fault_size)
    lifetime = { dist = "exponential", mean = 60 }    # steps; or
                                        # { dist = "lognormal", median = 40, sigma = 0.8 }
    boot_touch = 0.05                   # [0.05] share of boot RAM faulted (WRITE) at boot
    working_set = 0.6                   # [0.5] share of guest memory the VM touches
    faults_per_step = 8                 # [8] working-set faults per step (one fault_stream)
    fault_size = "2MiB"                 # ["2MiB"] bytes per fault (a multiple of 64 KiB)
    access = { read = 0.5, write = 0.45, tag = 0.05 }  # [0.6/0.4/0] shares, sum 1;
                                        # TAG counts as READ for a non-MTE VM
    tag_write_rate = 0.2                # [0.0] probability per step that an MTE VM writes tags
    tag_write_size = "64KiB"            # ["64KiB"] guest bytes whose tags one write sets
                                        #   (copy_tags_to_guest; a multiple of 4 KiB)
    backing = "thp"                     # ["thp"] host pages backing guest RAM: "thp"
                                        #   (transparent huge pages, as QEMU runs guests by
                                        #   default), "small" or "hugetlb" (gigantic pages;
                                        #   boot_memory must be a multiple of them)
    pinned_share = 0.0                  # [0.0] probability that a VM has a passthrough (VFIO)
                                        #   device: all its memory is pinned (backed at boot,
                                        #   never in tag storage, never discarded); under
                                        #   ON_TAG_ACCESS such a VM runs ON_FAULT (hostd refuses
                                        #   pinned ON_TAG_ACCESS guests)

    [vm_class.free_page_reporting]      # optional: the guest gives memory back (free page
    rate = 0.2                          #   reporting / balloon): probability per step that
    size = "64MiB"                      #   it returns this much of its boot RAM (discard)

    [vm_class.virtio_mem]               # optional: one virtio-mem device per VM
    region_size = "8GiB"
    block_size = "2MiB"                 # power of two, >= 1 MiB
    requested = "0"                     # ["0"] plugged at creation
    resize_rate = 0.05                  # probability per step of a resize (qom-set)
    sizes = ["0", "1GiB", "2GiB"]       # the new requested size is drawn from these
    prealloc = false                    # [false] QEMU's prealloc: PLUG backs blocks or is BUSY

    [vm_class.dimm]                     # optional: DIMM hotplug
    slots = 2
    size = "1GiB"
    add_rate = 0.02                     # probability per step of adding a DIMM
    remove_rate = 0.02                  # probability per step of removing the newest DIMM

Errors: :class:`ScenarioError` names the key (``vm_class[1].access.tag``), the value and why.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vmm_shim.units import KiB, MiB, parse_size

__all__ = [
    "POLICIES",
    "SCENARIO_DIR",
    "Action",
    "ArrivalsConfig",
    "DimmConfig",
    "FreePageReportingConfig",
    "HostConfig",
    "Plan",
    "Scenario",
    "ScenarioError",
    "SizeDist",
    "VirtioMemClassConfig",
    "VmClass",
    "VmPlan",
    "find_scenario",
    "load_scenario",
    "make_plan",
    "parse_scenario",
    "shipped_scenarios",
]

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
POLICIES = ("ON_FAULT", "EAGER", "ON_TAG_ACCESS")
PAGE_SIZES = {"4K": 4 * KiB, "16K": 16 * KiB, "64K": 64 * KiB}
BACKINGS = ("thp", "small", "hugetlb")
# Backing page sizes by host page size (hostd's backing_page_size): THP is PMD-sized, hugetlb
# the arm64 gigantic page.
THP_BYTES = {4 * KiB: 2 * MiB, 16 * KiB: 32 * MiB, 64 * KiB: 512 * MiB}
HUGETLB_BYTES = {4 * KiB: 1 << 30, 16 * KiB: 1 << 30, 64 * KiB: 16 << 30}
# Faults and tag writes are whole 64 KiB units so that every page size divides them.
FAULT_ALIGN_BYTES = 64 * KiB
TAG_WRITE_ALIGN_BYTES = 4 * KiB
MAX_TAG_WRITE_BYTES = 32 * MiB  # hostd: at most 32 MiB of guest memory per tag copy
MAX_FAULT_BYTES = 1 << 30
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


class ScenarioError(ValueError):
    """A scenario file that cannot be used: ``key`` (dotted path), ``value`` and the reason."""

    def __init__(self, key: str, value: object, reason: str, *, source: str = "") -> None:
        self.key = key
        self.value = value
        self.reason = reason
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key} = {value!r}: {reason}")


# -- the schema ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SizeDist:
    """A distribution of sizes in bytes: ``fixed``, ``choice`` (with weights) or ``uniform``."""

    dist: str
    values: tuple[int, ...]
    weights: tuple[float, ...] = ()

    def draw(self, rng: np.random.Generator, align: int) -> int:
        if self.dist == "fixed":
            return self.values[0]
        if self.dist == "choice":
            p = np.asarray(self.weights) / sum(self.weights)
            return self.values[int(rng.choice(len(self.values), p=p))]
        lo, hi = self.values
        return int(rng.integers(lo // align, hi // align + 1)) * align

    @property
    def max_bytes(self) -> int:
        return max(self.values)


@dataclass(frozen=True)
class Lifetime:
    """VM lifetime in steps: ``exponential`` (``mean``) or ``lognormal`` (``median``, ``sigma``)."""

    dist: str
    mean: float = 0.0
    median: float = 0.0
    sigma: float = 0.0

    def draw(self, rng: np.random.Generator) -> int:
        if self.dist == "exponential":
            value = rng.exponential(self.mean)
        else:
            value = rng.lognormal(math.log(self.median), self.sigma)
        return max(1, round(value))


@dataclass(frozen=True)
class VirtioMemClassConfig:
    region_size: int
    block_size: int
    requested: int
    resize_rate: float
    sizes: tuple[int, ...]
    prealloc: bool = False


@dataclass(frozen=True)
class FreePageReportingConfig:
    rate: float
    size: int


@dataclass(frozen=True)
class DimmConfig:
    slots: int
    size: int
    add_rate: float
    remove_rate: float


@dataclass(frozen=True)
class VmClass:
    name: str
    weight: float
    mte_share: float
    tag_policy: str
    boot_memory: SizeDist
    lifetime: Lifetime
    boot_touch: float
    working_set: float
    faults_per_step: int
    fault_size: int
    access: tuple[float, float, float]  # read, write, tag
    tag_write_rate: float
    tag_write_size: int
    virtio_mem: VirtioMemClassConfig | None = None
    dimm: DimmConfig | None = None
    backing: str = "thp"
    pinned_share: float = 0.0
    free_page_reporting: FreePageReportingConfig | None = None


@dataclass(frozen=True)
class HostConfig:
    memory: int
    page_size: str  # "4K" / "16K" / "64K", as hostd --page-size takes it

    @property
    def page_size_bytes(self) -> int:
        return PAGE_SIZES[self.page_size]


@dataclass(frozen=True)
class ArrivalsConfig:
    initial: int
    rate: float
    max_vms: int


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    steps: int
    seed: int
    host: HostConfig
    arrivals: ArrivalsConfig
    classes: tuple[VmClass, ...]
    source: str = ""

    def scaled(self, factor: float) -> Scenario:
        """The same scenario over ``factor`` times the steps (``report --quick``)."""
        steps = max(2, round(self.steps * factor))
        return Scenario(
            self.name,
            self.description,
            steps,
            self.seed,
            self.host,
            self.arrivals,
            self.classes,
            self.source,
        )


# -- parsing helpers -------------------------------------------------------------------------


class _Reader:
    """Reads one TOML table, tracking the keys used so that unknown keys are refused."""

    def __init__(self, table: Any, path: str, source: str) -> None:
        self.path = path
        self.source = source
        if not isinstance(table, dict):
            raise self.error("", table, "must be a table")
        self.table: dict[str, Any] = table
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, value: object, reason: str) -> ScenarioError:
        key = self.key(name) if name else self.path or "<top level>"
        return ScenarioError(key, value, reason, source=self.source)

    def has(self, name: str) -> bool:
        return name in self.table

    def raw(self, name: str, default: Any = ...) -> Any:
        self.used.add(name)
        if name not in self.table:
            if default is ...:
                raise self.error(name, None, "is required")
            return default
        return self.table[name]

    def string(self, name: str, default: Any = ...) -> str:
        value = self.raw(name, default)
        if not isinstance(value, str):
            raise self.error(name, value, "must be a string")
        return value

    def number(
        self,
        name: str,
        default: Any = ...,
        *,
        lo: float | None = None,
        hi: float | None = None,
        lo_open: bool = False,
    ) -> float:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise self.error(name, value, "must be a number")
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise self.error(name, value, f"must be {'>' if lo_open else '>='} {lo:g}")
        if hi is not None and value > hi:
            raise self.error(name, value, f"must be <= {hi:g}")
        return float(value)

    def share(self, name: str, default: Any = ...) -> float:
        return self.number(name, default, lo=0.0, hi=1.0)

    def integer(self, name: str, default: Any = ..., *, lo: int = 0, hi: int | None = None) -> int:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, value, "must be an integer")
        if value < lo:
            raise self.error(name, value, f"must be >= {lo}")
        if hi is not None and value > hi:
            raise self.error(name, value, f"must be <= {hi}")
        return value

    def size(self, name: str, default: Any = ..., *, align: int = 1, zero: bool = False) -> int:
        value = self.raw(name, default)
        return self.parse_size(name, value, align=align, zero=zero)

    def parse_size(self, name: str, value: object, *, align: int = 1, zero: bool = False) -> int:
        if isinstance(value, bool):
            raise self.error(name, value, "must be a size such as '2MiB' or a number of bytes")
        if isinstance(value, int):
            nbytes = value
        elif isinstance(value, str):
            try:
                nbytes = parse_size(value)
            except ValueError as e:
                raise self.error(name, value, str(e)) from None
        else:
            raise self.error(name, value, "must be a size such as '2MiB' or a number of bytes")
        if nbytes < 0 or (nbytes == 0 and not zero):
            raise self.error(name, value, "must be positive")
        if nbytes % align:
            raise self.error(name, value, f"must be a multiple of {align:#x} bytes")
        return nbytes

    def sub(self, name: str) -> _Reader:
        self.used.add(name)
        return _Reader(self.table.get(name), self.key(name), self.source)

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.error(unknown[0], self.table[unknown[0]], "unknown key")


def _size_dist(r: _Reader, align: int) -> SizeDist:
    dist = r.string("dist")
    if dist == "fixed":
        result = SizeDist("fixed", (r.size("value", align=align),))
    elif dist == "choice":
        raw = r.raw("values")
        if not isinstance(raw, list) or not raw:
            raise r.error("values", raw, "must be a non-empty list of sizes")
        values = tuple(r.parse_size(f"values[{i}]", v, align=align) for i, v in enumerate(raw))
        weights_raw = r.raw("weights", [1.0] * len(values))
        if not isinstance(weights_raw, list) or len(weights_raw) != len(values):
            raise r.error("weights", weights_raw, f"must be a list of {len(values)} numbers")
        for i, w in enumerate(weights_raw):
            if isinstance(w, bool) or not isinstance(w, int | float) or not w >= 0:
                raise r.error(f"weights[{i}]", w, "must be a number >= 0")
        if sum(weights_raw) <= 0:
            raise r.error("weights", weights_raw, "must not all be zero")
        result = SizeDist("choice", values, tuple(float(w) for w in weights_raw))
    elif dist == "uniform":
        lo = r.size("min", align=align)
        hi = r.size("max", align=align)
        if hi < lo:
            raise r.error("max", r.table["max"], f"must be >= min ({r.table['min']!r})")
        result = SizeDist("uniform", (lo, hi))
    else:
        raise r.error("dist", dist, "must be 'fixed', 'choice' or 'uniform'")
    r.finish()
    return result


def _lifetime(r: _Reader) -> Lifetime:
    dist = r.string("dist")
    if dist == "exponential":
        result = Lifetime("exponential", mean=r.number("mean", lo=0.0, lo_open=True))
    elif dist == "lognormal":
        result = Lifetime(
            "lognormal",
            median=r.number("median", lo=0.0, lo_open=True),
            sigma=r.number("sigma", lo=0.0),
        )
    else:
        raise r.error("dist", dist, "must be 'exponential' or 'lognormal'")
    r.finish()
    return result


def _virtio_mem(r: _Reader) -> VirtioMemClassConfig:
    block = r.size("block_size")
    if block < MiB or block & (block - 1):
        raise r.error("block_size", r.table["block_size"], "must be a power of two >= 1 MiB")
    region = r.size("region_size", align=block)
    requested = r.size("requested", 0, align=block, zero=True)
    if requested > region:
        raise r.error("requested", r.table["requested"], "must be <= region_size")
    rate = r.share("resize_rate")
    raw = r.raw("sizes")
    if not isinstance(raw, list) or not raw:
        raise r.error("sizes", raw, "must be a non-empty list of sizes")
    sizes = tuple(r.parse_size(f"sizes[{i}]", v, align=block, zero=True) for i, v in enumerate(raw))
    for i, s in enumerate(sizes):
        if s > region:
            raise r.error(f"sizes[{i}]", raw[i], "must be <= region_size")
    prealloc = r.raw("prealloc", False)
    if not isinstance(prealloc, bool):
        raise r.error("prealloc", prealloc, "must be true or false")
    r.finish()
    return VirtioMemClassConfig(region, block, requested, rate, sizes, prealloc)


def _free_page_reporting(r: _Reader, page_size: int) -> FreePageReportingConfig:
    result = FreePageReportingConfig(
        rate=r.share("rate"), size=r.size("size", align=max(page_size, FAULT_ALIGN_BYTES))
    )
    if result.size > MAX_FAULT_BYTES:
        raise r.error("size", r.table["size"], "must be at most 1 GiB")
    r.finish()
    return result


def _dimm(r: _Reader, page_size: int) -> DimmConfig:
    result = DimmConfig(
        slots=r.integer("slots", lo=1, hi=256),
        size=r.size("size", align=max(page_size, FAULT_ALIGN_BYTES)),
        add_rate=r.share("add_rate"),
        remove_rate=r.share("remove_rate"),
    )
    r.finish()
    return result


def _vm_class(r: _Reader, page_size: int) -> VmClass:
    name = r.string("name")
    if not _NAME_RE.match(name):
        raise r.error("name", name, "must be 1-32 characters of [a-z0-9-], starting alphanumeric")
    policy = r.string("tag_policy", "inherit")
    if policy != "inherit" and policy not in POLICIES:
        raise r.error("tag_policy", policy, f"must be 'inherit' or one of {', '.join(POLICIES)}")
    fault_size = r.size("fault_size", "2MiB", align=max(page_size, FAULT_ALIGN_BYTES))
    if fault_size > MAX_FAULT_BYTES:
        raise r.error("fault_size", r.table["fault_size"], "must be at most 1 GiB")
    boot_memory = _size_dist(r.sub("boot_memory"), fault_size)
    access_r = r.sub("access") if r.has("access") else _Reader({}, r.key("access"), r.source)
    read = access_r.share("read", 0.6)
    write = access_r.share("write", 0.4)
    tag = access_r.share("tag", 0.0)
    access_r.finish()
    if not math.isclose(read + write + tag, 1.0, abs_tol=1e-9):
        raise r.error(
            "access", access_r.table or {"read": read, "write": write}, "shares must add up to 1"
        )
    tag_write_size = r.size("tag_write_size", "64KiB", align=max(page_size, TAG_WRITE_ALIGN_BYTES))
    if tag_write_size > MAX_TAG_WRITE_BYTES:
        raise r.error("tag_write_size", r.table["tag_write_size"], "must be at most 32 MiB")
    result = VmClass(
        name=name,
        weight=r.number("weight", 1.0, lo=0.0, lo_open=True),
        mte_share=r.share("mte_share", 0.0),
        tag_policy=policy,
        boot_memory=boot_memory,
        lifetime=_lifetime(r.sub("lifetime")),
        boot_touch=r.share("boot_touch", 0.05),
        working_set=r.share("working_set", 0.5),
        faults_per_step=r.integer("faults_per_step", 8, hi=4096),
        fault_size=fault_size,
        access=(read, write, tag),
        tag_write_rate=r.share("tag_write_rate", 0.0),
        tag_write_size=tag_write_size,
        virtio_mem=_virtio_mem(r.sub("virtio_mem")) if r.has("virtio_mem") else None,
        dimm=_dimm(r.sub("dimm"), page_size) if r.has("dimm") else None,
        backing=r.string("backing", "thp"),
        pinned_share=r.share("pinned_share", 0.0),
        free_page_reporting=(
            _free_page_reporting(r.sub("free_page_reporting"), page_size)
            if r.has("free_page_reporting")
            else None
        ),
    )
    if result.backing not in BACKINGS:
        raise r.error("backing", result.backing, f"must be one of {', '.join(BACKINGS)}")
    if result.backing == "hugetlb":
        huge = HUGETLB_BYTES[page_size]
        bad = [v for v in result.boot_memory.values if v % huge]
        if bad or result.boot_memory.dist == "uniform":
            raise r.error(
                "boot_memory", r.table["boot_memory"], f"must be fixed multiples of {huge:#x}"
            )
    if tag_write_size > result.boot_memory.max_bytes:
        raise r.error("tag_write_size", r.table["tag_write_size"], "must fit in boot memory")
    r.finish()
    return result


def parse_scenario(doc: dict[str, Any], *, source: str = "", default_name: str = "") -> Scenario:
    """A validated :class:`Scenario` from a parsed TOML document; ScenarioError if invalid."""
    top = _Reader(doc, "", source)
    name = top.string("name", default_name or "scenario")
    description = top.string("description", "")
    steps = top.integer("steps", lo=1, hi=100_000)
    seed = top.integer("seed", 1, hi=2**63 - 1)
    host_r = top.sub("host")
    page_size = host_r.string("page_size", "4K")
    if page_size not in PAGE_SIZES:
        raise host_r.error("page_size", page_size, f"must be one of {', '.join(PAGE_SIZES)}")
    host = HostConfig(host_r.size("memory", align=PAGE_SIZES[page_size]), page_size)
    if host.memory < 1 << 30:
        raise host_r.error("memory", host_r.table["memory"], "must be at least 1GiB")
    host_r.finish()
    arr_r = top.sub("arrivals")
    arrivals = ArrivalsConfig(
        initial=arr_r.integer("initial", 0, hi=10_000),
        rate=arr_r.number("rate", lo=0.0, hi=1000.0),
        max_vms=arr_r.integer("max_vms", 64, lo=1, hi=10_000),
    )
    arr_r.finish()
    raw_classes = top.raw("vm_class")
    if not isinstance(raw_classes, list) or not raw_classes:
        raise top.error("vm_class", raw_classes, "must be a non-empty array of tables")
    classes = tuple(
        _vm_class(_Reader(c, f"vm_class[{i}]", source), host.page_size_bytes)
        for i, c in enumerate(raw_classes)
    )
    seen: set[str] = set()
    for i, c in enumerate(classes):
        if c.name in seen:
            raise ScenarioError(
                f"vm_class[{i}].name", c.name, "duplicate class name", source=source
            )
        seen.add(c.name)
    top.finish()
    return Scenario(name, description, steps, seed, host, arrivals, classes, source)


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; ScenarioError (also for unreadable or bad TOML)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ScenarioError("<file>", str(p), e.strerror or str(e), source=str(p)) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError("<toml>", str(p), f"not valid TOML: {e}", source=str(p)) from None
    return parse_scenario(doc, source=str(p), default_name=p.stem)


def shipped_scenarios() -> list[Path]:
    """The scenario files shipped in ``vmm_shim/scenarios``, by name."""
    return sorted(SCENARIO_DIR.glob("*.toml"))


def find_scenario(name_or_path: str) -> Path:
    """A path as given if it exists, else the shipped scenario of that name."""
    p = Path(name_or_path)
    if p.exists() or p.suffix == ".toml" or "/" in name_or_path:
        return p
    return SCENARIO_DIR / f"{name_or_path}.toml"


# -- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VmPlan:
    """One VM as drawn: class, size, MTE, policy, arrival and departure steps, and its own
    seed (for the addresses it touches, drawn when the simulator runs it)."""

    vm_id: str
    cls: str
    mte: bool
    policy: str  # as created; meaningless without MTE
    boot_memory: int
    arrive: int
    depart: int  # step at whose start it is destroyed (> steps: in the drain phase)
    seed: int
    pinned: bool = False
    backing: str = "thp"


@dataclass(frozen=True)
class Action:
    """One thing the simulator does at a step. ``kind``:

    - ``create``: create ``vm`` and fault ``boot_touch`` of its boot RAM
    - ``faults``: ``n`` working-set faults (one fault_stream)
    - ``tag_write``: one copy_tags_to_guest of ``tag_write_size``
    - ``resize``: set the virtio-mem requested size to ``size`` and drive the device
    - ``dimm_add`` / ``dimm_remove``: hot-add a DIMM / remove the newest
    - ``discard``: the guest gives ``size`` bytes of boot RAM back (free page reporting)
    - ``destroy``: the end of the VM's life
    """

    kind: str
    vm: str
    n: int = 0
    size: int = 0


@dataclass
class Plan:
    """Every VM and, per step, the actions in order; the drain step is ``steps``."""

    scenario: str
    seed: int
    policy: str
    steps: int
    vms: dict[str, VmPlan] = field(default_factory=dict)
    actions: list[list[Action]] = field(default_factory=list)
    arrivals_dropped: int = 0

    def action_count(self) -> int:
        return sum(len(a) for a in self.actions)


def make_plan(scenario: Scenario, seed: int, policy: str) -> Plan:
    """Draw the whole run from ``seed``: arrivals, VM classes and sizes, lifetimes, and per step
    and VM the faults, tag writes, resizes and DIMM changes. ``policy`` replaces "inherit"."""
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r}: expected one of {', '.join(POLICIES)}")
    rng = np.random.default_rng(seed)
    plan = Plan(scenario.name, seed, policy, scenario.steps)
    plan.actions = [[] for _ in range(scenario.steps + 1)]
    weights = np.array([c.weight for c in scenario.classes])
    weights /= weights.sum()
    by_name = {c.name: c for c in scenario.classes}
    counters = dict.fromkeys(by_name, 0)
    live: dict[str, VmPlan] = {}
    # Per VM: DIMMs present as the plan sees them (the simulator skips what the host refused).
    dimms: dict[str, int] = {}

    def arrive(step: int) -> None:
        cls = scenario.classes[int(rng.choice(len(scenario.classes), p=weights))]
        # Draw everything of the VM even if it is dropped, so the stream stays aligned.
        mte = bool(rng.random() < cls.mte_share)
        boot = cls.boot_memory.draw(rng, cls.fault_size)
        life = cls.lifetime.draw(rng)
        vm_seed = int(rng.integers(0, 2**63 - 1))
        # Drawn only for classes that have pinned VMs, so other scenarios keep their stream.
        pinned = bool(rng.random() < cls.pinned_share) if cls.pinned_share else False
        if len(live) >= scenario.arrivals.max_vms:
            plan.arrivals_dropped += 1
            return
        n = counters[cls.name]
        counters[cls.name] += 1
        vm = VmPlan(
            vm_id=f"{cls.name}-{n}",
            cls=cls.name,
            mte=mte,
            policy=(policy if cls.tag_policy == "inherit" else cls.tag_policy) if mte else "",
            boot_memory=boot,
            arrive=step,
            depart=step + life,
            seed=vm_seed,
        )
        if pinned:
            # hostd refuses a pinned ON_TAG_ACCESS guest: a pinned page cannot move.
            tag_policy = "ON_FAULT" if vm.policy == "ON_TAG_ACCESS" else vm.policy
            vm = replace(vm, pinned=True, policy=tag_policy)
        vm = replace(vm, backing=cls.backing)
        plan.vms[vm.vm_id] = vm
        live[vm.vm_id] = vm
        dimms[vm.vm_id] = 0
        plan.actions[step].append(Action("create", vm.vm_id))

    for step in range(scenario.steps):
        todo = plan.actions[step]
        # Departures first (in id order), then arrivals, then what live VMs do.
        for vm_id in sorted(v for v, vm in live.items() if vm.depart <= step):
            todo.append(Action("destroy", vm_id))
            del live[vm_id]
        n_arrivals = int(rng.poisson(scenario.arrivals.rate)) if scenario.arrivals.rate else 0
        if step == 0:
            n_arrivals += scenario.arrivals.initial
        for _ in range(n_arrivals):
            arrive(step)
        for vm_id in sorted(live):
            vm = live[vm_id]
            if vm.arrive == step:
                continue  # created (and booted) this step
            cls = by_name[vm.cls]
            if cls.faults_per_step:
                todo.append(Action("faults", vm_id, n=cls.faults_per_step))
            if vm.mte and cls.tag_write_rate and rng.random() < cls.tag_write_rate:
                todo.append(Action("tag_write", vm_id, size=cls.tag_write_size))
            if cls.virtio_mem and rng.random() < cls.virtio_mem.resize_rate:
                size = cls.virtio_mem.sizes[int(rng.integers(len(cls.virtio_mem.sizes)))]
                todo.append(Action("resize", vm_id, size=size))
            fpr = cls.free_page_reporting
            if fpr and not vm.pinned and rng.random() < fpr.rate:
                todo.append(Action("discard", vm_id, size=min(fpr.size, vm.boot_memory)))
            if cls.dimm:
                u = rng.random()
                if u < cls.dimm.add_rate and dimms[vm_id] < cls.dimm.slots:
                    dimms[vm_id] += 1
                    todo.append(Action("dimm_add", vm_id, size=cls.dimm.size))
                elif u >= 1 - cls.dimm.remove_rate and dimms[vm_id] > 0:
                    dimms[vm_id] -= 1
                    todo.append(Action("dimm_remove", vm_id))
    # Drain: every VM still alive is destroyed, so the host must be back to its start state.
    plan.actions[scenario.steps] = [Action("destroy", v) for v in sorted(live)]
    return plan
