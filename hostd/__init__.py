"""hostd: the daemon that owns the MTE tag storage of one arm64 KVM host.

Layers (dependencies point inward): :mod:`hostd.daemon` (CLI, server lifecycle) →
:mod:`hostd.api` (gRPC servicer, one error mapping) and :mod:`hostd.store` (snapshot + journal)
→ :mod:`hostd.model` (pure model, no I/O).
"""

import os

# hostd forks children that read a copy-on-write image of the host (hostd.cow, hostd.store).
# gRPC's own fork handlers, on by default in its C core, crash such children now and then
# ("Other threads are currently calling into gRPC, skipping fork() handlers"); the children
# never use gRPC, so turn them off. gRPC reads this when it is imported: hostd is imported first.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"
