"""A second client looking at the store from a thread while a test writes through objfs."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import ClassVar, Self


@dataclass(kw_only=True)
class Observer:
    """Calls ``look`` over and over in a thread for the length of a ``with`` block, counting the
    looks (a check then knows the store was looked at during the write, not only after)."""

    looks: int = 0
    join_timeout: ClassVar[float] = 30.0  # seconds a look may still take at the end
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def look(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.look()
            self.looks += 1

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(self.join_timeout)
