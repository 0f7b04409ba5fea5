"""``vmm-shim migrate``, ``migration show|abort|complete``, ``compact`` and ``evacuate``: live
migration between two hostd daemons and host page migration, through :mod:`vmm_shim.client`.

``vmm-shim --host SRC migrate VM --to DST`` drives the whole protocol (see
:func:`vmm_shim.migration_client.migrate`) and, on a terminal, keeps one progress line on
stderr (phase, round, bytes sent). ``--json`` prints the result as one JSON document.

Credentials: the source's bearer token is the global one (``--token``, ``--token-file``, else
``TAGSTORE_TOKEN``) unless ``--source-token`` is given; the destination's is ``--dest-token``,
else ``TAGSTORE_DEST_TOKEN``. A token that cannot be a bearer token is a usage error naming where
it came from, never repeating it.

Arguments are checked, and errors printed, by the helpers of :mod:`vmm_shim.cli` (one line on
stderr, a value the request cannot carry named by its argument). Exit codes as for every
command: 0 done, 1 refused or failed, 2 usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from vmm_shim.cli import (
    ENV_TOKEN,
    U32_MAX,
    _as_typed,
    _bounded_count,
    _count,
    _host_address,
    _print_error,
    _seconds,
    _usage,
)
from vmm_shim.client import HostClient, TagStoreClientError, Unauthenticated
from vmm_shim.migration_client import (
    DEFAULT_LEASE_S,
    DEFAULT_MIGRATION_TIMEOUT_S,
    MAX_ROUNDS,
    MigrationProgress,
    migrate,
)
from vmm_shim.units import format_size, one_line, quoted

EXIT_OK, EXIT_ERROR = 0, 1
SOURCE_TOKEN_ENV = ENV_TOKEN
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
        epilog="Example (a token in the environment stays out of `ps`): "
        'TAGSTORE_DEST_TOKEN="$(cat b/admin.token)" vmm-shim --host unix:/run/a.sock '
        "--token-file a/admin.token migrate vm1 --to unix:/run/b.sock",
    )
    p.add_argument("vm_id", metavar="ID", help="the VM on --host")
    p.add_argument(
        "--to",
        required=True,
        type=_host_address,
        metavar="ADDRESS",
        help="destination hostd: HOST:PORT or unix:PATH",
    )
    p.add_argument(
        "--source-token",
        metavar="TOKEN",
        help=f"source bearer token (default: the global --token, else ${SOURCE_TOKEN_ENV})",
    )
    p.add_argument(
        "--dest-token",
        metavar="TOKEN",
        help=f"destination bearer token (default ${DEST_TOKEN_ENV})",
    )
    p.add_argument(
        "--lease",
        type=_seconds,
        default=DEFAULT_LEASE_S,
        metavar="SECONDS",
        help=f"destination lease in seconds, renewed by every step ({DEFAULT_LEASE_S:g})",
    )
    p.add_argument(
        "--migration-timeout",
        type=_seconds,
        default=DEFAULT_MIGRATION_TIMEOUT_S,
        metavar="SECONDS",
        help="the source resumes the VM after this many silent seconds "
        f"({DEFAULT_MIGRATION_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--max-rounds",
        type=_rounds,
        default=MAX_ROUNDS,
        metavar="N",
        help=f"pre-copy rounds ({MAX_ROUNDS})",
    )
    # command_parser: what cli's _as_typed reads to name a refused field by its argument.
    p.set_defaults(func=_migrate_main, command_parser=p)

    # Resolving a migration by hand (e.g. a source left in HANDOVER when the destination could
    # not be asked whether it committed): show, then complete or abort.
    mig = subparsers.add_parser(
        "migration", help="show, abort or complete one migration step by hand"
    ).add_subparsers(dest="migration_command", metavar="ACTION", required=True)
    show = mig.add_parser("show", parents=[json_flag], help="the migration of a VM on --host")
    show.add_argument("vm_id", metavar="ID", help="the VM on --host")
    show.set_defaults(func=_migration_step_main, step="show", command_parser=show)
    for step, help_text in (
        ("abort", "undo the migration on --host (the source resumes the VM)"),
        ("complete", "source: the destination committed; release the VM here"),
    ):
        sub = mig.add_parser(step, parents=[json_flag], help=help_text)
        sub.add_argument("vm_id", metavar="ID", help="the VM on --host")
        sub.add_argument(
            "migration_id", metavar="MIGRATION_ID", help="as `migration show` prints it"
        )
        sub.set_defaults(func=_migration_step_main, step=step, command_parser=sub)

    c = subparsers.add_parser(
        "compact",
        parents=[json_flag],
        help="compact a tag region so whole tag blocks become free",
    )
    c.add_argument("region", metavar="REGION", help="tag region name, e.g. tag0")
    c.set_defaults(func=_compact_main, command_parser=c)

    e = subparsers.add_parser(
        "evacuate",
        parents=[json_flag],
        help="move every guest page off a host page range (before offlining it)",
    )
    e.add_argument("pfn_start", metavar="PFN", type=_count, help="first host page frame number")
    e.add_argument("nr_pages", metavar="NR_PAGES", type=_count, help="pages in the range")
    e.set_defaults(func=_evacuate_main, command_parser=e)


def _rounds(text: str) -> int:
    value = _bounded_count(text, "rounds", U32_MAX)
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid rounds {quoted(text)}: at least 1")
    return value


class _BadToken(Exception):
    """A token that cannot be a bearer token; the message says where it came from, never what
    it is."""


def _client(address: str, timeout_s: float, token: str | None, token_source: str) -> HostClient:
    """A client, with a bearer token when one is set."""
    try:
        return HostClient(address, timeout_s=timeout_s, token=token or None)
    except ValueError:  # the token's form (cli checked the address and the timeout)
        raise _BadToken(
            f"{token_source}: not a bearer token (printable ASCII without spaces)"
        ) from None


def _global_token_source(args: argparse.Namespace) -> str:
    """Where cli found ``args.token``: it resolves ``--token``, ``--token-file`` and
    ``$TAGSTORE_TOKEN`` (in that order; the first two exclusive) into it before the command."""
    if getattr(args, "token_file", None) is not None:
        return f"the file {quoted(args.token_file)}"
    if args.token is not None and args.token == os.environ.get(ENV_TOKEN):
        return ENV_TOKEN
    return "argument --token"


def _host_client(args: argparse.Namespace) -> HostClient:
    """The client of the --host daemon, with the global token."""
    return _client(args.host, args.timeout, args.token, _global_token_source(args))


def _option_token(args: argparse.Namespace, dest: str) -> str | None:
    """``--source-token`` / ``--dest-token`` if given (empty: a usage error, as for --token)."""
    value: str | None = getattr(args, dest)
    if value == "":
        raise _BadToken(f"argument --{dest.replace('_', '-')}: empty token")
    return value


def _failed(args: argparse.Namespace, e: TagStoreClientError, hint: str = "") -> int:
    """Print a refusal as every vmm-shim command does (one line; JSON too with --json)."""
    message = _as_typed(args, e)
    if isinstance(e, Unauthenticated) and hint:
        message += f" ({hint})"
    _print_error(args, e.code, e.reason, message)
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
            f"migrate {one_line(self.vm_id)}: {p.phase:<9} round {p.round}  "
            f"{format_size(p.wire_bytes)} sent ({format_size(p.tag_bytes)} tags, "
            f"{p.chunks} chunks)"
        )
        print("\r" + line.ljust(self.width), end="", file=sys.stderr, flush=True)
        self.width = len(line)

    def done(self) -> None:
        if self.enabled and self.width:
            print(file=sys.stderr)


def _migrate_main(args: argparse.Namespace) -> int:
    as_json = getattr(args, "json", False)
    try:
        src_token = _option_token(args, "source_token")
        dst_token = _option_token(args, "dest_token")
        if src_token is not None:
            src = _client(args.host, args.timeout, src_token, "argument --source-token")
        else:
            src = _host_client(args)
        try:
            if dst_token is not None:
                dst = _client(args.to, args.timeout, dst_token, "argument --dest-token")
            else:
                dst_token = os.environ.get(DEST_TOKEN_ENV)
                dst = _client(args.to, args.timeout, dst_token, DEST_TOKEN_ENV)
        except _BadToken:
            src.close()
            raise
    except _BadToken as e:
        return _usage(str(e))
    line = _ProgressLine(args.vm_id, sys.stderr.isatty() and not as_json)
    try:
        with src, dst:
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
        hint = (
            f"--host reads --source-token, --token or ${SOURCE_TOKEN_ENV}; "
            f"--to reads --dest-token or ${DEST_TOKEN_ENV}"
        )
        return _failed(args, e, hint)
    line.done()
    if as_json:
        print(json.dumps(dataclasses.asdict(result), indent=2))
    else:
        print(
            f"migrated {result.vm_id} to {args.to} in {result.rounds} round(s): "
            f"{format_size(result.mapped_bytes)} mapped, {format_size(result.tagged_bytes)} "
            f"tagged; {format_size(result.wire_bytes)} on the wire "
            f"({format_size(result.tag_bytes)} of packed tags)\n"
            f"vm_token: {result.vm_token}\n"
            f"(the VM's token on {args.to}: the VMM continues with it there; the source's "
            "token is revoked)"
        )
    return EXIT_OK


def _compact_main(args: argparse.Namespace) -> int:
    try:
        with _host_client(args) as host:
            r = host.compact_tag_region(args.region)
    except _BadToken as e:
        return _usage(str(e))
    except TagStoreClientError as e:
        return _failed(args, e)
    if getattr(args, "json", False):
        print(json.dumps(dataclasses.asdict(r), indent=2))
    else:
        print(
            f"{r.region}: {r.tag_blocks_freed} tag block(s) freed, {r.tag_blocks_reserved} "
            f"reserved (at least {r.tag_blocks_min_needed} needed); {r.compacted_pages} tagged "
            f"page(s) packed, {r.evacuated_pages} lent page(s) moved out"
            + ("" if r.complete else f", {r.lent_pages_left} lent page(s) left: no room")
        )
    return EXIT_OK


def _evacuate_main(args: argparse.Namespace) -> int:
    try:
        with _host_client(args) as host:
            r = host.evacuate_host_range(args.pfn_start, args.nr_pages)
    except _BadToken as e:
        return _usage(str(e))
    except TagStoreClientError as e:
        return _failed(args, e)
    if getattr(args, "json", False):
        print(json.dumps(dataclasses.asdict(r), indent=2))
    else:
        text = f"pfn {r.pfn_start:#x}+{r.nr_pages}: {r.moved_pages} guest page(s) moved"
        if not r.complete:
            text += f", {r.pages_left} left ({r.stopped_reason})"
        print(text)
    return EXIT_OK


def _migration_step_main(args: argparse.Namespace) -> int:
    try:
        with _host_client(args) as host:
            if args.step == "show":
                result: Any = host.get_migration(args.vm_id)
            elif args.step == "abort":
                result = host.abort_migration(args.vm_id, args.migration_id)
            else:
                result = host.complete_migration(args.vm_id, args.migration_id)
    except _BadToken as e:
        return _usage(str(e))
    except TagStoreClientError as e:
        return _failed(args, e)
    if getattr(args, "json", False):
        print(json.dumps(dataclasses.asdict(result), indent=2))
    elif args.step == "show":
        print(
            f"{result.vm_id}: {result.role} migration {result.migration_id}, phase "
            f"{result.phase}, round {result.round}, {result.chunks} chunk(s), "
            f"{format_size(result.wire_bytes)} on the wire"
        )
    else:
        print(f"{args.step}: {result.vm_id} ({one_line(args.migration_id)})")
    return EXIT_OK
