"""Channels that carry hostd's admin token, for the benchmarks' raw gRPC stubs.

Every benchmark daemon is started with ``--admin-token-file PATH``; the daemon writes the token
there at start, and :func:`admin_channel` sends it on every call of the channel.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc


class _Bearer(  # type: ignore[misc]
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),)

    def _with_token(self, details: Any) -> Any:
        return details._replace(metadata=tuple(details.metadata or ()) + self._metadata)

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        return continuation(self._with_token(details), request_iterator)


def admin_channel(address: str, token_file: Path) -> grpc.Channel:
    """A channel to ``address`` whose calls carry the token in ``token_file``."""
    token = token_file.read_text().strip()
    return grpc.intercept_channel(grpc.insecure_channel(address), _Bearer(token))
