"""One retry policy for every store request: transient failures only, exponential backoff
with full jitter, bounded by attempts and by a deadline. SDK-level retries are turned off so
that this is the only place that decides (and the deadline holds)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import trio

from .errors import is_temp_failure

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    base_delay: float = 0.05
    max_delay: float = 5.0
    deadline: float = 120.0

    def delays(self) -> Iterator[float]:
        """Sleep before each retry; stops when attempts or the deadline run out."""
        start = time.monotonic()
        for attempt in range(1, self.max_attempts):
            delay = random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))
            if time.monotonic() + delay - start > self.deadline:
                return
            yield delay


DEFAULT_POLICY = RetryPolicy()


def call_sync(fn: Callable[[], T], policy: RetryPolicy = DEFAULT_POLICY, what: str = "") -> T:
    """Run ``fn`` in this thread, retrying transient store errors."""
    delays = policy.delays()
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_temp_failure(exc):
                raise
            delay = next(delays, None)
            if delay is None:
                raise
            log.info("retrying %s in %.2fs after: %s", what, delay, exc)
            time.sleep(delay)


async def call_async(
    fn: Callable[[], Awaitable[T]], policy: RetryPolicy = DEFAULT_POLICY, what: str = ""
) -> T:
    """Await ``fn()``, retrying transient store errors without holding a worker thread."""
    delays = policy.delays()
    while True:
        try:
            return await fn()
        except Exception as exc:
            if not is_temp_failure(exc):
                raise
            delay = next(delays, None)
            if delay is None:
                raise
            log.info("retrying %s in %.2fs after: %s", what, delay, exc)
            await trio.sleep(delay)
