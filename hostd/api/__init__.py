"""The gRPC layer of hostd: the servicer, proto conversions and the one error mapping."""

from hostd.api.errors import to_grpc_status
from hostd.api.servicer import TagStorageServicer

__all__ = ["TagStorageServicer", "to_grpc_status"]
