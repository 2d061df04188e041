"""How far the scoring agent has read its input when it publishes a batch, stamped on every scored record: the
event time of its slowest input partition with a backlog, so that the aggregation windows wait for it, and how many
messages wait unread, so that they know a backlog from a live stream.

Why the event time: a backlog (the demo's history, a worker back from a crash) is not read in event time across
partitions. The news partitions can be minutes of event time ahead of the comment partitions, and both feed the same
topic keys: a key whose watermark followed its newest record closed its windows on the news time, and the comments
behind arrived after their one-minute and five-minute windows had closed (seen: most of a 20-minute history's
comments missing from its one-minute windows; the hour windows still counted them, so no late-message count showed
it). As a stream processor's watermark does, the scoring agent therefore tracks each input partition's progress
(``InputProgress``) and stamps the low mark on its outputs (the ``finpulse-input-watermark`` header, epoch ms), and
``stream.aggregate`` advances a key's watermark no further than the stamp of the record that moved it.

Only partitions of this worker still behind their high watermark hold the mark back: a caught-up partition
delivers only what arrives from now on, and a revoked one is another worker's. One with a backlog that has not
delivered for ``IDLE_S`` holds nothing either (stuck: the windows must close all the same, and the lag metrics
tell the operator). Minutes, not seconds: with 30 s, 2,716 messages of the demo's backlog still came after one
of their windows had closed. With every partition caught up, records carry no stamp and keys follow their own
event time, as before; live, the stamp holds a window back by the few seconds the partitions differ.

Why the count (the ``finpulse-input-backlog`` header): the aggregation agents republish open windows' running
figures for the dashboard, and in a backlog those windows close seconds after they open, so their running figures
are read by nobody and only fill ``finpulse.open-windows`` (about 42,000 of them for the demo's history, beside
3,100 closed windows). The watermark stamp cannot tell a backlog: live records carry it whenever a
partition has a message or two unread. A scorer that keeps up has at most what arrived while it scored one batch
waiting; more than ``BACKLOG_BATCHES`` full batches waiting means it is draining a backlog (``draining``). A queue
is not always history, though (a burst of news can outrun the scorer): the aggregation agents still publish the
running figures of windows the clock has not passed (``stream.aggregate.PartialSchedule``).
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, NamedTuple

HEADER = "finpulse-input-watermark"
BACKLOG_HEADER = "finpulse-input-backlog"
IDLE_S = 300.0
BACKLOG_BATCHES = 4

Highwater = Callable[[str, int], "int | None"]  # (topic, partition) -> its end (None: unknown, or not ours)


class InputLag(NamedTuple):
    """What the scoring agent's input partitions with a backlog hold when it publishes a batch."""
    watermark_ms: int | None = None   # the newest event time read from the slowest of them; None: none has one
    backlog: int = 0                  # how many messages they hold unread


def draining(backlog: int, max_batch: int) -> bool:
    """Whether a scorer with ``backlog`` messages unread is draining a backlog: more than ``BACKLOG_BATCHES``
    batches of ``max_batch`` wait (one that keeps up has at most what arrived while it scored one batch)."""
    return backlog > BACKLOG_BATCHES * max_batch


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

    def lag(self, highwater: Highwater, now: float) -> InputLag:
        """The newest event time of the slowest partition that still has a backlog, and the messages unread in
        those partitions (partitions not read for ``IDLE_S`` count for neither)."""
        unread = {tp: _unread(highwater(*tp), self.offset[tp]) for tp in self.event_ms
                  if now - self.read_at[tp] <= IDLE_S}
        behind = {tp: count for tp, count in unread.items() if count > 0}
        return InputLag(min((self.event_ms[tp] for tp in behind), default=None), sum(behind.values()))


def _unread(highwater: int | None, last_offset: int) -> int:
    return 0 if highwater is None else max(0, highwater - last_offset - 1)


def stamp(lag: InputLag) -> tuple[tuple[str, bytes], ...]:
    """The Kafka headers of a record published with this input lag (none when nothing is behind)."""
    if lag.watermark_ms is None:
        return ()
    return ((HEADER, str(lag.watermark_ms).encode("ascii")), (BACKLOG_HEADER, str(lag.backlog).encode("ascii")))


def read_stamp(headers: Iterable[tuple[str, bytes]] | Mapping[str, bytes] | None) -> InputLag:
    """The input lag a consumed record carries; none stamped (or unreadable) holds nothing back."""
    if not headers:
        return InputLag()
    pairs = dict(headers.items() if isinstance(headers, Mapping) else headers)
    watermark_ms, backlog = _int(pairs.get(HEADER)), _int(pairs.get(BACKLOG_HEADER))
    return InputLag(watermark_ms, backlog or 0) if watermark_ms is not None else InputLag()


def _int(value: bytes | None) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None
