"""``vmm-shim`` against the real daemon: output, ``--json`` and exit codes (0 done, 1 refused
with ``error: CODE REASON: message``, 2 usage, 3/4/5 virtio-mem NACK/BUSY/ERROR)."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.shim.conftest import CliRun
from vmm_shim.cli import _add_optional_cli, build_parser, main

pytestmark = pytest.mark.integration

Cli = Callable[..., CliRun]
BOOT = "0x40000000"


def create(cli: Cli, vm_id: str, *extra: str) -> None:
    args = ["--memory", "64MiB", "--dimm-slots", "2", "--max-memory", "1088MiB", *extra]
    run = cli("vm", "create", vm_id, *args)
    assert 0 == run.code, run.err


def test_status_prints_a_host_row_and_one_row_per_region(cli: Cli) -> None:
    run = cli("status")
    assert 0 == run.code
    rows = run.out.splitlines()
    header = next(line for line in rows if "TOTAL" in line)
    assert ["TOTAL", "FREE", "DATA", "TAGGED", "TAG", "RESERVED", "LENT", "BLOCKS", "RES/MIN"] == (
        header.split()
    )
    names = [line.split()[0] for line in rows[rows.index(header) + 1 :]]
    assert ["host", "tag0", "tag1", "untagged0"] == names
    assert "4GiB" == rows[rows.index(header) + 1].split()[1]


def test_status_json_is_the_host_info(cli: Cli) -> None:
    run = cli("--json", "status")
    data = json.loads(run.out)
    assert (4 << 30, ["tag0", "tag1", "untagged0"]) == (
        data["total_bytes"],
        [r["name"] for r in data["regions"]],
    )


def test_vm_create_show_list_destroy(cli: Cli, vm_id: str) -> None:
    create(cli, vm_id, "--policy", "eager")
    shown = cli("vm", "show", vm_id, "--json")
    data = json.loads(shown.out)
    assert (True, "EAGER", 64 << 20) == (
        data["mte_enabled"],
        data["tag_policy"],
        data["tagged_bytes"],
    )
    listed = cli("vm", "list")
    assert any(line.split()[0] == vm_id for line in listed.out.splitlines())
    assert 0 == cli("vm", "destroy", vm_id).code
    assert vm_id not in [vm["vm_id"] for vm in json.loads(cli("--json", "vm", "list").out)]


def test_a_vm_without_mte_shows_no_policy(cli: Cli, vm_id: str) -> None:
    create(cli, vm_id, "--no-mte")
    first = cli("vm", "show", vm_id).out.splitlines()[0]
    assert "mte off, policy -" in first


def test_fault_reports_what_it_did(cli: Cli, vm_id: str) -> None:
    create(cli, vm_id)
    run = cli("fault", vm_id, BOOT, "2MiB", "--access", "write", "--json")
    assert 512 == json.loads(run.out)["newly_mapped_pages"]
    text = cli("fault", vm_id, "0x40200000", "1MiB", "--access", "tag")
    assert text.out.startswith("256 page(s) newly mapped")


def test_tags_round_trip_through_files(cli: Cli, vm_id: str, tmp_path: Path) -> None:
    create(cli, vm_id)
    tags = bytes(i % 16 for i in range(8192 // 16))
    (tmp_path / "in").write_bytes(tags)
    assert 0 == cli("tags", "write", vm_id, BOOT, "--file", str(tmp_path / "in")).code
    assert 0 == cli("tags", "read", vm_id, BOOT, "8KiB", "--out", str(tmp_path / "out")).code
    assert tags == (tmp_path / "out").read_bytes()


def test_tags_fill_then_read_prints_one_hex_digit_per_granule(cli: Cli, vm_id: str) -> None:
    create(cli, vm_id)
    assert 0 == cli("tags", "write", vm_id, BOOT, "--fill", "7", "--length", "4KiB").code
    run = cli("tags", "read", vm_id, BOOT, "4KiB", "--json")
    assert "7" * 256 == json.loads(run.out)["tags"]
    first = cli("tags", "read", vm_id, BOOT, "4KiB").out.splitlines()[0]
    assert "0x000040000000  " + "7" * 64 == first


def test_dimm_add_and_remove(cli: Cli, vm_id: str) -> None:
    create(cli, vm_id)
    added = json.loads(cli("dimm", "add", vm_id, "dimm0", "128MiB", "--json").out)
    assert ("DIMM", 128 << 20) == (added["kind"], added["size"])
    assert 0 == cli("dimm", "remove", vm_id, "dimm0").code
    shown = json.loads(cli("vm", "show", vm_id, "--json").out)
    assert ["boot-ram"] == [d["device_id"] for d in shown["regions"]]


def test_virtio_mem_add_resize_drive_state_unplug_all(cli: Cli, vm_id: str) -> None:
    create(cli, vm_id)
    sizes = ["--region-size", "256MiB", "--block-size", "2MiB"]
    added = cli("virtio-mem", "add", vm_id, "vmem0", *sizes, "--json")
    gpa = hex(json.loads(added.out)["gpa"])
    beyond = hex(int(gpa, 16) + (16 << 20))
    assert 0 == cli("virtio-mem", "resize", vm_id, "vmem0", "16MiB").code
    drive = json.loads(cli("virtio-mem", "drive", vm_id, "vmem0", "--json").out)
    assert (16 << 20, 1, 0) == (drive["plugged_size"], drive["requests"], drive["errors"])
    assert "PLUGGED" == cli("virtio-mem", "state", vm_id, "vmem0", gpa, "8").out.strip()
    assert "NACK" == cli("virtio-mem", "plug", vm_id, "vmem0", beyond, "1").out.strip()
    assert "ACK" == cli("virtio-mem", "unplug-all", vm_id, "vmem0").out.strip()
    assert "UNPLUGGED" == cli("virtio-mem", "state", vm_id, "vmem0", gpa, "8").out.strip()


def test_a_virtio_mem_answer_other_than_ack_is_printed_and_exits_with_its_code(
    cli: Cli, vm_id: str
) -> None:
    """The answer is the output; the status says it was not ACK (3 NACK, 5 ERROR), with one
    line on stderr quoting the request as typed."""
    create(cli, vm_id)
    sizes = ["--region-size", "64MiB", "--block-size", "2MiB", "--requested-size", "2MiB"]
    added = cli("virtio-mem", "add", vm_id, "vmem0", *sizes, "--json")
    gpa = json.loads(added.out)["gpa"]
    run = cli("virtio-mem", "unplug", vm_id, "vmem0", hex(gpa), "1")
    assert (5, "ERROR") == (run.code, run.out.strip()), "unplugging an unplugged block"
    assert f"error: virtio-mem unplug {hex(gpa)} 1 on 'vmem0' answered ERROR\n" == run.err
    assert 0 == cli("virtio-mem", "drive", vm_id, "vmem0").code
    nack = cli("virtio-mem", "plug", vm_id, "vmem0", hex(gpa + (2 << 20)), "1", "--json")
    assert (3, {"response": "NACK"}) == (nack.code, json.loads(nack.out)), "beyond requested_size"
    assert 1 == len(nack.err.splitlines())


def test_drive_that_reaches_requested_size_exits_0(cli: Cli, vm_id: str) -> None:
    create(cli, vm_id)
    sizes = ["--region-size", "64MiB", "--block-size", "2MiB", "--requested-size", "4MiB"]
    assert 0 == cli("virtio-mem", "add", vm_id, "vmem0", *sizes).code
    assert 0 == cli("virtio-mem", "drive", vm_id, "vmem0").code


def test_a_refused_call_exits_1_with_code_and_reason(cli: Cli, vm_id: str) -> None:
    create(cli, vm_id)
    run = cli("fault", vm_id, "0x40000001", "4KiB")
    assert 1 == run.code
    assert run.err.startswith("error: INVALID_ARGUMENT: GPA '0x40000001': must be aligned")
    assert 1 == len(run.err.splitlines())
    again = cli("vm", "create", vm_id, "--memory", "64MiB")
    assert (1, "error: ALREADY_EXISTS VM_ALREADY_EXISTS:") == (again.code, again.err[:40])


def test_a_refused_call_with_json_also_prints_the_error_as_json(cli: Cli) -> None:
    run = cli("--json", "vm", "show", "no-such-vm")
    assert (1, "NOT_FOUND") == (run.code, json.loads(run.out)["error"]["code"])


def test_a_state_request_that_is_not_acked_exits_with_its_code(cli: Cli, vm_id: str) -> None:
    create(cli, vm_id)
    cli("virtio-mem", "add", vm_id, "vmem0", "--region-size", "64MiB", "--block-size", "2MiB")
    run = cli("virtio-mem", "state", vm_id, "vmem0", "0x80000000", "0")
    assert (5, "ERROR\n") == (run.code, run.out)
    assert "error: virtio-mem state 0x80000000 0 on 'vmem0' answered ERROR\n" == run.err


def test_the_value_hostd_refuses_is_reported_as_typed(cli: Cli, vm_id: str) -> None:
    """hostd names the field and its value in bytes; the CLI names the option and what the
    user typed (not 1536, not a rounded 1.5KiB)."""
    run = cli("vm", "create", vm_id, "--memory", "1.5KiB")
    assert "error: INVALID_ARGUMENT: --memory '1.5KiB': must be a multiple of 0x1000\n" == run.err


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["vm"],
        ["vm", "create", "x"],
        ["vm", "create", "x", "--memory", "2XB"],
        ["fault", "x", "0x40000000", "4KiB", "--access", "execute"],
        ["tags", "write", "x", "0x40000000"],
        ["tags", "write", "x", "0x40000000", "--fill", "16", "--length", "4KiB"],
        ["tags", "write", "x", "0x40000000", "--fill", "1"],
        ["no-such-command"],
        ["--timeout", "0", "status"],
    ],
)
def test_usage_errors_exit_2(cli: Cli, args: list[str]) -> None:
    assert 2 == cli(*args).code


def test_an_unreachable_host_exits_1_unavailable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--host", f"unix:{tmp_path}/none.sock", "--timeout", "5", "status"])
    err = capsys.readouterr().err
    assert (1, "error: UNAVAILABLE:", 1) == (code, err[:19], len(err.splitlines()))


@pytest.mark.parametrize("module_name", ["vmm_shim.simulate", "vmm_shim.report"])
def test_simulate_and_report_are_commands_when_their_modules_offer_add_cli(
    module_name: str,
) -> None:
    try:
        offered = hasattr(importlib.import_module(module_name), "add_cli")
    except ModuleNotFoundError:
        offered = False
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    assert offered == (module_name.rsplit(".", 1)[1] in commands.choices)  # type: ignore[operator]


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert 0 == main(["--help"])
    assert "virtio-mem" in capsys.readouterr().out


def test_a_command_module_that_fails_to_import_does_not_break_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "shim_broken_command.py").write_text("raise RuntimeError('half written')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    assert not _add_optional_cli(commands, "shim_broken_command")
    assert not _add_optional_cli(commands, "vmm_shim.no_such_module")
    args = parser.parse_args(["shim_broken_command"])
    assert 1 == args.func(args)
    assert "RuntimeError: half written" in capsys.readouterr().err


def test_a_fill_length_that_is_not_whole_granules_is_refused_not_rounded(cli: Cli) -> None:
    """--length 4097 would write 256 tags for 4096 bytes: refused, quoting what was typed."""
    run = cli("tags", "write", "any-vm", BOOT, "--fill", "1", "--length", "4097")
    assert (2, 1) == (run.code, len(run.err.splitlines()))
    assert "argument --length '4097': not a multiple of 16 bytes" in run.err
