"""The one mapping from model errors to gRPC status.

Every :class:`~hostd.model.errors.TagStoreError` becomes a gRPC status whose details carry a
``google.rpc.ErrorInfo`` with the error's stable ``reason``, domain ``tagstore`` and the error's
``metadata`` (the offending field and value). Clients decide on ``reason``, not on the message.
Anything that is not a ``TagStoreError`` is a bug: the servicer logs it and answers INTERNAL.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from hostd.model.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    StateUnavailableError,
    TagStoreError,
)

ERROR_DOMAIN = "tagstore"

# Most specific first: the first matching class decides (ConfigError is an InvalidArgumentError).
# A bare TagStoreError is a refusal the model has not classified: a model bug, hence INTERNAL,
# but it still carries its ErrorInfo because the refused call changed nothing.
STATUS_CODES: tuple[tuple[type[TagStoreError], grpc.StatusCode], ...] = (
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StateUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (TagStoreError, grpc.StatusCode.INTERNAL),
)


def to_grpc_status(error: TagStoreError) -> grpc.Status:
    """The gRPC status (code, message, ``ErrorInfo`` detail) for a model error."""
    code = next(code for cls, code in STATUS_CODES if isinstance(error, cls))
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=ERROR_DOMAIN, metadata=dict(error.metadata)
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=str(error), details=[detail]
    )
    return rpc_status.to_status(status)
