"""Scenario files: the shipped ones load, bad ones are refused naming the key and value, and
the plan is a pure function of (scenario, seed, policy)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from vmm_shim.scenario import (
    POLICIES,
    ScenarioError,
    load_scenario,
    make_plan,
    parse_scenario,
    shipped_scenarios,
)


def test_shipped_scenarios_load() -> None:
    """Every shipped scenario is valid, and the four the report promises are there."""
    names = {load_scenario(p).name for p in shipped_scenarios()}
    assert {
        "cloud-mostly-untagged",
        "mixed-25pct-mte",
        "secure-all-mte",
        "hotplug-heavy",
    } <= names


@pytest.mark.parametrize(
    ("old", "new", "key", "value"),
    [
        ('memory = "4GiB"', 'memory = "4 parsecs"', "host.memory", "4 parsecs"),
        ('memory = "4GiB"', 'memory = "512MiB"', "host.memory", "512MiB"),
        ("steps = 12", "steps = 0", "steps", 0),
        ("steps = 12", 'steps = "12"', "steps", "12"),
        ("rate = 0.5", "rate = -1", "arrivals.rate", -1),
        ("mte_share = 0.3", "mte_share = 1.5", "vm_class[0].mte_share", 1.5),
        ("tag = 0.2 }\ntag_write_rate", "tag = 0.3 }\ntag_write_rate", "vm_class[0].access", None),
        ('dist = "exponential"', 'dist = "weibull"', "vm_class[0].lifetime.dist", "weibull"),
        ('fault_size = "4MiB"', 'fault_size = "3KiB"', "vm_class[0].fault_size", "3KiB"),
        ('block_size = "2MiB"', 'block_size = "3MiB"', "vm_class[1].virtio_mem.block_size", "3MiB"),
        ('"0", "32MiB", "128MiB"', '"0", "1GiB"', "vm_class[1].virtio_mem.sizes[1]", "1GiB"),
        ('name = "elastic"', 'name = "plain"', "vm_class[1].name", "plain"),
        ('name = "elastic"', 'name = "Elastic VMs"', "vm_class[1].name", "Elastic VMs"),
        ("slots = 2", "slots = 2\nspare = 1", "vm_class[1].dimm.spare", 1),
        ("weight = 2", "wieght = 2", "vm_class[0].wieght", 2),
        (
            "mte_share = 0.3",
            'mte_share = 0.3\ntag_policy = "LAZY"',
            "vm_class[0].tag_policy",
            "LAZY",
        ),
    ],
)
def test_bad_scenario_is_refused_naming_key_and_value(
    tiny_scenario: str,
    write_scenario: Callable[[str], Path],
    old: str,
    new: str,
    key: str,
    value: object,
) -> None:
    """A bad value is a ScenarioError whose key and value point at the culprit."""
    assert old in tiny_scenario
    path = write_scenario(tiny_scenario.replace(old, new, 1))
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert key == info.value.key
    if value is not None:
        assert value == info.value.value
    assert key in str(info.value) and str(path) in str(info.value)


def test_missing_section_is_refused(write_scenario: Callable[[str], Path]) -> None:
    """A scenario without VM classes names ``vm_class``."""
    path = write_scenario('steps = 3\n[host]\nmemory = "4GiB"\n[arrivals]\nrate = 1\n')
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert "vm_class" == info.value.key


def test_invalid_toml_and_missing_file_are_scenario_errors(
    write_scenario: Callable[[str], Path], tmp_path: Path
) -> None:
    """Syntax errors and unreadable files are ScenarioErrors too (exit 2 in the CLI)."""
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(write_scenario("steps = = 3"))
    with pytest.raises(ScenarioError):
        load_scenario(tmp_path / "nope.toml")


def _plan_text(text: str, seed: int, policy: str = "ON_FAULT") -> tuple[object, ...]:
    import tomllib

    plan = make_plan(parse_scenario(tomllib.loads(text)), seed, policy)
    return (tuple(plan.vms.values()), tuple(tuple(a) for a in plan.actions), plan.arrivals_dropped)


def test_same_seed_gives_the_same_plan(tiny_scenario: str) -> None:
    """The plan is a function of the seed alone."""
    assert _plan_text(tiny_scenario, 3) == _plan_text(tiny_scenario, 3)


def test_different_seeds_give_different_plans(tiny_scenario: str) -> None:
    assert _plan_text(tiny_scenario, 3) != _plan_text(tiny_scenario, 4)


def test_policy_only_changes_the_policy_of_inherit_mte_vms(tiny_scenario: str) -> None:
    """Under another policy the same VMs do the same things; only their policy differs."""
    a, b = _plan_text(tiny_scenario, 5, "ON_FAULT"), _plan_text(tiny_scenario, 5, "EAGER")
    assert a[1] == b[1]
    assert {v.policy for v in a[0] if v.mte} == {"ON_FAULT"}  # type: ignore[attr-defined]
    assert {v.policy for v in b[0] if v.mte} == {"EAGER"}  # type: ignore[attr-defined]


@pytest.mark.parametrize("policy", POLICIES)
def test_every_vm_is_destroyed_once_and_after_its_creation(tiny_scenario: str, policy: str) -> None:
    """The plan never leaks a VM: each one created is destroyed exactly once, later."""
    import tomllib

    plan = make_plan(parse_scenario(tomllib.loads(tiny_scenario)), 11, policy)
    created: dict[str, int] = {}
    destroyed: dict[str, int] = {}
    for step, actions in enumerate(plan.actions):
        for a in actions:
            if a.kind == "create":
                assert a.vm not in created
                created[a.vm] = step
            elif a.kind == "destroy":
                assert a.vm not in destroyed
                destroyed[a.vm] = step
            else:
                assert a.vm in created and a.vm not in destroyed
    assert created.keys() == destroyed.keys()
    assert all(created[v] < destroyed[v] for v in created)
