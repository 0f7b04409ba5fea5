"""Long reads of the host on a copy-on-write image: fork under the lock, read in the child.

The invariant check, ``ExportState`` and snapshots read every page of the host: seconds on a
large host. Done under the host's lock they would stall every fault for that long. Instead the
daemon forks while holding the lock (a consistent cut; the fork costs about a millisecond per
GiB of resident memory, less with huge pages) and releases it at once; the child reads its
copy-on-write image at leisure and sends the result back through a pipe, while the parent goes
on serving. Pages the parent changes meanwhile are copied by the kernel, one at a time.

Rules for the child: it runs only the given function (plain Python + numpy over the model) and
leaves with ``os._exit``; it never touches gRPC, logging or any lock another thread may have
held at the fork; it dies with the daemon (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import signal
import struct
import threading
import traceback
from collections.abc import Callable, Generator, Iterable
from typing import TypeVar

T = TypeVar("T")

_LENGTH = struct.Struct("<Q")


class CopyFailedError(Exception):
    """The child reading the copy failed; the message carries its traceback."""


# Loaded in the parent: a child must not dlopen() (the loader's lock may have been held by
# another thread at the fork).
_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


# Children read at the lowest CPU priority: on a small host the daemon's calls come first. A
# nice level alone still gets a share of a busy CPU (CFS weights: nice 19 is 1.5% of nice 0
# per competing task); SCHED_IDLE runs only when nothing else wants the CPU.
CHILD_NICENESS = 19

# ...and still, a child that computes for long stretches without a system call delays the
# daemon's wake-ups: on this project's 2-core machine (`bench/bench_durability.py`, 64 GiB,
# checks back to back) fault p99 was 2.5-2.7x idle with the child at SCHED_IDLE alone, and
# 1.1x when the child gave up its CPU every 200 us (an interval timer whose handler calls
# sched_yield(2)); the checks finished as often either way.
CHILD_YIELD_SECONDS = 200e-6


def die_with_parent(keep_fd: int = -1) -> None:
    """In a forked child: drop every inherited file descriptor but ``keep_fd`` (the state
    directory's lock, listening sockets: a restarted daemon must not find them held), get
    SIGKILL when the daemon dies, and yield the CPU to the daemon's calls (at once when they
    want it, and every ``CHILD_YIELD_SECONDS`` in any case)."""
    if keep_fd > 3:
        os.closerange(3, keep_fd)
    os.closerange(max(3, keep_fd + 1), os.sysconf("SC_OPEN_MAX"))
    with contextlib.suppress(OSError, AttributeError):
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        os._exit(1)
    with contextlib.suppress(OSError):
        os.nice(CHILD_NICENESS)
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    with contextlib.suppress(OSError, ValueError):
        signal.signal(signal.SIGALRM, _yield_cpu)
        signal.setitimer(signal.ITIMER_REAL, CHILD_YIELD_SECONDS, CHILD_YIELD_SECONDS)


def _yield_cpu(signum: int, frame: object) -> None:
    os.sched_yield()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, size: int) -> bytes | None:
    parts = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


def stream_on_copy(
    lock: threading.Lock, produce: Callable[[], Iterable[bytes]]
) -> Generator[bytes, None, None]:
    """Yield what ``produce()`` yields, run in a child forked under ``lock``.

    The lock is held only for the fork. Raises :class:`CopyFailedError` if the child fails.
    """
    read_fd, write_fd = os.pipe()
    with lock:
        pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            die_with_parent(keep_fd=write_fd)
            for item in produce():
                _write_all(write_fd, _LENGTH.pack(len(item)) + item)
        except BaseException:
            with contextlib.suppress(OSError):
                error = traceback.format_exc().encode()
                _write_all(write_fd, _LENGTH.pack((1 << 63) | len(error)) + error)
            code = 1
        os._exit(code)
    os.close(write_fd)
    try:
        while (header := _read_exact(read_fd, _LENGTH.size)) is not None:
            (length,) = _LENGTH.unpack(header)
            data = _read_exact(read_fd, length & ~(1 << 63))
            if data is None:
                raise CopyFailedError("the copy's process ended in the middle of a message")
            if length >> 63:
                raise CopyFailedError(data.decode(errors="replace"))
            yield data
    finally:
        os.close(read_fd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # a consumer that stopped early: the child is not needed
        os.waitpid(pid, 0)


def call_on_copy(lock: threading.Lock, fn: Callable[[], T]) -> T:
    """``fn()`` run in a child forked under ``lock``, its result sent back pickled.

    Pickle is safe here: the bytes come from our own forked child, never from outside.
    """
    (data,) = list(stream_on_copy(lock, lambda: [pickle.dumps(fn())]))
    result: T = pickle.loads(data)
    return result
