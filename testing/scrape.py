"""Test helper: Prometheus text parsed into samples, and scraping an endpoint over HTTP."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples whose labels include ``labels`` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def scrape_until(url: str, ok: Callable[[Samples], bool], patience: float = 30.0) -> Samples:
    """Scrape ``url`` until ``ok`` holds (the figures of a request may land just after its reply)."""
    deadline = time.monotonic() + patience
    while True:
        with urllib.request.urlopen(url, timeout=10) as resp:
            samples = parse(resp.read().decode())
        if ok(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)
