"""Shared fixtures, layered by lifecycle: ``hostd_process`` (a factory that starts the real
daemon as a subprocess) → ``daemon`` (one running daemon per module) → ``stub`` → ``vm``.

The daemon is always ``python -m hostd serve`` on a unix socket in a short temp dir (socket paths
are limited to 107 bytes, pytest's tmp_path can be longer), with a small host (``--memory 4GiB``),
its own fresh state directory there (durable, as deployed) and metrics off unless a test asks
for them. No daemon a test starts ever sees the user's default state directory: the environment
it gets points ``$XDG_STATE_HOME`` into a temp dir and has no ``$STATE_DIRECTORY``.

Credentials: every daemon of the session shares one admin token (``ADMIN_TOKEN``, written to
``<short_tmp>/admin.token`` before the first daemon starts and passed as ``--admin-token-file``;
``RUNTIME_DIRECTORY`` points there too, so daemons that tools under test start themselves find
it). Channels from :meth:`HostdProcess.channel` carry it; clients under test (vmm_shim) must send
it themselves; ``raw_channel`` makes a channel without it, for tests of refusals.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tagstore.v1 import tagstore_pb2 as pb
from tagstore.v1 import tagstore_pb2_grpc as pb_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
# Generous: it bounds how long a broken daemon can hang a test, it is not a performance claim.
STARTUP_TIMEOUT_S = 30.0
BOOT_RAM_GPA = 0x4000_0000
MiB = 1 << 20
GiB = 1 << 30
# The admin token of every daemon of the session (see the module docstring).
ADMIN_TOKEN = "tsa_" + secrets.token_urlsafe(32)
_insecure_channel = grpc.insecure_channel  # channels with no credential of their own


class TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds ``authorization: Bearer <token>`` to every call that does not carry one already."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: Any) -> Any:
        metadata = list(details.metadata or ())
        if not any(key == "authorization" for key, _ in metadata):
            metadata.append(("authorization", f"Bearer {self._token}"))
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def raw_channel(address: str) -> grpc.Channel:
    """A channel that sends no credential unless a call passes ``metadata=``."""
    return _insecure_channel(address)


def token_channel(address: str, token: str) -> grpc.Channel:
    """A channel whose calls carry ``token``."""
    return grpc.intercept_channel(_insecure_channel(address), TokenInterceptor(token))


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying ``token``."""
    return (("authorization", f"Bearer {token}"),)


@dataclass
class HostdProcess:
    """A running ``hostd serve`` subprocess."""

    proc: subprocess.Popen[bytes]
    address: str
    stderr_path: Path
    args: list[str] = field(default_factory=list)

    def stderr(self) -> str:
        """Everything the daemon logged so far."""
        return self.stderr_path.read_text(errors="replace")

    def channel(self) -> grpc.Channel:
        """A new channel to the daemon carrying the admin token (close it, or use it as a
        context manager)."""
        return token_channel(self.address, ADMIN_TOKEN)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the daemon process (by its pid)."""
        self.proc.send_signal(signum)

    def wait(self, timeout: float = STARTUP_TIMEOUT_S) -> int:
        """Wait for the daemon to exit; returns its exit code."""
        return self.proc.wait(timeout)


_XDG_STATE_HOME = tempfile.mkdtemp(prefix="hostd-xdg-", dir="/tmp")


def hostd_env(**extra: str) -> dict[str, str]:
    """The environment of a daemon a test starts: never the user's state directory."""
    env = {k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"}
    return {**env, "PYTHONUNBUFFERED": "1", "XDG_STATE_HOME": _XDG_STATE_HOME, **extra}


def run_hostd(
    *args: str, timeout: float = STARTUP_TIMEOUT_S, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m hostd ARGS`` to completion (for commands that exit on their own)."""
    return subprocess.run(
        [sys.executable, "-m", "hostd", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env or hostd_env(),
    )


def wait_serving(address: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Block until the daemon's health service answers SERVING (fail if the process dies)."""
    with raw_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise AssertionError(f"hostd did not start (exit code {proc.poll()})") from None
        stub = health_pb2_grpc.HealthStub(channel)
        answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="session")
def short_tmp() -> Iterator[Path]:
    """A short directory for unix sockets (and the session's admin token)."""
    path = Path(tempfile.mkdtemp(prefix="hostd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def admin_token_file(short_tmp: Path) -> Path:
    """``ADMIN_TOKEN`` in a file (mode 0600) that every daemon of the session is given."""
    path = short_tmp / "admin.token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(ADMIN_TOKEN + "\n")
    return path


@pytest.fixture(scope="session", autouse=True)
def _attach_admin_token(short_tmp: Path, admin_token_file: Path) -> Iterator[None]:
    """Daemons that code under test starts itself (the simulator's) find the session's admin
    token through ``RUNTIME_DIRECTORY``; ``TAGSTORE_TOKEN`` and ``TAGSTORE_DEST_TOKEN`` are set for
    clients that read them.
    Clients must send tokens themselves: nothing here adds them behind the code's back."""
    patch = pytest.MonkeyPatch()
    patch.setenv("RUNTIME_DIRECTORY", str(short_tmp))
    patch.setenv("TAGSTORE_TOKEN", ADMIN_TOKEN)
    patch.setenv("TAGSTORE_DEST_TOKEN", ADMIN_TOKEN)
    yield
    patch.undo()


@pytest.fixture(scope="session")
def hostd_process(short_tmp: Path, admin_token_file: Path) -> Iterator[Callable[..., HostdProcess]]:
    """Factory: ``hostd_process(*extra_args, wait=True, env=None)`` starts a daemon and returns
    it.

    Defaults: a fresh unix socket, a fresh ``--state-dir``, ``--memory 4GiB``, metrics off, the
    session's admin token. Pass ``--listen``, ``--state-dir`` (or ``--ephemeral``), ``--memory``
    or ``--admin-token-file`` in ``extra_args`` to override; ``env`` adds environment variables.
    Every daemon still running at the end of the session is killed (by its pid).
    """
    started: list[HostdProcess] = []
    counter = itertools.count()

    def start(
        *extra_args: str, wait: bool = True, env: dict[str, str] | None = None
    ) -> HostdProcess:
        n = next(counter)
        args = list(extra_args)
        if "--listen" not in args:
            args += ["--listen", f"unix:{short_tmp}/hostd-{n}.sock"]
        if "--state-dir" not in args and "--ephemeral" not in args:
            args += ["--state-dir", str(short_tmp / f"state-{n}")]
        if "--memory" not in args and "--config" not in args:
            args += ["--memory", "4GiB"]
        if "--metrics-listen" not in args:
            args += ["--metrics-listen", ""]
        if "--admin-token-file" not in args:
            args += ["--admin-token-file", str(admin_token_file)]
        address = args[args.index("--listen") + 1]
        stderr_path = short_tmp / f"hostd-{n}.log"
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "hostd", "serve", *args],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                env=hostd_env(**(env or {})),
            )
        daemon = HostdProcess(proc, address, stderr_path, args)
        started.append(daemon)
        if wait:
            try:
                wait_serving(address, proc, STARTUP_TIMEOUT_S)
            except Exception as e:
                raise AssertionError(f"{e}\n--- hostd stderr ---\n{daemon.stderr()}") from None
        return daemon

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait()


@pytest.fixture(scope="module")
def daemon(hostd_process: Callable[..., HostdProcess]) -> Iterator[HostdProcess]:
    """One daemon shared by a test module (tests use distinct VM ids)."""
    process = hostd_process()
    yield process
    if process.proc.poll() is None:
        process.signal(signal.SIGTERM)
        process.wait()


@pytest.fixture(scope="module")
def stub(daemon: HostdProcess) -> Iterator[pb_grpc.TagStorageStub]:
    """A TagStorage client of the module's daemon."""
    with daemon.channel() as channel:
        yield pb_grpc.TagStorageStub(channel)


_vm_ids = itertools.count()


@pytest.fixture
def vm_id(request: pytest.FixtureRequest) -> str:
    """A VM id unique in the session, derived from the test name."""
    name = request.node.name.removeprefix("test_").replace("[", "-").replace("]", "")
    return f"{name[:50]}-{next(_vm_ids)}".replace("_", "-")


@pytest.fixture
def vm(stub: pb_grpc.TagStorageStub, vm_id: str) -> pb.Vm:
    """An MTE VM (ON_FAULT) with 64 MiB of boot RAM, 2 DIMM slots and 1 GiB of device memory."""
    return stub.CreateVm(
        pb.CreateVmRequest(
            vm_id=vm_id,
            mte_enabled=True,
            tag_policy=pb.TAG_POLICY_ON_FAULT,
            boot_memory_bytes=64 * MiB,
            dimm_slots=2,
            max_memory_bytes=64 * MiB + GiB,
        )
    )


@pytest.fixture
def vm_with_virtio_mem(stub: pb_grpc.TagStorageStub, vm: pb.Vm) -> tuple[pb.Vm, pb.MemoryDevice]:
    """``vm`` plus a 256 MiB virtio-mem device (2 MiB blocks) with 16 MiB requested."""
    device = stub.AddMemoryDevice(
        pb.AddMemoryDeviceRequest(
            vm_id=vm.vm_id,
            device_id="vmem0",
            virtio_mem=pb.VirtioMemConfig(
                region_size=256 * MiB, block_size=2 * MiB, requested_size=16 * MiB
            ),
        )
    )
    return vm, device
