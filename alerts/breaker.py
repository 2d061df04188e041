"""The circuit breaker of one endpoint: after ``threshold`` consecutive failed attempts its deliveries stop
hammering it and wait, and one probe at a time tries it until it answers. The deliveries waiting on an open breaker
take turns to probe, in the order they came to it, so that during an outage each is tried in its turn (its attempts
and last error stay current) rather than one delivery probing again and again while the others only wait.

The breaker only counts and admits; the dispatcher pauses the endpoint (``Endpoint.not_before``, as a Retry-After
does) for ``pause_s`` whenever an attempt fails while the breaker is open, and each delivery keeps its own retry
window and attempt count (``Dispatcher._deliver``), and leaves the line when it ends (``leave``).
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
        self._probing: str | None = None  # the delivery whose probe is out
        self._line: list[str] = []  # deliveries waiting for their turn to probe, first come first
        self._turn_changed = asyncio.Event()

    @property
    def is_open(self) -> bool:
        return self.threshold > 0 and self.failures >= self.threshold

    @property
    def pause_s(self) -> float:
        """How long the endpoint rests before the next probe: doubling with every failed probe, up to the maximum."""
        return min(self.max_pause_s, self.initial_pause_s * 2 ** max(0, self.failures - self.threshold))

    @property
    def turn_changed(self) -> asyncio.Event:
        """Set at the next change of turn: a probe ends, a waiting delivery leaves the line, the breaker closes. A
        refused delivery takes it before it lets go of the event loop, and looks again once it is set."""
        return self._turn_changed

    @property
    def waiting(self) -> list[str]:
        """The deliveries waiting for their turn to probe, next first."""
        return list(self._line)

    @contextlib.contextmanager
    def admission(self, delivery: str):
        """Yields whether ``delivery``'s attempt may go out now: always while closed; while open, only as the one
        probe, when no other probe is out and its turn has come. A refused delivery keeps its place in the line;
        one that has probed queues again at the back."""
        if not self.is_open:
            yield True
            return
        if delivery not in self._line:
            self._line.append(delivery)
        if self._probing is not None or self._line[0] != delivery:
            yield False
            return
        self._line.pop(0)
        self._probing = delivery
        try:
            yield True
        finally:
            self._probing = None
            self._change_turn()

    def leave(self, delivery: str) -> None:
        """``delivery`` ended (delivered, failed, stopped): it gives up its turn."""
        if delivery in self._line:
            self._line.remove(delivery)
            self._change_turn()

    def record(self, failed: bool, answered: bool, error: str = "") -> bool:
        """Count an attempt's outcome: ``failed`` (the endpoint is down or overloaded), ``answered`` (it works, even
        if it refused this request), or neither (a refused address, a TLS configuration error: says nothing about
        the endpoint). Returns whether the endpoint must pause now (the breaker is open). State changes are logged once."""
        if failed:
            self.failures += 1
            if self.threshold and self.failures == self.threshold:
                log.warning("endpoint %s: %d consecutive failed attempts (last: %s): paused; its deliveries wait, and "
                            "take turns to probe it, one at a time, until it answers",
                            self.endpoint, self.failures, error)
            return self.is_open
        if answered:
            if self.is_open:
                log.info("endpoint %s answers again: its deliveries resume", self.endpoint)
                self._line.clear()  # closed: nobody waits for a turn any more
                self._change_turn()
            self.failures = 0
        return False

    def _change_turn(self) -> None:
        self._turn_changed.set()
        self._turn_changed = asyncio.Event()
