"""``vmm-shim report`` on the tiny scenario, shortened: every file is written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from vmm_shim.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_report_writes_table_plots_and_results(
    tiny_scenario: str, write_scenario: Callable[[str], Path], tmp_path: Path
) -> None:
    """7 runs (static + 3 policies x 2 placements), a table row each, and the plots."""
    pytest.importorskip("matplotlib")
    path = write_scenario(tiny_scenario)
    out = tmp_path / "report"
    assert 0 == main(["report", "--out", str(out), "--scenarios", str(path), "--no-progress"])
    results = json.loads((out / "results.json").read_text())
    assert 7 == len(results)
    readme = (out / "README.md").read_text()
    assert 7 == sum(1 for line in readme.splitlines() if line.startswith("| tiny |"))
    for name in (
        "ram-given-back.png",
        "evacuations.png",
        "fault-latency.png",
        "tag-reserved-tiny.png",
    ):
        assert (out / name).stat().st_size > 0
