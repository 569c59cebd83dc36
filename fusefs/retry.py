"""One retry policy for every store request: transient failures only, exponential backoff
with full jitter, bounded by a deadline (and optionally by attempts). SDK-level retries are
turned off so that this is the only place that decides (and the deadline holds).

The deadline, not an attempt count, is what rides out a throttling burst: a store that answers
503 SlowDown for ten seconds is retried for as long as the deadline allows (30 s by default,
``Tuning.retry_deadline``), with backoff capped at ``max_delay`` so that a recovered store is
noticed soon. Once the deadline has passed the request fails with its last error (EIO at FUSE).
The deadline bounds when the last attempt starts; that attempt may still take up to the
request timeout."""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import trio

from fusefs.errors import is_temp_failure

log = logging.getLogger(__name__)
T = TypeVar("T")


DEFAULT_DEADLINE = 30.0


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int | None = None  # None: as many as the deadline allows
    base_delay: float = 0.05
    max_delay: float = 2.0
    deadline: float = DEFAULT_DEADLINE

    def delays(self) -> Iterator[float]:
        """Sleep before each retry; stops when attempts or the deadline run out."""
        start = time.monotonic()
        attempts = itertools.count(1) if self.max_attempts is None else range(1, self.max_attempts)
        for attempt in attempts:
            # min(): past ~2**30 the float would overflow, and the cap is reached long before.
            delay = random.uniform(0, min(self.max_delay, self.base_delay * 2 ** min(attempt, 30)))
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
