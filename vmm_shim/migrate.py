"""``vmm-shim migrate``, ``migration show|abort|complete``, ``compact`` and ``evacuate``: live
migration between two hostd daemons and host page migration, through :mod:`vmm_shim.client`.

``vmm-shim --host SRC migrate VM --to DST`` drives the whole protocol (see
:func:`vmm_shim.migration_client.migrate`) and, on a terminal, keeps one progress line on
stderr (phase, round, bytes sent). ``--json`` prints the result as one JSON document.

Credentials: the source's bearer token comes from ``TAGSTORE_TOKEN`` and the destination's from
``TAGSTORE_DEST_TOKEN``; ``--source-token`` / ``--dest-token`` (or a global ``--token``) override
them.

Exit codes as for every command: 0 done, 1 refused or failed, 2 usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from vmm_shim.client import HostClient, TagStoreClientError
from vmm_shim.migration_client import (
    DEFAULT_LEASE_S,
    DEFAULT_MIGRATION_TIMEOUT_S,
    MAX_ROUNDS,
    MigrationProgress,
    migrate,
)
from vmm_shim.units import format_size

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
SOURCE_TOKEN_ENV = "TAGSTORE_TOKEN"
DEST_TOKEN_ENV = "TAGSTORE_DEST_TOKEN"


def add_cli(subparsers: Any) -> None:
    """Register ``migrate``, ``migration``, ``compact`` and ``evacuate`` (called by
    ``vmm_shim.cli``)."""
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    p = subparsers.add_parser(
        "migrate",
        parents=[json_flag],
        help="live-migrate a VM from --host to --to",
        description="Live-migrate a VM, its memory devices and its tags from the --host daemon "
        "to the --to daemon (pre-copy rounds, then a short paused round).",
    )
    p.add_argument("vm_id", metavar="ID")
    p.add_argument("--to", required=True, metavar="ADDRESS", help="destination hostd")
    p.add_argument("--source-token", help=f"source bearer token (default ${SOURCE_TOKEN_ENV})")
    p.add_argument("--dest-token", help=f"destination bearer token (default ${DEST_TOKEN_ENV})")
    p.add_argument(
        "--lease",
        type=_seconds,
        default=DEFAULT_LEASE_S,
        help=f"destination lease in seconds, renewed by every step ({DEFAULT_LEASE_S:g})",
    )
    p.add_argument(
        "--migration-timeout",
        type=_seconds,
        default=DEFAULT_MIGRATION_TIMEOUT_S,
        help="the source resumes the VM after this many silent seconds "
        f"({DEFAULT_MIGRATION_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--max-rounds", type=_rounds, default=MAX_ROUNDS, help=f"pre-copy rounds ({MAX_ROUNDS})"
    )
    p.set_defaults(func=_migrate_main)

    # Resolving a migration by hand (e.g. a source left in HANDOVER when the destination could
    # not be asked whether it committed): show, then complete or abort.
    mig = subparsers.add_parser(
        "migration", help="show, abort or complete one migration step by hand"
    ).add_subparsers(dest="migration_command", metavar="ACTION", required=True)
    show = mig.add_parser("show", parents=[json_flag], help="the migration of a VM on --host")
    show.add_argument("vm_id", metavar="ID")
    show.set_defaults(func=_migration_step_main, step="show")
    for step, help_text in (
        ("abort", "undo the migration on --host (the source resumes the VM)"),
        ("complete", "source: the destination committed; release the VM here"),
    ):
        sub = mig.add_parser(step, parents=[json_flag], help=help_text)
        sub.add_argument("vm_id", metavar="ID")
        sub.add_argument("migration_id", metavar="MIGRATION_ID")
        sub.set_defaults(func=_migration_step_main, step=step)

    c = subparsers.add_parser(
        "compact",
        parents=[json_flag],
        help="compact a tag region so whole tag blocks become free",
    )
    c.add_argument("region", metavar="REGION", help="tag region name, e.g. tag0")
    c.set_defaults(func=_compact_main)

    e = subparsers.add_parser(
        "evacuate",
        parents=[json_flag],
        help="move every guest page off a host page range (before offlining it)",
    )
    e.add_argument("pfn_start", metavar="PFN", type=_int, help="first host page frame number")
    e.add_argument("nr_pages", metavar="NR_PAGES", type=_int, help="pages in the range")
    e.set_defaults(func=_evacuate_main)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seconds {text!r}") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"invalid seconds {text!r}: must be in (0, 86400]")
    return value


def _rounds(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid rounds {text!r}: at least 1")
    return value


def _int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: negative")
    return value


def _client(address: str, timeout_s: float, token: str | None) -> HostClient:
    """A client, with a bearer token when one is set."""
    return HostClient(address, timeout_s=timeout_s, token=token or None)


def _out(text: str) -> None:
    """Print to stdout; a reader that went away (``| head``) is not an error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Point stdout at /dev/null so that the interpreter's final flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _error(args: argparse.Namespace, code: str, reason: str, message: str) -> int:
    head = f"{code} {reason}" if reason else code
    print(f"error: {head}: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        _out(json.dumps({"error": {"code": code, "reason": reason, "message": message}}))
    return EXIT_ERROR


class _ProgressLine:
    """One self-rewriting line on a terminal (stderr); silent when stderr is not a terminal."""

    def __init__(self, vm_id: str, enabled: bool) -> None:
        self.vm_id = vm_id
        self.enabled = enabled
        self.width = 0

    def __call__(self, p: MigrationProgress) -> None:
        if not self.enabled:
            return
        line = (
            f"migrate {self.vm_id}: {p.phase:<9} round {p.round}  "
            f"{format_size(p.wire_bytes)} sent ({format_size(p.tag_bytes)} tags, "
            f"{p.chunks} chunks)"
        )
        print("\r" + line.ljust(self.width), end="", file=sys.stderr, flush=True)
        self.width = len(line)

    def done(self) -> None:
        if self.enabled and self.width:
            print(file=sys.stderr)


def _migrate_main(args: argparse.Namespace) -> int:
    src_token = (
        args.source_token or getattr(args, "token", None) or os.environ.get(SOURCE_TOKEN_ENV)
    )
    dst_token = args.dest_token or os.environ.get(DEST_TOKEN_ENV)
    as_json = getattr(args, "json", False)
    line = _ProgressLine(args.vm_id, sys.stderr.isatty() and not as_json)
    try:
        with (
            _client(args.host, args.timeout, src_token) as src,
            _client(args.to, args.timeout, dst_token) as dst,
        ):
            result = migrate(
                src,
                dst,
                args.vm_id,
                timeout_s=args.migration_timeout,
                lease_s=args.lease,
                max_rounds=args.max_rounds,
                progress=line,
            )
    except TagStoreClientError as e:
        line.done()
        return _error(args, e.code, e.reason, e.message)
    line.done()
    if as_json:
        _out(json.dumps(dataclasses.asdict(result), indent=2))
    else:
        _out(
            f"migrated {result.vm_id} to {args.to} in {result.rounds} round(s): "
            f"{format_size(result.mapped_bytes)} mapped, {format_size(result.tagged_bytes)} "
            f"tagged; {format_size(result.wire_bytes)} on the wire "
            f"({format_size(result.tag_bytes)} of packed tags)"
        )
    return EXIT_OK


def _compact_main(args: argparse.Namespace) -> int:
    try:
        with _client(args.host, args.timeout, getattr(args, "token", None)) as host:
            r = host.compact_tag_region(args.region)
    except TagStoreClientError as e:
        return _error(args, e.code, e.reason, e.message)
    if getattr(args, "json", False):
        _out(json.dumps(dataclasses.asdict(r), indent=2))
    else:
        _out(
            f"{r.region}: {r.tag_blocks_freed} tag block(s) freed, {r.tag_blocks_reserved} "
            f"reserved (at least {r.tag_blocks_min_needed} needed); {r.compacted_pages} tagged "
            f"page(s) packed, {r.evacuated_pages} lent page(s) moved out"
            + ("" if r.complete else f", {r.lent_pages_left} lent page(s) left: no room")
        )
    return EXIT_OK


def _evacuate_main(args: argparse.Namespace) -> int:
    try:
        with _client(args.host, args.timeout, getattr(args, "token", None)) as host:
            r = host.evacuate_host_range(args.pfn_start, args.nr_pages)
    except TagStoreClientError as e:
        return _error(args, e.code, e.reason, e.message)
    if getattr(args, "json", False):
        _out(json.dumps(dataclasses.asdict(r), indent=2))
    else:
        text = f"pfn {r.pfn_start:#x}+{r.nr_pages}: {r.moved_pages} guest page(s) moved"
        if not r.complete:
            text += f", {r.pages_left} left ({r.stopped_reason})"
        _out(text)
    return EXIT_OK


def _migration_step_main(args: argparse.Namespace) -> int:
    try:
        with _client(args.host, args.timeout, getattr(args, "token", None)) as host:
            if args.step == "show":
                result: Any = host.get_migration(args.vm_id)
            elif args.step == "abort":
                result = host.abort_migration(args.vm_id, args.migration_id)
            else:
                result = host.complete_migration(args.vm_id, args.migration_id)
    except TagStoreClientError as e:
        return _error(args, e.code, e.reason, e.message)
    if getattr(args, "json", False):
        _out(json.dumps(dataclasses.asdict(result), indent=2))
    elif args.step == "show":
        _out(
            f"{result.vm_id}: {result.role} migration {result.migration_id}, phase "
            f"{result.phase}, round {result.round}, {result.chunks} chunk(s), "
            f"{format_size(result.wire_bytes)} on the wire"
        )
    else:
        _out(f"{args.step}: {result.vm_id} ({args.migration_id})")
    return EXIT_OK
