"""The one mapping from model errors to gRPC status.

Every :class:`~hostd.model.errors.TagStoreError` becomes a gRPC status whose details carry a
``google.rpc.ErrorInfo`` with the error's stable ``reason``, domain ``tagstore`` and the error's
``metadata`` (the offending field and value). Clients decide on ``reason``, not on the message.
Refused credentials (:class:`~hostd.api.auth.AuthError`) map here too: UNAUTHENTICATED or
PERMISSION_DENIED, with the same ErrorInfo shape. Anything else is a bug: the servicer logs it
and answers INTERNAL.

Messages and metadata values are shortened here, in the one place every refusal passes: a
value is echoed as at most a short prefix, so that a hostile 10,000-character id gives its
INVALID_ARGUMENT and not an error too large for gRPC's 16 KiB metadata limit.
"""

from __future__ import annotations

import re

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from hostd.api.auth import AuthError, PermissionDeniedError, UnauthenticatedError
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
AUTH_STATUS_CODES: tuple[tuple[type[AuthError], grpc.StatusCode], ...] = (
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
)

# Longest value echoed whole in a message or an ErrorInfo metadata value; longer ones keep a
# prefix and say how long they were. A message as a whole is capped too.
MAX_ECHO_CHARS = 64
MAX_MESSAGE_CHARS = 512
_LONG_WORD = re.compile(rf"[^\s,;:=()]{{{MAX_ECHO_CHARS + 1},}}")


def shorten(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """``text`` if it is at most ``limit`` characters, else a prefix saying its length."""
    if len(text) <= limit:
        return text
    return f"{text[: limit // 2]}...({len(text)} characters)"


def _shorten_message(message: str) -> str:
    message = _LONG_WORD.sub(lambda m: shorten(m.group(0)), message)
    return shorten(message, MAX_MESSAGE_CHARS)


def to_grpc_status(error: TagStoreError | AuthError) -> grpc.Status:
    """The gRPC status (code, message, ``ErrorInfo`` detail) for a model or credential error."""
    rows = AUTH_STATUS_CODES if isinstance(error, AuthError) else STATUS_CODES
    code = next(code for cls, code in rows if isinstance(error, cls))
    metadata = {} if isinstance(error, AuthError) else dict(error.metadata)
    info = error_details_pb2.ErrorInfo(
        reason=error.reason,
        domain=ERROR_DOMAIN,
        metadata={k: shorten(v) for k, v in metadata.items()},
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name),
        message=_shorten_message(str(error)),
        details=[detail],
    )
    return rpc_status.to_status(status)
