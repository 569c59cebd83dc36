"""statvfs of FUSE mounts that may hang, with a bounded number of threads.

A FUSE server that is stopped or stuck never answers STATFS, and the kernel waits for it with the
caller's thread. kubelet asks for volume stats every minute or so: one new thread per call would pile
up forever. Here each path has at most one probe in flight; a call while it is stuck waits only until
that probe's own deadline (so never past ``timeout`` after the probe began) and starts no thread.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field


@dataclass
class _Probe:
    started: float
    done: threading.Event = field(default_factory=threading.Event)
    result: os.statvfs_result | None = None
    error: OSError | None = None


class StatfsProbes:
    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        self._in_flight: dict[str, _Probe] = {}

    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def stuck_for(self, path: str) -> float:
        """Seconds the probe of ``path`` has been waiting (0 if none is in flight)."""
        with self._lock:
            probe = self._in_flight.get(path)
        return time.monotonic() - probe.started if probe is not None else 0.0

    def statvfs(self, path: str) -> os.statvfs_result | None:
        """The filesystem's statvfs; None if it did not answer by the probe's deadline; its OSError if
        it failed."""
        with self._lock:
            probe = self._in_flight.get(path)
            if probe is None:
                probe = self._in_flight[path] = _Probe(time.monotonic())
                threading.Thread(target=self._run, args=(path, probe), name=f"statvfs {path}", daemon=True).start()
        if not probe.done.wait(max(0.0, probe.started + self.timeout - time.monotonic())):
            return None
        if probe.error is not None:
            raise probe.error
        return probe.result

    def _run(self, path: str, probe: _Probe) -> None:
        try:
            probe.result = os.statvfs(path)
        except OSError as e:
            probe.error = e
        finally:
            with self._lock:
                if self._in_flight.get(path) is probe:
                    del self._in_flight[path]
            probe.done.set()
