"""Idempotent retries (AIP-155): the window of remembered ``request_id`` values.

Every mutating request carries an optional ``request_id``. The first call with an id runs and
its answer is remembered; a retry with the same id (after a timeout, or after a daemon restart)
gets that answer back and changes nothing; the same id on a call with other arguments is refused
INVALID_ARGUMENT. Refused calls are not remembered: they changed nothing, so a retry runs again.

The window is bounded: the last :data:`DEFAULT_WINDOW` ids (oldest forgotten first), and of the
answers larger than :data:`MAX_KEPT_ANSWER_BYTES` (tag reads, migration chunks) only the last
:data:`MAX_LARGE_ANSWERS` are kept: a retry comes within seconds, and a tag read whose answer is
no longer kept runs again (it only reads). Eviction depends on nothing but the order of calls,
so the store rebuilds the same window by replaying its journal, and keeps the window in its
snapshots.

This module is plain Python: the servicer asks it before a mutating call, the store persists it.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

from hostd.model.errors import InvalidArgumentError
from hostd.model.migration import TagChunk

# Remembered ids. A VMM retries within seconds to minutes; at the fault rates of a busy host
# (thousands a second, but faults rarely carry ids) this still covers minutes of calls.
DEFAULT_WINDOW = 10_000
MAX_REQUEST_ID_CHARS = 128
MAX_KEPT_ANSWER_BYTES = 4096
MAX_LARGE_ANSWERS = 4


class _Miss:
    def __repr__(self) -> str:
        return "MISS"


MISS: Any = _Miss()
"""What :meth:`RequestWindow.lookup` returns when the call must run."""


@dataclass
class RememberedRequest:
    """One id of the window: the call it named and its answer (``kept`` False: not kept)."""

    request_id: str
    method: str
    fingerprint: str
    answer: object
    kept: bool = True


def _answer_bytes(answer: object) -> int:
    """About how much an answer holds: its bytes, or the bytes fields of a model dataclass."""
    if isinstance(answer, bytes):
        return len(answer)
    if dataclasses.is_dataclass(answer):
        return sum(
            len(value)
            for value in (getattr(answer, f.name) for f in dataclasses.fields(answer))
            if isinstance(value, bytes)
        )
    return 0


# Model calls that take the wall-clock time the call arrived (the live migration steps: the
# model keeps no clock, the servicer passes ``now``), and that argument's position. A retry
# arrives later than the call it repeats, so the time is not part of what the call asks and is
# left out of its fingerprint (else every retried step would be refused REQUEST_ID_REUSED).
WALL_CLOCK_ARG: dict[str, int] = {
    "start_migration": 2,
    "admit_migration": 1,
    "read_migration_chunk": 2,
    "write_migration_chunk": 3,
    "next_migration_round": 2,
    "pause_migration": 2,
    "handover_migration": 2,
    "commit_migration": 2,
    "complete_migration": 2,
    "abort_migration": 2,
}


def fingerprint(method: str, args: tuple[object, ...]) -> str:
    """A digest of a call: the method and its arguments (model values with stable reprs; bytes,
    such as a migration chunk's 2 MiB of tags, are hashed as they are instead of through their
    repr, which costs ten times as much), without the time of arrival (``WALL_CLOCK_ARG``).

    Bytes are hashed with SHA-256, which CPUs with the SHA extensions (x86 SHA-NI, Armv8 SHA2)
    run about three times as fast as BLAKE2b: a migration hashes every chunk it receives."""
    clock = WALL_CLOCK_ARG.get(method)
    if clock is not None and len(args) > clock:
        args = (*args[:clock], *args[clock + 1 :])
    return hashlib.blake2b(repr((method, _digestible(args))).encode(), digest_size=16).hexdigest()


def _digestible(value: object) -> object:
    if isinstance(value, TagChunk):
        # A migration chunk carries a CRC-32 of all its other fields, and the model applies
        # (and so remembers) only a chunk whose bytes match it: its header, checksum and size
        # name it, with no pass over its megabytes of tags. A chunk reusing a remembered id
        # with other content would have to match all three to pass for the first.
        return ("TagChunk", value.header(), value.checksum, value.wire_bytes)
    if isinstance(value, bytes):
        return ("sha256", hashlib.sha256(value).hexdigest())
    if isinstance(value, tuple):
        return tuple(_digestible(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ((f.name, _digestible(getattr(value, f.name))) for f in dataclasses.fields(value))
        return (type(value).__name__, tuple(fields))
    return value


class RequestWindow:
    """The last ``size`` request ids with their calls and answers."""

    def __init__(self, size: int = DEFAULT_WINDOW) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, not {size}")
        self.size = size
        self._ids: collections.OrderedDict[str, RememberedRequest] = collections.OrderedDict()
        self._large: collections.deque[RememberedRequest] = collections.deque()

    def __len__(self) -> int:
        return len(self._ids)

    def lookup(self, request_id: str, method: str, args: tuple[object, ...]) -> object:
        """The remembered answer of ``request_id``, or :data:`MISS` if the call must run.

        Raises :class:`InvalidArgumentError` when the id named another call.
        """
        if not request_id:
            return MISS
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidArgumentError(
                "request_id", request_id[:16] + "...", f"longer than {MAX_REQUEST_ID_CHARS} chars"
            )
        seen = self._ids.get(request_id)
        if seen is None:
            return MISS
        if seen.method != method or seen.fingerprint != fingerprint(method, args):
            raise InvalidArgumentError(
                "request_id",
                request_id,
                f"was first used for another call ({seen.method} with other arguments); "
                "use a fresh id for a new call",
                reason="REQUEST_ID_REUSED",
            )
        return seen.answer if seen.kept else MISS

    def remember(
        self, request_id: str, method: str, args: tuple[object, ...], answer: object
    ) -> None:
        """Remember a successful call's answer under ``request_id`` (no-op without an id)."""
        if not request_id or request_id in self._ids:
            return
        entry = RememberedRequest(request_id, method, fingerprint(method, args), answer)
        self._ids[request_id] = entry
        if _answer_bytes(answer) > MAX_KEPT_ANSWER_BYTES:
            self._large.append(entry)
            while len(self._large) > MAX_LARGE_ANSWERS:
                dropped = self._large.popleft()
                dropped.answer, dropped.kept = None, False
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)

    def entries(self) -> list[RememberedRequest]:
        """The window, oldest first (for the store's snapshot)."""
        return list(self._ids.values())

    def load(self, entries: list[RememberedRequest]) -> None:
        """Replace the window with ``entries`` (oldest first), as saved by :meth:`entries`."""
        self._ids = collections.OrderedDict((e.request_id, e) for e in entries)
        self._large = collections.deque(
            e for e in entries if e.kept and _answer_bytes(e.answer) > MAX_KEPT_ANSWER_BYTES
        )
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)
