"""hostd: the daemon that owns the MTE tag storage of one arm64 KVM host.

Layers (dependencies point inward): :mod:`hostd.daemon` (CLI, server lifecycle) →
:mod:`hostd.api` (gRPC servicer, one error mapping) and :mod:`hostd.store` (snapshot + journal)
→ :mod:`hostd.model` (pure model, no I/O).
"""
