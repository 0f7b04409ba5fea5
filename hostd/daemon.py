"""The hostd command line: ``hostd serve`` runs the daemon, ``hostd check-config`` validates a
topology file, ``hostd state check|reset`` inspects or discards a state directory.

:func:`create_server` builds everything (host or state directory, servicer, health, reflection,
metrics) and binds the addresses without serving; :func:`serve` runs a built daemon until SIGTERM
or SIGINT. Tests use the two separately.

Shutdown: health turns NOT_SERVING, WatchEvents streams end, in-flight calls get ``--grace``
seconds to finish, then the state is snapshotted and the process exits 0.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hostd.api.requests import RequestWindow
from hostd.api.servicer import TagStorageServicer
from hostd.logs import configure_logging, kv
from hostd.metrics import MetricsHttpServer, TagStoreMetrics
from hostd.model import (
    ConfigError,
    Host,
    HostTopology,
    Placement,
    TagStorageMode,
    default_topology,
    load_topology,
    parse_size,
)
from hostd.model.topology import DEFAULT_MEMORY_BYTES
from hostd.store import (
    DEFAULT_SNAPSHOT_EVERY,
    DEFAULT_SNAPSHOT_JOURNAL_BYTES,
    StateError,
    Store,
    SyncMode,
    check_state_dir,
    reset_state_dir,
)
from tagstore.v1 import tagstore_pb2 as pb
from tagstore.v1 import tagstore_pb2_grpc as pb_grpc

logger = logging.getLogger("hostd.daemon")

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9464"
# The invariant check reads every page (in a forked child, hostd.cow: it does not hold the
# lock): often enough to catch a bug early, rarely enough to cost little CPU on a large host.
DEFAULT_INVARIANT_CHECK_INTERVAL_S = 60.0
DEFAULT_GRACE_SECONDS = 10.0
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TagStorage"].full_name
# WatchEvents streams each hold a worker thread for their lifetime; leave room for calls.
MAX_WORKERS = 32

_PLACEMENTS = {"tag-block-aware": Placement.TAG_BLOCK_AWARE, "naive": Placement.NAIVE}
_TAG_STORAGE_MODES = {"dynamic": TagStorageMode.DYNAMIC, "static": TagStorageMode.STATIC}


class ListenError(Exception):
    """An address cannot be served (in use, or not a valid address)."""


@dataclass
class Daemon:
    """A built, bound hostd. :meth:`start` serves; :meth:`stop` drains and saves."""

    server: grpc.Server
    servicer: TagStorageServicer
    health: health.HealthServicer
    address: str
    store: Store | None
    metrics: TagStoreMetrics
    metrics_server: MetricsHttpServer | None

    def start(self) -> None:
        """Start serving and report SERVING on the health service."""
        # Everything built so far (modules, descriptors, the model) lives as long as the
        # process: take it out of the cyclic collector's sight, so that collections triggered
        # by per-request garbage do not walk it again and again.
        gc.collect()
        gc.freeze()
        self.server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        state: dict[str, object] = {"state_dir": "none", "ephemeral": "true"}
        if self.store is not None:
            report = self.store.report
            state = {
                "state_dir": self.store.state_dir,
                "sync": self.store.sync.value,
                "restored_vms": report.vms,
                "replayed": report.replayed,
                "generation": report.generation,
            }
        logger.info(
            kv(
                "serving",
                address=self.address,
                metrics=self.metrics_server.url if self.metrics_server else "off",
                **state,
            )
        )

    def stop(self, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> None:
        """NOT_SERVING, end event streams, drain in-flight calls, then save and release state."""
        self.health.enter_graceful_shutdown()
        self.servicer.close()
        self.server.stop(grace_seconds).wait()
        # No call can be in flight now; the lock still guards against the metrics thread.
        with self.servicer.lock:
            if self.store is not None:
                self.store.close()
        self.metrics.close()
        logger.info(kv("stopped", address=self.address))


def create_server(
    topology: HostTopology,
    *,
    placement: Placement = Placement.TAG_BLOCK_AWARE,
    listen: str = DEFAULT_LISTEN,
    metrics_listen: str = DEFAULT_METRICS_LISTEN,
    state_dir: str | Path | None = None,
    snapshot_every: int = DEFAULT_SNAPSHOT_EVERY,
    snapshot_journal_bytes: int = DEFAULT_SNAPSHOT_JOURNAL_BYTES,
    sync: SyncMode = SyncMode.NONE,
    invariant_check_interval_s: float = DEFAULT_INVARIANT_CHECK_INTERVAL_S,
) -> Daemon:
    """Build a daemon for ``topology`` and bind ``listen`` (and ``metrics_listen`` unless "").

    With ``state_dir`` the host is loaded from (and saved to) that directory; without it the
    host lives only as long as the process. Raises :class:`~hostd.store.StateError` or
    :class:`ListenError` with a message fit for an operator; nothing is left bound or locked
    then.
    """
    lock = threading.Lock()
    store = None
    requests = RequestWindow()
    if state_dir is not None:
        store = Store.open(
            state_dir,
            topology,
            placement,
            snapshot_every=snapshot_every,
            snapshot_journal_bytes=snapshot_journal_bytes,
            sync=sync,
            requests=requests,
        )
        host = store.host
    else:
        host = Host(topology, placement)
    metrics = TagStoreMetrics(
        host, lock, invariant_check_interval_s=invariant_check_interval_s or None
    )
    try:
        return _bind(host, lock, store, requests, metrics, listen, metrics_listen)
    except BaseException:
        metrics.close()
        if store is not None:
            store.close(snapshot=False)
        raise


def _bind(
    host: Host,
    lock: threading.Lock,
    store: Store | None,
    requests: RequestWindow,
    metrics: TagStoreMetrics,
    listen: str,
    metrics_listen: str,
) -> Daemon:
    servicer = TagStorageServicer(host, lock, journal=store, requests=requests)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="hostd-rpc"),
        interceptors=[metrics.server_interceptor()],
        # Without this, a second daemon on the same TCP address would silently share the port.
        options=[("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_TagStorageServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    metrics.preregister_grpc_service(pb.DESCRIPTOR.services_by_name["TagStorage"])

    _refuse_live_unix_socket(listen)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as e:
        raise ListenError(f"cannot listen on {listen!r}: address in use or invalid ({e})") from None
    if port == 0:
        raise ListenError(f"cannot listen on {listen!r}: address in use or invalid")
    address = listen
    if not listen.startswith("unix:") and listen.rsplit(":", 1)[-1] == "0":
        address = f"{listen.rsplit(':', 1)[0]}:{port}"

    metrics_server = None
    if metrics_listen:
        try:
            metrics_server = metrics.start_http_server(metrics_listen)
        except (OSError, ValueError) as e:
            server.stop(None)
            raise ListenError(f"cannot serve metrics on {metrics_listen!r}: {e}") from None
    return Daemon(server, servicer, health_servicer, address, store, metrics, metrics_server)


def _refuse_live_unix_socket(listen: str) -> None:
    """gRPC unlinks an existing unix socket before binding, which would steal a live daemon's
    address: refuse when something still accepts connections there."""
    if not listen.startswith("unix:"):
        return
    path = listen.removeprefix("unix:").removeprefix("//")
    if not Path(path).exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return  # a stale socket file: gRPC replaces it
    finally:
        probe.close()
    raise ListenError(f"cannot listen on {listen!r}: another server is accepting connections there")


def serve(daemon: Daemon, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> int:
    """Run ``daemon`` until SIGTERM or SIGINT, then stop it gracefully. Returns the exit code."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info(kv("signal", signal=signal.Signals(signum).name))
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon.start()
    stop.wait()
    daemon.stop(grace_seconds)
    return 0


# -- command line -------------------------------------------------------------------------------


def _topology_from_args(args: argparse.Namespace) -> HostTopology:
    if args.config is not None:
        return load_topology(args.config)
    memory = DEFAULT_MEMORY_BYTES if args.memory is None else parse_size("memory", args.memory)
    page_size = 4096 if args.page_size is None else parse_size("page_size", args.page_size)
    mode = _TAG_STORAGE_MODES[args.tag_storage or "dynamic"]
    return default_topology(memory, page_size, tag_storage_mode=mode)


def default_state_dir() -> Path:
    """Where ``hostd serve`` keeps its state without ``--state-dir``: ``$STATE_DIRECTORY``
    (systemd's ``StateDirectory=``; its first entry), else ``$XDG_STATE_HOME/tagstore``, else
    ``~/.local/state/tagstore``."""
    systemd = os.environ.get("STATE_DIRECTORY", "")
    if systemd:
        return Path(systemd.split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME", "")
    if xdg:
        return Path(xdg) / "tagstore"
    return Path.home() / ".local" / "state" / "tagstore"


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        topology = _topology_from_args(args)
    except ConfigError as e:
        print(f"hostd: invalid configuration: {e}", file=sys.stderr)
        return 2
    state_dir = None if args.ephemeral else (args.state_dir or default_state_dir())
    try:
        daemon = create_server(
            topology,
            placement=_PLACEMENTS[args.placement],
            listen=args.listen,
            metrics_listen=args.metrics_listen,
            state_dir=state_dir,
            snapshot_every=args.snapshot_every,
            snapshot_journal_bytes=args.snapshot_journal_bytes,
            sync=SyncMode(args.sync),
            invariant_check_interval_s=args.invariant_check_interval,
        )
    except (StateError, ListenError) as e:
        logger.error(kv("startup_failed", error=str(e)))
        print(f"hostd: {e}", file=sys.stderr)
        return 1
    return serve(daemon, args.grace)


def _cmd_check_config(args: argparse.Namespace) -> int:
    try:
        topology = load_topology(args.file)
    except ConfigError as e:
        print(f"{args.file}: invalid: {e}", file=sys.stderr)
        return 2
    print(f"{args.file}: valid")
    print(f"  page_size: {topology.page_size_bytes} bytes")
    print(f"  mte_perm: {str(topology.mte_perm).lower()}")
    print(f"  tag_storage: {topology.tag_storage_mode.name.lower()}")
    for i, r in enumerate(topology.tag_regions):
        print(
            f"  tag_region[{i}]: memory {r.memory_base:#x}+{r.memory_size_bytes:#x}, "
            f"tags {r.tag_base:#x}+{r.tag_size_bytes:#x}, block_size {r.block_size_bytes:#x}"
        )
    for i, u in enumerate(topology.untagged_ranges):
        print(f"  untagged_range[{i}]: {u.base:#x}+{u.size_bytes:#x}")
    print(f"  total: {topology.total_bytes} bytes")
    return 0


def _cmd_state_check(args: argparse.Namespace) -> int:
    path = args.dir or default_state_dir()
    try:
        for line in check_state_dir(path):
            print(line, flush=True)
    except StateError as e:
        print(f"hostd: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader (`| head`) has what it wanted; say nothing more, not even at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _cmd_state_reset(args: argparse.Namespace) -> int:
    path = args.dir or default_state_dir()
    try:
        print(reset_state_dir(path, force=args.force))
    except (StateError, OSError) as e:
        print(f"hostd: {e}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``hostd`` argument parser."""
    parser = argparse.ArgumentParser(prog="hostd", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    commands = parser.add_subparsers(dest="command", required=True)

    s = commands.add_parser("serve", help="run the daemon")
    s.add_argument("--config", type=Path, help="host topology TOML (default: built-in host)")
    s.add_argument("--listen", default=DEFAULT_LISTEN, help="host:port or unix:/path")
    s.add_argument(
        "--metrics-listen", default=DEFAULT_METRICS_LISTEN, help='host:port; "" disables'
    )
    s.add_argument(
        "--state-dir",
        type=Path,
        help="keep state here (default: $STATE_DIRECTORY, else $XDG_STATE_HOME/tagstore, else "
        "~/.local/state/tagstore)",
    )
    s.add_argument(
        "--ephemeral", action="store_true", help="keep no state: it ends with the process"
    )
    s.add_argument(
        "--sync",
        choices=[m.value for m in SyncMode],
        default=SyncMode.NONE.value,
        help="fsync journal records before replying: 'always' survives power loss (and keeps "
        "state across reboots); 'none' (default) survives the process being killed",
    )
    s.add_argument("--memory", help="built-in host: RAM size, e.g. 64GiB (default 64GiB)")
    s.add_argument("--page-size", choices=["4K", "16K", "64K"], help="built-in host (default 4K)")
    s.add_argument("--tag-storage", choices=sorted(_TAG_STORAGE_MODES), help="built-in host")
    s.add_argument("--placement", choices=sorted(_PLACEMENTS), default="tag-block-aware")
    s.add_argument("--grace", type=float, default=DEFAULT_GRACE_SECONDS, help="drain seconds")
    s.add_argument(
        "--invariant-check-interval",
        type=float,
        default=DEFAULT_INVARIANT_CHECK_INTERVAL_S,
        metavar="SECONDS",
        help="check every invariant this often (0: only at start), in a forked child so that "
        "calls do not wait. It reads every page: ~0.5 s on the default host, ~10 s on 1 TiB",
    )
    s.add_argument(
        "--snapshot-every",
        type=int,
        default=DEFAULT_SNAPSHOT_EVERY,
        help="snapshot after this many journal records",
    )
    s.add_argument(
        "--snapshot-journal-bytes",
        type=int,
        default=DEFAULT_SNAPSHOT_JOURNAL_BYTES,
        metavar="BYTES",
        help="snapshot once the journal holds this many bytes",
    )
    s.set_defaults(func=_cmd_serve)

    st = commands.add_parser("state", help="inspect or discard a state directory")
    state_commands = st.add_subparsers(dest="state_command", required=True)
    sc = state_commands.add_parser(
        "check", help="verify a state directory as `serve` would load it, without serving"
    )
    sc.add_argument("dir", type=Path, nargs="?", help="default: the default state directory")
    sc.set_defaults(func=_cmd_state_check)
    sr = state_commands.add_parser(
        "reset", help="discard a state directory's state (moved aside unless --force)"
    )
    sr.add_argument("dir", type=Path, nargs="?", help="default: the default state directory")
    sr.add_argument("--force", action="store_true", help="delete instead of moving aside")
    sr.set_defaults(func=_cmd_state_reset)

    c = commands.add_parser("check-config", help="validate a topology TOML file")
    c.add_argument("file", type=Path)
    c.set_defaults(func=_cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hostd`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve" and args.config is not None:
        overrides = [f for f in ("memory", "page_size", "tag_storage") if getattr(args, f)]
        if overrides:
            parser.error(
                "--"
                + ", --".join(f.replace("_", "-") for f in overrides)
                + " only apply to the built-in host, not with --config"
            )
    if args.command == "serve" and args.snapshot_every < 1:
        parser.error("--snapshot-every must be at least 1")
    if args.command == "serve" and args.snapshot_journal_bytes < 1:
        parser.error("--snapshot-journal-bytes must be at least 1")
    if args.command == "serve" and args.ephemeral and args.state_dir is not None:
        parser.error("--ephemeral and --state-dir exclude each other")
    configure_logging(args.log_level)
    code: int = args.func(args)
    return code
