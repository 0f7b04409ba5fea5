"""``vmm-shim qemu attach|resize|status|detach``: the QEMU bridge on the command line.

Registered by :mod:`vmm_shim.cli` through :func:`add_cli`; the work is done by
:class:`vmm_shim.qemu_bridge.QemuBridge` (see docs/qemu.md). Exit codes as for every
``vmm-shim`` command: 0 done, 1 hostd or QEMU refused or failed (one ``error:`` line on stderr),
2 usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from vmm_shim.client import TAG_POLICIES, NotFound, TagStoreClientError, VmInfo
from vmm_shim.qemu_bridge import (
    DEFAULT_GRACE_S,
    DEFAULT_POLL_INTERVAL_S,
    QemuBridge,
    QemuBridgeError,
    QemuMachine,
    VirtioMemSync,
)
from vmm_shim.qemu_qmp import QmpConnectionError, QmpError, parse_qmp_address
from vmm_shim.units import format_size, parse_size

__all__ = ["add_cli"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
# How often `resize --wait` looks at QEMU while the guest driver works.
WAIT_POLL_S = 0.5


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seconds {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"invalid seconds {text!r}: must be >= 0")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"invalid seconds {text!r}: must be > 0")
    return value


def add_cli(subparsers: Any) -> None:
    """Register ``qemu`` and its actions on the ``vmm-shim`` command line."""
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    qemu = subparsers.add_parser(
        "qemu",
        help="bridge a running QEMU guest to hostd",
        description="Mirror a running QEMU guest (over QMP) into hostd. See docs/qemu.md.",
    )
    actions = qemu.add_subparsers(dest="qemu_command", metavar="ACTION", required=True)

    def action(name: str, help_text: str, *, qmp_required: bool) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = actions.add_parser(
            name, help=help_text, description=help_text, parents=[json_flag]
        )
        sub.add_argument("vm_id", metavar="VM", help="the VM's id in hostd")
        sub.add_argument(
            "--qmp",
            required=qmp_required,
            type=_qmp_address,
            metavar="ADDR",
            help="QEMU's QMP socket: unix:/path/qmp.sock or host:port",
        )
        sub.set_defaults(func=_run)
        return sub

    attach = action(
        "attach",
        "register the QEMU guest in hostd (or check its registration) and mirror it",
        qmp_required=True,
    )
    attach.add_argument(
        "--policy",
        choices=[p.lower().replace("_", "-") for p in TAG_POLICIES],
        default="eager",
        help="tag policy of an MTE guest (default eager: QMP shows no guest faults)",
    )
    attach.add_argument(
        "--max-memory",
        type=_size,
        default=0,
        help="hostd's max_memory_bytes (default: boot RAM + the devices' regions)",
    )
    attach.add_argument(
        "--follow",
        action="store_true",
        help="keep mirroring until QEMU is gone (then destroy the VM in hostd) or a signal",
    )
    attach.add_argument(
        "--poll-interval",
        type=_positive_seconds,
        default=DEFAULT_POLL_INTERVAL_S,
        help=f"--follow: seconds between query-memory-devices ({DEFAULT_POLL_INTERVAL_S:g})",
    )
    attach.add_argument(
        "--grace",
        type=_seconds,
        default=DEFAULT_GRACE_S,
        help=f"--follow: seconds QEMU may be gone before the VM is destroyed ({DEFAULT_GRACE_S:g})",
    )
    resize = action(
        "resize",
        "admit a new requested size in hostd, then set it in QEMU",
        qmp_required=True,
    )
    resize.add_argument("device_id", metavar="DEVICE", help="the virtio-mem device's QEMU id")
    resize.add_argument("size", metavar="SIZE", type=_size, help="new requested size, e.g. 512MiB")
    resize.add_argument(
        "--wait",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for the guest driver, then mirror into hostd",
    )
    action("status", "QEMU's view and hostd's side by side", qmp_required=False)
    action("detach", "destroy the VM in hostd (QEMU is left running)", qmp_required=False)


# -- output ------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [header, *rows]
    )


def _syncs_text(syncs: Sequence[VirtioMemSync]) -> str:
    if not syncs:
        return "no virtio-mem devices"
    header = ["DEVICE", "QEMU REQ", "QEMU PLUGGED", "HOSTD REQ", "HOSTD PLUGGED", "STATE"]
    rows = [
        [
            s.device_id,
            format_size(s.qemu_requested_size),
            format_size(s.qemu_plugged_size),
            format_size(s.hostd_requested_size),
            format_size(s.hostd_plugged_size),
            "in sync" if not s.problem else "DIFFERS",
        ]
        for s in syncs
    ]
    problems = [f"{s.device_id}: {s.problem}" for s in syncs if s.problem]
    return "\n".join([_table(header, rows), *problems])


def _qmp_address(text: str) -> str:
    """argparse type for ``--qmp``: checked before anything connects (a usage error)."""
    try:
        parse_qmp_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


class _NothingKnown(Exception):
    """Neither QEMU nor hostd knows the VM: there is no status to show."""


def _status(bridge: QemuBridge, qemu_error: str) -> tuple[dict[str, Any], str]:
    """Both sides, read now: never changes anything (no sync)."""
    machine: QemuMachine | None = None
    if bridge.qmp is None:
        qemu_error = qemu_error or "not asked (no --qmp)"
    else:
        try:
            machine = bridge.machine()
        except (QmpConnectionError, QmpError) as e:
            qemu_error = f"unreachable: {e}"
    vm: VmInfo | None
    try:
        vm = bridge.vm.info()
    except NotFound:
        vm = None
    if vm is None and machine is None:
        raise _NothingKnown(
            f"VM {bridge.vm_id!r} is not registered in hostd and QEMU was not reached "
            f"({qemu_error})"
        )
    tag_reserved = bridge.host.host_status().tag_reserved_bytes

    def onoff(flag: bool) -> str:
        return "on" if flag else "off"

    lines = [f"VM {bridge.vm_id}"]
    if machine is not None:
        lines.append(
            f"  QEMU : MTE {onoff(machine.mte_enabled)}, boot RAM "
            f"{format_size(machine.boot_memory_bytes)}"
            + (f", not mirrored: {', '.join(machine.unmirrored)}" if machine.unmirrored else "")
        )
    else:
        lines.append(f"  QEMU : {qemu_error}")
    if vm is not None:
        lines.append(
            f"  hostd: MTE {onoff(vm.mte_enabled)}"
            + (f" ({vm.tag_policy})" if vm.mte_enabled else "")
            + f", boot RAM {format_size(vm.boot_memory_bytes)}, mapped "
            f"{format_size(vm.mapped_bytes)}, tagged {format_size(vm.tagged_bytes)}; host tag "
            f"storage reserved {format_size(tag_reserved)}"
        )
    else:
        lines.append("  hostd: not registered (vmm-shim qemu attach)")

    qemu_devs = {d.device_id: d for d in machine.virtio_mem} if machine else {}
    hostd_devs = {d.device_id: d for d in vm.regions if d.kind == "VIRTIO_MEM"} if vm else {}
    rows = []
    for device_id in sorted(qemu_devs.keys() | hostd_devs.keys()):
        q, h = qemu_devs.get(device_id), hostd_devs.get(device_id)
        if q and h:
            same = (q.requested_size, q.plugged_size) == (h.requested_size, h.plugged_size)
            state = "in sync" if same else "DIFFERS"
        else:
            state = "QEMU only" if q else "hostd only"
        rows.append(
            [
                device_id,
                format_size(q.region_size) if q else "-",
                format_size(q.block_size) if q else "-",
                format_size(q.requested_size) if q else "-",
                format_size(q.plugged_size) if q else "-",
                format_size(h.requested_size) if h else "-",
                format_size(h.plugged_size) if h else "-",
                format_size(h.tagged_bytes) if h else "-",
                state,
            ]
        )
    if rows:
        header = [
            "DEVICE",
            "REGION",
            "BLOCK",
            "QEMU REQ",
            "QEMU PLUGGED",
            "HOSTD REQ",
            "HOSTD PLUGGED",
            "TAGGED",
            "STATE",
        ]
        lines.append(_table(header, rows))
    result = {
        "vm_id": bridge.vm_id,
        "qemu": dataclasses.asdict(machine) if machine else {"error": qemu_error},
        "hostd": dataclasses.asdict(vm) if vm else None,
        "host_tag_reserved_bytes": tag_reserved,
    }
    return result, "\n".join(lines)


# -- the actions -------------------------------------------------------------------------------


def _attach(args: argparse.Namespace, bridge: QemuBridge) -> tuple[Any, str]:
    policy = args.policy.upper().replace("-", "_")
    syncs = bridge.attach(tag_policy=policy, max_memory_bytes=args.max_memory)
    if not args.follow:
        return [dataclasses.asdict(s) for s in syncs], _syncs_text(syncs)
    print(_syncs_text(syncs), flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    outcome = bridge.follow(
        tag_policy=policy, poll_interval_s=args.poll_interval, grace_s=args.grace, stop=stop
    )
    text = {
        "qemu-gone": f"QEMU gone: VM {args.vm_id} destroyed in hostd",
        "stopped": f"stopped; VM {args.vm_id} stays registered (vmm-shim qemu detach removes it)",
    }[outcome]
    return {"outcome": outcome}, text


def _resize(args: argparse.Namespace, bridge: QemuBridge) -> tuple[Any, str]:
    admitted = bridge.resize(args.device_id, args.size)
    text = (
        f"{args.device_id}: requested size {format_size(admitted.requested_size)} "
        "admitted by hostd and set in QEMU"
    )
    if args.wait <= 0:
        return dataclasses.asdict(admitted), text
    deadline = time.monotonic() + args.wait
    while bridge.machine().device(args.device_id).plugged_size != args.size:
        if time.monotonic() >= deadline:
            text += f"\nthe guest did not reach it within {args.wait:g}s"
            break
        time.sleep(WAIT_POLL_S)
    syncs = bridge.sync()
    return [dataclasses.asdict(s) for s in syncs], text + "\n" + _syncs_text(syncs)


def _detach(args: argparse.Namespace, bridge: QemuBridge) -> tuple[Any, str]:
    bridge.detach()
    return {"vm_id": args.vm_id, "detached": True}, f"VM {args.vm_id} destroyed in hostd"


def _error(args: argparse.Namespace, code: str, reason: str, message: str) -> int:
    head = f"{code} {reason}" if reason else code
    print(f"error: {head}: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": code, "reason": reason, "message": message}}))
    return EXIT_ERROR


def _run(args: argparse.Namespace) -> int:
    """Run one ``vmm-shim qemu`` action; returns the exit code."""
    if getattr(args, "follow", False):
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    # Credentials and other HostClient options the top-level parser may offer pass through.
    host_options = {
        name: getattr(args, name) for name in ("token",) if getattr(args, name, None) is not None
    }

    def connect(qmp_address: str | None) -> QemuBridge:
        return QemuBridge.connect(
            args.vm_id,
            qmp_address=qmp_address,
            host_address=args.host,
            timeout_s=args.timeout,
            **host_options,
        )

    try:
        qemu_error = ""
        try:
            bridge = connect(args.qmp)
        except QmpConnectionError as e:
            if args.qemu_command != "status":
                raise
            qemu_error = f"unreachable: {e}"  # status still shows hostd's side
            bridge = connect(None)
        with bridge:
            if args.qemu_command == "status":
                result, text = _status(bridge, qemu_error)
            else:
                action = {"attach": _attach, "resize": _resize, "detach": _detach}
                result, text = action[args.qemu_command](args, bridge)
    except ValueError as e:  # a malformed --qmp address
        print(f"vmm-shim qemu: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TagStoreClientError as e:
        return _error(args, e.code, e.reason, e.message)
    except (QmpConnectionError, QmpError) as e:
        return _error(args, "QEMU", type(e).__name__, str(e))
    except QemuBridgeError as e:
        return _error(args, "BRIDGE", "", str(e))
    except _NothingKnown as e:
        return _error(args, "NOT_FOUND", "", str(e))
    try:
        print(json.dumps(result, indent=2) if getattr(args, "json", False) else text, flush=True)
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK
