"""The node cache's counters and its once-per-kind problem reports.

A sick cache disk must not write a line per block: the first event of each kind is a warning, later
ones are debug lines, and the totals are in the counters (``NodeCache.stats``, exported by
``fusefs.metrics``). Every failure of the cache itself degrades to direct reads.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("fusefs.nodecache")

NAMES = ("hits", "hit_bytes", "misses", "corrupt", "errors", "fetches", "waits", "shared", "stores",
         "store_bytes", "store_skipped", "lock_timeouts", "published", "refills", "refill_errors", "file_checks")


class Counters:
    """Thread-safe counters of one cache object, and its reports."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._counts: dict[str, int] = dict.fromkeys(NAMES, 0)
        self._lock = threading.Lock()
        self._reported: set[str] = set()

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def problem(self, kind: str, exc: BaseException) -> None:
        """Count a failure of the cache itself and report it (once per kind)."""
        self.count("errors")
        self.report(kind, f"{kind} failed ({type(exc).__name__}: {exc}); reads go to the store directly when needed")

    def report(self, kind: str, message: str) -> None:
        """Log the first event of each kind as a warning, later ones at debug level."""
        with self._lock:
            first = kind not in self._reported
            self._reported.add(kind)
        log.log(logging.WARNING if first else logging.DEBUG, "node cache %s: %s", self.directory, message)
