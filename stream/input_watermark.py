"""How far in event time the scoring agent's slowest input partition with a backlog has read, stamped on every
scored record it publishes, so that the aggregation windows wait for it.

Why: a backlog (the demo's history, a worker back from a crash) is not read in event time across partitions. The
news partitions can be minutes of event time ahead of the comment partitions, and both feed the same topic keys:
a key whose watermark followed its newest record closed its windows on the news time, and the comments behind
arrived after their one-minute and five-minute windows had closed (seen: most of a 20-minute history's comments
missing from its one-minute windows; the hour windows still counted them, so no late-message count showed it).
As a stream processor's watermark does, the scoring agent therefore tracks each input partition's progress
(``InputProgress``) and stamps the low mark on its outputs (the ``finpulse-input-watermark`` header, epoch ms),
and ``stream.aggregate`` advances a key's watermark no further than the stamp of the record that moved it.

Only partitions of this worker still behind their high watermark hold the mark back: a caught-up partition
delivers only what arrives from now on, and a revoked one is another worker's. One with a backlog that has not
delivered for ``IDLE_S`` holds nothing either (stuck: the windows must close all the same, and the lag metrics
tell the operator). Minutes, not seconds: with 30 s, 2,716 messages of the demo's backlog still came after one
of their windows had closed. With every partition caught up, records carry no stamp and keys follow their own
event time, as before; live, the stamp holds a window back by the few seconds the partitions differ.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

HEADER = "finpulse-input-watermark"
IDLE_S = 300.0

Highwater = Callable[[str, int], "int | None"]  # (topic, partition) -> its end (None: unknown, or not ours)


class InputProgress:
    """Per input partition: the newest event time read, the last offset read and when it was read."""

    def __init__(self) -> None:
        self.event_ms: dict[tuple[str, int], int] = {}
        self.offset: dict[tuple[str, int], int] = {}
        self.read_at: dict[tuple[str, int], float] = {}

    def saw(self, topic: str, partition: int, offset: int, event_ms: int | None, now: float) -> None:
        """A message was read (``event_ms`` None: it had no valid event time, as for a dead letter)."""
        tp = (topic, partition)
        if event_ms is not None and event_ms > self.event_ms.get(tp, -1):
            self.event_ms[tp] = event_ms
        self.offset[tp] = max(offset, self.offset.get(tp, -1))
        self.read_at[tp] = now

    def low_watermark_ms(self, highwater: Highwater, now: float) -> int | None:
        """The newest event time of the slowest partition that still has a backlog; None when none has."""
        behind = [ms for tp, ms in self.event_ms.items()
                  if now - self.read_at[tp] <= IDLE_S and _has_backlog(highwater(*tp), self.offset[tp])]
        return min(behind, default=None)


def _has_backlog(highwater: int | None, last_offset: int) -> bool:
    return highwater is not None and highwater > last_offset + 1


def stamp(low_watermark_ms: int | None) -> tuple[tuple[str, bytes], ...]:
    """The Kafka headers of a record published with ``low_watermark_ms`` as its input watermark."""
    return () if low_watermark_ms is None else ((HEADER, str(low_watermark_ms).encode("ascii")),)


def read_stamp(headers: Iterable[tuple[str, bytes]] | Mapping[str, bytes] | None) -> int | None:
    """The input watermark a consumed record carries, or None (none stamped: it holds nothing back)."""
    if not headers:
        return None
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    for name, value in pairs:
        if name == HEADER:
            try:
                return int(value)
            except (TypeError, ValueError):
                return None
    return None
