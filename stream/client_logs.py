"""What the Kafka clients (aiokafka, kafka-python) may log: warnings and errors only, and a broker outage as a few
lines rather than thousands.

While a broker is unreachable, aiokafka retries every ``retry_backoff_ms`` (100 ms) and logs each failed connect,
fetch, metadata refresh and coordinator lookup at ERROR: a worker logged about 1,500 lines in a 20-second outage,
burying everything else and filling disks. ``RepeatLimiter`` lets the first record of each kind through, counts the
repeats, and logs one summary per kind every ``window_s`` seconds while they go on ("... 183 more like it in the last
30 s"). A kind is the message with its numbers blanked, per logger and level, so a reconnect to another port or node
is the same kind. Every ``finpulse`` command installs it (``tame_kafka_client_logs``), and so does the dashboard's
feed, which runs in Streamlit's process.
"""
from __future__ import annotations

import atexit
import importlib
import logging
import re
import threading
import time

CLIENT_LOGGERS = ("aiokafka", "kafka")
_NUMBERS = re.compile(r"\d+")


class RepeatLimiter(logging.Filter):
    """A filter for the client loggers: the first record of a kind passes, its repeats within ``window_s`` are
    counted and summarised once the window ends (by a daemon thread, so the summary comes even when the repeats
    stop: that is how the log shows the outage ended)."""

    def __init__(self, window_s: float = 30.0):
        super().__init__()
        self.window_s = window_s
        self._lock = threading.Lock()
        self._kinds: dict[tuple[str, int, str], list] = {}   # kind -> [window start, repeats, (first record, its message)]
        self._flusher: threading.Thread | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "finpulse_summary", False):
            return True
        message = record.getMessage()
        kind = (record.name, record.levelno, _NUMBERS.sub("#", message))
        now = time.monotonic()
        with self._lock:
            seen = self._kinds.get(kind)
            if seen is None or (now - seen[0] >= self.window_s and seen[1] == 0):
                # The message as logged: its arguments (a connection, say) may read differently later.
                self._kinds[kind] = [now, 0, (record, message)]
                return True
            seen[1] += 1
            self._start_flusher()
            return False

    def _start_flusher(self) -> None:
        if self._flusher is None or not self._flusher.is_alive():
            self._flusher = threading.Thread(target=self._flush_forever, daemon=True, name="kafka-log-summaries")
            self._flusher.start()

    def _flush_forever(self) -> None:
        while True:
            time.sleep(min(1.0, self.window_s / 4))
            if not self.flush(due_only=True):
                with self._lock:
                    if not any(seen[1] for seen in self._kinds.values()):
                        self._flusher = None
                        return

    def flush(self, due_only: bool = False) -> int:
        """Log a summary for every kind with counted repeats (only those whose window ended, with ``due_only``);
        returns how many summaries were logged."""
        now, due = time.monotonic(), []
        with self._lock:
            for kind, seen in self._kinds.items():
                started, repeats, first = seen
                if repeats and (not due_only or now - started >= self.window_s):
                    due.append((first, repeats, now - started))
                    seen[0], seen[1] = now, 0
        for (first, message), repeats, span in due:
            summary = logging.LogRecord(first.name, first.levelno, first.pathname, first.lineno,
                                        "%s (%d more like it in the last %.0f s, not shown)",
                                        (message, repeats, span), None)
            summary.finpulse_summary = True
            logging.getLogger(first.name).handle(summary)
        return len(due)


_limiter = RepeatLimiter()
atexit.register(_limiter.flush)     # repeats counted but not yet summarised; runs before logging's own shutdown


def tame_kafka_client_logs() -> RepeatLimiter:
    """Client loggers at WARNING or above (their debug logging costs per record) and ``RepeatLimiter`` on each of
    them. A logger filter sees only the records logged to that very logger, so it goes on every client logger
    there is (``aiokafka.conn``, ``aiokafka.consumer.fetcher``, ...), which is why the clients are imported first."""
    for client in CLIENT_LOGGERS:
        importlib.import_module(client)      # creates its loggers
    for root in CLIENT_LOGGERS:
        logger = logging.getLogger(root)
        logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
    for name in list(logging.root.manager.loggerDict):
        if any(name == root or name.startswith(root + ".") for root in CLIENT_LOGGERS):
            logger = logging.getLogger(name)
            if _limiter not in logger.filters:
                logger.addFilter(_limiter)
    return _limiter
