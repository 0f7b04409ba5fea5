"""The tests. Importing this package first turns off gRPC's fork handlers before gRPC is
imported, as ``hostd/__init__.py`` does for the daemon (in-process daemons fork too)."""

import os

os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"
