"""Persistence of the host in a state directory: snapshots plus a chain of journals.

The model is deterministic (the same calls in the same order give the same state), so durable
state = the last snapshot + every mutating call made since, in order, with its outcome.

Layout of a state directory::

    LOCK                   flock()ed by the one daemon that owns the directory
    CURRENT                one sealed line: format, generation, boot id, sync mode, topology,
                           placement and the checksum of the snapshot's meta.json (the commit
                           point, replaced atomically)
    snapshot-<gen>/        meta.json (checksums of the files below), tables.json, arrays/*.npy
    journal-<gen>.jsonl    sealed lines: the calls made after snapshot <gen> was taken
    journal-<gen+1>.jsonl  ... and after snapshot <gen+1> was taken, while it is being written

A *sealed* line is ``<crc32 of the JSON, 8 hex digits> <JSON>\\n``. Generation 1 of a new
directory has no snapshot: it starts from the empty host.

Durability without fsync: only the *process* can die under running VMs; when the host reboots,
every VM dies with it. A journal record written with ``write(2)`` before the reply is in the
kernel's page cache and survives SIGKILL, so the default (``sync=none``) never fsyncs a record.
State written under another boot (``/proc/sys/kernel/random/boot_id``) is not trusted: the page
cache may have been lost with the power. It is discarded at start with one log line.
``sync=always`` fsyncs every record before the reply instead (concurrent calls share one fsync:
group commit), and its state is kept across reboots.

Write-ahead: the record of a call is written *before* the call runs, so a call whose record
cannot be written is refused (:class:`~hostd.model.errors.StateUnavailableError`) having changed
nothing. A call that then raises gets an ``abort`` record; replay runs every record and requires
the recorded outcome (refused calls change nothing, the model is deterministic). The last record
of the chain may lack its abort (the process died before writing it): it was never answered.

Snapshots are taken by a forked child on a copy-on-write image of the process (the lock is held
only for the fork), after ``snapshot_every`` records or ``snapshot_journal_bytes`` bytes. At the
fork, records start going to a new journal; when the child has written and fsync'd the snapshot,
``CURRENT`` is replaced, and only then are the older snapshot and journals deleted. Start-up
replays from the snapshot ``CURRENT`` names through every later journal, so a crash at any point
(or a directory fsync that failed after ``CURRENT`` was replaced) loses nothing.

Anything unexpected (a bad checksum, a bad line before the last, a missing or truncated file, a
missing ``CURRENT`` beside snapshots or journals, another format or topology) refuses the start
with one line naming the file and what to do: never start empty over state.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import enum
import fcntl
import json
import logging
import os
import shutil
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from hostd.api.requests import RememberedRequest, RequestWindow
from hostd.cow import die_with_parent
from hostd.logs import kv
from hostd.model import Host, HostState, topology_to_doc
from hostd.model.compaction import CompactionResult, EvacuationResult
from hostd.model.errors import StateUnavailableError
from hostd.model.migration import (
    DeviceManifest,
    MigrationManifest,
    MigrationOutcome,
    MigrationPhase,
    MigrationReport,
    MigrationRole,
    MigrationStatus,
    TagChunk,
)
from hostd.model.topology import HostTopology
from hostd.model.types import (
    Access,
    FaultResult,
    MemoryDeviceKind,
    MemoryDeviceStatus,
    Placement,
    TagCopyDirection,
    TagPolicy,
    VirtioMemAnswer,
    VirtioMemBlockState,
    VirtioMemConfig,
    VirtioMemRequestType,
    VirtioMemResponse,
    VmConfig,
    VmStatus,
)

logger = logging.getLogger("hostd.store")

FORMAT_VERSION = 2
DEFAULT_SNAPSHOT_EVERY = 10_000
# Replay runs at roughly 5,000-20,000 records a second: this bounds replay at start to seconds.
DEFAULT_SNAPSHOT_JOURNAL_BYTES = 16 << 20
# After a failed snapshot (disk full), wait this long before forking another.
SNAPSHOT_RETRY_SECONDS = 30.0
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
# Test hook: read the boot id from this file instead (to fake a reboot). Documented in
# docs/design.md; nothing else reads the environment.
BOOT_ID_FILE_ENV = "HOSTD_BOOT_ID_FILE"
_READ_CHUNK_BYTES = 16 << 20

# Model methods whose calls are journaled and replayed. Calls that only read through them
# (FROM_GUEST tag copies, virtio-mem STATE) are included: they advance the model's counters,
# and replay must reproduce the whole state.
JOURNALED_METHODS = frozenset(
    {
        "create_vm",
        "destroy_vm",
        "guest_fault",
        "add_dimm",
        "add_virtio_mem",
        "remove_memory_device",
        "resize_virtio_mem",
        "virtio_mem_request",
        "copy_tags",
        # Live migration (hostd.model.migration): every step changes the migration's state.
        "start_migration",
        "read_migration_chunk",
        "next_migration_round",
        "pause_migration",
        "handover_migration",
        "complete_migration",
        "admit_migration",
        "write_migration_chunk",
        "commit_migration",
        "abort_migration",
        "expire_migrations",
        # Host page migration (hostd.model.compaction).
        "compact_tag_region",
        "evacuate_host_range",
    }
)


class SyncMode(enum.Enum):
    """When journal records are fsync'd: never (the default), or before every reply."""

    NONE = "none"
    ALWAYS = "always"


# The value types of journaled call arguments and answers, by the name used in the journal.
_ENUMS: dict[str, type[enum.Enum]] = {
    cls.__name__: cls
    for cls in (
        TagPolicy,
        Access,
        TagCopyDirection,
        VirtioMemRequestType,
        VirtioMemResponse,
        VirtioMemBlockState,
        MemoryDeviceKind,
        MigrationRole,
        MigrationPhase,
        MigrationOutcome,
    )
}
_DATACLASSES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        VmConfig,
        VirtioMemConfig,
        VmStatus,
        MemoryDeviceStatus,
        FaultResult,
        VirtioMemAnswer,
        MigrationManifest,
        DeviceManifest,
        TagChunk,
        MigrationStatus,
        MigrationReport,
        CompactionResult,
        EvacuationResult,
    )
}


_PLAIN = frozenset({int, str, bool, float})
# Enum members are the common non-plain argument (every fault has an Access): encode once.
_ENCODED_ENUMS: dict[object, dict[str, str]] = {
    member: {"$enum": cls.__name__, "name": member.name}
    for cls in _ENUMS.values()
    for member in cls
}


class StateError(Exception):
    """The state directory cannot be used; the message names the file and what to do."""


# -- value codec (journal arguments, remembered answers)


def encode_value(value: object) -> Any:
    """A JSON value for a call argument or answer (see :func:`decode_value`)."""
    if value is None or type(value) in _PLAIN or isinstance(value, bool | int | float | str):
        return value
    encoded = _ENCODED_ENUMS.get(value)
    if encoded is not None:
        return encoded
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, tuple):
        return {"$tuple": [encode_value(v) for v in value]}
    if isinstance(value, enum.Enum) and type(value).__name__ in _ENUMS:
        return {"$enum": type(value).__name__, "name": value.name}
    if dataclasses.is_dataclass(value) and type(value).__name__ in _DATACLASSES:
        fields = {f.name: encode_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"$dataclass": type(value).__name__, "fields": fields}
    raise TypeError(f"cannot journal a value of type {type(value).__name__}: {value!r}")


def decode_value(value: Any) -> object:
    """The value that :func:`encode_value` encoded."""
    if not isinstance(value, dict):
        return value
    if "$bytes" in value:
        return base64.b64decode(value["$bytes"])
    if "$tuple" in value:
        return tuple(decode_value(v) for v in value["$tuple"])
    if "$enum" in value:
        return _ENUMS[value["$enum"]][value["name"]]
    if "$dataclass" in value:
        fields = {k: decode_value(v) for k, v in value["fields"].items()}
        return _DATACLASSES[value["$dataclass"]](**fields)
    raise ValueError(f"unknown journal value {value!r}")


# -- sealed lines


# One encoder for every record: json.dumps() with options builds a new one per call, which is
# a third of a journaled call's cost.
_encode_json = json.JSONEncoder(separators=(",", ":")).encode


def seal(obj: Any) -> bytes:
    """One line: the CRC-32 of the compact JSON of ``obj``, a space, the JSON, a newline."""
    data = _encode_json(obj).encode()
    return b"%08x %s\n" % (zlib.crc32(data), data)


def unseal(line: bytes) -> Any:
    """The object of a sealed line (without its newline); ValueError if it is not intact."""
    if len(line) < 10 or line[8:9] != b" ":
        raise ValueError("not a sealed record")
    data = line[9:]
    if int(line[:8], 16) != zlib.crc32(data):
        raise ValueError("checksum mismatch")
    return json.loads(data)


# -- topology identity


def _diff(saved: Any, wanted: Any, path: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(wanted, dict):
        out = []
        for key in sorted(set(saved) | set(wanted)):
            out += _diff(saved.get(key), wanted.get(key), f"{path}.{key}" if path else key)
        return out
    if isinstance(saved, list) and isinstance(wanted, list) and len(saved) == len(wanted):
        return [
            d
            for i, (s, w) in enumerate(zip(saved, wanted, strict=True))
            for d in _diff(s, w, f"{path}[{i}]")
        ]
    return [] if saved == wanted else [f"{path}: saved {saved!r}, requested {wanted!r}"]


# -- file helpers


def current_boot_id() -> str:
    """This boot's id (``$HOSTD_BOOT_ID_FILE`` names another file to read it from, for tests)."""
    path = os.environ.get(BOOT_ID_FILE_ENV) or BOOT_ID_PATH
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "unknown"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _snapshot_name(generation: int) -> str:
    return f"snapshot-{generation:08d}"


def _journal_name(generation: int) -> str:
    return f"journal-{generation:08d}.jsonl"


def _generation_of(name: str) -> int | None:
    for prefix, suffix in (("snapshot-", ""), ("journal-", ".jsonl")):
        if name.startswith(prefix) and name.endswith(suffix):
            number = name[len(prefix) : len(name) - len(suffix)]
            if number.isdigit():
                return int(number)
    return None


class _Crc32Writer:
    """A write-only file that keeps the CRC-32 and size of what went through it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.crc = 0
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        return self._f.write(data)


def _file_crc32(path: Path) -> tuple[int, int]:
    crc = size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return crc, size


def _write_sealed_file(path: Path, obj: Any) -> int:
    """Write ``obj`` sealed to ``path`` and fsync it; returns the line's CRC-32."""
    line = seal(obj)
    with open(path, "wb") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return zlib.crc32(line)


def _write_snapshot(
    state_dir: Path, generation: int, state: HostState, meta: dict[str, Any]
) -> int:
    """Write ``state`` as ``snapshot-<generation>`` (via a temp dir, fsync'd, renamed).

    Returns the CRC-32 of its meta.json, which ``CURRENT`` records. Arrays are streamed to the
    files in chunks (np.save of a non-file object), so no whole-array copy is made.
    """
    tmp = state_dir / f".{_snapshot_name(generation)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "arrays").mkdir(parents=True)
    files: dict[str, dict[str, Any]] = {}
    for i, (name, array) in enumerate(sorted(state.arrays.items())):
        file_name = f"{i:04d}.npy"
        with open(tmp / "arrays" / file_name, "wb") as f:
            writer = _Crc32Writer(f)
            _write_npy(writer, array)
            f.flush()
            os.fsync(f.fileno())
        files[name] = {"file": file_name, "crc32": writer.crc, "size": writer.size}
    tables = seal(state.tables)
    with open(tmp / "tables.json", "wb") as f:
        f.write(tables)
        f.flush()
        os.fsync(f.fileno())
    meta_crc = _write_sealed_file(
        tmp / "meta.json", {**meta, "generation": generation, "arrays": files}
    )
    _fsync_dir(tmp / "arrays")
    _fsync_dir(tmp)
    os.rename(tmp, state_dir / _snapshot_name(generation))
    _fsync_dir(state_dir)
    return meta_crc


def _write_npy(writer: _Crc32Writer, array: npt.NDArray[Any]) -> None:
    """``np.save`` of ``array`` in the ``.npy`` format, its data written a chunk at a time
    straight from the array's memory: np.save to a non-file object copies each chunk twice
    (a buffered iterator, then ``tobytes``), and a whole-array copy is out of the question."""
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)  # never one of the host's large arrays
    np.lib.format.write_array_header_1_0(writer, np.lib.format.header_data_from_array_1_0(array))
    data = array.reshape(-1).view(np.uint8).data
    for start in range(0, len(data), _READ_CHUNK_BYTES):
        writer.write(data[start : start + _READ_CHUNK_BYTES])


def _read_sealed_file(path: Path, what: str) -> Any:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise StateError(f"{path}: cannot read the {what} ({e.strerror}); {_WHAT_TO_DO}") from None
    if not data:
        raise StateError(f"{path}: the {what} is empty (truncated); {_WHAT_TO_DO}")
    if not data.endswith(b"\n") or data.count(b"\n") != 1:
        raise StateError(f"{path}: the {what} is truncated or altered; {_WHAT_TO_DO}")
    try:
        return unseal(data[:-1])
    except ValueError as e:
        raise StateError(f"{path}: the {what} is corrupt ({e}); {_WHAT_TO_DO}") from None


_WHAT_TO_DO = (
    "the saved state cannot be trusted: inspect it with `hostd state check DIR`, or set it aside "
    "with `hostd state reset DIR` to start empty"
)


def _read_snapshot(snapshot_dir: Path, meta_crc: int) -> tuple[HostState, list[Any]]:
    """The host state and request window saved in ``snapshot_dir``.

    The arrays are read lazily (:class:`_NpyFile`); their checksums are verified as they are
    read, by :func:`_restore`.
    """
    meta_path = snapshot_dir / "meta.json"
    if not snapshot_dir.is_dir():
        raise StateError(f"{snapshot_dir}: the snapshot CURRENT names is missing; {_WHAT_TO_DO}")
    meta = _read_sealed_file(meta_path, "snapshot description")
    try:
        if zlib.crc32(meta_path.read_bytes()) != meta_crc:
            raise StateError(
                f"{meta_path}: does not match the checksum CURRENT records; {_WHAT_TO_DO}"
            )
    except OSError as e:
        raise StateError(f"{meta_path}: {e.strerror}; {_WHAT_TO_DO}") from None
    arrays: dict[str, Any] = {}
    for name, entry in meta.get("arrays", {}).items():
        path = snapshot_dir / "arrays" / entry["file"]
        try:
            size = path.stat().st_size
            if size != entry["size"]:
                raise StateError(
                    f"{path}: array {name!r} is truncated or altered ({size} of {entry['size']} "
                    f"bytes); {_WHAT_TO_DO}"
                )
            # Read lazily: Host.restore copies it into the model's own arrays chunk by chunk.
            arrays[name] = _NpyFile(path, name, entry["crc32"])
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) else str(e)
            raise StateError(
                f"{path}: array {name!r} unreadable ({reason}); {_WHAT_TO_DO}"
            ) from None
    tables = _read_sealed_file(snapshot_dir / "tables.json", "snapshot tables")
    requests = tables.pop("requests", [])
    return HostState(arrays=arrays, tables=tables), requests


class _NpyFile:
    """A 1-D ``.npy`` file read on demand: ``f[a:b]`` reads those elements, ``np.asarray(f)``
    the whole array. Restoring a large host then needs no whole-array temporary (a memory
    mapping would count in the daemon's resident memory as it is read).

    The CRC-32 of the file is computed on the way when the file is read in order (as
    ``Host.restore`` does), so the start reads each file once; :meth:`verify` checks it.
    """

    def __init__(self, path: Path, name: str, crc32: int) -> None:
        self.path = path
        self.name = name
        self._expected_crc = crc32
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
            f.seek(0)
            self._crc = zlib.crc32(f.read(self.offset))
        if fortran and len(shape) > 1:
            raise ValueError("Fortran-ordered arrays are not written by hostd")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.size = int(np.prod(shape, dtype=np.int64))
        self._next = 0  # elements read in order so far (-1: read out of order)
        # One worker thread that checksums what was read while the next chunk is read
        # (zlib and file reads release the GIL): set by _restore.
        self.checksummer: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def _read(self, start: int, count: int) -> npt.NDArray[Any]:
        data = np.empty(count, self.dtype)
        self.read_into(start, data)
        return data

    def read_into(self, start: int, out: npt.NDArray[Any]) -> None:
        """Read elements ``start .. start + out.size`` straight into ``out`` (1-D, contiguous,
        of this dtype): the model's own array, so a restore needs no temporary at all."""
        if out.dtype != self.dtype or out.ndim != 1 or not out.flags.c_contiguous:
            raise ValueError(f"{self.path}: cannot read {self.dtype} elements into {out.dtype}")
        if start < 0 or start + out.size > self.size:
            raise ValueError(f"{self.path}: elements {start}..{start + out.size} of {self.size}")
        buffer = out.view(np.uint8).data
        done = 0
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset + start * self.dtype.itemsize)
            while done < len(buffer):
                n = f.readinto(buffer[done:])
                if not n:
                    raise ValueError(f"{self.path}: {done} of {len(buffer)} bytes (truncated)")
                done += n
        if start == self._next:
            self._next += out.size
            if self.checksummer is None:
                self._update_crc(buffer)
            else:
                self._pending = self.checksummer.submit(self._update_crc, buffer)
        else:
            self._next = -1

    def _update_crc(self, data: memoryview) -> None:
        self._crc = zlib.crc32(data, self._crc)

    def astype(self, dtype: Any) -> npt.NDArray[Any]:
        """The whole array as ``dtype`` (the small arrays of a migration in progress)."""
        return np.asarray(self).astype(dtype, copy=False)

    def __getitem__(self, key: slice) -> npt.NDArray[Any]:
        if len(self.shape) != 1:
            return np.asarray(self)[key]
        start, stop, step = key.indices(self.shape[0])
        if step != 1:
            return np.asarray(self)[key]
        return self._read(start, max(0, stop - start))

    def __array__(self, dtype: Any = None, copy: Any = None) -> npt.NDArray[Any]:
        data = self._read(0, self.size).reshape(self.shape)
        return data if dtype is None else data.astype(dtype, copy=False)

    def verify(self) -> None:
        """Raise StateError unless the file's checksum is the recorded one."""
        if self._pending is not None:
            self._pending.result()  # the worker checksums in order: this one was last
        crc = self._crc if self._next == self.size else _file_crc32(self.path)[0]
        if crc != self._expected_crc:
            raise StateError(
                f"{self.path}: array {self.name!r} is altered (checksum mismatch); {_WHAT_TO_DO}"
            )


def _restore(state: HostState, path: Path) -> Host:
    """The host of a snapshot, every array's checksum verified."""
    arrays: list[Any] = list(state.arrays.values())
    files: list[_NpyFile] = [a for a in arrays if isinstance(a, _NpyFile)]
    with ThreadPoolExecutor(1, thread_name_prefix="hostd-restore-crc") as checksummer:
        for f in files:
            f.checksummer = checksummer
        try:
            host = Host.restore(state)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            for f in files:
                f.verify()  # corruption is the likelier cause: say so if it is
            raise StateError(
                f"{path}: the snapshot does not fit this host ({e}); {_WHAT_TO_DO}"
            ) from None
        for f in files:
            f.verify()
    return host


def _lock_dir(path: Path) -> int:
    fd = os.open(path / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateError(f"{path} is in use by another hostd (it holds {path / 'LOCK'})") from None
    return fd


# -- the store


@dataclass
class Ticket:
    """A call whose record has been written ahead (see :meth:`Store.begin`)."""

    seq: int
    offset_before: int
    method: str
    args: tuple[object, ...]


@dataclass
class LoadReport:
    """What opening a state directory found."""

    generation: int
    snapshot: bool
    replayed: int
    vms: int
    discarded: str = ""
    restore_seconds: float = 0.0  # reading the snapshot, deriving the counts
    replay_seconds: float = 0.0


class Store:
    """Owns a state directory and keeps it in step with one :class:`Host`.

    Build it with :meth:`open`. ``begin``/``abort``/``commit`` implement the servicer's journal
    and run under the host's lock; :meth:`wait_durable` runs after the lock is released.
    """

    def __init__(
        self,
        state_dir: Path,
        host: Host,
        current: dict[str, Any],
        *,
        snapshot_every: int,
        snapshot_journal_bytes: int,
        sync: SyncMode,
        requests: RequestWindow,
        fork_snapshots: bool,
    ) -> None:
        self.state_dir = state_dir
        self.host = host
        self.requests = requests
        self.snapshot_every = snapshot_every
        self.snapshot_journal_bytes = snapshot_journal_bytes
        self.sync = sync
        self.fork_snapshots = fork_snapshots
        self.report = LoadReport(0, False, 0, 0)
        self._current = current  # what CURRENT says
        self.generation = int(current["generation"])  # the journal being appended to
        self._journal_fd = -1
        self._lock_fd = -1
        self._seq = 0  # records in the active journal
        self._good_offset = 0  # end of the last record that is kept
        self._failed: str | None = None
        self._written = 0  # bytes written in this process (group commit tokens)
        self._synced = 0
        self._sync_mutex = threading.Lock()
        self._child: int | None = None
        self._child_generation = 0
        self._retry_snapshot_at = 0.0
        self._reaper: threading.Thread | None = None
        self._closed = False

    # Opening

    @classmethod
    def open(
        cls,
        state_dir: str | Path,
        topology: HostTopology,
        placement: Placement = Placement.TAG_BLOCK_AWARE,
        *,
        snapshot_every: int = DEFAULT_SNAPSHOT_EVERY,
        snapshot_journal_bytes: int = DEFAULT_SNAPSHOT_JOURNAL_BYTES,
        sync: SyncMode = SyncMode.NONE,
        requests: RequestWindow | None = None,
        fork_snapshots: bool = True,
    ) -> Store:
        """Lock ``state_dir`` and load the host saved there (or start a new one).

        Raises :class:`StateError` when another daemon holds the directory, when the saved
        topology or placement differ from the requested ones, or when anything saved there is
        corrupt or cannot be replayed. Neither runs a full invariant check nor writes a
        snapshot: start-up costs the load and the replay of a short journal.
        """
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be >= 1, not {snapshot_every}")
        path = Path(state_dir)
        try:
            path.mkdir(parents=True, exist_ok=True)
            lock_fd = _lock_dir(path)
        except OSError as e:
            raise StateError(f"{path}: cannot use as a state directory ({e.strerror})") from None
        options = {
            "snapshot_every": snapshot_every,
            "snapshot_journal_bytes": snapshot_journal_bytes,
            "sync": sync,
            "requests": requests if requests is not None else RequestWindow(),
            "fork_snapshots": fork_snapshots,
        }
        try:
            store = cls._load(path, topology, placement, options)
        except BaseException:
            os.close(lock_fd)
            raise
        store._lock_fd = lock_fd
        return store

    @staticmethod
    def _identity(topology: HostTopology, placement: Placement) -> dict[str, Any]:
        return {"topology": topology_to_doc(topology), "placement": placement.name}

    @classmethod
    def _load(
        cls, path: Path, topology: HostTopology, placement: Placement, options: dict[str, Any]
    ) -> Store:
        identity = cls._identity(topology, placement)
        sync: SyncMode = options["sync"]
        boot_id = current_boot_id()
        current_path = path / "CURRENT"
        discarded = ""
        if current_path.exists():
            current = _read_current(current_path)
            if current["boot_id"] != boot_id and not current.get("synced"):
                discarded = (
                    f"state written under boot {current['boot_id']} (this is boot {boot_id}) "
                    "discarded: every VM it describes died with that boot"
                )
                logger.warning(kv("state_discarded", state_dir=path, reason=discarded))
                _remove_state_files(path)
        if not current_path.exists():
            _refuse_lost_commit_point(path)
            return cls._create(path, topology, placement, identity, boot_id, options, discarded)

        differences = _diff(
            {"topology": current.get("topology"), "placement": current.get("placement")},
            identity,
        )
        if differences:
            raise StateError(
                f"the state in {path} was saved for another host configuration ("
                + "; ".join(differences)
                + "): start hostd with the saved configuration, or choose another state "
                "directory (or `hostd state reset DIR` to discard it)"
            )
        generation = int(current["generation"])
        started = time.monotonic()
        if current.get("meta_crc32") is None:
            host = Host(topology, placement)
            saved_requests: list[Any] = []
        else:
            state, saved_requests = _read_snapshot(
                path / _snapshot_name(generation), current["meta_crc32"]
            )
            host = _restore(state, path)
        requests: RequestWindow = options["requests"]
        requests.load([_decode_request(r) for r in saved_requests])
        store = cls(path, host, current, **options)
        restored = time.monotonic()
        replayed, last = store._replay_chain(generation, repair=True)
        replay_seconds = time.monotonic() - restored
        store._clean_stale(generation, last)
        store._open_journal(last)
        if sync is SyncMode.ALWAYS and not current.get("synced"):
            for g in range(generation, last + 1):
                with open(path / _journal_name(g), "rb") as f:
                    os.fsync(f.fileno())
            store._write_current(dict(current, synced=True))
        elif sync is SyncMode.NONE and current.get("synced"):
            store._write_current(dict(current, synced=False))
        if current["boot_id"] != boot_id:
            store._write_current(dict(store._current, boot_id=boot_id))
        store.report = LoadReport(
            generation,
            current.get("meta_crc32") is not None,
            replayed,
            len(host.vms),
            discarded,
            round(restored - started, 3),
            round(replay_seconds, 3),
        )
        return store

    @classmethod
    def _create(
        cls,
        path: Path,
        topology: HostTopology,
        placement: Placement,
        identity: dict[str, Any],
        boot_id: str,
        options: dict[str, Any],
        discarded: str,
    ) -> Store:
        """A new directory: generation 1 has no snapshot (the empty host) and an empty journal."""
        current = {
            "format": FORMAT_VERSION,
            "generation": 1,
            "boot_id": boot_id,
            "synced": options["sync"] is SyncMode.ALWAYS,
            "meta_crc32": None,
            **identity,
        }
        store = cls(path, Host(topology, placement), current, **options)
        store._clean_stale(1, 1)
        fd = os.open(
            path / _journal_name(1), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644
        )
        os.close(fd)
        store._write_current(current)
        store._open_journal(1)
        store.report = LoadReport(1, False, 0, 0, discarded)
        return store

    def _replay_chain(self, generation: int, *, repair: bool) -> tuple[int, int]:
        """Replay journal-<generation> and every later one; returns (records, last generation).

        With ``repair``, a torn tail of the last journal is cut off and a last record whose
        call raises gets its abort record, so that appending can continue after it.
        """
        chain = []
        g = generation
        while (self.state_dir / _journal_name(g)).exists():
            chain.append(g)
            g += 1
        if not chain:
            raise StateError(
                f"{self.state_dir / _journal_name(generation)}: the journal of the current "
                f"generation is missing; {_WHAT_TO_DO}"
            )
        later = sorted(
            n
            for p in self.state_dir.iterdir()
            if p.name.startswith("journal-")
            and (n := _generation_of(p.name)) is not None
            and n > chain[-1]
        )
        if later:
            raise StateError(
                f"{self.state_dir / _journal_name(later[0])}: a journal after a missing one "
                f"({_journal_name(chain[-1] + 1)}); {_WHAT_TO_DO}"
            )
        total = 0
        for g in chain:
            total += self._replay(
                self.state_dir / _journal_name(g), last=g == chain[-1], repair=repair
            )
        return total, chain[-1]

    def _replay(self, journal: Path, *, last: bool, repair: bool) -> int:
        with open(journal, "rb") as f:
            return self._replay_lines(journal, f, last=last, repair=repair)

    def _replay_lines(self, journal: Path, f: BinaryIO, *, last: bool, repair: bool) -> int:
        # Line by line, not the whole file at once: a journal may grow to
        # snapshot_journal_bytes, and its bytes plus their split would be a temporary of
        # that size twice over.
        pending: tuple[int, dict[str, Any]] | None = None
        count = 0
        number = 0
        good = 0  # bytes of complete records
        torn = b""
        for raw in f:
            if not raw.endswith(b"\n"):
                torn = raw  # only the end of the file can lack its newline
                break
            number += 1
            good += len(raw)
            line = raw[:-1]
            try:
                entry = unseal(line)
                if entry["seq"] != number:
                    raise ValueError(f"record number {entry['seq']}, expected {number}")
                if "abort" not in entry and entry["method"] not in JOURNALED_METHODS:
                    raise ValueError(f"unknown method {entry['method']!r}")
            except (ValueError, KeyError, TypeError) as e:
                # Only the bytes after the last newline can be torn (a record is one write
                # ending in its newline), so a bad complete line is corruption.
                raise StateError(
                    f"{journal}:{number}: unreadable journal record ({e}); {_WHAT_TO_DO}"
                ) from None
            if "abort" in entry:
                if pending is None or entry["abort"] != pending[1]["seq"]:
                    raise StateError(
                        f"{journal}:{number}: abort of record {entry['abort']} which is not the "
                        f"record before it; {_WHAT_TO_DO}"
                    )
                self._apply(journal, *pending, expect_raise=True)
                pending = None
                continue
            if pending is not None:
                count += self._apply(journal, *pending, expect_raise=False)
            pending = (number, entry)
        if torn and not last:
            raise StateError(
                f"{journal}: ends in an incomplete record but is not the last journal; "
                f"{_WHAT_TO_DO}"
            )
        if pending is not None:
            if last:
                # Its answer was never sent if it raised: no abort was written before the end.
                ok = self._apply(journal, *pending, expect_raise=None)
                count += ok
                if not ok and repair:
                    self._append_repair(journal, good, pending[1]["seq"])
                    good = -1
            else:
                count += self._apply(journal, *pending, expect_raise=False)
        if torn:
            logger.warning(kv("journal_torn_tail_dropped", journal=journal, bytes=len(torn)))
            if repair and good >= 0:
                os.truncate(journal, good)
        self._seq = number + (1 if good == -1 else 0)
        return count

    def _append_repair(self, journal: Path, good: int, seq: int) -> None:
        os.truncate(journal, good)
        with open(journal, "ab") as f:
            f.write(seal({"seq": seq + 1, "abort": seq}))

    def _apply(
        self, journal: Path, number: int, entry: dict[str, Any], *, expect_raise: bool | None
    ) -> int:
        """Run one journaled call; 1 if it succeeded. Raises StateError if the outcome differs."""
        method = entry["method"]
        try:
            args = tuple(decode_value(a) for a in entry["args"])
        except (ValueError, KeyError, TypeError) as e:
            raise StateError(
                f"{journal}:{number}: unreadable arguments ({e}); {_WHAT_TO_DO}"
            ) from None
        try:
            result = getattr(self.host, method)(*args)
        except Exception as e:
            if expect_raise is False:
                raise StateError(
                    f"{journal}:{number}: {method} was refused on replay ({e}) but succeeded "
                    "when it was made: the saved state cannot be reproduced by this hostd "
                    "version"
                ) from None
            return 0
        if expect_raise:
            raise StateError(
                f"{journal}:{number}: {method} succeeded on replay but was refused when it was "
                "made: the saved state cannot be reproduced by this hostd version"
            )
        self.requests.remember(entry.get("id", ""), method, args, result)
        return 1

    def _clean_stale(self, first: int, last: int) -> None:
        """Delete snapshots, journals and temp files outside generations ``first..last``."""
        for entry in self.state_dir.iterdir():
            g = _generation_of(entry.name)
            if entry.name.startswith(".snapshot-") or entry.name == "CURRENT.tmp":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            elif g is None:
                continue
            elif entry.name.startswith("snapshot-") and g != first:
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.name.startswith("journal-") and not first <= g <= last:
                entry.unlink()

    def _open_journal(self, generation: int) -> None:
        path = self.state_dir / _journal_name(generation)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
        self._journal_fd = fd
        self.generation = generation
        self._good_offset = os.fstat(fd).st_size

    def _write_current(self, current: dict[str, Any]) -> bool:
        """Replace CURRENT (the commit point): temp file, fsync, rename, directory fsync.

        Returns False if the directory fsync after the rename failed. That is logged, not
        raised: the rename is visible to the next start either way (only a power cut could undo
        it), and records already go to the newest journal, which the replay reaches from either
        generation, as long as the caller then keeps the older files.
        """
        tmp = self.state_dir / "CURRENT.tmp"
        _write_sealed_file(tmp, current)
        os.replace(tmp, self.state_dir / "CURRENT")
        self._current = current
        try:
            _fsync_dir(self.state_dir)
        except OSError as e:
            logger.error(kv("state_dir_fsync_failed", state_dir=self.state_dir, error=e))
            return False
        return True

    # Journal (begin/abort/commit under the host lock)

    def begin(self, method: str, args: tuple[object, ...], request_id: str = "") -> Ticket | None:
        """Write the record of a call ahead of it; None if ``method`` is not journaled.

        Raises :class:`StateUnavailableError` if the record cannot be written: the call must
        not run then, and nothing has changed.
        """
        if method not in JOURNALED_METHODS:
            return None
        if method == "guest_fault" and not request_id and self._fault_changes_nothing(args):
            # The hot path (vCPUs racing on a mapped page) changes no state: recording it would
            # only add journal bytes and snapshots. Its count in the fault counters is lost on
            # a crash, like the latency histograms; a call with a request_id is recorded.
            return None
        entry: dict[str, Any] = {
            "seq": self._seq + 1,
            "method": method,
            "args": [encode_value(a) for a in args],
        }
        if request_id:
            entry["id"] = request_id
        ticket = Ticket(self._seq + 1, self._good_offset, method, args)
        self._append(seal(entry))
        return ticket

    def _fault_changes_nothing(self, args: tuple[object, ...]) -> bool:
        if len(args) != 4:
            return False
        vm_id, gpa, length_bytes, access = args
        return (
            isinstance(vm_id, str)
            and isinstance(gpa, int)
            and isinstance(length_bytes, int)
            and isinstance(access, Access)
            and self.host.fault_changes_nothing(vm_id, gpa, length_bytes, access)
        )

    def abort(self, ticket: Ticket) -> None:
        """The call of ``ticket`` raised: record that, so replay expects it to raise too."""
        try:
            self._append(seal({"seq": ticket.seq + 1, "abort": ticket.seq}))
        except StateUnavailableError:
            # Cut the call's record off on the next write instead: the call changed nothing.
            self._good_offset = ticket.offset_before
            self._seq = ticket.seq - 1

    def commit(self, ticket: Ticket) -> int:
        """The call of ``ticket`` succeeded. Returns the token for :meth:`wait_durable`."""
        self._maybe_snapshot()
        return self._written

    def _append(self, data: bytes) -> None:
        if self._closed:
            raise StateUnavailableError("the state store is closed (hostd is stopping)")
        if self._failed is not None:
            try:
                # A failed write may have left part of a record: cut back to the last kept one.
                os.ftruncate(self._journal_fd, self._good_offset)
            except OSError as e:
                raise self._unavailable(e) from None
        try:
            written = os.write(self._journal_fd, data)
        except OSError as e:
            self._fail(e)
            raise self._unavailable(e) from None
        if written != len(data):
            error = OSError(f"short write to the journal ({written} of {len(data)} bytes)")
            self._fail(error)
            raise self._unavailable(error)
        if self._failed is not None:
            logger.warning(kv("journal_writable_again", journal=self._journal_path()))
            self._failed = None
        self._good_offset += written
        self._written += written
        self._seq += 1

    def _fail(self, error: OSError) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(self._journal_fd, self._good_offset)
        if self._failed is None:
            logger.error(kv("journal_write_failed", journal=self._journal_path(), error=error))
        self._failed = str(error)

    def _unavailable(self, error: OSError) -> StateUnavailableError:
        return StateUnavailableError(
            f"the state journal cannot be written ({error}): the call was not made; "
            "mutations are refused until the state directory is writable again",
            reason="STATE_UNWRITABLE",
            journal=str(self._journal_path()),
        )

    def _journal_path(self) -> Path:
        return self.state_dir / _journal_name(self.generation)

    @property
    def syncs(self) -> bool:
        """Whether :meth:`wait_durable` may block (``--sync always``)."""
        return self.sync is SyncMode.ALWAYS

    def wait_durable(self, token: int) -> None:
        """With ``sync=always``, return once everything up to ``token`` is fsync'd (group
        commit: one fsync covers every record written before it started). Call it without
        the host lock."""
        if self.sync is SyncMode.NONE or token <= self._synced:
            return
        with self._sync_mutex:
            if token <= self._synced:
                return
            target = self._written
            try:
                os.fsync(self._journal_fd)
            except OSError as e:
                # The record is written (it survives the process) but maybe not a power cut.
                self._fail(e)
                return
            self._synced = target

    # Snapshots

    def _maybe_snapshot(self) -> None:
        if self._seq < self.snapshot_every and self._good_offset < self.snapshot_journal_bytes:
            return
        if self._child is not None or self._failed is not None:
            return
        if time.monotonic() < self._retry_snapshot_at:
            return
        if self.fork_snapshots:
            self._fork_snapshot()
        else:
            self.snapshot()

    def _start_generation(self) -> int:
        """Create the next journal and switch appends to it; returns its generation."""
        new = self.generation + 1
        path = self.state_dir / _journal_name(new)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC)
        try:
            if self.sync is SyncMode.ALWAYS:
                _fsync_dir(self.state_dir)
        except OSError:
            os.close(fd)
            raise
        with self._sync_mutex:
            if self.sync is SyncMode.ALWAYS:
                os.fsync(self._journal_fd)
                self._synced = self._written
            os.close(self._journal_fd)
            self._journal_fd = fd
        self.generation = new
        self._seq = 0
        self._good_offset = 0
        return new

    def _fork_snapshot(self) -> None:
        """Fork a child that writes the host as it is now; appends go to a new journal."""
        try:
            new = self._start_generation()
        except OSError as e:
            self._snapshot_failed(f"cannot create the next journal: {e}")
            return
        meta = self._snapshot_meta()
        pid = os.fork()
        if pid == 0:  # the child: no locks, no logging, no gRPC; write and exit
            code = 0
            try:
                die_with_parent()
                # Read the host here, not under the parent's lock: this image stays as it was.
                state = self.host.save_state()
                state.tables["requests"] = [_encode_request(r) for r in self.requests.entries()]
                crc = _write_snapshot(self.state_dir, new, state, meta)
                _child_result_path(self.state_dir, new).write_text(f"{crc}\n")
            except BaseException as e:  # reported through the exit code
                with contextlib.suppress(OSError):
                    os.write(2, f"hostd snapshot child: {e!r}\n".encode())
                code = 1
            os._exit(code)
        self._child = pid
        self._child_generation = new
        self._reaper = threading.Thread(
            target=self._reap, args=(pid, new), name="hostd-snapshot-reaper", daemon=True
        )
        self._reaper.start()

    def _snapshot_meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            **{k: self._current[k] for k in ("topology", "placement")},
        }

    def _reap(self, pid: int, generation: int) -> None:
        _, status = os.waitpid(pid, 0)
        result = _child_result_path(self.state_dir, generation)
        try:
            if os.waitstatus_to_exitcode(status) != 0:
                raise OSError(
                    f"the snapshot process exited with {os.waitstatus_to_exitcode(status)}"
                )
            crc = int(result.read_text())
            result.unlink()
            self._commit_snapshot(generation, crc)
        except (OSError, ValueError) as e:
            with contextlib.suppress(OSError):
                result.unlink()
            shutil.rmtree(self.state_dir / f".{_snapshot_name(generation)}.tmp", ignore_errors=True)
            shutil.rmtree(self.state_dir / _snapshot_name(generation), ignore_errors=True)
            self._snapshot_failed(str(e))
        finally:
            self._child = None

    def _commit_snapshot(self, generation: int, meta_crc: int) -> None:
        """Point CURRENT at snapshot ``generation``; then delete what it makes obsolete."""
        old = int(self._current["generation"])
        if not self._write_current(dict(self._current, generation=generation, meta_crc32=meta_crc)):
            return  # keep the old files: a power cut could bring the old CURRENT back
        for g in range(old, generation):
            shutil.rmtree(self.state_dir / _snapshot_name(g), ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / _journal_name(g)).unlink()
        logger.info(kv("snapshot_written", generation=generation))

    def _snapshot_failed(self, error: str) -> None:
        self._retry_snapshot_at = time.monotonic() + SNAPSHOT_RETRY_SECONDS
        logger.error(
            kv(
                "snapshot_failed",
                error=error,
                retry_in_s=SNAPSHOT_RETRY_SECONDS,
                journal=self._journal_path(),
            )
        )

    def snapshot(self) -> bool:
        """Write a snapshot now, in this process (host lock held, or no calls running).

        Returns whether it was written; a failure is logged and changes nothing that was
        acknowledged (the journal still holds every call).
        """
        self.wait_for_snapshot()
        try:
            new = self._start_generation()
        except OSError as e:
            self._snapshot_failed(f"cannot create the next journal: {e}")
            return False
        state = self.host.save_state()
        state.tables["requests"] = [_encode_request(r) for r in self.requests.entries()]
        try:
            crc = _write_snapshot(self.state_dir, new, state, self._snapshot_meta())
            self._commit_snapshot(new, crc)
        except OSError as e:
            shutil.rmtree(self.state_dir / f".{_snapshot_name(new)}.tmp", ignore_errors=True)
            self._snapshot_failed(str(e))
            return False
        return True

    def wait_for_snapshot(self) -> None:
        """Wait until a snapshot being written by a child process is done."""
        reaper = self._reaper
        if reaper is not None:
            reaper.join()

    def close(self, *, snapshot: bool = True) -> None:
        """Snapshot (on a graceful stop), close the journal and unlock the directory.

        Never raises for a failed snapshot: the journal holds every acknowledged call.
        """
        if self._closed:
            return
        self.wait_for_snapshot()
        if snapshot and self._failed is None:
            self.snapshot()
        self._closed = True
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
            self._journal_fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _child_result_path(state_dir: Path, generation: int) -> Path:
    return state_dir / f".snapshot-{generation:08d}.done"


def _encode_request(r: RememberedRequest) -> dict[str, Any]:
    return {
        "id": r.request_id,
        "method": r.method,
        "fingerprint": r.fingerprint,
        "kept": r.kept,
        "answer": encode_value(r.answer),
    }


def _decode_request(doc: dict[str, Any]) -> RememberedRequest:
    return RememberedRequest(
        doc["id"], doc["method"], doc["fingerprint"], decode_value(doc["answer"]), doc["kept"]
    )


def _refuse_lost_commit_point(path: Path) -> None:
    """With no ``CURRENT``: refuse a directory that still holds snapshots or journals (starting
    empty over them would lose acknowledged state)."""
    leftovers = sorted(p.name for p in path.iterdir() if _generation_of(p.name) is not None)
    if leftovers:
        raise StateError(
            f"{path / 'CURRENT'} is missing beside {', '.join(leftovers[:3])}: the commit "
            f"point is lost; {_WHAT_TO_DO}"
        )


def _read_current(path: Path) -> dict[str, Any]:
    current = _read_sealed_file(path, "commit point")
    if not isinstance(current, dict) or current.get("format") != FORMAT_VERSION:
        found = current.get("format") if isinstance(current, dict) else None
        raise StateError(
            f"{path}: state format {found!r}, this hostd reads format {FORMAT_VERSION}: use the "
            "hostd version that wrote it, or `hostd state reset DIR` to set it aside"
        )
    for key in ("generation", "boot_id", "topology", "placement"):
        if key not in current:
            raise StateError(f"{path}: no {key!r} in the commit point; {_WHAT_TO_DO}")
    return current


def _remove_state_files(path: Path) -> None:
    for entry in path.iterdir():
        if entry.name == "LOCK":
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# -- hostd state check / reset


def check_state_dir(path: Path) -> Iterator[str]:
    """Load the state in ``path`` without changing it; yields one line per finding.

    Raises :class:`StateError` (the same line ``hostd serve`` would refuse with) if it is
    unusable. Takes the directory's lock, so it refuses a directory a daemon is using.
    """
    if not path.is_dir():
        raise StateError(f"{path}: no such state directory")
    try:
        lock_fd = _lock_dir(path)
    except OSError as e:
        raise StateError(f"{path}: cannot lock ({e.strerror})") from None
    try:
        current_path = path / "CURRENT"
        if not current_path.exists():
            _refuse_lost_commit_point(path)
            yield f"{path}: empty (hostd serve starts a new host here)"
            return
        current = _read_current(current_path)
        from hostd.model.topology import parse_topology

        topology = parse_topology(current["topology"])
        placement = Placement[current["placement"]]
        generation = int(current["generation"])
        if current.get("meta_crc32") is None:
            host = Host(topology, placement)
        else:
            state, _ = _read_snapshot(path / _snapshot_name(generation), current["meta_crc32"])
            host = _restore(state, path)
        store = Store(
            path,
            host,
            current,
            snapshot_every=DEFAULT_SNAPSHOT_EVERY,
            snapshot_journal_bytes=DEFAULT_SNAPSHOT_JOURNAL_BYTES,
            sync=SyncMode.NONE,
            requests=RequestWindow(),
            fork_snapshots=False,
        )
        replayed, last = store._replay_chain(generation, repair=False)
        boot = current_boot_id()
        yield f"{path}: format {FORMAT_VERSION}, generation {generation} (journals up to {last})"
        yield (
            f"  host: {topology.total_bytes} bytes, page size {topology.page_size_bytes}, "
            f"placement {placement.name}"
        )
        yield f"  restored: {len(host.vms)} VM(s), {replayed} journal record(s) replayed"
        if current["boot_id"] != boot and not current.get("synced"):
            yield (
                f"  written under another boot ({current['boot_id']}): hostd serve will discard it"
            )
        violations = host.check_invariants()
        for v in violations:
            yield f"  invariant violated: {v}"
        if violations:
            raise StateError(f"{path}: the saved state violates {len(violations)} invariant(s)")
        yield "  ok"
    finally:
        os.close(lock_fd)


def reset_state_dir(path: Path, *, force: bool) -> str:
    """Discard the state in ``path``: move it aside to ``<path>.reset-<time>`` (or delete it
    with ``force``). Returns what was done. Refuses a directory a daemon is using."""
    if not path.is_dir():
        raise StateError(f"{path}: no such state directory")
    lock_fd = _lock_dir(path)
    try:
        names = [p for p in path.iterdir() if p.name != "LOCK"]
        if not names:
            return f"{path}: already empty"
        if force:
            _remove_state_files(path)
            return f"{path}: state deleted"
        aside = path.with_name(f"{path.name}.reset-{time.strftime('%Y%m%dT%H%M%S')}")
        aside.mkdir()
        for entry in names:
            os.rename(entry, aside / entry.name)
        return f"{path}: state moved aside to {aside}"
    finally:
        os.close(lock_fd)
