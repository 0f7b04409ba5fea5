"""Fixtures of the vmm_shim tests, on top of ``tests/conftest.py`` (``daemon``, ``vm_id``):
``host`` (a :class:`vmm_shim.HostClient` of the module's real daemon) and ``cli`` (runs
``vmm_shim.cli.main`` against it and captures its output)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import HostdProcess
from vmm_shim import HostClient
from vmm_shim.cli import main


@dataclass(frozen=True)
class CliRun:
    """One ``vmm-shim`` run: exit code and what it printed."""

    code: int
    out: str
    err: str


@pytest.fixture(scope="module")
def host(daemon: HostdProcess) -> Iterator[HostClient]:
    """A client of the module's daemon."""
    with HostClient(daemon.address) as client:
        yield client


@pytest.fixture
def cli(daemon: HostdProcess, capsys: pytest.CaptureFixture[str]) -> Callable[..., CliRun]:
    """``cli("vm", "list")`` runs ``vmm-shim --host <daemon> vm list``."""

    def run(*args: str) -> CliRun:
        capsys.readouterr()
        code = main(["--host", daemon.address, *args])
        captured = capsys.readouterr()
        return CliRun(code, captured.out, captured.err)

    return run
