"""``vmm-shim``'s credentials and environment: ``--token``, ``--token-file``, ``TAGSTORE_TOKEN``,
``TAGSTORE_HOST``, the VM token printed once by ``vm create``; and what ``report`` and
``simulate`` do before they run anything. Credentials are checked by a real gRPC server in the
test process that requires them (:class:`tests.shim.servers.ScriptedHost`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.shim.conftest import CliRun
from tests.shim.servers import ScriptedHost, serve
from vmm_shim import cli as cli_module
from vmm_shim import report
from vmm_shim.cli import ENV_HOST, ENV_TOKEN, main

ADMIN = "admin-token-for-the-cli-tests"


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedHost, str]]:
    """A ScriptedHost that requires the admin token ``ADMIN``; channels carry only what the
    CLI sends."""
    host = ScriptedHost(admin_token=ADMIN)
    server, address = serve(host.handler())
    yield host, address
    server.stop(None)


@pytest.fixture
def run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., CliRun]:
    """``run(*argv, env={...})``: vmm-shim with exactly these TAGSTORE_* variables."""

    def invoke(*argv: str, env: dict[str, str] | None = None) -> CliRun:
        for name in (ENV_HOST, ENV_TOKEN):
            monkeypatch.delenv(name, raising=False)
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        code = main(list(argv))
        out, err = capsys.readouterr()
        return CliRun(code, out, err)

    return invoke


def test_vm_create_prints_the_vm_token_once_with_how_to_use_it(
    scripted: tuple[ScriptedHost, str], run: Callable[..., CliRun]
) -> None:
    """The token hostd issues appears once in ``vm create``'s output (and in its JSON), with a
    hint naming TAGSTORE_TOKEN; ``vm show`` of the same VM never shows it."""
    _, address = scripted
    created = run("--host", address, "--token", ADMIN, "vm", "create", "vm1", "--memory", "64MiB")
    assert (0, "") == (created.code, created.err)
    assert 1 == created.out.count("vm-token-of-vm1")
    assert "vm_token: vm-token-of-vm1" in created.out.splitlines()
    assert ENV_TOKEN in created.out
    as_json = run(
        "--host", address, "--token", ADMIN, "--json", "vm", "create", "vm2", "--memory", "1MiB"
    )
    assert "vm-token-of-vm2" == json.loads(as_json.out)["vm_token"]
    shown = run("--host", address, "--token", ADMIN, "vm", "show", "vm1")
    assert "vm-token-of-vm1" not in shown.out + shown.err


def test_the_token_comes_from_the_flag_then_the_file_then_the_environment(
    scripted: tuple[ScriptedHost, str], run: Callable[..., CliRun], tmp_path: Path
) -> None:
    """``--token`` overrides TAGSTORE_TOKEN; ``--token-file`` reads a token file (trailing
    newline and all); TAGSTORE_TOKEN alone is used."""
    server, address = scripted
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN + "\n")
    assert 0 == run("--host", address, "status", env={ENV_TOKEN: ADMIN}).code
    assert 0 == run("--host", address, "--token", ADMIN, "status", env={ENV_TOKEN: "wrong"}).code
    assert 0 == run("--host", address, "--token-file", str(token_file), "status").code
    assert [f"Bearer {ADMIN}"] * 3 == [a.authorization for a in server.of("GetHost")]


def test_a_missing_token_is_one_line_saying_where_to_find_one(
    scripted: tuple[ScriptedHost, str], run: Callable[..., CliRun]
) -> None:
    _, address = scripted
    refused = run("--host", address, "status")
    assert 1 == refused.code
    expected = f"error: UNAUTHENTICATED: no credential (vmm-shim reads {ENV_TOKEN}, --token or "
    assert [expected + "--token-file)"] == refused.err.splitlines()


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--token", "not a token"], {}, "argument --token"),
        (["--token", ""], {}, "argument --token"),
        ([], {ENV_TOKEN: "tok\nen"}, ENV_TOKEN),
        (["--token-file", "/nonexistent/admin.token"], {}, "argument --token-file"),
    ],
)
def test_a_bad_token_is_a_usage_error_naming_its_source_but_not_the_token(
    run: Callable[..., CliRun], argv: list[str], env: dict[str, str], named: str
) -> None:
    refused = run("--host", "127.0.0.1:1", *argv, "status", env=env)
    assert (2, 1) == (refused.code, len(refused.err.splitlines()))
    assert named in refused.err
    assert "not a token" not in refused.err and "tok" not in refused.err.replace("token", "")


def test_tagstore_host_sets_the_default_address_and_host_overrides_it(
    scripted: tuple[ScriptedHost, str], run: Callable[..., CliRun], tmp_path: Path
) -> None:
    _, address = scripted
    assert 0 == run("--token", ADMIN, "status", env={ENV_HOST: address}).code
    nowhere = f"unix:{tmp_path}/none.sock"
    moved = run("--token", ADMIN, "--timeout", "1", "status", env={ENV_HOST: nowhere})
    assert (1, "error: UNAVAILABLE") == (moved.code, moved.err[:18])
    assert 0 == run("--host", address, "--token", ADMIN, "status", env={ENV_HOST: nowhere}).code


@pytest.mark.parametrize("value", ["127.0.0.1:99999", "127.0.0.1", "unix:", "[::1", "höst:1"])
def test_a_bad_tagstore_host_is_a_usage_error_naming_the_variable(
    run: Callable[..., CliRun], value: str
) -> None:
    refused = run("status", env={ENV_HOST: value})
    assert (2, 1) == (refused.code, len(refused.err.splitlines()))
    assert refused.err.startswith(f"vmm-shim: error: {ENV_HOST}: invalid address {value!r}")


def test_report_without_matplotlib_says_how_to_install_it_before_running_anything(
    run: Callable[..., CliRun], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No simulation starts (run_report is never reached) and the message names the extra."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    started: list[object] = []
    monkeypatch.setattr(report, "run_report", lambda *a, **k: started.append(a))
    refused = run("report", "--quick")
    assert (2, []) == (refused.code, started)
    assert "pip install 'tagstore[report]'" in refused.err
    assert 1 == len(refused.err.splitlines())


def test_simulate_uses_the_global_host(run: Callable[..., CliRun], tmp_path: Path) -> None:
    """``vmm-shim --host ADDR simulate`` drives ADDR (here nothing listens: it fails to reach
    it) instead of quietly starting a daemon of its own."""
    nowhere = f"unix:{tmp_path}/none.sock"
    refused = run("--host", nowhere, "simulate", "cloud-mostly-untagged", "--no-progress")
    assert 0 != refused.code
    assert "starting a hostd of its own" not in refused.err
    assert "UNAVAILABLE" in refused.err or "none.sock" in refused.err


def test_a_command_another_module_registers_gets_the_resolved_host_and_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``add_cli`` commands (qemu, ...) read ``args.host`` and ``args.token``: the values the
    flags or TAGSTORE_HOST / TAGSTORE_TOKEN give, as for the built-in commands."""
    (tmp_path / "shim_probe_command.py").write_text(
        "import json\n"
        "def add_cli(subparsers):\n"
        "    p = subparsers.add_parser('probe')\n"
        "    p.set_defaults(func=lambda args: print(json.dumps([args.host, args.token])) or 0)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(ENV_HOST, "unix:/run/probe.sock")
    monkeypatch.setenv(ENV_TOKEN, "env-token")
    real_build = cli_module.build_parser

    def build_with_probe() -> Any:
        parser = real_build()
        commands = next(a for a in parser._actions if a.dest == "command")
        assert cli_module._add_optional_cli(commands, "shim_probe_command")
        return parser

    monkeypatch.setattr(cli_module, "build_parser", build_with_probe)
    capsys.readouterr()
    assert 0 == main(["probe"])
    assert 0 == main(["--host", "127.0.0.1:7", "--token", "flag-token", "probe"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [["unix:/run/probe.sock", "env-token"], ["127.0.0.1:7", "flag-token"]] == lines
