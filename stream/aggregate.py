"""Rolling per-topic and per-ticker windows over scored records, in event time: closed windows are published to
``finpulse.trends``, the running figures of open ones to ``finpulse.open-windows`` (for the dashboard).

Two layers:

* ``WindowAggregator`` is pure Python (no Kafka, no Faust): feed it scored records and it returns the windows
  that closed (``TrendRecord(final=True)``) and the open windows that changed. The worker's agents and the replay
  run exactly this code. Replay usage::

      topics = WindowAggregator(settings.section("aggregate", AggregateSettings), "topic", run_id="r1")
      for batch in batches_of_scored_records:          # any iterable of ScoredRecord, in arrival order
          closed = topics.feed(batch).final             # TrendRecord(final=True), oldest window first
      closed += topics.flush()                          # end of input: close what is still open

  (``"ticker"`` keys a record by each of its tickers.) The live agents instead keep one ``KeyWindows`` per key in a
  Faust table and call ``apply(key, state, events)`` once per key per batch (``KeyTypeAggregation``).

* ``install(app, settings, names)`` registers two Faust agents: ``scored`` (keyed by topic label) feeds the topic
  table and ``scored-by-ticker`` (keyed by ticker) the ticker table. Each agent takes micro-batches, groups them by
  message key and writes each key's table value once per batch. The tables use the message key as table key with
  ``use_partitioner=True``, so a key's changelog partition is its source partition (co-partitioned) and changelog
  recovery after a restart restores the windows.

Windows are hopping and epoch-aligned: ``SIZE/STEP`` (defaults 1m/1m, 5m/1m, 1h/5m). Each key has a watermark,
the largest event time it has seen; a window closes when the watermark passes its end plus the allowed lateness,
so a late message inside the lateness still counts, and one later than that is dropped from the windows that
closed (counted as ``late``). Live, two things hold the watermark back in a backlog, where the partitions are not
read in event time: a watermark advance takes effect only ``close_grace_s`` of wall-clock time later
(``WindowAggregator.settle``, also run by a 1 s timer), so scored partitions consumed round-robin are not late;
and a record moves its key's watermark no further than the input watermark it carries (``stream.input_watermark``),
so when the scoring agent reads the news minutes of event time ahead of the comments, the windows wait for the
comments. While the scoring agent drains a backlog (its records say how many messages wait), open windows are not
republished, for they close seconds after they open; once it has drained, every window still open is republished.
A key that goes quiet follows the event time of its input partition (``StreamClock``; of the slowest active
partition once its own is idle), so its windows close, and its alerts fire, on time rather than at its next
message. The timer that closes them takes stock of the keys it owns from the table after every start and
rebalance: keys recovered from the changelog (a restart, or partitions taken over from a worker that left) may
never see another message. Without a clock (replay, bench, tests) windows close on event time alone,
deterministically (replay's ``flush`` closes what is left at the end of the input).

Exactly-once table effects under at-least-once delivery: each key's state stores the highest applied offset per
source partition, and the ids of messages applied in the last ``dedupe_horizon_s`` of event time. After a crash
Faust re-delivers from the last committed offset; events at or below the stored offset are skipped (a batch ends,
and is acked, only once the broker has its table writes, ``stream.confirmed_table``: a committed offset is never
ahead of the recovered state). The id set also skips the duplicates an upstream re-scoring produces at new offsets.
The one documented gap: a duplicate whose event time is older than the horizon (relative to the key's watermark)
counts again in the windows still open for it, i.e. only in windows longer than the horizon. Final trends re-emitted
after a crash are identical (downstream deduplicates by ``TrendRecord.window_id``). Closed windows are published,
and acknowledged by the broker, before the table values that no longer hold them are written, so a crash re-emits a
final trend rather than losing it.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Iterator, Sequence

from .config import ConfigError
from .input_watermark import draining, read_stamp
from .metrics import counter
from .records import MessageRef, ScoredRecord, TrendRecord, epoch_ms, excerpt, format_time, utcnow
from .topics import TopicNames

if TYPE_CHECKING:
    from .app import Outgoing   # the Faust side, imported when the agents are installed

log = logging.getLogger(__name__)

KEY_TYPES = ("topic", "ticker")
REF_EXCERPT_CHARS = 200
_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

WINDOWS_CLOSED = counter("finpulse_windows_closed_total", "Windows closed and published as final trends, by key type "
                         "(topic, ticker) and window length in seconds.", ["key_type", "window_s"])
LATE_MESSAGES = counter("finpulse_late_messages_total", "Scored messages that arrived after one or more of their "
                        "windows had closed (missing from those, counted in the others), by key type.", ["key_type"])


def parse_duration_s(text: str | int) -> int:
    """``90``, ``"90s"``, ``"5m"``, ``"1h"``, ``"2d"`` -> seconds."""
    if isinstance(text, int):
        return text
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a duration like 60, 60s, 5m, 1h or 2d")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


@dataclass(frozen=True)
class WindowSpec:
    size_s: int
    step_s: int

    def starts_ms(self, t_ms: int) -> Iterator[int]:
        """Starts of the windows [start, start+size) that contain ``t_ms``, newest first."""
        step, size = self.step_s * 1000, self.size_s * 1000
        start = t_ms - t_ms % step
        while start > t_ms - size:
            yield start
            start -= step


@dataclass
class AggregateSettings:
    """``[aggregate]``: windows as ``"SIZE/STEP"`` (seconds, or with s/m/h), lateness, what each window keeps."""
    windows: list[str] = field(default_factory=lambda: ["1m/1m", "5m/1m", "1h/5m"])
    allowed_lateness_s: int = 30
    # How many of the most negative messages each window keeps (they end up in alerts).
    top_negative: int = 5
    # Open windows are republished (final=false, to finpulse.open-windows) at most this often per key, so the
    # dashboard is live; and at least this often when unchanged, so a dashboard starting up reads only that far back.
    partial_interval_s: float = 5.0
    partial_refresh_s: float = 300.0
    # Message ids are remembered this long (event time) to skip re-scored duplicates; see the module docstring.
    dedupe_horizon_s: int = 600
    # Live only: wall-clock seconds a window stays open after the watermark passed it (see WindowAggregator.settle).
    close_grace_s: float = 5.0

    def __post_init__(self) -> None:
        self.specs()
        if min(self.allowed_lateness_s, self.top_negative, self.dedupe_horizon_s, self.close_grace_s) < 0:
            raise ConfigError("[aggregate] allowed_lateness_s, top_negative, dedupe_horizon_s and close_grace_s "
                              "must be >= 0")
        if self.partial_interval_s <= 0 or self.partial_refresh_s < self.partial_interval_s:
            raise ConfigError("[aggregate] partial_interval_s must be > 0, and partial_refresh_s no shorter")

    def open_span_s(self) -> float:
        """How long ago, at most, the newest partial of a window still open was published, while the stream keeps
        up: one refresh (or the longest window, its lateness and grace, if that is shorter), and the partial
        interval and timer tick that may delay a publication."""
        longest = max(spec.size_s for spec in self.specs())
        lasts = min(self.partial_refresh_s, longest + self.allowed_lateness_s + self.close_grace_s)
        return lasts + self.partial_interval_s + SETTLE_TICK_S

    def specs(self) -> tuple[WindowSpec, ...]:
        specs = []
        for text in self.windows:
            size, _, step = str(text).partition("/")
            try:
                spec = WindowSpec(parse_duration_s(size), parse_duration_s(step or size))
            except ValueError as exc:
                raise ConfigError(f"[aggregate] windows: {exc} (write SIZE/STEP, e.g. 5m/1m)") from None
            if spec.size_s <= 0 or spec.step_s <= 0 or spec.size_s % spec.step_s:
                raise ConfigError(f"[aggregate] windows: {text!r} needs a positive size that is a multiple of the step")
            specs.append(spec)
        if not specs or len(set(s.size_s for s in specs)) != len(specs):
            raise ConfigError("[aggregate] windows: give at least one window, each size once")
        return tuple(specs)


@dataclass(frozen=True)
class SourcedRecord:
    """A scored record and where it was read from. ``offset=-1`` (a file, a test): only the id dedupe applies.
    ``input_watermark_ms``: the scoring agent's input watermark when it published the record (``None``: not
    stamped); the key's watermark moves no further than that. ``input_backlog``: how many input messages the
    scoring agent had unread then (``stream.input_watermark``)."""
    record: ScoredRecord
    partition: int = -1
    offset: int = -1
    input_watermark_ms: int | None = None
    input_backlog: int = 0

    @cached_property
    def event_ms(self) -> int:
        return epoch_ms(self.record.event_time)

    @property
    def watermark_ms(self) -> int:
        """How far in event time this record may move its key's watermark."""
        return self.event_ms if self.input_watermark_ms is None else min(self.event_ms, self.input_watermark_ms)


@dataclass
class Applied:
    """What one ``apply``/``feed`` call did."""
    final: list[TrendRecord] = field(default_factory=list)
    touched: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # key -> open window ids changed
    applied: int = 0
    duplicates: int = 0
    late: int = 0        # too late for at least one window it belonged to (counted in the others)

    def merge(self, other: "Applied") -> None:
        self.final.extend(other.final)
        for key, windows in other.touched.items():
            self.touched[key] |= windows
        self.applied += other.applied
        self.duplicates += other.duplicates
        self.late += other.late


def _new_window() -> dict[str, Any]:
    return {"count": 0, "score_sum": 0.0, "bearish": 0, "bullish": 0, "news": 0, "comments": 0,
            "model_version": "", "negative": []}


class KeyWindows:
    """One key's open windows, watermarks and dedupe memory. ``to_dict`` is the JSON-able table value.

    ``watermark_ms`` is the largest event time seen; ``settled_ms`` is the watermark that windows close by. Without
    a close grace (replay, tests) they are equal. With one (the live agents), each advance of the watermark waits in
    ``pending`` as [wall-clock seconds, watermark] until it is ``close_grace_s`` old."""

    __slots__ = ("watermark_ms", "settled_ms", "pending", "offsets", "recent_ids", "windows", "next_close_ms")

    def __init__(self, watermark_ms: int | None = None, offsets: dict[str, int] | None = None,
                 recent_ids: dict[str, int] | None = None, windows: dict[str, dict] | None = None,
                 settled_ms: int | None = None, pending: list[list] | None = None):
        self.watermark_ms = watermark_ms
        self.settled_ms = watermark_ms if settled_ms is None and not pending else settled_ms
        self.pending = pending or []
        self.offsets = offsets or {}
        self.recent_ids = recent_ids or {}          # message id -> event time (ms)
        self.windows = windows or {}                # "size_s:start_ms" -> counters (see _new_window)
        # Not stored: the earliest end of an open window, so most events skip the scan for windows to close.
        self.next_close_ms: int | None = min((_window_order(w)[0] for w in self.windows), default=None)

    @classmethod
    def from_dict(cls, data: dict | None) -> "KeyWindows":
        if not data:
            return cls()
        # Copies, so that mutating this state never changes a value the table still holds.
        return cls(data.get("watermark_ms"), dict(data.get("offsets", {})), dict(data.get("recent_ids", {})),
                   {k: _copy_window(w) for k, w in data.get("windows", {}).items()},
                   data.get("settled_ms"), [list(p) for p in data.get("pending", [])])

    def to_dict(self) -> dict[str, Any]:
        return {"watermark_ms": self.watermark_ms, "settled_ms": self.settled_ms,
                "pending": [list(p) for p in self.pending], "offsets": dict(self.offsets),
                "recent_ids": dict(self.recent_ids),
                "windows": {k: _copy_window(w) for k, w in self.windows.items()}}

    def advance(self, t_ms: int, now: float | None) -> None:
        """The watermark moves to ``t_ms``: at once (no wall clock given) or once it is ``close_grace_s`` old."""
        self.watermark_ms = t_ms
        if now is None:
            self.settled_ms = t_ms
        elif self.pending and self.pending[-1][0] == now:
            self.pending[-1][1] = t_ms
        else:
            self.pending.append([now, t_ms])

    def settle(self, now: float, grace_s: float) -> None:
        """Let the watermark advances older than ``grace_s`` take effect."""
        while self.pending and self.pending[0][0] <= now - grace_s:
            self.settled_ms = self.pending.pop(0)[1]

    def claim(self, event: SourcedRecord, t_ms: int, horizon_ms: int) -> bool:
        """Record ``event`` (event time ``t_ms``) as applied; False when it was applied before: an offset already
        applied, or a message id seen within ``horizon_ms`` of the watermark. (Ids are compared with the horizon
        here rather than relying on when they are pruned, so the outcome does not depend on batch boundaries.)"""
        if event.offset >= 0:
            partition = str(event.partition)
            if event.offset <= self.offsets.get(partition, -1):
                return False
            self.offsets[partition] = event.offset
        seen_at = self.recent_ids.get(event.record.id)
        self.recent_ids[event.record.id] = t_ms
        return seen_at is None or self.watermark_ms is None or seen_at < self.watermark_ms - horizon_ms

    def forget_ids_before(self, t_ms: int) -> None:
        self.recent_ids = {i: t for i, t in self.recent_ids.items() if t >= t_ms}


def _copy_window(window: dict[str, Any]) -> dict[str, Any]:
    """A window's counters, with copies of its mutable parts (a ticker window's ``topics`` counts: windows written
    before tickers kept them have none)."""
    copy = {**window, "negative": list(window["negative"])}
    if "topics" in window:
        copy["topics"] = dict(window["topics"])
    return copy


def dominant_topic(topics: dict[str, int]) -> str:
    """The topic most messages were classified as; on a tie the first by name, so live and replay agree."""
    return min(topics.items(), key=lambda item: (-item[1], item[0]))[0] if topics else ""


def window_key(size_s: int, start_ms: int) -> str:
    return f"{size_s}:{start_ms}"


def keys_of(record: ScoredRecord, key_type: str) -> tuple[str, ...]:
    """The keys a record is aggregated under: its topic label, or each of its tickers."""
    if key_type == "topic":
        return (record.topic,) if record.topic else ()
    return record.tickers


class WindowAggregator:
    """Event-time hopping windows for every key of one key type ("topic" or "ticker"). Pure and deterministic:
    the same sequence of events per key gives the same final windows, however it is cut into batches."""

    def __init__(self, settings: AggregateSettings, key_type: str, run_id: str = "",
                 clock: Callable[[], datetime] = utcnow):
        if key_type not in KEY_TYPES:
            raise ValueError(f"key_type must be one of {KEY_TYPES}, not {key_type!r}")
        self.settings = settings
        self.specs = settings.specs()
        self.key_type = key_type
        self.run_id = run_id
        self.clock = clock
        self.lateness_ms = settings.allowed_lateness_s * 1000
        self.states: dict[str, KeyWindows] = {}     # used by feed()/flush(); the agents keep theirs in a table

    # ------------------------------------------------------------ replay interface

    def feed(self, records: Iterable[ScoredRecord | SourcedRecord]) -> Applied:
        """Apply records (in arrival order) to the aggregator's own per-key states."""
        by_key: dict[str, list[SourcedRecord]] = defaultdict(list)
        for item in records:
            event = item if isinstance(item, SourcedRecord) else SourcedRecord(item)
            for key in keys_of(event.record, self.key_type):
                by_key[key].append(event)
        result = Applied()
        for key, events in by_key.items():
            result.merge(self.apply(key, self.states.setdefault(key, KeyWindows()), events))
        return result

    def flush(self) -> list[TrendRecord]:
        """Close every open window now (the end of a finite input), oldest first."""
        closed = []
        for key, state in self.states.items():
            closed.extend(self._close(key, state, until_ms=None))
        return closed

    # ------------------------------------------------------------ per-key core (the agents call this)

    def apply(self, key: str, state: KeyWindows, events: Sequence[SourcedRecord], now: float | None = None) -> Applied:
        """Apply one key's events, in order, to ``state`` (mutated). Returns the windows that closed and the open
        windows that changed. ``now`` (wall-clock seconds) turns on the close grace: see ``settle``."""
        result = Applied()
        if now is not None:
            result.final.extend(self.settle(key, state, now))
        touched = result.touched[key]
        horizon_ms = self.settings.dedupe_horizon_s * 1000
        for event in events:
            record = event.record
            t_ms = event.event_ms
            if not state.claim(event, t_ms, horizon_ms):
                result.duplicates += 1
                continue
            moved_to = event.watermark_ms
            if state.watermark_ms is None or moved_to > state.watermark_ms:
                state.advance(moved_to, now)
                if now is None:
                    result.final.extend(self._close_settled(key, state))
            counted = missed = False
            for spec in self.specs:
                for start in spec.starts_ms(t_ms):
                    wid = window_key(spec.size_s, start)
                    window = state.windows.get(wid)
                    if window is None:
                        end_ms = start + spec.size_s * 1000
                        if state.settled_ms is not None and end_ms + self.lateness_ms <= state.settled_ms:
                            missed = True
                            break  # this window (and every older one) has closed
                        window = state.windows[wid] = _new_window()
                        if state.next_close_ms is None or end_ms < state.next_close_ms:
                            state.next_close_ms = end_ms
                    self._add(window, record)
                    touched.add(wid)
                    counted = True
            result.applied += counted
            result.late += missed
        if state.watermark_ms is not None:
            state.forget_ids_before(state.watermark_ms - horizon_ms)
        touched.intersection_update(state.windows)
        if not touched:
            del result.touched[key]
        return result

    def settle(self, key: str, state: KeyWindows, now: float) -> list[TrendRecord]:
        """Close the windows that the watermark passed (plus lateness) at least ``close_grace_s`` of wall-clock time
        ago. The grace is for backlogs: the worker consumes input partitions round-robin, so when it catches up,
        records of equal event time from different partitions can be minutes of event time (but only seconds of
        wall-clock time) apart; the grace keeps windows open until the lagging partitions have delivered."""
        state.settle(now, self.settings.close_grace_s)
        return self._close_settled(key, state)

    def follow_stream(self, state: KeyWindows, stream_ms: int, now: float | None) -> bool:
        """A key with no new messages follows the stream's event time ``stream_ms``: its watermark moves there when
        that would close one of its windows (as a message of its own at that time would). Without this a ticker that
        goes quiet after a bearish minute would hold that minute open, and its alert, until its next message, maybe
        hours later. True when the watermark moved (the state must be written)."""
        if not self.would_follow(state.watermark_ms, state.next_close_ms, stream_ms):
            return False
        state.advance(stream_ms, now)
        return True

    def would_follow(self, watermark_ms: int | None, next_close_ms: int | None, stream_ms: int) -> bool:
        """Whether ``follow_stream`` would move a key with this watermark and earliest open window end."""
        return next_close_ms is not None and next_close_ms + self.lateness_ms <= stream_ms \
            and (watermark_ms is None or stream_ms > watermark_ms)

    def _close_settled(self, key: str, state: KeyWindows) -> list[TrendRecord]:
        if state.next_close_ms is None or state.settled_ms is None \
                or state.next_close_ms + self.lateness_ms > state.settled_ms:
            return []
        return self._close(key, state, until_ms=state.settled_ms)

    def open_trends(self, key: str, state: KeyWindows, window_ids: Iterable[str] | None = None) -> list[TrendRecord]:
        """Partial (final=False) trends of ``key``'s open windows (those named, or all), but for those its watermark
        has passed (plus lateness): they wait out the close grace only, and their final trend comes within it."""
        ids = state.windows.keys() if window_ids is None else [w for w in window_ids if w in state.windows]
        if state.watermark_ms is not None:
            ids = [wid for wid in ids if _window_order(wid)[0] + self.lateness_ms > state.watermark_ms]
        return [self._trend(key, wid, state.windows[wid], final=False) for wid in sorted(ids, key=_window_order)]

    def _close(self, key: str, state: KeyWindows, until_ms: int | None) -> list[TrendRecord]:
        closing, open_ends = [], []
        for wid in state.windows:
            end_ms = _window_order(wid)[0]
            if until_ms is None or end_ms + self.lateness_ms <= until_ms:
                closing.append(wid)
            else:
                open_ends.append(end_ms)
        state.next_close_ms = min(open_ends, default=None)
        closing.sort(key=_window_order)
        return [self._trend(key, wid, state.windows.pop(wid), final=True) for wid in closing]

    def _add(self, window: dict[str, Any], record: ScoredRecord) -> None:
        window["count"] += 1
        window["score_sum"] += record.sentiment_score
        window["bearish"] += record.sentiment == "bearish"
        window["bullish"] += record.sentiment == "bullish"
        if record.kind == "news":
            window["news"] += 1
        else:
            window["comments"] += 1
        window["model_version"] = record.model_version
        if self.key_type == "ticker" and record.topic:
            # Which story moves the ticker: its alert names the topic most of the window's messages are about.
            topics = window.setdefault("topics", {})
            topics[record.topic] = topics.get(record.topic, 0) + 1
        limit = self.settings.top_negative
        negative = window["negative"]
        if record.sentiment_score >= 0 or limit == 0:
            return
        rank = (record.sentiment_score, record.id)
        if len(negative) >= limit and rank >= (negative[-1]["sentiment_score"], negative[-1]["id"]):
            return
        if any(ref["id"] == record.id for ref in negative):
            return
        ref = MessageRef(id=record.id, text=excerpt(record.text, REF_EXCERPT_CHARS),
                         sentiment_score=record.sentiment_score, kind=record.kind, url=record.url,
                         event_time=format_time(record.event_time)).to_dict()
        negative.append(ref)
        negative.sort(key=lambda r: (r["sentiment_score"], r["id"]))
        del negative[limit:]

    def _trend(self, key: str, wid: str, window: dict[str, Any], final: bool) -> TrendRecord:
        size_s, start_ms = (int(part) for part in wid.split(":"))
        count = window["count"]
        start = datetime.fromtimestamp(start_ms / 1000, tz=timezone.utc)
        end = datetime.fromtimestamp((start_ms + size_s * 1000) / 1000, tz=timezone.utc)
        return TrendRecord(
            key_type=self.key_type, key=key, window_s=size_s, window_start=start, window_end=end, count=count,
            mean_score=round(window["score_sum"] / count, 6), bearish_share=round(window["bearish"] / count, 6),
            bullish_share=round(window["bullish"] / count, 6), news_count=window["news"],
            comment_count=window["comments"], final=final, model_version=window["model_version"],
            emitted_at=self.clock(), most_negative=tuple(window["negative"]), run_id=self.run_id,
            topic=dominant_topic(window.get("topics", {})))


def _window_order(wid: str) -> tuple[int, int, int]:
    """Sort key of a window id: by end time, then size."""
    size_s, start_ms = (int(part) for part in wid.split(":"))
    return (start_ms + size_s * 1000, size_s, start_ms)


def _open_by_clock(wid: str, now_s: float) -> bool:
    return _window_order(wid)[0] > now_s * 1000


class PartialSchedule:
    """Which open windows' running figures to republish now. A changed window is republished at most every
    ``interval_s``, or every 1/``UPDATES_PER_WINDOW`` of its length when that is longer: an hour window once a
    minute. Measured in ``make demo`` with every window every 5 s, the 1h/5m windows (twelve open per key) made
    63% of the partial records, each moving its figures by at most 1/720 of the window.

    A window published ``refresh_s`` ago is republished, changed or not, so that a dashboard starting up finds
    every open window in the last ``refresh_s`` (and a bit) of ``finpulse.open-windows`` rather than in the last
    hour, a quiet key's hour window being published once, perhaps 50 minutes ago.

    While the scoring agent drains a backlog (``hold``), only windows the clock has not passed are noted or due: the
    others close seconds after they open, as the watermark races through them (``stream.input_watermark``), while
    a window still open by the clock is live, be it a scorer at its limit during a burst of news or the hour
    window a backlog ends in. Once it has drained (``resume``), every window still open is noted."""
    UPDATES_PER_WINDOW = 60

    def __init__(self, interval_s: float, refresh_s: float = float("inf")):
        self.interval_s = interval_s
        self.refresh_s = refresh_s
        self.changed: dict[bytes, set[str]] = defaultdict(set)   # key -> open windows changed since last published
        self.next_at: dict[tuple[bytes, str], float] = {}        # (key, window) -> when it may be published again
        self.published_at: dict[tuple[bytes, str], float] = {}   # (key, window) -> when last published, till closed
        self.held_since: float | None = None   # when the last record published while draining a backlog came

    def __bool__(self) -> bool:
        return bool(self.changed or self.published_at)

    def hold(self, now: float) -> None:
        self.held_since = now

    def resume(self, open_windows: Iterable[tuple[bytes, Iterable[str]]]) -> None:
        """The backlog has drained: ``open_windows`` ((key, window ids) of every window still open) are due."""
        self.held_since = None
        for key, window_ids in open_windows:
            self.note(key, window_ids)

    def note(self, key: bytes, window_ids: Iterable[str]) -> None:
        ids = set(window_ids)
        if self.held_since is not None:
            ids = {wid for wid in ids if _open_by_clock(wid, self.held_since)}
        if ids:
            self.changed[key] |= ids

    def keep_only(self, keys: set[bytes]) -> None:
        """Forget the keys this worker no longer owns."""
        for key in set(self.changed) - keys:
            del self.changed[key]
        self.published_at = {kw: at for kw, at in self.published_at.items() if kw[0] in keys}

    def forget(self, key: bytes, window_ids: Iterable[str]) -> None:
        """These windows closed: no more refreshes."""
        for wid in window_ids:
            self.published_at.pop((key, wid), None)

    def due(self, now: float) -> dict[bytes, set[str]]:
        """The changed windows, and those due a refresh, to publish now, per key; they count as published."""
        for (key, wid), at in self.published_at.items():
            if now - at >= self.refresh_s:
                self.changed[key].add(wid)
        out: dict[bytes, set[str]] = {}
        for key in list(self.changed):
            waiting = self.changed[key]
            if self.held_since is not None:    # noted in time, but the clock has passed it since
                waiting -= {wid for wid in waiting if not _open_by_clock(wid, now)}
            ready = {wid for wid in waiting if self.next_at.get((key, wid), 0.0) <= now}
            waiting -= ready
            if not waiting:
                del self.changed[key]
            if not ready:
                continue
            out[key] = ready
            for wid in ready:
                size_s = int(wid.split(":", 1)[0])
                self.next_at[(key, wid)] = now + max(self.interval_s, size_s / self.UPDATES_PER_WINDOW)
                self.published_at[(key, wid)] = now
        # A window whose time has come and that has not changed needs no entry: its next change is due at once.
        self.next_at = {kw: at for kw, at in self.next_at.items() if at > now or kw[1] in self.changed.get(kw[0], ())}
        return out


def trend_key(trend: TrendRecord) -> bytes:
    """Kafka key of a trend: one key per (key type, key), so a key's windows stay in order on one partition and
    the detector's table co-partitions with them. Downstream deduplicates by ``trend.window_id``."""
    return f"{trend.key_type}:{trend.key}".encode("utf-8")


# ---------------------------------------------------------------- Faust wiring

SETTLE_TICK_S = 1.0
# A partition with no message for this long (wall clock) is idle: its quiet keys follow the event time of the
# active partitions instead of its own, which has stopped. Long enough that a partition merely slow to be fetched
# under load is not taken for idle (its keys would jump ahead of its unread records, which would then be late).
IDLE_PARTITION_S = 30.0


class StreamClock:
    """The event time each source partition has reached, for keys that have gone quiet (``follow_stream``).

    A quiet key follows its own partition: records of one partition arrive roughly in event time, so its keys share
    one clock, and a backlog consumed round-robin cannot push a key past records its partition has not delivered
    yet. Once its partition is idle, it follows the slowest active partition instead.

    A partition's clock goes as far as its records' input watermarks allow (``stream.input_watermark``), and on to
    its newest record once the scoring agent has caught up with its input (``input_caught_up``): otherwise, after a
    backlog with no message since, the keys would stay held at the last stamps."""

    def __init__(self) -> None:
        self.event_ms: dict[int, int] = {}
        self.newest_ms: dict[int, int] = {}
        self.last_seen: dict[int, float] = {}

    def saw(self, partition: int, t_ms: int, now: float, newest_ms: int | None = None) -> None:
        """Records of ``partition`` arrived: they move its keys up to ``t_ms``; the newest was at ``newest_ms``."""
        if t_ms > self.event_ms.get(partition, -1):
            self.event_ms[partition] = t_ms
        if newest_ms is not None and newest_ms > self.newest_ms.get(partition, -1):
            self.newest_ms[partition] = newest_ms
        self.last_seen[partition] = now

    def input_caught_up(self) -> None:
        """A record arrived that the scoring agent published with no input backlog: every older input message was
        published before it, so each partition's clock may move on to its newest record."""
        for partition, newest in self.newest_ms.items():
            if newest > self.event_ms.get(partition, -1):
                self.event_ms[partition] = newest

    def time_for(self, partition: int, now: float) -> int | None:
        if partition in self.event_ms and now - self.last_seen[partition] <= IDLE_PARTITION_S:
            return self.event_ms[partition]
        return min((self.event_ms[p] for p, seen in self.last_seen.items() if now - seen <= IDLE_PARTITION_S),
                   default=None)


def install(app, settings, names) -> None:
    """Register the topic and ticker aggregation agents (and their tables) on the worker's Faust app."""
    config = settings.section("aggregate", AggregateSettings)
    for key_type, source in (("topic", names.scored), ("ticker", names.scored_by_ticker)):
        _install_key_type(app, settings, config, key_type, source, names)


def trend_outgoing(trend: TrendRecord, names: TopicNames) -> list[Outgoing]:
    """What publishing a trend writes: a closed window to ``trends``, with a tombstone for its partials on
    ``open-windows``; an open window's running figures to ``open-windows``, keyed by window id (so compaction keeps
    the latest) and stamped with the time published (what the dashboard's read of recent partials searches by)."""
    from .app import Outgoing

    window_key = trend.window_id.encode("utf-8")
    if not trend.final:
        return [Outgoing(names.open_windows, window_key, trend.to_json(), None)]
    return [Outgoing(names.trends, trend_key(trend), trend.to_json(), epoch_ms(trend.window_end)),
            Outgoing(names.open_windows, window_key, None, None)]


class KeyTypeAggregation:
    """One key type's windows as the worker keeps them: its agent applies each batch of scored records
    (``apply_batch``) and a timer closes what is due and republishes running figures (``settle_and_publish``), both
    reading and writing the key states in ``table`` (the Faust table: ``get``, ``items``, item assignment and
    ``writes_delivered``) and sending trends through ``publish``. Apart from Faust, so that the order of the two can
    be tested."""

    def __init__(self, config: AggregateSettings, key_type: str, max_batch: int, table,
                 publish: Callable[[list[TrendRecord]], Awaitable[None]], owned_partitions: Callable[[], set[int]],
                 clock: Callable[[], float] = time.time):
        self.config, self.key_type, self.max_batch = config, key_type, max_batch
        self.table, self.publish, self.owned_partitions, self.clock = table, publish, owned_partitions, clock
        self.aggregator = WindowAggregator(config, key_type)
        self.unsettled: set[bytes] = set()             # keys whose watermark advances still wait out the grace
        self.partials = PartialSchedule(config.partial_interval_s, config.partial_refresh_s)   # what to republish
        self.stream_clock = StreamClock()
        # Keys with open windows -> (the partition they are read from, watermark, earliest open window end): what
        # the timer needs to tell, without loading every key's state each second, which quiet keys follow the stream.
        self.open_keys: dict[bytes, tuple[int, int | None, int | None]] = {}
        self.last_partials = 0.0
        self.stock_taken_at = -1                       # the rebalance generation the open keys were last read in
        self.hold_logged, self.hold_logged_at = False, float("-inf")
        # The agent and the timer both read, publish and then write key states: one at a time, or one would write
        # back a state the other has already moved past, or publish a state the other is about to replace.
        self.exclusive = asyncio.Lock()

    async def _commit(self, states: dict[bytes, KeyWindows], closed: list[TrendRecord]) -> None:
        """Closed windows reach the broker before the states that no longer hold them are written: a crash in
        between re-emits the same trends (harmless) instead of losing them."""
        await self.publish(closed)
        for trend in closed:
            WINDOWS_CLOSED.labels(self.key_type, str(trend.window_s)).inc()
        for key_bytes, state in states.items():
            self.table[key_bytes] = state.to_dict()
            (self.unsettled.add if state.pending else self.unsettled.discard)(key_bytes)
            if state.windows and state.offsets:
                self.open_keys[key_bytes] = _follow_info(state)
            else:
                self.open_keys.pop(key_bytes, None)
        await self.table.writes_delivered()

    def _resume_partials(self, why: str) -> None:
        """A backlog has drained: the windows still open are republished, whether or not a message touches them."""
        open_windows = [(key_bytes, (self.table.get(key_bytes) or {}).get("windows", ()))
                        for key_bytes in self.open_keys]
        self.partials.resume(open_windows)
        if self.hold_logged:
            self.hold_logged = False
            log.info("%s aggregation: %s; publishing the running figures of its %d open window(s) again",
                     self.key_type, why, sum(len(windows) for _, windows in open_windows))

    async def apply_batch(self, items: Sequence[tuple[bytes, SourcedRecord]]) -> None:
        """Apply one micro-batch of (message key, record): each key's state is read, changed and written once."""
        by_key: dict[bytes, list[SourcedRecord]] = defaultdict(list)
        moves_to: dict[int, int] = {}  # partition -> how far this batch moves its clock (as far as the stamps allow)
        newest: dict[int, int] = {}    # partition -> the newest event time in this batch
        caught_up, backlog = False, 0
        for key_bytes, item in items:
            by_key[key_bytes].append(item)
            moves_to[item.partition] = max(item.watermark_ms, moves_to.get(item.partition, -1))
            newest[item.partition] = max(item.event_ms, newest.get(item.partition, -1))
            caught_up |= item.input_watermark_ms is None
            backlog = max(backlog, item.input_backlog)
        behind = draining(backlog, self.max_batch)
        async with self.exclusive:
            now = self.clock()
            if behind:
                # A scorer at its limit can cross the backlog mark batch after batch: one pair of lines a minute.
                if self.partials.held_since is None and now - self.hold_logged_at >= 60:
                    self.hold_logged, self.hold_logged_at = True, now
                    log.info("%s aggregation: draining a backlog (%d messages unread); running figures only for "
                             "windows the clock has not passed until it has drained", self.key_type, backlog)
                self.partials.hold(now)
            for partition, t_ms in moves_to.items():
                self.stream_clock.saw(partition, t_ms, now, newest[partition])
            if caught_up:
                self.stream_clock.input_caught_up()
            states, closed = {}, []
            for key_bytes, sourced_events in by_key.items():
                key = key_bytes.decode("utf-8")
                state = states[key_bytes] = KeyWindows.from_dict(self.table.get(key_bytes))
                result = self.aggregator.apply(key, state, sourced_events, now=now)    # once per key per batch
                closed += result.final
                self.partials.note(key_bytes, result.touched.get(key, ()))
                if result.late:
                    LATE_MESSAGES.labels(self.key_type).inc(result.late)
                    log.warning("%s %s: %d message(s) arrived after one or more of their windows closed",
                                self.key_type, key, result.late)
                if result.duplicates:
                    log.info("%s %s: skipped %d message(s) already applied (redelivered after a restart)",
                             self.key_type, key, result.duplicates)
            await self._commit(states, closed)
            if self.partials.held_since is not None and not behind:
                self._resume_partials("the backlog has drained")

    async def settle_and_publish(self, rebalance_generation: int) -> None:
        """The timer's turn: close the windows that are due (keys with no new messages too) and publish the running
        figures that are due. All of it under the agent's lock: the agent notes a batch's changed windows before it
        writes their states, and a partial read in between was the old state (a new window missing from it),
        published and counted as published, so never sent again (seen under load: a backlog's last windows never
        shown, or shown a message short). Nor may a partial go out after the tombstone of its window, closed by a
        batch meanwhile."""
        async with self.exclusive:
            if self.stock_taken_at != rebalance_generation:      # a start or a rebalance since the last look
                self._take_stock()
                self.stock_taken_at = rebalance_generation
            now = self.clock()
            await self._close_what_is_due(now)
            await self._publish_due_partials(now)

    def _take_stock(self) -> None:
        """Which keys this worker owns now wait to settle, have open windows, or owe a partial trend: read from the
        table after every start and rebalance. The keys come from the recovered changelog as much as from this
        process (a restart, or partitions taken over from another worker, whose keys may never see another
        message), and only keys of partitions assigned to this worker count (a memory store keeps the keys it wrote
        itself after their partition moved on)."""
        owned = self.owned_partitions()
        self.unsettled.clear()
        self.open_keys.clear()
        mine = set()
        for key_bytes, value in self.table.items():
            if not value or not value.get("offsets"):
                continue
            state = KeyWindows.from_dict(value)
            info = _follow_info(state)
            if info[0] not in owned:
                continue
            mine.add(key_bytes)
            if state.pending:
                self.unsettled.add(key_bytes)
            if state.windows:
                self.open_keys[key_bytes] = info
                self.partials.note(key_bytes, state.windows)    # its figures now, then refreshed from here on
        self.partials.keep_only(mine)

    async def _close_what_is_due(self, now: float) -> None:
        """Close the windows whose grace has passed (keys with no new messages too)."""
        states, closed = {}, []
        for key_bytes, (partition, watermark_ms, next_close_ms) in list(self.open_keys.items()):
            stream_ms = self.stream_clock.time_for(partition, now)
            if stream_ms is None or not self.aggregator.would_follow(watermark_ms, next_close_ms, stream_ms):
                continue
            state = KeyWindows.from_dict(self.table.get(key_bytes))
            if self.aggregator.follow_stream(state, stream_ms, now):
                states[key_bytes] = state
                self.unsettled.add(key_bytes)
        for key_bytes in list(self.unsettled):
            state = states.get(key_bytes) or KeyWindows.from_dict(self.table.get(key_bytes))
            waiting = len(state.pending)
            closed += self.aggregator.settle(key_bytes.decode("utf-8"), state, now)
            if len(state.pending) != waiting:
                states[key_bytes] = state
        await self._commit(states, closed)
        if self.partials.held_since is not None and now - self.partials.held_since > IDLE_PARTITION_S:
            self._resume_partials(f"no message for {IDLE_PARTITION_S:.0f} s while draining")   # the scorer failed, say

    async def _publish_due_partials(self, now: float) -> None:
        if now - self.last_partials < self.config.partial_interval_s or not self.partials:
            return
        self.last_partials = now
        updates = []
        for key_bytes, window_ids in self.partials.due(now).items():
            value = self.table.get(key_bytes) or {}
            self.partials.forget(key_bytes, window_ids - value.get("windows", {}).keys())
            if value:
                updates += self.aggregator.open_trends(key_bytes.decode("utf-8"), KeyWindows.from_dict(value),
                                                       window_ids)
        await self.publish(updates)


def _install_key_type(app, settings, config: AggregateSettings, key_type: str, source_name: str,
                      names: TopicNames) -> None:
    from .app import deliver, faust_send, finish_batch, finishes_before_stop, micro_batches

    worker = settings.worker
    table = app.Table(f"aggregate-{key_type}", default=None, key_type=bytes, partitions=settings.kafka.partitions,
                      use_partitioner=True, help=f"open windows per {key_type}")
    source = app.topic(source_name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    send = faust_send(app)

    async def publish(trends: list[TrendRecord]) -> None:
        await deliver(send, [out for trend in trends for out in trend_outgoing(trend, names)])

    def owned_partitions() -> set[int]:
        return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == source_name}

    aggregation = KeyTypeAggregation(config, key_type, worker.max_batch, table, publish, owned_partitions)

    async def process(events) -> None:
        parsed = (_parse_event(event, key_type) for event in events)
        await aggregation.apply_batch([item for item in parsed if item is not None])

    @app.agent(source, name=f"aggregate-{key_type}")
    async def aggregate(stream):
        async for events in micro_batches(app, stream, worker):
            # A worker stopping mid-batch must not end the body between publishing and the table write: Faust
            # would ack the batch and its messages would be missing from their windows after the restart.
            await finish_batch(process(events))

    @app.timer(SETTLE_TICK_S, name=f"aggregate-{key_type}-tick")
    @finishes_before_stop(app)
    async def tick():
        """Close windows whose grace has passed (keys with no new messages too) and publish throttled partials."""
        if app.rebalancing:
            # Partitions are moving and tables being recovered: writing a key now could be overwritten by its
            # changelog, or belong to another worker by the time it lands.
            return
        # A stop landing between the closed windows' publishing and their table writes reaching the changelog
        # would leave those writes queued on a stopping producer: the closing finishes first, like a batch.
        await finish_batch(aggregation.settle_and_publish(app.rebalancing_count))


def _follow_info(state: KeyWindows) -> tuple[int, int | None, int | None]:
    """(the input partition a key is read from, its watermark, its earliest open window end). The partition is the
    one with the key's latest applied offset, should the key have moved."""
    return int(max(state.offsets, key=state.offsets.get)), state.watermark_ms, state.next_close_ms


def _parse_event(event, key_type: str) -> tuple[bytes, SourcedRecord] | None:
    """(message key, record) of one consumed event; a malformed record is logged and skipped (its offset still
    counts as consumed: it can never become valid)."""
    message = event.message
    try:
        record = ScoredRecord.from_json(event.value)
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("skipping malformed scored record at %s[%d]@%d: %s", message.topic, message.partition,
                    message.offset, exc)
        return None
    key = event.key
    if not key:
        derived = keys_of(record, key_type)
        if len(derived) != 1:
            log.warning("skipping unkeyed %s record %s at %s[%d]@%d", key_type, record.id, message.topic,
                        message.partition, message.offset)
            return None
        key = derived[0].encode("utf-8")
    lag = read_stamp(message.headers)
    return key, SourcedRecord(record, message.partition, message.offset, lag.watermark_ms, lag.backlog)


__all__ = ["AggregateSettings", "Applied", "KeyTypeAggregation", "KeyWindows", "SourcedRecord", "WindowAggregator",
           "WindowSpec", "install", "keys_of", "parse_duration_s", "trend_key"]
