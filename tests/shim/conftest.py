"""Fixtures of the vmm_shim tests, on top of ``tests/conftest.py`` (``daemon``, ``vm_id``):
``host`` (a :class:`vmm_shim.HostClient` of the module's real daemon) and ``cli`` (runs
``vmm_shim.cli.main`` against it and captures its output), both with the daemon's admin token
once hostd issues one (:func:`admin_token`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

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


def admin_token(daemon: HostdProcess) -> str | None:
    """The daemon's admin token, once hostd issues one (issue 9): ``daemon.admin_token`` if the
    fixture provides it, else the file given as ``--admin-token-file``, else
    ``<state-dir>/admin.token``; None for a daemon that asks for no credential."""
    token = getattr(daemon, "admin_token", None)
    if token:
        return str(token)
    candidates = []
    if "--admin-token-file" in daemon.args:
        candidates.append(Path(daemon.args[daemon.args.index("--admin-token-file") + 1]))
    if "--state-dir" in daemon.args:
        candidates.append(Path(daemon.args[daemon.args.index("--state-dir") + 1]) / "admin.token")
    for path in candidates:
        if path.exists():
            return path.read_text().strip()
    return None


@pytest.fixture(scope="module")
def host(daemon: HostdProcess) -> Iterator[HostClient]:
    """A client of the module's daemon."""
    with HostClient(daemon.address, token=admin_token(daemon)) as client:
        yield client


@pytest.fixture
def cli(daemon: HostdProcess, capsys: pytest.CaptureFixture[str]) -> Callable[..., CliRun]:
    """``cli("vm", "list")`` runs ``vmm-shim --host <daemon> vm list``."""

    def run(*args: str) -> CliRun:
        capsys.readouterr()
        token = admin_token(daemon)
        code = main(["--host", daemon.address, *(["--token", token] if token else []), *args])
        captured = capsys.readouterr()
        return CliRun(code, captured.out, captured.err)

    return run
