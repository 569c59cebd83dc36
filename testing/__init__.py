"""Helpers that tests, bench, sanity and e2e share: local servers, proxies, simulated pods, the
in-process plugin harness."""
