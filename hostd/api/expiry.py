"""The daemon's migration timer: ends migrations whose lease or deadline ran out.

The model keeps no clock (deadlines are passed in); this thread is what makes a destination's
lease end "by itself" and a silent client's source VM resume, including right after a restart
that restored a migration whose deadline passed while the daemon was down.
"""

from __future__ import annotations

import logging
import threading

from hostd.api.servicer import TagStorageServicer
from hostd.logs import kv

logger = logging.getLogger("hostd.api")

# How often deadlines are checked: leases are seconds to minutes long.
EXPIRY_INTERVAL_SECONDS = 0.25


class MigrationExpiry:
    """A thread that calls :meth:`TagStorageServicer.expire_migrations` periodically."""

    def __init__(
        self, servicer: TagStorageServicer, interval_seconds: float = EXPIRY_INTERVAL_SECONDS
    ) -> None:
        self._servicer = servicer
        self._interval = interval_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hostd-expiry", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                ended = self._servicer.expire_migrations()
            except Exception:
                logger.exception(kv("migration_expiry_failed"))
                continue
            if ended:
                logger.info(kv("migrations_expired", count=ended))
