"""Every ``vmm-shim`` command, fed hostile arguments, fails cleanly: a non-zero exit, exactly one
line on stderr, never a traceback (nor the line that reports a bug in vmm-shim).

Commands are found by walking the parser, so a command added later (``qemu ...``,
``discard``) is covered without touching this file: each of its arguments gets the hostile
values of its kind (numbers, counts, enum words, free text), the others a plausible baseline
(:data:`BASELINE_VALUES`, else ``x``/``1``). A new command whose baseline would succeed where
it should not, or which does real work when given one bad value, gets a line in
:data:`BASELINE_ARGS` that makes it fail fast.

Runs are in-process against the module's real daemon, plus a few through the installed entry
point (real argv bytes, a real pipe closed by ``head``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, HostdProcess
from tests.shim.conftest import CliRun, admin_token
from vmm_shim import HostClient
from vmm_shim.cli import build_parser, main

pytestmark = pytest.mark.integration

VM = "hostile-vm"
BUG_MARKER = "internal error"

# Hostile values by the kind of argument they are fed to.
HOSTILE = {
    "size": [
        "99999999TiB",
        str(1 << 64),
        "-1",
        "",
        " ",
        "1e999",
        "nan",
        "\u0661\u0662\u0663",  # Arabic-Indic digits: int() would take them
        "0x",
        "9" * 5000,
        "1.5B",
    ],
    "count": ["4294967296" * 3, str(1 << 64), "-1", "", "\u0661", "0x", "1.5", "inf", "9" * 5000],
    "word": ["EXECUTE", "", "on_fault\u202e", "\U0001f600", "-"],
    "text": ["", "\u202e", "\U0001f600" * 10, "x" * 10000, "\x1b[31mred", "a\nb", "\udcff"],
    # Output paths: any creatable path is a legitimate answer, so only uncreatable ones.
    "out_path": ["", "/nonexistent/dir/out", "x" * 5000],
}
# Arguments (by dest) that name a file to write.
OUT_PATHS = {"out"}
# Baseline values for arguments of these dests (others: "x", or "1" for numbers).
BASELINE_VALUES = {
    "vm_id": VM,
    "device_id": "vmem0",
    "gpa": "0x40000000",
    "addr": "0x40000000",
    "length": "4KiB",
    "size": "4KiB",
    "nb_blocks": "1",
    "memory": "64MiB",
    "region_size": "64MiB",
    "block_size": "2MiB",
    "fill": "1",
    "scenario": "no-such-scenario",
    # A well-formed destination nobody listens on: hostile ids reach the client's checks.
    "to": "unix:/nonexistent/hostd.sock",
}
# Extra arguments that make a command fail fast instead of doing real work when a hostile value
# lands where it is accepted (report would otherwise run every scenario).
BASELINE_ARGS: dict[tuple[str, ...], list[str]] = {
    ("report",): ["--scenarios", "no-such-scenario"],
    ("tags", "write"): ["--length", "4KiB"],
}
# Global options and their hostile values (tried with `status`).
GLOBAL_HOSTILE = {
    "--host": [
        "127.0.0.1:99999",
        "127.0.0.1:0",
        "127.0.0.1:-1",
        "127.0.0.1",
        ":50051",
        "",
        "unix:",
        "[::1",
        "h\u00f6st:1",
        "a b:1",
        "127.0.0.1:\u0663",
    ],
    "--timeout": ["0", "-1", "nan", "inf", "1e309", "", "1e99", "0x10"],
    "--token": ["", "sec ret", "\U0001f600", "\x1b[2J", "tok\nen"],
    "--token-file": ["", "/nonexistent/admin.token", "/dev/null", "/"],
}

Cli = Callable[..., CliRun]


def leaf_commands(parser: argparse.ArgumentParser) -> list[tuple[tuple[str, ...], Any]]:
    """Every runnable command path (``("vm", "create")``) and its parser."""
    found: list[tuple[tuple[str, ...], Any]] = []

    def walk(path: tuple[str, ...], p: argparse.ArgumentParser) -> None:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            found.append((path, p))
            return
        for name, sub in subs[0].choices.items():
            walk((*path, name), sub)

    walk((), parser)
    return found


def kind(action: argparse.Action) -> str:
    """Which hostile values fit an argument."""
    if action.dest in OUT_PATHS:
        return "out_path"
    if action.choices is not None:
        return "word"
    name = getattr(action.type, "__name__", "")
    if name in ("_size", "_address", "_seconds", "float"):
        return "size"
    if name.startswith("_count") or name in ("_tag", "int"):
        return "count"
    return "text"


def value_slots(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments of a command that take a value (not flags, not --help)."""
    return [
        a
        for a in parser._actions
        if a.nargs != 0 and not isinstance(a, argparse._SubParsersAction | argparse._HelpAction)
    ]


def baseline_value(action: argparse.Action) -> str:
    if action.dest in BASELINE_VALUES:
        return BASELINE_VALUES[action.dest]
    if action.choices is not None:
        return str(next(iter(action.choices)))
    return "1" if kind(action) in ("size", "count") else "x"


def argv_with(
    path: tuple[str, ...], parser: argparse.ArgumentParser, hostile: argparse.Action, value: str
) -> list[str]:
    """``path`` with plausible arguments, except ``hostile`` set to ``value``."""
    rivals: set[str] = set()
    for group in parser._mutually_exclusive_groups:
        if hostile in group._group_actions:
            rivals |= {a.dest for a in group._group_actions if a is not hostile}
    argv = [*path]
    options: list[str] = [*BASELINE_ARGS.get(path, [])]
    for action in value_slots(parser):
        given = value if action is hostile else baseline_value(action)
        if not action.option_strings:
            argv.append(given)
        elif action is hostile or (action.required and action.dest not in rivals):
            options += [action.option_strings[0], given]
    for group in parser._mutually_exclusive_groups:
        if group.required and hostile not in group._group_actions:
            first = group._group_actions[0]
            options += [first.option_strings[0], baseline_value(first)]
    # Positionals first, then options; an option value starting with "-" is passed as
    # --opt=VALUE so that argparse does not read it as another option.
    joined: list[str] = []
    it = iter(options)
    for option, given in zip(it, it, strict=True):
        joined.append(f"{option}={given}" if given.startswith("-") else option)
        if not given.startswith("-"):
            joined.append(given)
    return argv + joined


@pytest.fixture(scope="module")
def hostile_vm(daemon: HostdProcess) -> Iterator[str]:
    """The VM the baselines name, with a virtio-mem device ``vmem0``."""
    with HostClient(daemon.address, token=admin_token(daemon)) as host:
        vm = host.create_vm(
            VM,
            mte_enabled=True,
            boot_memory_bytes=64 << 20,
            max_memory_bytes=(64 << 20) + (1 << 30),
        )
        vm.add_virtio_mem("vmem0", region_size=256 << 20, block_size=2 << 20)
        yield VM


def assert_clean_failure(argv: list[str], run: CliRun) -> str | None:
    """None if ``run`` failed cleanly, else what is wrong."""
    lines = run.err.splitlines()
    if run.code == 0:
        return f"{argv!r}: exit 0"
    if len(lines) != 1:
        return f"{argv!r}: {len(lines)} lines on stderr: {run.err[:300]!r}"
    if "Traceback" in run.err or BUG_MARKER in run.err:
        return f"{argv!r}: {run.err[:300]!r}"
    return None


COMMANDS = leaf_commands(build_parser())


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=" ".join)
def test_every_argument_of_every_command_fails_cleanly_on_hostile_values(
    cli: Cli,
    hostile_vm: str,
    path: tuple[str, ...],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each argument in turn gets each hostile value of its kind: exit non-zero, one line on
    stderr, no traceback."""
    monkeypatch.chdir(tmp_path)  # whatever a command might write lands here
    parser = dict(COMMANDS)[path]
    failures = []
    tried = 0
    for action in value_slots(parser):
        for value in HOSTILE[kind(action)]:
            argv = argv_with(path, parser, action, value)
            tried += 1
            problem = assert_clean_failure(argv, cli(*argv))
            if problem:
                failures.append(problem)
    assert not failures, f"{len(failures)} of {tried} runs:\n" + "\n".join(failures)


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=" ".join)
def test_every_command_fails_cleanly_without_a_daemon(
    path: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Plausible arguments, nothing listening: exit 1 with one line (commands that start their
    own daemon fail on their baseline instead, just as cleanly)."""
    parser = dict(COMMANDS)[path]
    slots = value_slots(parser)
    argv = argv_with(path, parser, slots[0], baseline_value(slots[0])) if slots else [*path]
    full = ["--host", f"unix:{tmp_path}/none.sock", "--timeout", "2", *argv]
    code = main(full)
    out, err = capsys.readouterr()
    assert None is assert_clean_failure(full, CliRun(code, out, err))


@pytest.mark.parametrize(
    ("option", "value"),
    [(option, value) for option, values in GLOBAL_HOSTILE.items() for value in values],
)
def test_hostile_global_options_are_one_line_usage_errors(
    cli: Cli, option: str, value: str
) -> None:
    """Bad addresses, timeouts and tokens: exit 2 naming the option, never echoing a token."""
    argv = [f"{option}={value}", "status"]
    run = cli(*argv)
    assert None is assert_clean_failure(argv, run)
    assert 2 == run.code and option in run.err
    if option == "--token" and value:
        assert value not in run.err


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=" ".join)
def test_help_of_every_command_prints_and_exits_0(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    """Help text is a %-format to argparse; a stray % in any command's help must not crash."""
    assert 0 == main([*path, "--help"])
    assert "usage:" in capsys.readouterr().out


def run_entry_point(*argv: str | bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "vmm_shim.cli", *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


@pytest.fixture
def own_vm(daemon: HostdProcess, vm_id: str) -> str:
    """A VM of the test's own, with 32 MiB of boot RAM."""
    with HostClient(daemon.address, token=admin_token(daemon)) as host:
        host.create_vm(vm_id, mte_enabled=True, boot_memory_bytes=32 << 20)
    return vm_id


def test_argv_that_is_not_utf8_fails_cleanly_through_the_entry_point(
    daemon: HostdProcess, own_vm: str
) -> None:
    """Bytes a shell can pass but that are not text (``$'\\xff'``): one line, exit 1."""
    token = admin_token(daemon)
    auth = ["--token", token] if token else []
    done = run_entry_point("--host", daemon.address, *auth, "vm", "show", b"\xff\xfe")
    lines = done.stderr.decode(errors="replace").splitlines()
    assert (1, 1) == (done.returncode, len(lines)), lines
    assert "Traceback" not in lines[0] and "ID " in lines[0]


def test_piping_tags_into_head_ends_quietly(daemon: HostdProcess, own_vm: str) -> None:
    """``vmm-shim tags read VM GPA 32MiB | head -n 2``: two lines, nothing on stderr, and the
    exit status of a command whose reader went away (141), not a BrokenPipeError."""
    token = admin_token(daemon)
    auth = ["--token", token] if token else []
    argv = [sys.executable, "-m", "vmm_shim.cli", "--host", daemon.address, *auth]
    proc = subprocess.Popen(
        [*argv, "tags", "read", own_vm, "0x40000000", "32MiB"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.stdout is not None and proc.stderr is not None
    first_two = [proc.stdout.readline(), proc.stdout.readline()]
    proc.stdout.close()  # what head does after its lines
    err = proc.stderr.read()
    code = proc.wait(timeout=60)
    assert all(line.startswith(b"0x0000400") for line in first_two)
    assert (141, b"") == (code, err)
