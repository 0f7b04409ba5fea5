"""The hostd command line: ``hostd serve`` runs the daemon, ``hostd check-config`` validates a
topology file, ``hostd state check|reset`` inspects or discards a state directory.

:func:`create_server` builds everything (host or state directory, servicer, health, reflection,
metrics) and binds the addresses without serving; :func:`serve` runs a built daemon until SIGTERM
or SIGINT. Tests use the two separately.

The gRPC server is ``grpc.aio``, run by an event loop on its own thread (``hostd-grpc``), so
that an open stream holds a coroutine and not a thread; :class:`Daemon` keeps a synchronous face.

Who can connect (docs/SECURITY.md): ``--listen unix:PATH`` makes an owner-only socket
(``--socket-group`` opens it to one group, mode 0660); TCP is served without TLS only on
loopback, any other address needs ``--tls-cert``/``--tls-key`` (``--tls-client-ca``: mutual
TLS). Every call then needs a token (:mod:`hostd.api.auth`); the admin token is written at the
first start to ``--admin-token-file``, by default ``<state-dir>/admin.token``.

Shutdown: health turns NOT_SERVING, WatchEvents streams end, in-flight calls get ``--grace``
seconds to finish, then the state is snapshotted and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import grp
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AioHealthServicer
from grpc_reflection.v1alpha import reflection

from hostd.api.auth import ADMIN_TOKEN_FILE, VM_TOKENS_FILE, CredentialError, Credentials
from hostd.api.expiry import MigrationExpiry
from hostd.api.limits import (
    DEFAULT_EVENT_QUEUE_SIZE,
    DEFAULT_MAX_DEVICES_PER_VM,
    DEFAULT_MAX_STREAMS,
    DEFAULT_MAX_STREAMS_PER_CLIENT,
    DEFAULT_MAX_VMS,
    MAX_MESSAGE_BYTES,
    Limits,
)
from hostd.api.requests import RequestWindow
from hostd.api.servicer import TagStorageServicer, add_to_server
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

logger = logging.getLogger("hostd.daemon")

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9464"
# The invariant check reads every page (in a forked child, hostd.cow: it does not hold the
# lock): often enough to catch a bug early, rarely enough to cost little CPU on a large host.
DEFAULT_INVARIANT_CHECK_INTERVAL_S = 60.0
DEFAULT_GRACE_SECONDS = 10.0
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TagStorage"].full_name
T = TypeVar("T")

_PLACEMENTS = {"tag-block-aware": Placement.TAG_BLOCK_AWARE, "naive": Placement.NAIVE}
_TAG_STORAGE_MODES = {"dynamic": TagStorageMode.DYNAMIC, "static": TagStorageMode.STATIC}


class ListenError(Exception):
    """An address cannot be served (in use, not a valid address, or not safe to serve)."""


@dataclass(frozen=True)
class ListenConfig:
    """Where and how the gRPC server listens (``hostd serve --listen/--socket-group/--tls-*``)."""

    listen: str = DEFAULT_LISTEN
    socket_group: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None


class _EventLoopThread:
    """An asyncio event loop running on a thread of its own; the gRPC server lives there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="hostd-grpc")
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        """Stop the loop and its thread; idempotent."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()


@dataclass
class Daemon:
    """A built, bound hostd. :meth:`start` serves; :meth:`stop` drains and saves."""

    server: grpc.aio.Server
    servicer: TagStorageServicer
    health: AioHealthServicer
    address: str
    store: Store | None
    metrics: TagStoreMetrics
    metrics_server: MetricsHttpServer | None
    loop_thread: _EventLoopThread
    admin_token_path: Path
    expiry: MigrationExpiry | None = None

    def start(self) -> None:
        """Start serving and report SERVING on the health service."""
        # Everything built so far (modules, descriptors, the model) lives as long as the
        # process: take it out of the cyclic collector's sight, so that collections triggered
        # by per-request garbage do not walk it again and again.
        gc.collect()
        gc.freeze()
        self.loop_thread.run(self._start())
        # Leases and source deadlines end by themselves, also right after a restart.
        self.expiry = MigrationExpiry(self.servicer)
        self.expiry.start()
        state: dict[str, object] = {"state_dir": "none", "ephemeral": "true"}
        if self.store is not None:
            report = self.store.report
            state = {
                "state_dir": self.store.state_dir,
                "sync": self.store.sync.value,
                "restored_vms": report.vms,
                "replayed": report.replayed,
                "generation": report.generation,
                "restore_s": report.restore_seconds,
                "replay_s": report.replay_seconds,
            }
        logger.info(
            kv(
                "serving",
                address=self.address,
                metrics=self.metrics_server.url if self.metrics_server else "off",
                admin_token_file=self.admin_token_path,
                **state,
            )
        )

    async def _start(self) -> None:
        await self.server.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> None:
        """NOT_SERVING, end event streams, drain in-flight calls, then save and release state."""
        if self.expiry is not None:
            self.expiry.stop()
        self.loop_thread.run(self._stop(grace_seconds))
        self.servicer.shutdown()
        self.loop_thread.close()
        # No call can be in flight now; the lock still guards against the metrics thread.
        with self.servicer.lock:
            if self.store is not None:
                self.store.close()
        self.metrics.close()
        logger.info(kv("stopped", address=self.address))

    async def _stop(self, grace_seconds: float) -> None:
        await self.health.enter_graceful_shutdown()
        self.servicer.close()
        await self.server.stop(grace_seconds)


def create_server(
    topology: HostTopology,
    *,
    placement: Placement = Placement.TAG_BLOCK_AWARE,
    listen: str | ListenConfig = DEFAULT_LISTEN,
    metrics_listen: str = DEFAULT_METRICS_LISTEN,
    state_dir: str | Path | None = None,
    snapshot_every: int = DEFAULT_SNAPSHOT_EVERY,
    snapshot_journal_bytes: int = DEFAULT_SNAPSHOT_JOURNAL_BYTES,
    sync: SyncMode = SyncMode.NONE,
    invariant_check_interval_s: float = DEFAULT_INVARIANT_CHECK_INTERVAL_S,
    admin_token_file: str | Path | None = None,
    limits: Limits | None = None,
) -> Daemon:
    """Build a daemon for ``topology`` and bind ``listen`` (and ``metrics_listen`` unless "").

    With ``state_dir`` the host is loaded from (and saved to) that directory; without it the
    host lives only as long as the process. The admin token is read from (or made at)
    ``admin_token_file``, default :func:`default_admin_token_path`. Raises
    :class:`~hostd.store.StateError`, :class:`ListenError` or
    :class:`~hostd.api.auth.CredentialError` with a message fit for an operator; nothing is
    left bound or locked then.
    """
    config = listen if isinstance(listen, ListenConfig) else ListenConfig(listen)
    _check_listen_is_safe(config)
    lock = threading.Lock()
    store = None
    state_path = Path(state_dir) if state_dir is not None else None
    token_path = (
        Path(admin_token_file) if admin_token_file else default_admin_token_path(state_path)
    )
    requests = RequestWindow()
    if state_path is not None:
        store = Store.open(
            state_path,
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
    loop_thread = _EventLoopThread()
    try:
        credentials = Credentials.open(
            token_path, state_path / VM_TOKENS_FILE if state_path is not None else None
        )
        return loop_thread.run(
            _bind(
                host,
                lock,
                store,
                requests,
                metrics,
                config,
                metrics_listen,
                credentials,
                limits or Limits(),
            )
        )._built(loop_thread, token_path)
    except BaseException:
        loop_thread.close()
        metrics.close()
        if store is not None:
            store.close(snapshot=False)
        raise


def default_admin_token_path(state_dir: Path | None) -> Path:
    """Where the admin token lives unless ``--admin-token-file`` says: ``<state-dir>/admin.token``;
    without a state directory ``$RUNTIME_DIRECTORY`` (systemd's ``RuntimeDirectory=``), then
    ``$XDG_RUNTIME_DIR/tagstore``, then ``~/.local/state/tagstore``."""
    if state_dir is not None:
        return state_dir / ADMIN_TOKEN_FILE
    for variable, sub in (("RUNTIME_DIRECTORY", ""), ("XDG_RUNTIME_DIR", "tagstore")):
        base = os.environ.get(variable, "").split(":")[0]
        if base:
            return Path(base) / sub / ADMIN_TOKEN_FILE
    return Path.home() / ".local" / "state" / "tagstore" / ADMIN_TOKEN_FILE


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _check_listen_is_safe(config: ListenConfig) -> None:
    """Refuse plaintext TCP beyond loopback, and half a TLS configuration."""
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ListenError("--tls-cert and --tls-key go together: give both or neither")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise ListenError("--tls-client-ca needs --tls-cert and --tls-key")
    if config.listen.startswith("unix:"):
        return
    if config.socket_group is not None:
        raise ListenError("--socket-group applies to a unix: listen address only")
    host = config.listen.rsplit(":", 1)[0]
    if config.tls_cert is None and not _is_loopback(host):
        raise ListenError(
            f"refusing to serve {config.listen!r} without TLS: only loopback TCP may be "
            "plaintext; give --tls-cert and --tls-key (and --tls-client-ca for mutual TLS), "
            "or listen on unix:PATH or 127.0.0.1"
        )


def _server_credentials(config: ListenConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None or config.tls_key is None:
        return None

    def read(flag: str, path: Path) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ListenError(f"{flag} {path}: {e.strerror}") from None

    key = read("--tls-key", config.tls_key)
    cert = read("--tls-cert", config.tls_cert)
    ca = read("--tls-client-ca", config.tls_client_ca) if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _restrict_socket(path: str, group: str | None) -> None:
    """Owner-only, or owner and ``group`` (0660): who may connect to a unix socket is who may
    write to it."""
    if group is None:
        os.chmod(path, 0o600)
        return
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise ListenError(f"--socket-group {group!r}: no such group") from None
    try:
        os.chown(path, -1, gid)
    except OSError as e:
        raise ListenError(
            f"--socket-group {group!r}: cannot give the socket to it: {e.strerror}"
        ) from None
    os.chmod(path, 0o660)


@dataclass
class _Bound:
    """What :func:`_bind` builds on the event loop; :meth:`_built` makes the Daemon of it."""

    server: grpc.aio.Server
    servicer: TagStorageServicer
    health: AioHealthServicer
    address: str
    store: Store | None
    metrics: TagStoreMetrics
    metrics_server: MetricsHttpServer | None

    def _built(self, loop_thread: _EventLoopThread, admin_token_path: Path) -> Daemon:
        return Daemon(
            self.server,
            self.servicer,
            self.health,
            self.address,
            self.store,
            self.metrics,
            self.metrics_server,
            loop_thread,
            admin_token_path,
        )


async def _bind(
    host: Host,
    lock: threading.Lock,
    store: Store | None,
    requests: RequestWindow,
    metrics: TagStoreMetrics,
    config: ListenConfig,
    metrics_listen: str,
    credentials: Credentials,
    limits: Limits,
) -> _Bound:
    listen = config.listen
    servicer = TagStorageServicer(
        host, lock, credentials=credentials, journal=store, requests=requests, limits=limits
    )
    server = grpc.aio.server(
        interceptors=[metrics.aio_server_interceptor()],
        options=[
            # Without this, a second daemon on the same TCP address would silently share it.
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Per connection, unary calls included: room for every stream the limits allow
            # and for calls beside them, so that the limits answer RESOURCE_EXHAUSTED first.
            ("grpc.max_concurrent_streams", limits.max_streams + 100),
            ("grpc.max_metadata_size", 16 * 1024),
        ],
    )
    add_to_server(servicer, server)
    health_servicer = AioHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    metrics.preregister_grpc_service(pb.DESCRIPTOR.services_by_name["TagStorage"])

    _refuse_live_unix_socket(listen)
    server_credentials = _server_credentials(config)
    try:
        # A unix socket is made owner-only from the start (umask), then opened to its group.
        with _umask(0o177):
            if server_credentials is not None:
                port = server.add_secure_port(listen, server_credentials)
            else:
                port = server.add_insecure_port(listen)
    except RuntimeError as e:
        raise ListenError(f"cannot listen on {listen!r}: address in use or invalid ({e})") from None
    if port == 0:
        raise ListenError(f"cannot listen on {listen!r}: address in use or invalid")
    address = listen
    if listen.startswith("unix:"):
        try:
            _restrict_socket(_unix_path(listen), config.socket_group)
        except BaseException:
            await server.stop(None)
            raise
    elif listen.rsplit(":", 1)[-1] == "0":
        address = f"{listen.rsplit(':', 1)[0]}:{port}"

    metrics_server = None
    if metrics_listen:
        try:
            metrics_server = metrics.start_http_server(metrics_listen)
        except (OSError, ValueError) as e:
            await server.stop(None)
            raise ListenError(f"cannot serve metrics on {metrics_listen!r}: {e}") from None
    return _Bound(server, servicer, health_servicer, address, store, metrics, metrics_server)


def _unix_path(listen: str) -> str:
    return listen.removeprefix("unix:").removeprefix("//")


def _refuse_live_unix_socket(listen: str) -> None:
    """gRPC unlinks an existing unix socket before binding, which would steal a live daemon's
    address: refuse when something still accepts connections there."""
    if not listen.startswith("unix:"):
        return
    path = _unix_path(listen)
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
            listen=ListenConfig(
                args.listen, args.socket_group, args.tls_cert, args.tls_key, args.tls_client_ca
            ),
            metrics_listen=args.metrics_listen,
            state_dir=state_dir,
            snapshot_every=args.snapshot_every,
            snapshot_journal_bytes=args.snapshot_journal_bytes,
            sync=SyncMode(args.sync),
            invariant_check_interval_s=args.invariant_check_interval,
            admin_token_file=args.admin_token_file,
            limits=Limits(
                max_vms=args.max_vms,
                max_devices_per_vm=args.max_devices_per_vm,
                max_streams=args.max_streams,
                max_streams_per_client=args.max_streams_per_client,
                event_queue_size=args.max_queued_events,
            ),
        )
    except (StateError, ListenError, CredentialError) as e:
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
    s.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help="unix:/path (owner-only socket) or host:port (plaintext only on loopback)",
    )
    s.add_argument(
        "--socket-group", metavar="GROUP", help="unix socket: let GROUP connect (mode 0660)"
    )
    s.add_argument("--tls-cert", type=Path, metavar="PEM", help="TLS certificate chain")
    s.add_argument("--tls-key", type=Path, metavar="PEM", help="TLS private key")
    s.add_argument(
        "--tls-client-ca", type=Path, metavar="PEM", help="mutual TLS: CA of client certificates"
    )
    s.add_argument(
        "--admin-token-file",
        type=Path,
        metavar="PATH",
        help="admin token, made at first start (default: <state-dir>/admin.token, else "
        "$RUNTIME_DIRECTORY/admin.token, $XDG_RUNTIME_DIR/tagstore/admin.token, "
        "~/.local/state/tagstore/admin.token)",
    )
    s.add_argument(
        "--metrics-listen",
        default=DEFAULT_METRICS_LISTEN,
        help='host:port (default loopback); "" disables',
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
    for flag, default, what in (
        ("--max-vms", DEFAULT_MAX_VMS, "VMs on the host"),
        ("--max-devices-per-vm", DEFAULT_MAX_DEVICES_PER_VM, "memory devices in one VM"),
        ("--max-streams", DEFAULT_MAX_STREAMS, "open streams in all"),
        ("--max-streams-per-client", DEFAULT_MAX_STREAMS_PER_CLIENT, "open streams per token"),
        (
            "--max-queued-events",
            DEFAULT_EVENT_QUEUE_SIZE,
            "events queued per WatchEvents stream (the oldest are dropped, counted)",
        ),
    ):
        s.add_argument(flag, type=int, default=default, metavar="N", help=f"cap on {what}")
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
    if args.command == "serve":
        for flag in (
            "max_vms",
            "max_devices_per_vm",
            "max_streams",
            "max_streams_per_client",
            "max_queued_events",
        ):
            if getattr(args, flag) < 1:
                parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.command == "serve" and args.snapshot_journal_bytes < 1:
        parser.error("--snapshot-journal-bytes must be at least 1")
    if args.command == "serve" and args.ephemeral and args.state_dir is not None:
        parser.error("--ephemeral and --state-dir exclude each other")
    configure_logging(args.log_level)
    code: int = args.func(args)
    return code
