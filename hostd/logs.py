"""Structured logs: one ``key=value`` line per record on stderr, through stdlib ``logging``.

Call sites pass the fields as keyword arguments of :func:`kv`, so the message itself is
machine-readable (``event=rpc rpc=CreateVm code=OK vm_id=vm1``) and the formatter only adds the
time, level and logger.
"""

from __future__ import annotations

import logging
import sys
import time


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def kv(event: str, **fields: object) -> str:
    """``event=<event> k1=v1 k2=v2`` with values quoted when they contain spaces or ``=``."""
    parts = [f"event={_quote(event)}"]
    parts += [f"{key}={_quote(value)}" for key, value in fields.items()]
    return " ".join(parts)


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=... logger=... <message>``; a traceback follows on its own lines."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (
            f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname} "
            f"logger={record.name} {record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str = "INFO") -> None:
    """Send every ``hostd`` log record to stderr as key=value lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger("hostd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
