"""Persistence of the host for ``hostd serve --state-dir DIR``: a snapshot plus a journal.

The model is deterministic (the same calls in the same order give the same state), so durable
state = the last snapshot + every successful mutating call made since, in order.

Layout of ``DIR``::

    LOCK                   flock()ed by the one daemon that owns DIR
    CURRENT                "<generation>\\n": the commit point, replaced atomically
    snapshot-<gen>/        meta.json (format, topology, placement), tables.json, arrays/*.npy
    journal-<gen>.jsonl    one JSON line per call made after snapshot <gen>

Writing a snapshot: fill ``.snapshot-<gen+1>.tmp/``, fsync, rename it to ``snapshot-<gen+1>``,
create an empty ``journal-<gen+1>.jsonl``, then replace ``CURRENT``; only then are the old
snapshot and journal deleted. A crash at any point leaves either the old or the new generation
complete, and start-up deletes whatever does not belong to ``CURRENT``.

Journal records are flushed and fsync'd before the reply to the call is sent, so every
acknowledged call survives SIGKILL. A torn last line (a crash in the middle of a write) belongs to
a call that was never acknowledged and is dropped; a bad line anywhere else refuses the start.
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
from pathlib import Path
from typing import Any

import numpy as np

from hostd.logs import kv
from hostd.model import Host, HostState, topology_to_doc
from hostd.model.errors import TagStoreError
from hostd.model.migration import DeviceManifest, MigrationManifest, TagChunk
from hostd.model.topology import HostTopology
from hostd.model.types import (
    Access,
    MemoryDeviceKind,
    Placement,
    TagCopyDirection,
    TagPolicy,
    VirtioMemConfig,
    VirtioMemRequestType,
    VmConfig,
)

logger = logging.getLogger("hostd.store")

FORMAT_VERSION = 1
DEFAULT_SNAPSHOT_EVERY = 10_000

# Model methods whose successful calls are journaled and replayed. Calls that only read through
# them (FROM_GUEST tag copies, virtio-mem STATE) are included: they advance the model's counters,
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

# The value types that journaled calls take as arguments, by the name used in the journal.
_ENUMS: dict[str, type[enum.Enum]] = {
    cls.__name__: cls
    for cls in (TagPolicy, Access, TagCopyDirection, VirtioMemRequestType, MemoryDeviceKind)
}
_DATACLASSES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (VmConfig, VirtioMemConfig, MigrationManifest, DeviceManifest, TagChunk)
}


class StateError(Exception):
    """The state directory cannot be used; the message says why and what to do."""


# -- journal argument codec


def encode_value(value: object) -> Any:
    """A JSON value for a call argument (see :func:`decode_value`)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
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
    """The call argument that :func:`encode_value` encoded."""
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    _write_file(path, json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def _snapshot_name(generation: int) -> str:
    return f"snapshot-{generation:08d}"


def _journal_name(generation: int) -> str:
    return f"journal-{generation:08d}.jsonl"


# -- the store


class Store:
    """Owns a state directory and keeps it in step with one :class:`Host`.

    Build it with :meth:`open`. ``prepare``/``commit`` implement the servicer's journal; they and
    :meth:`snapshot` must be called with the host's lock held (the servicer does).
    """

    def __init__(
        self, state_dir: Path, host: Host, meta: dict[str, Any], generation: int, every: int
    ) -> None:
        self.state_dir = state_dir
        self.host = host
        self.generation = generation
        self.snapshot_every = every
        self._meta = meta
        self._journal_fd = -1
        self._entries = 0
        self._failed: str | None = None
        self._lock_fd = -1

    # Opening

    @classmethod
    def open(
        cls,
        state_dir: str | Path,
        topology: HostTopology,
        placement: Placement = Placement.TAG_BLOCK_AWARE,
        *,
        snapshot_every: int = DEFAULT_SNAPSHOT_EVERY,
    ) -> Store:
        """Lock ``state_dir`` and load the host saved there (or start a new one).

        Raises :class:`StateError` when another daemon holds the directory, when the saved
        topology or placement differ from the requested ones, when the journal cannot be
        replayed, or when the restored host fails ``check_invariants()``.
        """
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be >= 1, not {snapshot_every}")
        path = Path(state_dir)
        path.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock_dir(path)
        try:
            store = cls._load(path, topology, placement, snapshot_every)
        except BaseException:
            os.close(lock_fd)
            raise
        store._lock_fd = lock_fd
        return store

    @classmethod
    def _load(cls, path: Path, topology: HostTopology, placement: Placement, every: int) -> Store:
        meta = {
            "format": FORMAT_VERSION,
            "topology": topology_to_doc(topology),
            "placement": placement.name,
        }
        current = path / "CURRENT"
        if not current.exists():
            host = Host(topology, placement=placement)
            store = cls(path, host, meta, 0, every)
            store._clean_stale()
            store.snapshot()
            logger.info(kv("state_created", state_dir=path, generation=store.generation))
            return store

        generation = _read_generation(current)
        snapshot_dir = path / _snapshot_name(generation)
        saved_meta = _read_json(snapshot_dir / "meta.json")
        if saved_meta.get("format") != FORMAT_VERSION:
            raise StateError(
                f"{snapshot_dir}: snapshot format {saved_meta.get('format')!r}, this hostd reads "
                f"format {FORMAT_VERSION}"
            )
        differences = _diff(
            {"topology": saved_meta.get("topology"), "placement": saved_meta.get("placement")},
            {"topology": meta["topology"], "placement": meta["placement"]},
        )
        if differences:
            raise StateError(
                f"the state in {path} was saved for another host configuration ("
                + "; ".join(differences)
                + "): start hostd with the saved configuration, or use an empty --state-dir"
            )
        host = Host.restore(_read_snapshot(snapshot_dir))
        store = cls(path, host, meta, generation, every)
        replayed = store._replay(path / _journal_name(generation))
        violations = host.check_invariants()
        if violations:
            raise StateError(
                f"the state restored from {path} violates {len(violations)} invariant(s), "
                f"refusing to start: " + "; ".join(violations[:5])
            )
        store._clean_stale()
        # Start from a fresh generation: the next start needs no replay of what was just replayed.
        store.snapshot()
        logger.info(
            kv("state_restored", state_dir=path, replayed=replayed, generation=store.generation)
        )
        return store

    def _replay(self, journal: Path) -> int:
        """Apply every journaled call to the host; drop a torn last line. Returns the count."""
        if not journal.exists():
            return 0
        data = journal.read_bytes()
        lines = data.split(b"\n")
        # A complete journal ends with "\n", leaving b"" last; anything else is a torn write.
        torn = lines.pop()
        count = 0
        for number, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
                method = entry["method"]
                args = tuple(decode_value(a) for a in entry["args"])
                if entry["seq"] != number or method not in JOURNALED_METHODS:
                    raise ValueError(f"unexpected seq {entry['seq']} or method {method!r}")
            except (ValueError, KeyError, TypeError) as e:
                # Only the bytes after the last newline can be torn (a record is one write
                # ending in its newline), so a bad complete line is corruption.
                raise StateError(f"{journal}:{number}: unreadable journal entry ({e})") from None
            try:
                getattr(self.host, method)(*args)
            except TagStoreError as e:
                raise StateError(
                    f"{journal}:{number}: {method} was refused on replay ({e.reason}: {e}); the "
                    "saved state cannot be reproduced by this hostd version"
                ) from None
            count += 1
        if torn:
            logger.warning(kv("journal_torn_tail_dropped", journal=journal, bytes=len(torn)))
        return count

    def _clean_stale(self) -> None:
        """Delete snapshots, journals and temp dirs that are not the current generation."""
        keep = {_snapshot_name(self.generation), _journal_name(self.generation), "CURRENT", "LOCK"}
        for entry in self.state_dir.iterdir():
            if entry.name in keep:
                continue
            if entry.name.startswith(("snapshot-", ".snapshot-")) and entry.is_dir():
                shutil.rmtree(entry)
            elif entry.name.startswith(("journal-", "CURRENT.")):
                entry.unlink()

    # Journal (called under the host lock)

    def prepare(self, method: str, args: tuple[object, ...]) -> str | None:
        """The journal line for a call, or None if ``method`` does not change state."""
        if method not in JOURNALED_METHODS:
            return None
        if self._failed is not None:
            raise StateError(f"the state journal failed earlier ({self._failed}); restart hostd")
        entry = {
            "seq": self._entries + 1,
            "method": method,
            "args": [encode_value(a) for a in args],
        }
        return json.dumps(entry, separators=(",", ":")) + "\n"

    def commit(self, record: str) -> None:
        """Append ``record`` and fsync it; snapshot every ``snapshot_every`` records."""
        try:
            data = record.encode()
            written = os.write(self._journal_fd, data)
            if written != len(data):
                raise OSError(f"short write to the journal ({written} of {len(data)} bytes)")
            os.fsync(self._journal_fd)
        except OSError as e:
            # The host has applied a call that is not durable: accept nothing more.
            self._failed = str(e)
            logger.critical(kv("journal_write_failed", error=e))
            raise
        self._entries += 1
        if self._entries >= self.snapshot_every:
            self.snapshot()

    # Snapshots

    def snapshot(self) -> None:
        """Write the host as a new generation and start an empty journal (host lock held)."""
        new = self.generation + 1
        state = self.host.save_state()
        tmp = self.state_dir / f".{_snapshot_name(new)}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "arrays").mkdir(parents=True)
        array_files = {}
        for i, (name, array) in enumerate(sorted(state.arrays.items())):
            file_name = f"{i:04d}.npy"
            with open(tmp / "arrays" / file_name, "wb") as f:
                np.save(f, np.asarray(array), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            array_files[name] = file_name
        _write_json(tmp / "tables.json", state.tables)
        _write_json(tmp / "meta.json", {**self._meta, "generation": new, "arrays": array_files})
        _fsync_dir(tmp / "arrays")
        _fsync_dir(tmp)
        os.rename(tmp, self.state_dir / _snapshot_name(new))
        journal_fd = os.open(
            self.state_dir / _journal_name(new),
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND,
            0o644,
        )
        os.fsync(journal_fd)
        _fsync_dir(self.state_dir)
        # The commit point: from here on a restart loads generation `new`.
        _write_file(self.state_dir / "CURRENT.tmp", f"{new}\n".encode())
        os.replace(self.state_dir / "CURRENT.tmp", self.state_dir / "CURRENT")
        _fsync_dir(self.state_dir)

        old = self.generation
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
        self._journal_fd = journal_fd
        self.generation = new
        self._entries = 0
        if old:
            shutil.rmtree(self.state_dir / _snapshot_name(old), ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / _journal_name(old)).unlink()
        logger.debug(kv("snapshot_written", generation=new))

    def close(self, *, snapshot: bool = True) -> None:
        """Snapshot (on a graceful stop), close the journal and unlock the directory."""
        if snapshot and self._failed is None:
            self.snapshot()
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
            self._journal_fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _lock_dir(path: Path) -> int:
    fd = os.open(path / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateError(f"{path} is in use by another hostd (it holds {path / 'LOCK'})") from None
    return fd


def _read_generation(current: Path) -> int:
    text = current.read_text().strip()
    if not text.isdigit():
        raise StateError(f"{current}: expected a generation number, found {text!r}")
    return int(text)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise StateError(f"{path}: cannot read the snapshot ({e})") from None
    if not isinstance(data, dict):
        raise StateError(f"{path}: expected a JSON object")
    return data


def _read_snapshot(snapshot_dir: Path) -> HostState:
    meta = _read_json(snapshot_dir / "meta.json")
    arrays = {}
    for name, file_name in meta.get("arrays", {}).items():
        try:
            arrays[name] = np.load(snapshot_dir / "arrays" / file_name, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise StateError(f"{snapshot_dir}: cannot read array {name!r} ({e})") from None
    return HostState(arrays=arrays, tables=_read_json(snapshot_dir / "tables.json"))
