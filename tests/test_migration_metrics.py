"""Migration metrics come from the model through the one collector: migrations by role and
outcome, in progress by phase, bytes on the wire, rounds, page moves by reason."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry

from hostd.metrics import TagStoreMetrics
from hostd.model import Host, default_topology
from hostd.model.types import BOOT_RAM_GPA, Access, GiB, MiB, TagPolicy, VmConfig


def sample(m: TagStoreMetrics, name: str, **labels: str) -> float:
    v = m.registry.get_sample_value(name, labels)
    assert v is not None, f"no sample {name}{labels}"
    return v


def test_migration_counters_and_phases_are_exported() -> None:
    """A migration in progress shows in tagstore_migrations_in_progress; a completed one in
    tagstore_migrations_total by role and outcome, with its bytes, rounds and duration."""
    src, dst = Host(default_topology(2 * GiB)), Host(default_topology(2 * GiB))
    src.create_vm(VmConfig("vm", True, TagPolicy.ON_FAULT, boot_memory_bytes=64 * MiB))
    src.guest_fault("vm", BOOT_RAM_GPA, 8 * MiB, Access.WRITE)
    m_src = TagStoreMetrics(src, threading.Lock(), CollectorRegistry(), 3600.0)
    m_dst = TagStoreMetrics(dst, threading.Lock(), CollectorRegistry(), 3600.0)
    try:
        dst.admit_migration(src.start_migration("vm", "m", 0.0, 60.0), 0.0, 60.0)
        in_progress = "tagstore_migrations_in_progress"
        assert 1 == sample(m_src, in_progress, role="OUTGOING", phase="PRECOPY")
        assert 1 == sample(m_dst, in_progress, role="INCOMING", phase="INCOMING")
        while (chunk := src.read_migration_chunk("vm", "m", 0.0)) is not None:
            dst.write_migration_chunk("vm", "m", chunk, 0.0)
        src.pause_migration("vm", "m", 2.0)
        src.next_migration_round("vm", "m", 2.0)
        src.handover_migration("vm", "m", 2.02)
        dst.commit_migration("vm", "m", 4.0)
        src.complete_migration("vm", "m", 300.0)
        assert 0 == sample(m_src, in_progress, role="OUTGOING", phase="PRECOPY")
        ended = "tagstore_migrations_total"
        assert 1 == sample(m_src, ended, role="OUTGOING", outcome="completed")
        assert 1 == sample(m_dst, ended, role="INCOMING", outcome="completed")
        assert 0 == sample(m_dst, ended, role="INCOMING", outcome="expired")
        sent = sample(m_src, "tagstore_migration_wire_bytes_total", role="OUTGOING")
        assert sent == sample(m_dst, "tagstore_migration_wire_bytes_total", role="INCOMING") > 0
        assert 1 == sample(m_src, "tagstore_migration_rounds_total")
        assert 0 == sample(m_src, "tagstore_page_migrations_total", reason="compaction")
    finally:
        m_src.close()
        m_dst.close()


def test_migration_durations_are_histograms_per_outcome_and_per_phase() -> None:
    """Each ended migration is one observation of its total duration (by role and outcome)
    and of each phase it went through (by role and phase): a 20 ms pause lands in the 25 ms
    bucket, the 5 minute handover wait beyond 250 s; an aborted migration counts apart."""
    src, dst = Host(default_topology(2 * GiB)), Host(default_topology(2 * GiB))
    src.create_vm(VmConfig("vm", True, TagPolicy.ON_FAULT, boot_memory_bytes=64 * MiB))
    src.guest_fault("vm", BOOT_RAM_GPA, 8 * MiB, Access.WRITE)
    m_src = TagStoreMetrics(src, threading.Lock(), CollectorRegistry(), 3600.0)
    m_dst = TagStoreMetrics(dst, threading.Lock(), CollectorRegistry(), 3600.0)
    try:
        dst.admit_migration(src.start_migration("vm", "m", 0.0, 600.0), 0.0, 600.0)
        while (chunk := src.read_migration_chunk("vm", "m", 0.0)) is not None:
            dst.write_migration_chunk("vm", "m", chunk, 0.0)
        src.pause_migration("vm", "m", 2.0)
        src.next_migration_round("vm", "m", 2.0)
        src.handover_migration("vm", "m", 2.02)
        dst.commit_migration("vm", "m", 4.0)
        src.complete_migration("vm", "m", 300.0)
        total = "tagstore_migration_duration_seconds"
        out = {"role": "OUTGOING", "outcome": "completed"}
        assert 1 == sample(m_src, f"{total}_count", **out)
        assert 300.0 == sample(m_src, f"{total}_sum", **out)
        assert 0 == sample(m_src, f"{total}_bucket", le="250.0", **out)
        assert 1 == sample(m_src, f"{total}_bucket", le="500.0", **out)
        assert 4.0 == sample(m_dst, f"{total}_sum", role="INCOMING", outcome="completed")
        phase = "tagstore_migration_phase_duration_seconds"
        paused = {"role": "OUTGOING", "phase": "PAUSED"}
        assert 1 == sample(m_src, f"{phase}_count", **paused)
        assert 0 == sample(m_src, f"{phase}_bucket", le="0.01", **paused)
        assert 1 == sample(m_src, f"{phase}_bucket", le="0.025", **paused)
        assert 2.0 == sample(m_src, f"{phase}_sum", role="OUTGOING", phase="PRECOPY")
        assert 297.98 == round(sample(m_src, f"{phase}_sum", role="OUTGOING", phase="HANDOVER"), 6)
        assert 4.0 == sample(m_dst, f"{phase}_sum", role="INCOMING", phase="INCOMING")
        src.create_vm(VmConfig("vm2", False, TagPolicy.ON_FAULT, boot_memory_bytes=64 * MiB))
        src.start_migration("vm2", "m2", 10.0, 600.0)
        src.abort_migration("vm2", "m2", 11.0)
        assert 1 == sample(m_src, f"{total}_count", role="OUTGOING", outcome="aborted")
        assert 1 == sample(m_src, f"{total}_count", **out)
        assert 3.0 == sample(m_src, f"{phase}_sum", role="OUTGOING", phase="PRECOPY")
        assert 2 == sample(m_src, f"{phase}_count", role="OUTGOING", phase="PRECOPY")
        assert 0 == sample(m_src, "tagstore_page_migrations_total", reason="compaction")
    finally:
        m_src.close()
        m_dst.close()
