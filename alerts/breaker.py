"""The circuit breaker of one endpoint: after ``threshold`` consecutive failed attempts its deliveries stop
hammering it and wait, and one probe at a time tries it until it answers.

The breaker only counts and admits; the dispatcher pauses the endpoint (``Endpoint.not_before``, as a Retry-After
does) for ``pause_s`` whenever an attempt fails while the breaker is open, and each delivery keeps its own retry
window and attempt count (``Dispatcher._deliver``).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)

class CircuitBreaker:
    def __init__(self, endpoint: str, threshold: int, initial_pause_s: float, max_pause_s: float):
        self.endpoint = endpoint
        self.threshold = threshold  # 0: never opens
        self.initial_pause_s = initial_pause_s
        self.max_pause_s = max_pause_s
        self.failures = 0  # consecutive failed attempts
        self._probing = False
        self.probe_over = asyncio.Event()
        self.probe_over.set()

    @property
    def is_open(self) -> bool:
        return self.threshold > 0 and self.failures >= self.threshold

    @property
    def pause_s(self) -> float:
        """How long the endpoint rests before the next probe: doubling with every failed probe, up to the maximum."""
        return min(self.max_pause_s, self.initial_pause_s * 2 ** max(0, self.failures - self.threshold))

    @contextlib.contextmanager
    def admission(self):
        """Yields whether an attempt may go out now: always while closed; while open, only as the one probe (the
        others wait for ``probe_over``, then look again)."""
        probe = self.is_open
        if probe and self._probing:
            yield False
            return
        if probe:
            self._probing = True
            self.probe_over.clear()
        try:
            yield True
        finally:
            if probe:
                self._probing = False
                self.probe_over.set()

    def record(self, failed: bool, answered: bool, error: str = "") -> bool:
        """Count an attempt's outcome: ``failed`` (the endpoint is down or overloaded), ``answered`` (it works, even
        if it refused this request), or neither (a refused address, a TLS configuration error: says nothing about
        the endpoint). Returns whether the endpoint must pause now (the breaker is open). State changes are logged once."""
        if failed:
            self.failures += 1
            if self.threshold and self.failures == self.threshold:
                log.warning("endpoint %s: %d consecutive failed attempts (last: %s): paused; its deliveries wait, and "
                            "one probe at a time tries it until it answers", self.endpoint, self.failures, error)
            return self.is_open
        if answered:
            if self.is_open:
                log.info("endpoint %s answers again: its deliveries resume", self.endpoint)
            self.failures = 0
        return False
