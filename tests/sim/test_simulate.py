"""The simulator end to end against the real daemon (a fresh ``hostd`` per run): the tiny
scenario leaves the host as it found it, and runs are deterministic."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from vmm_shim.cli import main
from vmm_shim.scenario import parse_scenario
from vmm_shim.simulate import RunConfig, checks_pass, deterministic_summary, run_scenario

pytestmark = pytest.mark.integration


def _run(text: str, seed: int, **config: str) -> tuple[dict[str, object], list[str]]:
    scenario = parse_scenario(tomllib.loads(text))
    calls: list[str] = []
    result = run_scenario(
        scenario, RunConfig(scenario.host.memory, **config), seed, keep_calls=calls
    )
    return result.summary, calls


@pytest.mark.parametrize(
    "config",
    [
        {"policy": "ON_FAULT"},
        {"policy": "EAGER", "placement": "naive"},
        {"policy": "ON_TAG_ACCESS"},
        {"tag_storage": "static"},
    ],
    ids=["on-fault", "eager-naive", "on-tag-access", "static"],
)
def test_small_scenario_leaves_the_host_as_it_found_it(
    tiny_scenario: str, config: dict[str, str]
) -> None:
    """Every VM is created and destroyed, the state stays sound, nothing leaks."""
    summary, calls = _run(tiny_scenario, 7, **config)
    assert [] == summary["invariant_violations"]
    assert [] == summary["leaks"]
    assert summary["host_back_to_start"] is True
    assert {} == summary["other_errors"]
    assert checks_pass(summary)
    assert summary["vms_created"] == summary["vms_destroyed"] > 0
    assert summary["faults"] > 0 and summary["calls"] == len(calls)
    if config.get("tag_storage") == "static":
        assert 0.0 == summary["ram_given_back_mean"]
    else:
        assert 0.0 < summary["ram_given_back_min"] <= summary["ram_given_back_mean"] < 0.04


def test_same_seed_same_calls_and_summary(tiny_scenario: str) -> None:
    """Two runs with one seed make the same calls, get the same answers, and summarise the
    same (timing figures aside); another seed does not."""
    first, first_calls = _run(tiny_scenario, 21, policy="ON_TAG_ACCESS")
    again, again_calls = _run(tiny_scenario, 21, policy="ON_TAG_ACCESS")
    other, other_calls = _run(tiny_scenario, 22, policy="ON_TAG_ACCESS")
    assert first_calls == again_calls
    assert deterministic_summary(first) == deterministic_summary(again)
    assert first_calls != other_calls
    assert deterministic_summary(first) != deterministic_summary(other)


def test_cli_json_summary(
    tiny_scenario: str,
    write_scenario: Callable[[str], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``vmm-shim simulate FILE --json`` prints the summary and exits 0 when checks pass."""
    path = write_scenario(tiny_scenario)
    code = main(["simulate", str(path), "--json", "--no-progress", "--policy", "eager"])
    out = capsys.readouterr().out
    assert 0 == code
    summary = json.loads(out)
    assert "EAGER" == summary["policy"] and summary["host_back_to_start"] is True


def test_cli_bad_scenario_exits_2(
    tiny_scenario: str,
    write_scenario: Callable[[str], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A bad scenario is refused before any daemon starts, naming key and value."""
    path = write_scenario(tiny_scenario.replace("mte_share = 0.3", "mte_share = 3", 1))
    assert 2 == main(["simulate", str(path), "--no-progress"])
    err = capsys.readouterr().err
    assert "vm_class[0].mte_share = 3" in err
