"""Migration calls of :class:`vmm_shim.client.HostClient` (mixed into it), and ``migrate()``.

Live migration is driven by the client: the two daemons never talk to each other. Each step
is one method here; :func:`migrate` runs the whole protocol between two clients::

    src.start_migration -> manifest -> dst.admit_migration
    loop: src.read_migration_chunk -> dst.write_migration_chunk ; src.next_migration_round
    src.pause_migration ; final round ; src.handover_migration
    dst.commit_migration (-> the VM's token on dst) ; src.complete_migration (revokes src's)

Manifests and chunks are opaque values passed from one daemon to the other unchanged (they are
protobuf messages; nothing else of protobuf leaks out of this module and ``client``).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from tagstore.v1 import tagstore_pb2 as pb

if TYPE_CHECKING:
    from vmm_shim.client import HostClient

# Pre-copy stops when a round has at most this many pages left to send, or after MAX_ROUNDS;
# the final round then runs with the guest paused.
CONVERGED_PAGES = 1024
MAX_ROUNDS = 8
DEFAULT_MIGRATION_TIMEOUT_S = 60.0
DEFAULT_LEASE_S = 60.0


@dataclass(frozen=True)
class MigrationInfo:
    """A migration on one host (``GetMigration``)."""

    migration_id: str
    vm_id: str
    role: str  # OUTGOING / INCOMING
    phase: str  # PRECOPY / PAUSED / HANDOVER / INCOMING
    round: int
    round_pages_left: int
    dirty_pages: int
    chunks: int
    wire_bytes: int
    tag_bytes: int
    deadline_unix_seconds: float


@dataclass(frozen=True)
class MigrationResult:
    """What a finished migration moved (the source's and destination's reports agree)."""

    migration_id: str
    vm_id: str
    rounds: int
    wire_bytes: int
    tag_bytes: int
    mapped_bytes: int
    tagged_bytes: int
    # The VM's token on the destination (from CommitMigration; ``migrate()`` carries it over):
    # the VMM continues with it there. Empty in the source's own report.
    vm_token: str = ""


@dataclass(frozen=True)
class MigrationProgress:
    """One progress report of :func:`migrate`."""

    phase: str  # admitting, precopy, paused, handover, committed, completed
    round: int
    wire_bytes: int
    tag_bytes: int
    chunks: int


@dataclass(frozen=True)
class CompactionInfo:
    """What ``CompactTagRegion`` did."""

    region: str
    evacuated_pages: int
    lent_pages_left: int
    compacted_pages: int
    tag_blocks_freed: int
    tag_blocks_reserved: int
    tag_blocks_min_needed: int
    complete: bool


@dataclass(frozen=True)
class EvacuationInfo:
    """What ``EvacuateHostRange`` did."""

    pfn_start: int
    nr_pages: int
    moved_pages: int
    pages_left: int
    stopped_reason: str
    complete: bool


def _info(s: pb.MigrationStatus) -> MigrationInfo:
    return MigrationInfo(
        s.migration_id,
        s.vm_id,
        pb.MigrationRole.Name(s.role).removeprefix("MIGRATION_ROLE_"),
        pb.MigrationPhase.Name(s.phase).removeprefix("MIGRATION_PHASE_"),
        s.round,
        s.round_pages_left,
        s.dirty_pages,
        s.chunks,
        s.wire_bytes,
        s.tag_bytes,
        s.deadline_unix_seconds,
    )


def _result(r: pb.MigrationReport) -> MigrationResult:
    return MigrationResult(
        r.migration_id,
        r.vm_id,
        r.rounds,
        r.wire_bytes,
        r.tag_bytes,
        r.mapped_bytes,
        r.tagged_bytes,
        r.vm_token,
    )


def _set(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields that are not None."""
    return {name: value for name, value in fields.items() if value is not None}


class MigrationCalls:
    """The migration RPCs, one method each (mixed into ``HostClient``)."""

    if TYPE_CHECKING:

        def _unary(self, method: str, request: Any, *, token: str | None = None) -> Any: ...

    def _read(self, method: str, cls: Any, **fields: Any) -> Any:
        """One call that changes nothing. The request is built by the client's ``_message``:
        a value it cannot carry (text that is not UTF-8, an integer out of range) is the
        client's InvalidArgument naming the field, raised before anything is sent. A None
        leaves its field unset, as the message's constructor would (a round's last "chunk")."""
        # Imported here: vmm_shim.client imports this module (HostClient mixes these calls in).
        from vmm_shim.client import _message

        return self._unary(method, _message(cls, **_set(fields)))

    def _mutation(
        self, method: str, cls: Any, *, request_id: str | None = None, **fields: Any
    ) -> Any:
        """One mutating call, its request built by the client's ``_mutation``: checked like
        ``_read``'s, with a request_id (the caller's, or a fresh one) that every attempt
        repeats, so the client's retries never apply a step twice."""
        from vmm_shim.client import _mutation

        return self._unary(method, _mutation(cls, request_id, **_set(fields)))

    def _step(self, method: str, vm_id: str, migration_id: str) -> Any:
        return self._mutation(
            method, pb.MigrationStepRequest, vm_id=vm_id, migration_id=migration_id
        )

    # -- source

    def start_migration(self, vm_id: str, migration_id: str, timeout_s: float) -> Any:
        """Start an outgoing migration; returns the manifest (opaque, for ``admit_migration``)."""
        return self._mutation(
            "StartMigration",
            pb.StartMigrationRequest,
            vm_id=vm_id,
            migration_id=migration_id,
            timeout_seconds=timeout_s,
        )

    def read_migration_chunk(self, vm_id: str, migration_id: str) -> Any | None:
        """The next chunk of the round (opaque, for ``write_migration_chunk``), or None."""
        # A mutation: reading advances the round's cursor.
        answer = self._mutation(
            "ReadMigrationChunk",
            pb.ReadMigrationChunkRequest,
            vm_id=vm_id,
            migration_id=migration_id,
        )
        return None if answer.round_done else answer.chunk

    def next_migration_round(self, vm_id: str, migration_id: str) -> int:
        """Start the next round (pages dirtied since the last); returns its page count."""
        return int(self._step("NextMigrationRound", vm_id, migration_id).round_pages)

    def pause_migration(self, vm_id: str, migration_id: str) -> MigrationInfo:
        """Pause the guest for the final round."""
        return _info(self._step("PauseMigration", vm_id, migration_id))

    def handover_migration(self, vm_id: str, migration_id: str) -> MigrationInfo:
        """Everything is sent: the source will no longer resume the VM by itself."""
        return _info(self._step("HandoverMigration", vm_id, migration_id))

    def complete_migration(self, vm_id: str, migration_id: str) -> MigrationResult:
        """The destination committed: the source releases the VM."""
        return _result(self._step("CompleteMigration", vm_id, migration_id))

    # -- destination

    def admit_migration(self, manifest: Any, lease_s: float) -> MigrationInfo:
        """Admit an incoming VM (or raise ResourceExhausted saying what is short)."""
        return _info(
            self._mutation(
                "AdmitMigration", pb.AdmitMigrationRequest, manifest=manifest, lease_seconds=lease_s
            )
        )

    def write_migration_chunk(self, vm_id: str, migration_id: str, chunk: Any) -> MigrationInfo:
        """Apply one chunk (resending an applied chunk is harmless)."""
        return _info(
            self._mutation(
                "WriteMigrationChunk",
                pb.WriteMigrationChunkRequest,
                vm_id=vm_id,
                migration_id=migration_id,
                chunk=chunk,
            )
        )

    def commit_migration(
        self, vm_id: str, migration_id: str, *, request_id: str | None = None
    ) -> MigrationResult:
        """Take ownership of the VM on the destination; the result carries the VM's token
        there. Repeating a commit with its ``request_id`` answers the same result and token."""
        return _result(
            self._mutation(
                "CommitMigration",
                pb.MigrationStepRequest,
                request_id=request_id,
                vm_id=vm_id,
                migration_id=migration_id,
            )
        )

    # -- either side

    def abort_migration(self, vm_id: str, migration_id: str) -> MigrationInfo:
        """Undo the migration on this host."""
        return _info(self._step("AbortMigration", vm_id, migration_id))

    def get_migration(self, vm_id: str) -> MigrationInfo:
        """The migration of ``vm_id`` on this host (NotFound if none)."""
        return _info(self._read("GetMigration", pb.GetMigrationRequest, vm_id=vm_id))

    # -- host page migration

    def compact_tag_region(self, region: str) -> CompactionInfo:
        """Compact a tag region (``tag0``, ...) so that whole tag blocks become free."""
        r = self._mutation("CompactTagRegion", pb.CompactTagRegionRequest, region=region)
        return CompactionInfo(
            r.region,
            r.evacuated_pages,
            r.lent_pages_left,
            r.compacted_pages,
            r.tag_blocks_freed,
            r.tag_blocks_reserved,
            r.tag_blocks_min_needed,
            r.complete,
        )

    def evacuate_host_range(self, pfn_start: int, nr_pages: int) -> EvacuationInfo:
        """Move every guest page off host pages ``[pfn_start, pfn_start + nr_pages)``."""
        r = self._mutation(
            "EvacuateHostRange", pb.EvacuateHostRangeRequest, pfn_start=pfn_start, nr_pages=nr_pages
        )
        return EvacuationInfo(
            r.pfn_start, r.nr_pages, r.moved_pages, r.pages_left, r.stopped_reason, r.complete
        )

    def migrate(
        self,
        vm_id: str,
        to: HostClient,
        **options: Any,
    ) -> MigrationResult:
        """Live-migrate ``vm_id`` from this host to ``to`` (see :func:`migrate`)."""
        return migrate(self, to, vm_id, **options)  # type: ignore[arg-type]


def migrate(
    src: HostClient,
    dst: HostClient,
    vm_id: str,
    *,
    migration_id: str | None = None,
    timeout_s: float = DEFAULT_MIGRATION_TIMEOUT_S,
    lease_s: float = DEFAULT_LEASE_S,
    max_rounds: int = MAX_ROUNDS,
    converged_pages: int = CONVERGED_PAGES,
    progress: Callable[[MigrationProgress], None] | None = None,
) -> MigrationResult:
    """Live-migrate ``vm_id`` from ``src`` to ``dst``; returns the source's report with the
    VM's token on the destination (``vm_token``: the source's token no longer works).

    Pre-copy rounds run until a round is small (``converged_pages``) or ``max_rounds``; the
    final round runs paused. Any failure before the handover aborts both sides (the VM keeps
    running on the source) and re-raises. A failed commit is resolved by asking the
    destination whether it owns the VM; if it cannot be reached the source stays in HANDOVER
    (paused, owning everything) and the error is raised: nothing is ever owned twice.
    """
    mid = migration_id or f"{vm_id[:40]}-{uuid.uuid4().hex[:12]}"
    state = {"round": 1, "wire": 0, "tags": 0, "chunks": 0}

    def report(phase: str) -> None:
        if progress is not None:
            progress(
                MigrationProgress(
                    phase, state["round"], state["wire"], state["tags"], state["chunks"]
                )
            )

    def send_round() -> None:
        # The next chunk is read from the source while the destination applies this one: the
        # two daemons work at the same time (chunks still apply in order, one at a time).
        with ThreadPoolExecutor(1, thread_name_prefix="migrate-read") as reader:
            pending = reader.submit(src.read_migration_chunk, vm_id, mid)
            while (chunk := pending.result()) is not None:
                pending = reader.submit(src.read_migration_chunk, vm_id, mid)
                try:
                    applied = dst.write_migration_chunk(vm_id, mid, chunk)
                except BaseException:
                    # Let the read in flight finish before the caller aborts both sides.
                    with contextlib.suppress(Exception):
                        pending.result()
                    raise
                # The destination counts what it received: reading a protobuf bytes field
                # copies it, and a chunk carries up to 2 MiB of tags.
                state["wire"] = applied.wire_bytes
                state["tags"] = applied.tag_bytes
                state["chunks"] += 1
                if state["chunks"] % 16 == 0:
                    report("precopy" if state.get("paused", 0) == 0 else "paused")

    report("admitting")
    manifest = src.start_migration(vm_id, mid, timeout_s)
    try:
        dst.admit_migration(manifest, lease_s)
    except BaseException:
        # The admission may have happened with only its reply lost: undo it too (else the
        # lease ends it).
        _quietly(dst.abort_migration, vm_id, mid)
        _quietly(src.abort_migration, vm_id, mid)
        raise
    try:
        report("precopy")
        while True:
            send_round()
            pages = src.next_migration_round(vm_id, mid)
            state["round"] += 1
            if pages <= converged_pages or state["round"] >= max_rounds:
                break
        state["paused"] = 1
        src.pause_migration(vm_id, mid)
        report("paused")
        send_round()
        # Pages dirtied between the last round's start and the pause.
        state["round"] += 1
        if src.next_migration_round(vm_id, mid):
            send_round()
        src.handover_migration(vm_id, mid)
        report("handover")
    except BaseException:
        _quietly(dst.abort_migration, vm_id, mid)
        _quietly(src.abort_migration, vm_id, mid)
        raise
    # One request_id for the commit and its repeats: a repeat after a lost reply answers the
    # first result, with the VM's token on the destination, and commits nothing twice.
    commit_id = str(uuid.uuid4())
    try:
        committed = dst.commit_migration(vm_id, mid, request_id=commit_id)
    except BaseException:
        if not _committed(dst, vm_id, mid):
            _quietly(dst.abort_migration, vm_id, mid)
            if not _still_incoming(dst, vm_id, mid):
                _quietly(src.abort_migration, vm_id, mid)
            raise
        # The destination owns the VM: its answer (the token) is remembered under commit_id.
        committed = dst.commit_migration(vm_id, mid, request_id=commit_id)
    report("committed")
    src_result = src.complete_migration(vm_id, mid)
    report("completed")
    # The source counted every round (the destination only those that sent it chunks).
    return replace(src_result, vm_token=committed.vm_token)


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    """Best-effort cleanup: the original error is what the caller must see."""
    with contextlib.suppress(Exception):
        fn(*args)


def _committed(dst: HostClient, vm_id: str, mid: str) -> bool:
    """Whether the destination owns the VM (its commit went through, the reply was lost)."""
    try:
        dst.get_migration(vm_id)
    except Exception as e:
        if getattr(e, "code", "") != "NOT_FOUND":
            return False
        try:
            dst.get_vm(vm_id)
        except Exception:
            return False
        return True
    return False


def _still_incoming(dst: HostClient, vm_id: str, mid: str) -> bool:
    """Whether the destination may still commit (unreachable counts as "may")."""
    try:
        info = dst.get_migration(vm_id)
    except Exception as e:
        return getattr(e, "code", "") != "NOT_FOUND"
    return info.migration_id == mid
