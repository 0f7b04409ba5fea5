"""Fixtures of the simulator tests: ``tiny_scenario`` (a TOML text that runs in seconds) and
``write_scenario`` (writes a scenario text to a file and returns its path)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

TINY = """
name = "tiny"
steps = 12
seed = 7

[host]
memory = "4GiB"

[arrivals]
initial = 3
rate = 0.5
max_vms = 5

[[vm_class]]
name = "plain"
weight = 2
mte_share = 0.3
boot_memory = { dist = "choice", values = ["128MiB", "256MiB"] }
lifetime = { dist = "exponential", mean = 5 }
working_set = 0.8
faults_per_step = 4
fault_size = "4MiB"
access = { read = 0.4, write = 0.4, tag = 0.2 }
tag_write_rate = 0.5
tag_write_size = "64KiB"

[[vm_class]]
name = "elastic"
mte_share = 0.5
boot_memory = { dist = "fixed", value = "128MiB" }
lifetime = { dist = "lognormal", median = 6, sigma = 0.5 }
fault_size = "2MiB"
access = { read = 0.5, write = 0.3, tag = 0.2 }

[vm_class.virtio_mem]
region_size = "512MiB"
block_size = "2MiB"
requested = "64MiB"
resize_rate = 0.4
sizes = ["0", "32MiB", "128MiB"]

[vm_class.dimm]
slots = 2
size = "64MiB"
add_rate = 0.3
remove_rate = 0.2
"""


@pytest.fixture
def tiny_scenario() -> str:
    """A scenario with every feature (MTE, tags, virtio-mem, DIMMs) on a 4 GiB host."""
    return TINY


@pytest.fixture
def write_scenario(tmp_path: Path) -> Callable[[str], Path]:
    """``write_scenario(text)`` -> the path of a new scenario file holding ``text``."""
    counter = iter(range(1_000_000))

    def write(text: str) -> Path:
        path = tmp_path / f"scenario-{next(counter)}.toml"
        path.write_text(text)
        return path

    return write
