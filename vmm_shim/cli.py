"""``vmm-shim``: drive a hostd from the shell, through :mod:`vmm_shim.client` only.

Exit codes: 0 done (a virtio-mem NACK/BUSY/ERROR answer is an answer, printed, and still 0),
1 the daemon refused or failed the call (one line on stderr: ``error: CODE REASON: message``),
2 usage. ``--json`` prints one JSON document for every command (errors too, on stdout, with the
line on stderr kept). Sizes accept ``2MiB``, ``4GiB``, ``0x1000``.

``simulate`` and ``report`` come from :mod:`vmm_shim.simulate` and :mod:`vmm_shim.report` when
those modules exist and define ``add_cli(subparsers)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vmm_shim.client import (
    ACCESSES,
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT_S,
    TAG_POLICIES,
    DeviceInfo,
    HostClient,
    HostInfo,
    TagStoreClientError,
    VirtioMemRequestError,
    VmInfo,
)
from vmm_shim.units import format_size, parse_address, parse_size

__all__ = ["build_parser", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
# Tags printed per line by `tags read` (one hex digit per 16-byte granule).
TAGS_PER_LINE = 64

Handler = Callable[[argparse.Namespace, HostClient], Any]


# -- argument types ----------------------------------------------------------------------------


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _address(text: str) -> int:
    try:
        return parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("size", "address")) from None


def _count(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: negative")
    return value


def _tag(text: str) -> int:
    value = _count(text)
    if value > 15:
        raise argparse.ArgumentTypeError(f"invalid tag {text!r}: tags are 0..15")
    return value


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
    return info, _vm_text(info)


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
        tags = bytes([args.fill]) * (args.length // 16)
    host.vm(args.vm_id).copy_tags_to_guest(args.gpa, tags)
    length = len(tags) * 16
    result = {"vm_id": args.vm_id, "gpa": args.gpa, "length": length, "tags": len(tags)}
    return result, f"wrote {len(tags)} tag(s) for {format_size(length)} at {args.gpa:#x}"


def _tags_read(args: argparse.Namespace, host: HostClient) -> tuple[Any, str]:
    tags = host.vm(args.vm_id).copy_tags_from_guest(args.gpa, args.length)
    digits = "".join(f"{t:x}" for t in tags)
    if args.out is not None:
        Path(args.out).write_bytes(tags)
        result = {"vm_id": args.vm_id, "gpa": args.gpa, "length": args.length, "out": args.out}
        return result, f"read {len(tags)} tag(s) into {args.out}"
    result = {"vm_id": args.vm_id, "gpa": args.gpa, "length": args.length, "tags": digits}
    lines = [
        f"{args.gpa + i * 16:#014x}  {digits[i : i + TAGS_PER_LINE]}"
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


def _virtio_mem_answer(args: argparse.Namespace, host: HostClient) -> tuple[Any, str]:
    vm = host.vm(args.vm_id)
    if args.request == "plug":
        response = vm.virtio_mem_plug(args.device_id, args.addr, args.nb_blocks)
    elif args.request == "unplug":
        response = vm.virtio_mem_unplug(args.device_id, args.addr, args.nb_blocks)
    else:
        response = vm.virtio_mem_unplug_all(args.device_id)
    return {"response": response}, response


def _virtio_mem_state(args: argparse.Namespace, host: HostClient) -> tuple[Any, str]:
    state = host.vm(args.vm_id).virtio_mem_state(args.device_id, args.addr, args.nb_blocks)
    return {"response": "ACK", "state": state}, state


def _virtio_mem_drive(args: argparse.Namespace, host: HostClient) -> tuple[Any, str]:
    result = host.vm(args.vm_id).drive_virtio_mem(args.device_id)
    text = (
        f"plugged {format_size(result.plugged_size)} of {format_size(result.requested_size)} "
        f"requested: {result.requests} request(s), {result.acks} ACK, {result.nacks} NACK, "
        f"{result.busy} BUSY, {result.errors} ERROR"
    )
    return result, text


class _UsageError(Exception):
    """A combination of arguments argparse cannot check by itself."""


# -- parser ------------------------------------------------------------------------------------


def _add(
    subparsers: Any, name: str, handler: Handler, help_text: str, json_flag: argparse.ArgumentParser
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=help_text, description=help_text, parents=[json_flag]
    )
    parser.set_defaults(handler=handler)
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
    parser = argparse.ArgumentParser(
        prog="vmm-shim", description="Talk to hostd, the MTE tag storage daemon."
    )
    parser.add_argument(
        "--host", default=DEFAULT_ADDRESS, help=f"host:port or unix:/path ({DEFAULT_ADDRESS})"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"deadline of each call in seconds ({DEFAULT_TIMEOUT_S:g})",
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
    create.add_argument("--dimm-slots", type=_count, default=0, help="DIMM slots")
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

    for module_name in ("vmm_shim.simulate", "vmm_shim.report"):
        _add_optional_cli(commands, module_name)
    return parser


# -- main --------------------------------------------------------------------------------------


def _print_error(args: argparse.Namespace, code: str, reason: str, message: str) -> None:
    head = f"{code} {reason}" if reason else code
    print(f"error: {head}: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": code, "reason": reason, "message": message}}))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vmm-shim ARGV``; returns the exit code (0 ok, 1 refused/failed call, 2 usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    handler: Handler | None = getattr(args, "handler", None)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if args.timeout <= 0:
        parser.print_usage(sys.stderr)
        print("vmm-shim: error: --timeout must be positive", file=sys.stderr)
        return EXIT_USAGE
    try:
        if handler is None:
            # A command registered by simulate/report: set_defaults(func=...) -> exit code.
            if func is None:
                parser.print_usage(sys.stderr)
                return EXIT_USAGE
            return int(func(args))
        with HostClient(args.host, timeout_s=args.timeout) as host:
            result, text = handler(args, host)
    except _UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"vmm-shim: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TagStoreClientError as e:
        _print_error(args, e.code, e.reason, e.message)
        return EXIT_ERROR
    except VirtioMemRequestError as e:
        _print_error(args, "VIRTIO_MEM", e.response, str(e))
        return EXIT_ERROR
    except OSError as e:  # --file / --out
        _print_error(args, "OS_ERROR", type(e).__name__, str(e))
        return EXIT_ERROR
    if args.json:
        print(json.dumps(_jsonable(result), indent=2))
    else:
        print(text)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
