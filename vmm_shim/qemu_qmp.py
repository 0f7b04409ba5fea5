"""A small QMP client (QEMU Machine Protocol), standard library only.

QMP is newline-delimited JSON over a stream socket (QEMU's ``docs/interop/qmp-spec``): QEMU
greets, the client sends ``qmp_capabilities``, then each ``{"execute": ..., "id": ...}`` gets one
``{"return": ...}`` or ``{"error": {"class", "desc"}}`` with the same id; asynchronous
``{"event": ...}`` messages may arrive at any time, also between a command and its answer.
This client is synchronous and single-threaded: events read while waiting for an answer are
queued and handed out by :meth:`QmpClient.next_event`.

A QMP socket served by a QEMU chardev (``-qmp unix:PATH,server=on,wait=off``) takes one client
at a time; give QEMU one ``-qmp`` per client (QEMU sends every event to each of them).

Exceptions::

    QmpError                 QEMU answered a command with an error (``error_class``, ``desc``)
    QmpConnectionError       (an OSError) no connection, or QEMU closed it (QEMU gone)
"""

from __future__ import annotations

import collections
import itertools
import json
import select
import socket
import time
from typing import Any

__all__ = ["QmpClient", "QmpConnectionError", "QmpError", "parse_qmp_address"]

# How long to wait for QEMU's greeting and for each answer; QEMU answers QMP from its main loop,
# which TCG keeps busy, so this is generous. It bounds a hung QEMU, it is no performance claim.
DEFAULT_QMP_TIMEOUT_S = 30.0
_READ_CHUNK = 65536


class QmpError(Exception):
    """QEMU refused a command: ``error_class`` (e.g. ``GenericError``) and its description."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QEMU refused {command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QmpConnectionError(OSError):
    """No QMP connection: QEMU is not listening there, or it closed the connection (exited)."""


class _QmpTimeout(QmpConnectionError):
    """QEMU sent nothing in time (connected, but busy, hung, or serving another client)."""


def parse_qmp_address(address: str) -> tuple[int, Any]:
    """``unix:PATH`` or ``HOST:PORT`` (QEMU's ``-qmp`` spelling, also ``tcp:HOST:PORT``) as a
    socket family and address; ValueError naming the address otherwise."""
    if address.startswith("unix:"):
        path = address.removeprefix("unix:").split(",", 1)[0]
        if not path:
            raise ValueError(f"invalid QMP address {address!r}: empty socket path")
        return socket.AF_UNIX, path
    host, sep, port = address.removeprefix("tcp:").split(",", 1)[0].rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"invalid QMP address {address!r}: expected unix:/path/to/qmp.sock or host:port"
        )
    return socket.AF_INET6 if ":" in host else socket.AF_INET, (host.strip("[]"), int(port))


class QmpClient:
    """One QMP connection, negotiated and ready for :meth:`execute`; a context manager."""

    def __init__(self, address: str, *, timeout_s: float = DEFAULT_QMP_TIMEOUT_S) -> None:
        family, sockaddr = parse_qmp_address(address)
        self.address = address
        self.timeout_s = timeout_s
        self._events: collections.deque[dict[str, Any]] = collections.deque()
        self._buffer = b""
        self._ids = itertools.count(1)
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout_s)
            self._sock.connect(sockaddr)
            try:
                greeting = self._read_message(time.monotonic() + timeout_s)
            except _QmpTimeout:
                raise QmpConnectionError(
                    f"{address}: no QMP greeting within {timeout_s:g}s (a QMP socket serves one "
                    "client at a time: is another one connected?)"
                ) from None
            if "QMP" not in greeting:
                raise QmpConnectionError(f"{address}: not a QMP greeting: {greeting!r:.200}")
            self.version: dict[str, Any] = greeting["QMP"].get("version", {})
            self.execute("qmp_capabilities")
        except OSError as e:
            self._sock.close()
            if isinstance(e, QmpConnectionError):
                raise
            raise QmpConnectionError(f"cannot connect to QMP at {address}: {e}") from None
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        """Close the connection (QEMU keeps running)."""
        self._sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _QmpTimeout(f"{self.address}: QEMU did not answer in time")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(_READ_CHUNK)
            except TimeoutError:
                continue
            except OSError as e:
                raise QmpConnectionError(f"{self.address}: {e}") from None
            if not chunk:
                raise QmpConnectionError(f"{self.address}: QEMU closed the QMP connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError:
            raise QmpConnectionError(f"{self.address}: not QMP: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise QmpConnectionError(f"{self.address}: not QMP: {line[:200]!r}")
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command`` and return its ``return`` value; QmpError if QEMU refuses it."""
        request_id = next(self._ids)
        request: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments:
            request["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as e:
            raise QmpConnectionError(f"{self.address}: {e}") from None
        deadline = time.monotonic() + self.timeout_s
        while True:
            message = self._read_message(deadline)
            if "event" in message:
                self._events.append(message)
            elif message.get("id") == request_id:
                if "error" in message:
                    error = message["error"]
                    raise QmpError(command, str(error.get("class")), str(error.get("desc")))
                return message.get("return")

    def next_event(self, timeout_s: float) -> dict[str, Any] | None:
        """The next event (``{"event": NAME, "data": {...}, "timestamp": ...}``), waiting up to
        ``timeout_s``; None if none came. QmpConnectionError once QEMU has gone."""
        deadline = time.monotonic() + timeout_s
        while not self._events:
            if b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                readable, _, _ = select.select([self._sock], [], [], remaining)
                if not readable:
                    return None
            message = self._read_message(time.monotonic() + self.timeout_s)
            if "event" in message:
                self._events.append(message)
        return self._events.popleft()

    # -- the few commands the bridge uses --------------------------------------------------

    def qom_get(self, path: str, prop: str) -> Any:
        """``qom-get``: one property of a QOM object."""
        return self.execute("qom-get", path=path, property=prop)

    def qom_set(self, path: str, prop: str, value: Any) -> None:
        """``qom-set``: set one property of a QOM object."""
        self.execute("qom-set", path=path, property=prop, value=value)

    def memory_devices(self) -> list[dict[str, Any]]:
        """``query-memory-devices``: ``[{"type": "virtio-mem", "data": {...}}, ...]``."""
        return list(self.execute("query-memory-devices"))
