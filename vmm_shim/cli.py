"""``vmm-shim``: drive a hostd from the shell, through :mod:`vmm_shim.client` only.

Exit codes (docs/vmm_shim.md): 0 done; 1 the daemon refused or failed the call (one line on
stderr: ``error: CODE REASON: message``); 2 usage (a bad argument, option or environment
variable: one line on stderr naming it and the value as typed); a virtio-mem request the device
did not acknowledge prints its answer and exits 3 (NACK), 4 (BUSY) or 5 (ERROR); 130
interrupted; 141 stdout closed early (``| head``), quietly. Whatever the input, the command
prints one line on stderr when it fails, never a traceback.

``--json`` prints one JSON document for every command (errors too, on stdout, with the line on
stderr kept). Sizes accept ``2MiB``, ``4GiB``, ``0x1000``. ``TAGSTORE_HOST`` sets the default
``--host``; ``TAGSTORE_TOKEN`` the default ``--token`` (flags win).

Commands are a parser builder (:func:`build_parser`) and one function per command returning
``(json value, text)``. ``simulate`` and ``report`` come from :mod:`vmm_shim.simulate` and
:mod:`vmm_shim.report` when those modules exist and define ``add_cli(subparsers)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from vmm_shim.client import (
    ACCESSES,
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT_S,
    TAG_POLICIES,
    DeviceInfo,
    HostClient,
    HostInfo,
    TagStoreClientError,
    Unauthenticated,
    VirtioMemRequestError,
    VmInfo,
)
from vmm_shim.units import U64_MAX, format_size, one_line, parse_address, parse_size, quoted

__all__ = ["build_parser", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
# A virtio-mem request answered other than ACK: the answer is printed, the status says which.
EXIT_VIRTIO_MEM = {"NACK": 3, "BUSY": 4, "ERROR": 5}
EXIT_INTERRUPTED = 130
# 128 + SIGPIPE, what `cat` reports when its reader goes away.
EXIT_BROKEN_PIPE = 141
ENV_HOST = "TAGSTORE_HOST"
ENV_TOKEN = "TAGSTORE_TOKEN"
U32_MAX = (1 << 32) - 1
# A deadline longer than a day is a typo; gRPC deadlines also overflow far beyond it.
MAX_TIMEOUT_S = 86400.0
_LONG_QUOTE_RE = re.compile(r"'([^']{60,})'")
_HOST_NAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", re.ASCII)
# Tags printed per line by `tags read` (one hex digit per 16-byte granule).
TAGS_PER_LINE = 64
# Bytes of guest memory one tag describes (an MTE granule).
TAG_GRANULE_BYTES = 16

Handler = Callable[[argparse.Namespace, HostClient], Any]


# -- argument types ----------------------------------------------------------------------------


class Typed(int):
    """A number parsed from the command line that remembers how it was typed (``text``), so
    that an error about it can quote the user rather than a converted value."""

    text: str

    def __new__(cls, value: int, text: str) -> Typed:
        typed = super().__new__(cls, value)
        typed.text = text
        return typed


def _size(text: str) -> int:
    try:
        return Typed(parse_size(text), text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _address(text: str) -> int:
    try:
        return Typed(parse_address(text), text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _bounded_count(text: str, what: str, maximum: int) -> int:
    value_text = text.strip()
    # int() would take non-ASCII digits and spend quadratic time on a long digit string.
    if not value_text.isascii() or len(value_text) > 2 + 4 * 24:
        raise argparse.ArgumentTypeError(f"invalid {what} {quoted(text)}")
    try:
        value = int(value_text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {what} {quoted(text)}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid {what} {quoted(text)}: negative")
    if value > maximum:
        raise argparse.ArgumentTypeError(f"invalid {what} {quoted(text)}: at most {maximum}")
    return Typed(value, text)


def _count(text: str) -> int:
    """A uint64 count (e.g. NB_BLOCKS)."""
    return _bounded_count(text, "count", U64_MAX)


def _count32(text: str) -> int:
    """A uint32 count (``--dimm-slots``)."""
    return _bounded_count(text, "count", U32_MAX)


def _tag(text: str) -> int:
    return _bounded_count(text, "tag", 15)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seconds {quoted(text)}") from None
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT_S):
        raise argparse.ArgumentTypeError(
            f"invalid seconds {quoted(text)}: must be more than 0 and at most {MAX_TIMEOUT_S:g}"
        )
    return value


def check_host_address(text: str) -> str:
    """``text`` if it is an address hostd can listen on and the client can reach:
    ``HOST:PORT`` (a name, IPv4, or ``[IPv6]``; port 1..65535) or ``unix:PATH``; ValueError
    saying what is wrong, quoting it, otherwise."""
    if text.startswith("unix:"):
        if not text.removeprefix("unix:").removeprefix("//"):
            raise ValueError(f"invalid address {quoted(text)}: no socket path after unix:")
        return text
    host, sep, port = text.rpartition(":")
    expected = "expected HOST:PORT or unix:PATH"
    if not sep or not host:
        raise ValueError(f"invalid address {quoted(text)}: {expected}")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"invalid address {quoted(text)}: port {quoted(port)} is not 1..65535")
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1]
        ok = bool(inner) and inner.isascii() and all(c in "0123456789abcdefABCDEF:." for c in inner)
    else:
        ok = _HOST_NAME_RE.fullmatch(host) is not None
    if not ok:
        raise ValueError(f"invalid address {quoted(text)}: host {quoted(host)} is not a host name")
    return text


def _host_address(text: str) -> str:
    try:
        return check_host_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# -- output ------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned: the first left, the others right (they hold numbers)."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            str(cell).ljust(width) if i == 0 else str(cell).rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _host_text(host: HostInfo) -> str:
    summary = (
        f"page size {format_size(host.page_size)}, tag storage {host.tag_storage_mode}, "
        f"placement {host.placement}, mte_perm {'yes' if host.mte_perm else 'no'}, "
        f"{host.vm_count} VM(s)"
    )
    header = ["", "TOTAL", "FREE", "DATA", "TAGGED", "TAG RESERVED", "LENT", "BLOCKS RES/MIN"]
    rows = [
        [
            "host",
            format_size(host.total_bytes),
            format_size(host.free_bytes),
            format_size(host.data_bytes),
            format_size(host.tagged_bytes),
            format_size(host.tag_reserved_bytes),
            format_size(host.tag_lent_bytes),
            f"{host.tag_blocks_reserved}/{host.tag_blocks_min_needed}",
        ]
    ]
    rows += [
        [
            r.name,
            format_size(r.total_bytes),
            format_size(r.free_bytes),
            format_size(r.data_bytes),
            format_size(r.tagged_bytes),
            format_size(r.tag_reserved_bytes),
            format_size(r.tag_lent_bytes),
            f"{r.tag_blocks_reserved}/{r.tag_blocks_min_needed}",
        ]
        for r in host.regions
    ]
    return summary + "\n" + _table(header, rows)


def _devices_text(devices: Sequence[DeviceInfo]) -> str:
    header = ["DEVICE", "KIND", "GPA", "SIZE", "PLUGGED", "REQUESTED", "BLOCK", "MAPPED", "TAGGED"]
    rows = [
        [
            d.device_id,
            d.kind,
            f"{d.gpa:#x}",
            format_size(d.size),
            format_size(d.plugged_size),
            format_size(d.requested_size) if d.kind == "VIRTIO_MEM" else "-",
            format_size(d.block_size) if d.kind == "VIRTIO_MEM" else "-",
            format_size(d.mapped_bytes),
            format_size(d.tagged_bytes),
        ]
        for d in devices
    ]
    return _table(header, rows)


def _vm_text(vm: VmInfo) -> str:
    policy = vm.tag_policy if vm.mte_enabled else "-"
    head = (
        f"vm {vm.vm_id}: mte {'on' if vm.mte_enabled else 'off'}, policy {policy}, "
        f"boot {format_size(vm.boot_memory_bytes)}, max {format_size(vm.max_memory_bytes)}, "
        f"{vm.dimm_slots} DIMM slot(s), mapped {format_size(vm.mapped_bytes)}, "
        f"tagged {format_size(vm.tagged_bytes)}"
    )
    if vm.huge_page_bytes:
        head += f", {format_size(vm.huge_page_bytes)} in huge pages"
    if vm.pinned:
        head += ", pinned"
    if vm.discarded_bytes:
        head += f", discarded {format_size(vm.discarded_bytes)} so far"
    return head + "\n" + _devices_text(vm.regions)


def _vms_text(vms: Sequence[VmInfo]) -> str:
    header = ["VM", "MTE", "POLICY", "BOOT", "MAX", "MAPPED", "TAGGED", "DEVICES"]
    rows = [
        [
            vm.vm_id,
            "on" if vm.mte_enabled else "off",
            vm.tag_policy if vm.mte_enabled else "-",
            format_size(vm.boot_memory_bytes),
            format_size(vm.max_memory_bytes),
            format_size(vm.mapped_bytes),
            format_size(vm.tagged_bytes),
            str(len(vm.regions) - 1),
        ]
        for vm in vms
    ]
    return _table(header, rows) if vms else "no VMs"


# -- commands: each returns (json value, text) -------------------------------------------------


def _status(args: argparse.Namespace, host: HostClient) -> tuple[Any, str]:
    info = host.host_status()
    return info, _host_text(info)


def _vm_create(args: argparse.Namespace, host: HostClient) -> tuple[Any, str]:
    vm = host.create_vm(
        args.vm_id,
        mte_enabled=args.mte,
        tag_policy=args.policy,
        boot_memory_bytes=args.memory,
        dimm_slots=args.dimm_slots,
        max_memory_bytes=args.max_memory,
        pinned=args.pinned,
        backing_page_size=args.backing_page_size,
    )
    info = vm.info()
    if not vm.vm_token:
        return info, _vm_text(info)
    # The only time hostd tells anyone the token: print it once, with how to use it.
    text = (
        f"{_vm_text(info)}\n"
        f"vm_token: {vm.vm_token}\n"
        f"(shown once: pass it as {ENV_TOKEN}=... or --token to drive vm {info.vm_id})"
    )
    return {**dataclasses.asdict(info), "vm_token": vm.vm_token}, text


def _vm_list(args: argparse.Namespace, host: HostClient) -> tuple[Any, str]:
    vms = host.list_vms()
    return vms, _vms_text(vms)


def _vm_show(args: argparse.Namespace, host: HostClient) -> tuple[Any, str]:
    info = host.get_vm(args.vm_id)
    return info, _vm_text(info)


def _vm_destroy(args: argparse.Namespace, host: HostClient) -> tuple[Any, str]:
    host.vm(args.vm_id).destroy()
    return {"vm_id": args.vm_id, "destroyed": True}, f"destroyed vm {args.vm_id}"


def _fault(args: argparse.Namespace, host: HostClient) -> tuple[Any, str]:
    outcome = host.vm(args.vm_id).fault(args.gpa, args.length, access=args.access)
    text = (
        f"{outcome.newly_mapped_pages} page(s) newly mapped, "
        f"{outcome.tag_blocks_reserved} tag block(s) reserved, "
        f"{outcome.pages_migrated} page(s) migrated, {outcome.replays} replay(s)"
    )
    return outcome, text


def _tags_write(args: argparse.Namespace, host: HostClient) -> tuple[Any, str]:
    if args.file is not None:
        tags = Path(args.file).read_bytes()
    else:
        if args.length is None:
            raise _UsageError("tags write --fill needs --length")
        if args.length % TAG_GRANULE_BYTES:
            raise _UsageError(
                f"argument --length {quoted(args.length.text)}: not a multiple of "
                f"{TAG_GRANULE_BYTES} bytes (one tag per {TAG_GRANULE_BYTES}-byte granule)"
            )
        tags = bytes([args.fill]) * (args.length // TAG_GRANULE_BYTES)
    host.vm(args.vm_id).copy_tags_to_guest(args.gpa, tags)
    length = len(tags) * TAG_GRANULE_BYTES
    result = {"vm_id": args.vm_id, "gpa": args.gpa, "length": length, "tags": len(tags)}
    text = f"wrote {len(tags)} tag(s) for {format_size(length, exact=True)} at {args.gpa:#x}"
    return result, text


def _tags_read(args: argparse.Namespace, host: HostClient) -> tuple[Any, str]:
    tags = host.vm(args.vm_id).copy_tags_from_guest(args.gpa, args.length)
    digits = "".join(f"{t:x}" for t in tags)
    if args.out is not None:
        try:
            Path(args.out).write_bytes(tags)
        except OSError as e:  # a failed write (ENOSPC) names no file by itself
            e.filename = e.filename or args.out
            raise
        result = {"vm_id": args.vm_id, "gpa": args.gpa, "length": args.length, "out": args.out}
        return result, f"read {len(tags)} tag(s) into {args.out}"
    result = {"vm_id": args.vm_id, "gpa": args.gpa, "length": args.length, "tags": digits}
    lines = [
        f"{args.gpa + i * TAG_GRANULE_BYTES:#014x}  {digits[i : i + TAGS_PER_LINE]}"
        for i in range(0, len(digits), TAGS_PER_LINE)
    ]
    return result, "\n".join(lines)


def _discard(args: argparse.Namespace, host: HostClient) -> tuple[Any, str]:
    result = host.vm(args.vm_id).discard(args.gpa, args.length)
    text = (
        f"discarded {format_size(result.discarded_bytes)} "
        f"({format_size(result.tagged_bytes)} tagged), "
        f"released {result.tag_blocks_released} tag block(s)"
    )
    return result, text


def _dimm_add(args: argparse.Namespace, host: HostClient) -> tuple[Any, str]:
    device = host.vm(args.vm_id).add_dimm(args.device_id, args.size)
    return device, _devices_text([device])


def _device_remove(args: argparse.Namespace, host: HostClient) -> tuple[Any, str]:
    host.vm(args.vm_id).remove_device(args.device_id)
    result = {"vm_id": args.vm_id, "device_id": args.device_id, "removed": True}
    return result, f"removed {args.device_id} from vm {args.vm_id}"


def _virtio_mem_add(args: argparse.Namespace, host: HostClient) -> tuple[Any, str]:
    device = host.vm(args.vm_id).add_virtio_mem(
        args.device_id,
        region_size=args.region_size,
        block_size=args.block_size,
        requested_size=args.requested_size,
        prealloc=args.prealloc,
    )
    return device, _devices_text([device])


def _virtio_mem_resize(args: argparse.Namespace, host: HostClient) -> tuple[Any, str]:
    device = host.vm(args.vm_id).resize_virtio_mem(args.device_id, args.size)
    return device, _devices_text([device])


class _NotAcked(Exception):
    """A virtio-mem request the device answered NACK, BUSY or ERROR: the answer is the
    command's output, and the exit status (:data:`EXIT_VIRTIO_MEM`) says it was not ACK."""

    def __init__(self, result: Any, text: str, response: str, complaint: str) -> None:
        super().__init__(complaint)
        self.result, self.text, self.response = result, text, response


def _virtio_mem_answer(args: argparse.Namespace, host: HostClient) -> tuple[Any, str]:
    vm = host.vm(args.vm_id)
    if args.request == "plug":
        response = vm.virtio_mem_plug(args.device_id, args.addr, args.nb_blocks)
    elif args.request == "unplug":
        response = vm.virtio_mem_unplug(args.device_id, args.addr, args.nb_blocks)
    else:
        response = vm.virtio_mem_unplug_all(args.device_id)
    if response != "ACK":
        where = "" if args.request == "unplug-all" else f" {args.addr.text} {args.nb_blocks.text}"
        complaint = f"virtio-mem {args.request}{where} on {args.device_id!r} answered {response}"
        raise _NotAcked({"response": response}, response, response, complaint)
    return {"response": response}, response


def _virtio_mem_state(args: argparse.Namespace, host: HostClient) -> tuple[Any, str]:
    vm = host.vm(args.vm_id)
    try:
        state = vm.virtio_mem_state(args.device_id, args.addr, args.nb_blocks)
    except VirtioMemRequestError as e:
        complaint = (
            f"virtio-mem state {args.addr.text} {args.nb_blocks.text} on {args.device_id!r} "
            f"answered {e.response}"
        )
        raise _NotAcked({"response": e.response}, e.response, e.response, complaint) from None
    return {"response": "ACK", "state": state}, state


def _virtio_mem_drive(args: argparse.Namespace, host: HostClient) -> tuple[Any, str]:
    result = host.vm(args.vm_id).drive_virtio_mem(args.device_id)
    text = (
        f"plugged {format_size(result.plugged_size)} of {format_size(result.requested_size)} "
        f"requested: {result.requests} request(s), {result.acks} ACK, {result.nacks} NACK, "
        f"{result.busy} BUSY, {result.errors} ERROR"
    )
    if result.plugged_size != result.requested_size:
        # Short of the target: say which answer stopped it (a NACK the driver got past, after
        # re-reading the config, does not count once the target is reached).
        answers = (("ERROR", result.errors), ("BUSY", result.busy), ("NACK", result.nacks))
        stopped_by = next((name for name, count in answers if count), None)
        if stopped_by is not None:
            complaint = (
                f"virtio-mem drive on {args.device_id!r} stopped at a {stopped_by} answer, "
                f"{format_size(result.plugged_size, exact=True)} plugged"
            )
            raise _NotAcked(result, text, stopped_by, complaint)
    return result, text


class _UsageError(Exception):
    """A combination of arguments argparse cannot check by itself."""


# -- parser ------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (``PROG: error: ...``), not the usage
    text plus the error: one line is what a script or a person reads first. Subcommands
    (including those other modules register) are built with this class too.

    Abbreviated options are off: with them a subcommand's ``--to`` would be taken for the
    global ``--token`` (argparse matches prefixes across the whole command line)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        # argparse quotes whole values ("invalid int value: '999...'"): cut long ones.
        message = _LONG_QUOTE_RE.sub(lambda m: quoted(m.group(1)), message)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def _add(
    subparsers: Any, name: str, handler: Handler, help_text: str, json_flag: argparse.ArgumentParser
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=help_text, description=help_text, parents=[json_flag]
    )
    parser.set_defaults(handler=handler, command_parser=parser)
    return parser


def _add_optional_cli(subparsers: Any, module_name: str) -> bool:
    """Let a sibling module register its own subcommand, if it exists and offers ``add_cli``.

    A module that exists but fails to import must not take the other commands down: its command
    is still listed and reports the import error (exit 1) when used.
    """
    command = module_name.rsplit(".", 1)[-1]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            return False
        broken: Exception = e
    except Exception as e:  # a bug in that module: report it when its command is used
        broken = e
    else:
        if not hasattr(module, "add_cli"):
            return False
        module.add_cli(subparsers)
        return True

    def unavailable(args: argparse.Namespace) -> int:
        print(f"error: {command} unavailable: {type(broken).__name__}: {broken}", file=sys.stderr)
        return EXIT_ERROR

    sub = subparsers.add_parser(command, help=f"({command} failed to load)")
    sub.add_argument("rest", nargs=argparse.REMAINDER)
    sub.set_defaults(func=unavailable)
    return False


def build_parser() -> argparse.ArgumentParser:
    """The ``vmm-shim`` argument parser."""
    # --json is accepted before or after the command.
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    parser = _Parser(
        prog="vmm-shim",
        description="Talk to hostd, the MTE tag storage daemon.",
        epilog=(
            f"Environment: {ENV_HOST} (default --host), {ENV_TOKEN} (default --token). "
            "Exit status: 0 done, 1 refused or failed, 2 bad usage, 3/4/5 virtio-mem answered "
            "NACK/BUSY/ERROR."
        ),
    )
    parser.add_argument(
        "--host",
        type=_host_address,
        default=None,
        help=f"HOST:PORT or unix:PATH (default ${ENV_HOST}, else {DEFAULT_ADDRESS})",
    )
    credential = parser.add_mutually_exclusive_group()
    credential.add_argument(
        "--token",
        default=None,
        help=f"bearer token: the admin token or a VM's (default ${ENV_TOKEN})",
    )
    credential.add_argument(
        "--token-file",
        default=None,
        metavar="PATH",
        help="read the token from this file (e.g. STATE_DIR/admin.token)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds a call may take, retries included ({DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _add(commands, "status", _status, "host memory and tag storage use", json_flag)

    vm = commands.add_parser("vm", help="create, list, show, destroy VMs").add_subparsers(
        dest="vm_command", metavar="ACTION", required=True
    )
    create = _add(vm, "create", _vm_create, "create a VM", json_flag)
    create.add_argument("vm_id", metavar="ID")
    create.add_argument(
        "--mte", action=argparse.BooleanOptionalAction, default=True, help="MTE guest (default)"
    )
    create.add_argument(
        "--policy",
        choices=[p.lower().replace("_", "-") for p in TAG_POLICIES],
        default="on-fault",
        help="tag policy (default on-fault)",
    )
    create.add_argument("--memory", type=_size, required=True, help="boot RAM, e.g. 2GiB")
    create.add_argument("--dimm-slots", type=_count32, default=0, help="DIMM slots")
    create.add_argument(
        "--max-memory", type=_size, default=0, help="boot RAM + device memory, e.g. 8GiB"
    )
    create.add_argument(
        "--pinned", action="store_true", help="memory pinned by a passthrough (VFIO) device"
    )
    create.add_argument(
        "--backing-page-size",
        type=_size,
        default=0,
        help="host page backing guest RAM: 2MiB THP, 1GiB hugetlb (4K hosts); default small",
    )
    _add(vm, "list", _vm_list, "list VMs", json_flag)
    for name, handler, help_text in (
        ("show", _vm_show, "show a VM and its memory devices"),
        ("destroy", _vm_destroy, "destroy a VM"),
    ):
        _add(vm, name, handler, help_text, json_flag).add_argument("vm_id", metavar="ID")

    fault = _add(commands, "fault", _fault, "handle a guest stage-2 fault", json_flag)
    fault.add_argument("vm_id", metavar="ID")
    fault.add_argument("gpa", metavar="GPA", type=_address)
    fault.add_argument("length", metavar="LENGTH", type=_size)
    fault.add_argument(
        "--access", choices=[a.lower() for a in ACCESSES], default="write", help="(write)"
    )

    discard = _add(
        commands,
        "discard",
        _discard,
        "discard guest memory the guest gave back (free page reporting, balloon)",
        json_flag,
    )
    discard.add_argument("vm_id", metavar="ID")
    discard.add_argument("gpa", metavar="GPA", type=_address)
    discard.add_argument("length", metavar="LENGTH", type=_size)

    tags = commands.add_parser("tags", help="write or read guest tags").add_subparsers(
        dest="tags_command", metavar="ACTION", required=True
    )
    write = _add(tags, "write", _tags_write, "write guest tags (one per byte)", json_flag)
    write.add_argument("vm_id", metavar="ID")
    write.add_argument("gpa", metavar="GPA", type=_address)
    source = write.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", help="raw tags, one per byte; covers 16x its size")
    source.add_argument("--fill", type=_tag, help="write this tag (0..15) over --length bytes")
    write.add_argument("--length", type=_size, help="bytes of guest memory for --fill")
    read = _add(tags, "read", _tags_read, "read guest tags", json_flag)
    read.add_argument("vm_id", metavar="ID")
    read.add_argument("gpa", metavar="GPA", type=_address)
    read.add_argument("length", metavar="LENGTH", type=_size)
    read.add_argument("--out", help="write the raw tags (one per byte) here")

    dimm = commands.add_parser("dimm", help="hot-add or remove DIMMs").add_subparsers(
        dest="dimm_command", metavar="ACTION", required=True
    )
    add = _add(dimm, "add", _dimm_add, "hot-add a DIMM", json_flag)
    add.add_argument("vm_id", metavar="ID")
    add.add_argument("device_id", metavar="DEV")
    add.add_argument("size", metavar="SIZE", type=_size)
    remove = _add(dimm, "remove", _device_remove, "hot-remove a DIMM", json_flag)
    remove.add_argument("vm_id", metavar="ID")
    remove.add_argument("device_id", metavar="DEV")

    vmem = commands.add_parser("virtio-mem", help="virtio-mem devices").add_subparsers(
        dest="virtio_mem_command", metavar="ACTION", required=True
    )
    add = _add(vmem, "add", _virtio_mem_add, "hot-add a virtio-mem device", json_flag)
    add.add_argument("vm_id", metavar="ID")
    add.add_argument("device_id", metavar="DEV")
    add.add_argument("--region-size", type=_size, required=True)
    add.add_argument("--block-size", type=_size, required=True)
    add.add_argument("--requested-size", type=_size, default=0)
    add.add_argument(
        "--prealloc", action="store_true", help="back blocks on PLUG, BUSY if the host cannot"
    )
    resize = _add(vmem, "resize", _virtio_mem_resize, "set requested_size", json_flag)
    resize.add_argument("vm_id", metavar="ID")
    resize.add_argument("device_id", metavar="DEV")
    resize.add_argument("size", metavar="SIZE", type=_size)
    remove = _add(vmem, "remove", _device_remove, "hot-remove a virtio-mem device", json_flag)
    remove.add_argument("vm_id", metavar="ID")
    remove.add_argument("device_id", metavar="DEV")
    for request, handler, help_text in (
        ("plug", _virtio_mem_answer, "guest PLUG request"),
        ("unplug", _virtio_mem_answer, "guest UNPLUG request"),
        ("state", _virtio_mem_state, "guest STATE request"),
    ):
        sub = _add(vmem, request, handler, help_text, json_flag)
        sub.set_defaults(request=request)
        sub.add_argument("vm_id", metavar="ID")
        sub.add_argument("device_id", metavar="DEV")
        sub.add_argument("addr", metavar="ADDR", type=_address)
        sub.add_argument("nb_blocks", metavar="NB_BLOCKS", type=_count)
    for name, handler, help_text in (
        ("unplug-all", _virtio_mem_answer, "guest UNPLUG_ALL request"),
        ("drive", _virtio_mem_drive, "plug/unplug like the Linux driver until requested_size"),
    ):
        sub = _add(vmem, name, handler, help_text, json_flag)
        sub.set_defaults(request=name)
        sub.add_argument("vm_id", metavar="ID")
        sub.add_argument("device_id", metavar="DEV")

    for module_name in (
        "vmm_shim.simulate",
        "vmm_shim.report",
        "vmm_shim.qemu",
        "vmm_shim.migrate",
    ):
        _add_optional_cli(commands, module_name)
    return parser


# -- main --------------------------------------------------------------------------------------

# Request fields hostd names in its errors -> the argument (dest) of the command that set them,
# where the two names differ.
_FIELD_DESTS = {
    "boot_memory_bytes": ("memory",),
    "max_memory_bytes": ("max_memory",),
    "tag_policy": ("policy",),
    "size_bytes": ("size",),
    "requested_size": ("requested_size", "size"),
}


def _as_typed(args: argparse.Namespace, error: TagStoreClientError) -> str:
    """The refusal's message with the field hostd names (``length=0x1900000000: ...``) shown
    as the argument the user typed (``LENGTH '100GiB': ...``), when it maps to one."""
    field = error.metadata.get("field", "")
    parser: argparse.ArgumentParser | None = getattr(args, "command_parser", None)
    if not field or parser is None or not error.message.startswith(f"{field}="):
        return error.message
    shown = error.metadata.get("value", "")
    prefix = f"{field}={shown}: "
    if shown and error.message.startswith(prefix):
        rest = error.message[len(prefix) :]
    else:
        rest = error.message.partition(": ")[2]
    for dest in _FIELD_DESTS.get(field, (field,)):
        action = next((a for a in parser._actions if a.dest == dest), None)
        value = getattr(args, dest, None)
        if action is None or value is None or not rest:
            continue
        typed = value.text if isinstance(value, Typed) else str(value)
        name = action.option_strings[0] if action.option_strings else str(action.metavar or dest)
        return f"{name} {quoted(typed)}: {rest}"
    return error.message


def _print_error(args: argparse.Namespace, code: str, reason: str, message: str) -> None:
    # The reason adds nothing when it only repeats the code (INVALID_ARGUMENT twice).
    head = f"{code} {reason}" if reason not in ("", code) else code
    print(one_line(f"error: {head}: {message}"), file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": code, "reason": reason, "message": message}}))


def _usage(message: str) -> int:
    print(one_line(f"vmm-shim: error: {message}"), file=sys.stderr)
    return EXIT_USAGE


def _resolve_host(args: argparse.Namespace) -> str:
    """--host, else $TAGSTORE_HOST (checked like --host), else the default address."""
    if args.host is not None:
        return str(args.host)
    from_env = os.environ.get(ENV_HOST, "")
    if not from_env:
        return DEFAULT_ADDRESS
    try:
        return check_host_address(from_env)
    except ValueError as e:
        raise _UsageError(f"{ENV_HOST}: {e}") from None


def _resolve_token(args: argparse.Namespace) -> tuple[str | None, str]:
    """The token and where it came from (--token, --token-file, $TAGSTORE_TOKEN) for messages;
    the token itself never appears in one."""
    if args.token is not None:
        if not args.token:
            raise _UsageError("argument --token: empty token")
        return args.token, "argument --token"
    if args.token_file is not None:
        try:
            with open(args.token_file, encoding="ascii", errors="replace") as f:
                token = f.read().strip()
        except OSError as e:
            reason = e.strerror or type(e).__name__
            raise _UsageError(
                f"argument --token-file {quoted(args.token_file)}: {reason}"
            ) from None
        if not token:
            raise _UsageError(f"argument --token-file {quoted(args.token_file)}: empty file")
        return token, f"the file {quoted(args.token_file)}"
    return os.environ.get(ENV_TOKEN) or None, ENV_TOKEN


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    handler: Handler | None = getattr(args, "handler", None)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    try:
        explicit_host = args.host
        # Commands other modules register read the resolved args.host and args.token.
        args.host = _resolve_host(args)
        token, token_source = _resolve_token(args)
        if handler is None:
            # A command registered by another module: set_defaults(func=...) -> exit code.
            if func is None:
                return _usage("no command given")
            args.token = token
            # `vmm-shim --host ADDR simulate ...`: simulate's own --host defaults to the global.
            if explicit_host is not None and getattr(args, "sim_host", "") is None:
                args.sim_host = args.host
            return int(func(args))
        try:
            client = HostClient(args.host, token=token, timeout_s=args.timeout)
        except ValueError:  # the token's form; the message must not repeat the token
            raise _UsageError(
                f"{token_source}: not a bearer token (printable ASCII without spaces)"
            ) from None
        with client as host:
            result, text = handler(args, host)
    except _UsageError as e:
        return _usage(str(e))
    except _NotAcked as e:
        print(json.dumps(_jsonable(e.result), indent=2) if args.json else e.text)
        print(one_line(f"error: {e}"), file=sys.stderr)
        return EXIT_VIRTIO_MEM[e.response]
    except Unauthenticated as e:
        hint = f" (vmm-shim reads {ENV_TOKEN}, --token or --token-file)"
        _print_error(args, e.code, e.reason, _as_typed(args, e) + hint)
        return EXIT_ERROR
    except TagStoreClientError as e:
        _print_error(args, e.code, e.reason, _as_typed(args, e))
        return EXIT_ERROR
    except OSError as e:  # --file / --out
        where = f"{quoted(str(e.filename))}: " if e.filename is not None else ""
        print(one_line(f"error: {where}{e.strerror or e}"), file=sys.stderr)
        if args.json:
            print(
                json.dumps(
                    {
                        "error": {
                            "code": "OS_ERROR",
                            "reason": type(e).__name__,
                            "message": f"{where}{e.strerror or e}",
                        }
                    }
                )
            )
        return EXIT_ERROR
    if args.json:
        print(json.dumps(_jsonable(result), indent=2))
    else:
        print(text)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vmm-shim ARGV``; returns the exit status (see the module docstring).

    Never raises: a closed stdout ends the command quietly, Ctrl-C with one line, and a bug
    with one line that says it is one (and the exception's name), not a traceback.
    """
    try:
        code = _run(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader (`head`) has what it wanted. Point stdout at /dev/null so that the
        # interpreter's final flush does not report the same broken pipe again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("vmm-shim: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug in vmm-shim: still one line, saying so
        print(
            one_line(
                f"vmm-shim: internal error (a bug, please report it): {type(e).__name__}: {e}"
            ),
            file=sys.stderr,
        )
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
