"""``finpulse ingest``: put news and comments from files and RSS/Atom feeds into Kafka.

Every message is validated with ``records.parse_input`` before it is produced, exactly as the worker will parse
it, and produced in its normalised form (tickers upper-cased or extracted from cashtags, times in UTC) keyed by id,
with the Kafka timestamp set to its event time. A command returns only once the broker has every record.

* ``ingest_file``: JSONL (one JSON object per line) or CSV (a header row naming the fields; ``tickers`` may hold
  several, separated by ``,``, ``;``, ``|`` or spaces; epoch-second/millisecond times are accepted). A bad line is
  reported with its line number and reason and skipped; the rest of the file is still ingested, and the exit code
  is 1 so scripts notice.
* ``ingest_rss``: polls feeds (``--every``), maps entries to news items, and remembers in a state file which
  entries it has produced (by guid, else link), so a restart never produces an entry twice. It sends the feed's
  ETag/Last-Modified back (If-None-Match/If-Modified-Since), so an unchanged feed costs a 304. While it polls (not
  with ``--once``) it serves ``/metrics``, ``/healthz`` and ``/readyz`` (``[ingest] metrics_port``, ``stream.ops``):
  polls and entries per feed and outcome, and when each feed last answered, so a feed that went quiet or broke is
  an alert of its own, not a hole in the trends nobody explains.
"""
from __future__ import annotations

import asyncio
import calendar
import csv
import hashlib
import html
import itertools
import json
import math
import os
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import urlparse

from aiokafka.errors import KafkaError

from models.data import SPREADSHEET_SUFFIXES, csv_separator

from .config import ConfigError, Settings, check_port
from .kafka_io import DeliveryStalled, RecordSender, gave_up_retrying, newest_timestamp_ms
from .metrics import counter, gauge
from .records import (INPUT_FIELDS, InputItem, InvalidRecord, Kind, NewsItem, epoch_ms, format_time, parse_input,
                      utcnow)
from .replay.plan import ReplaySettings
from .topics import TopicNames, ensure_topics

KINDS: dict[str, Kind] = {"news": "news", "comments": "comment", "comment": "comment"}
MAX_REPORTED_LINES = 50
_TICKER_SPLIT = re.compile(r"[,;|\s]+")
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


async def produce_items(settings: Settings, topic: str, items: Iterable[InputItem], client_id: str) -> int:
    """Produce items (normalised JSON, keyed by id, timestamped with their event time); return how many the broker
    acknowledged (or, in a ``DeliveryStalled`` raised, had acknowledged)."""
    async with RecordSender(settings.kafka, client_id=client_id) as sender:
        for item in items:
            await sender.send(topic, item.to_json(), key=item.id.encode("utf-8"), event_time=item.event_time)
        await sender.flush()
        return sender.delivered


# ---------------------------------------------------------------- files

@dataclass
class FileReport:
    lines: int = 0
    produced: int = 0
    rejected: Counter = field(default_factory=Counter)
    shown: int = 0
    # Records written more than [replay] max_disorder_s older than what was written before them: a replay, which
    # finds records assuming each partition is in about event-time order, misses them (stream.replay.select).
    out_of_order: int = 0
    largest_gap_ms: int = 0
    newest_ms: int | None = None

    def written(self, event_ms: int, disorder_ms: int) -> None:
        if self.newest_ms is not None and event_ms < self.newest_ms - disorder_ms:
            self.out_of_order += 1
            self.largest_gap_ms = max(self.largest_gap_ms, self.newest_ms - event_ms)
        self.newest_ms = event_ms if self.newest_ms is None else max(self.newest_ms, event_ms)

    def disorder_warning(self, topic: str, topic_newest_ms: int | None, disorder_s: float) -> str:
        if not self.out_of_order:
            return ""
        before = "earlier lines of this file"
        if topic_newest_ms is not None:
            newest = format_time(datetime.fromtimestamp(topic_newest_ms / 1000, timezone.utc))
            before = f"{topic}'s newest records ({newest}) or {before}"
        return (f"warning: {self.out_of_order} of these records are more than {disorder_s:g} s older than "
                f"{before}. A replay finds records by event time assuming each partition was written in about "
                f"time order (within [replay] max_disorder_s), so it will miss them unless its --max-disorder "
                f"covers the gap (here {_round_up(self.largest_gap_ms / 1000)}); load history oldest first, before "
                f"newer data, to avoid it")

    def reject(self, line_no: int, reason: str, detail: str) -> None:
        from tqdm import tqdm

        self.rejected[reason] += 1
        if self.shown < MAX_REPORTED_LINES:
            tqdm.write(f"line {line_no}: rejected ({reason}): {detail}", file=sys.stderr)
            self.shown += 1
        elif self.shown == MAX_REPORTED_LINES:
            tqdm.write("(more rejected lines are counted but not shown)", file=sys.stderr)
            self.shown += 1


def _detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in SPREADSHEET_SUFFIXES:
        raise ConfigError(f"{path} is a spreadsheet: save it as CSV and ingest that")
    raise ConfigError(f"cannot tell the format of {path} from its name: pass --format jsonl or --format csv")


def _binary_lines(path: Path, progress) -> Iterator[bytes]:
    with open(path, "rb") as f:
        first = f.readline()
        if not first:
            return
        progress.update(len(first))
        # Excel's "CSV UTF-8" starts with a byte-order mark: not part of the first column's name, nor of any JSON.
        yield first.removeprefix(b"\xef\xbb\xbf")
        for line in f:
            progress.update(len(line))
            yield line


def _jsonl_records(path: Path, progress) -> Iterator[tuple[int, bytes]]:
    for line_no, line in enumerate(_binary_lines(path, progress), start=1):
        raw = line.rstrip(b"\r\n")
        if raw.strip():
            yield line_no, raw


def csv_row_to_json(row: dict[str, str | None]) -> bytes:
    """One CSV row as the JSON message ``parse_input`` reads: empty cells are absent, ``tickers`` becomes a list,
    numeric times become numbers. Undecodable bytes stay undecodable (and are rejected as ``invalid_utf8``)."""
    data: dict[str, object] = {}
    for name, value in row.items():
        if name is None or value is None or not value.strip():
            continue
        name = name.strip()
        name = name.lower() if name.lower() in INPUT_FIELDS else name  # "ID", "Headline" as a spreadsheet titles them
        if name == "tickers":
            data[name] = [t for t in _TICKER_SPLIT.split(value) if t]
        elif name in ("published_at", "created_at") and _NUMBER.match(value.strip()):
            data[name] = float(value) if "." in value else int(value)
        else:
            data[name] = value
    return json.dumps(data, ensure_ascii=False).encode("utf-8", "surrogateescape")


def _csv_records(path: Path, progress) -> Iterator[tuple[int, bytes]]:
    text_lines = (line.decode("utf-8", "surrogateescape") for line in _binary_lines(path, progress))
    header = next(text_lines, "")
    reader = csv.DictReader(itertools.chain([header], text_lines), delimiter=csv_separator(header))
    if not reader.fieldnames:
        return
    for row in reader:
        yield reader.line_num, csv_row_to_json(row)


def ingest_file(settings: Settings, path: str | os.PathLike, kind: str, fmt: str = "auto") -> int:
    """``finpulse ingest file``: 0 when every line was ingested, 1 when some were rejected (the rest still are)."""
    from tqdm import tqdm

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} is not a file")
    record_kind = KINDS[kind]
    fmt = _detect_format(path, fmt)
    names = TopicNames(settings.kafka.topic_prefix)
    ensure_topics(settings.kafka, names.all(), names.compacted())
    topic = names.input_for(record_kind)
    max_chars = settings.worker.max_text_chars
    disorder_s = settings.section("replay", ReplaySettings).max_disorder_s
    disorder_ms = int(disorder_s * 1000)
    topic_newest_ms = asyncio.run(newest_timestamp_ms(settings.kafka, topic))
    report = FileReport(newest_ms=topic_newest_ms)

    def valid_items(progress) -> Iterator[InputItem]:
        records = _csv_records(path, progress) if fmt == "csv" else _jsonl_records(path, progress)
        for line_no, raw in records:
            report.lines += 1
            try:
                item = parse_input(raw, record_kind, max_chars)
            except InvalidRecord as exc:
                report.reject(line_no, exc.reason, exc.detail)
                continue
            report.written(epoch_ms(item.event_time), disorder_ms)
            yield item

    try:
        with tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"ingest {path.name}") as progress:
            report.produced = asyncio.run(produce_items(settings, topic, valid_items(progress), "finpulse-ingest"))
    except DeliveryStalled as exc:
        print(f"stopped: {exc.delivered} of the first {report.lines} {kind} records of {path} reached {topic} before "
              f"the broker stopped taking them. Run the same command again once it is back: records are keyed by id, "
              f"and the worker counts a message it gets twice once.", file=sys.stderr, flush=True)
        raise
    rejected = sum(report.rejected.values())
    reasons = ", ".join(f"{r}={n}" for r, n in sorted(report.rejected.items()))
    print(f"ingested {report.produced} of {report.lines} {kind} records from {path} into {topic}"
          + (f"; rejected {rejected} ({reasons})" if rejected else ""), flush=True)
    warning = report.disorder_warning(topic, topic_newest_ms, disorder_s)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    return 1 if rejected else 0


def _round_up(seconds: float) -> str:
    """A duration ``--max-disorder`` takes, at least ``seconds``: whole minutes, hours or days."""
    for unit, size in (("m", 60), ("h", 3600), ("d", 86400)):
        if seconds <= 48 * size or unit == "d":
            return f"{math.ceil(seconds / size)}{unit}"
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- RSS / Atom

@dataclass
class IngestSettings:
    """``[ingest]``: what ``finpulse ingest rss`` serves while it polls."""
    metrics_port: int = 6067        # /metrics, /healthz, /readyz (0 = none); --metrics-port
    metrics_host: str = "0.0.0.0"

    def __post_init__(self) -> None:
        check_port("[ingest] metrics_port", self.metrics_port)


RSS_POLLS = counter("finpulse_rss_polls_total", "Feed fetches by outcome: ok (new content), not_modified (304) or "
                    "failed (unreachable, HTTP error, unparsable).", ["feed", "outcome"])
RSS_ENTRIES = counter("finpulse_rss_entries_total", "Feed entries by outcome: produced to the news topic, "
                      "already_seen (produced before), skipped (no key, or not a valid news item).", ["feed", "outcome"])
RSS_LAST_OK = gauge("finpulse_rss_last_success_timestamp_seconds", "When each feed last answered (200 or 304), "
                    "in Unix seconds: alert on time() minus this.", ["feed"])
SEEN_LIMIT = 50_000          # entries remembered per state file (oldest forgotten first)
RSS_BODY_CHARS = 4_000       # feed summaries can be whole articles: the classifier reads the start anyway
_TAG = re.compile(r"<[^>]+>")


@dataclass
class FeedState:
    """What ``ingest rss`` remembers between polls and restarts (a JSON file)."""
    path: Path
    validators: dict[str, dict[str, str]] = field(default_factory=dict)   # feed url -> {"etag", "modified"}
    seen: dict[str, None] = field(default_factory=dict)                   # entry keys, oldest first

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeedState":
        path = Path(path)
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
            return cls(path, dict(data.get("feeds", {})), dict.fromkeys(data.get("seen", [])))
        except (ValueError, AttributeError) as exc:
            raise ConfigError(f"RSS state file {path} is unreadable ({exc}): fix or remove it") from None

    def save(self) -> None:
        while len(self.seen) > SEEN_LIMIT:
            del self.seen[next(iter(self.seen))]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps({"feeds": self.validators, "seen": list(self.seen)}, indent=1))
        os.replace(tmp, self.path)


def _plain(text: str) -> str:
    return " ".join(html.unescape(_TAG.sub(" ", text or "")).split())


def entry_key(entry) -> str | None:
    """How an entry is recognised again: its guid, else its link, else its title."""
    title = _plain(entry.get("title", ""))
    return entry.get("id") or entry.get("link") or (f"title:{title}" if title else None)


def entry_to_news(entry, feed_url: str, feed_title: str, max_text_chars: int) -> NewsItem:
    """Map a feedparser entry to a validated NewsItem (raises InvalidRecord)."""
    key = entry_key(entry)
    parsed = entry.get("published_parsed") or entry.get("updated_parsed")
    published = datetime.fromtimestamp(calendar.timegm(parsed), tz=timezone.utc) if parsed else utcnow()
    data = {
        "id": "rss-" + hashlib.sha1(f"{feed_url}\n{key}".encode("utf-8")).hexdigest()[:20],
        "source": feed_title or urlparse(feed_url).hostname or "rss",
        "published_at": published.isoformat(),
        "headline": _plain(entry.get("title", "")),
        "body": _plain(entry.get("summary", ""))[:RSS_BODY_CHARS],
        "url": entry.get("link") or "",
    }
    return parse_input(json.dumps(data).encode("utf-8"), "news", max_text_chars)


@dataclass
class PollResult:
    status: int | None
    new: list[tuple[str, NewsItem]]
    already_seen: int = 0
    rejected: int = 0
    error: str = ""
    validators: dict[str, str] | None = None   # the feed's new ETag / Last-Modified: kept once its entries are sent


def poll_feed(url: str, state: FeedState, max_text_chars: int) -> PollResult:
    """Fetch one feed (conditional GET) and return its entries not produced before."""
    import feedparser

    validators = state.validators.get(url, {})
    parsed = feedparser.parse(url, etag=validators.get("etag"), modified=validators.get("modified"),
                              agent="FinPulse-RSS/1.0")
    status = parsed.get("status")
    if status is None or status >= 400:
        return PollResult(status, [], error=str(parsed.get("bozo_exception") or f"HTTP {status}"))
    if status == 304:
        return PollResult(status, [])
    fresh = {k: v for k, v in (("etag", parsed.get("etag")), ("modified", parsed.get("modified"))) if v}
    result = PollResult(status, [], validators=fresh)
    title = _plain(parsed.feed.get("title", ""))
    for entry in parsed.entries:
        key = entry_key(entry)
        if key is None:
            result.rejected += 1
            print(f"{url}: an entry with no guid, link or title skipped", file=sys.stderr, flush=True)
            continue
        if key in state.seen:
            result.already_seen += 1
            continue
        try:
            result.new.append((key, entry_to_news(entry, url, title, max_text_chars)))
        except InvalidRecord as exc:
            result.rejected += 1
            print(f"{url}: entry {key!r} skipped ({exc.reason}: {exc.detail})", file=sys.stderr, flush=True)
    return result


def feed_label(url: str) -> str:
    """A feed as metrics name it: scheme, host and path. Query strings and user info are left out, since feed URLs
    can carry access tokens."""
    parts = urlparse(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


def ingest_rss(settings: Settings, urls: list[str], every: str = "60s", once: bool = False,
               state_path: str | os.PathLike = "var/rss-state.json", metrics_port: int | None = None) -> int:
    """``finpulse ingest rss``: poll until stopped (or once). Exit code 1 when a feed failed on the last poll."""
    from .aggregate import parse_duration_s

    try:
        interval_s = parse_duration_s(every)
    except ValueError as exc:
        raise ConfigError(f"--every: {exc}") from None
    if interval_s <= 0:
        raise ConfigError("--every must be positive")
    options = settings.section("ingest", IngestSettings)
    port = options.metrics_port if metrics_port is None else metrics_port
    if not 0 <= port <= 65535:
        raise ConfigError("[ingest] metrics_port must be a TCP port (0 = no metrics server)")
    names = TopicNames(settings.kafka.topic_prefix)
    ensure_topics(settings.kafka, names.all(), names.compacted())
    state = FeedState.load(state_path)
    poller = _FeedPoller(settings, names, urls, state)
    return asyncio.run(poller.run(interval_s, once, None if once or not port else
                                  (options.metrics_host, port)))


class _FeedPoller:
    """The polling loop of ``ingest_rss``, counted for ``/metrics`` and ``/readyz``."""

    def __init__(self, settings: Settings, names: TopicNames, urls: list[str], state: FeedState):
        self.settings, self.names, self.urls, self.state = settings, names, urls, state
        self.last_error: dict[str, str] = {}        # feed url -> why its last poll failed ("" when it answered)

    def readiness(self) -> tuple[bool, str]:
        if len(self.last_error) < len(self.urls):
            return False, f"first poll under way ({len(self.last_error)} of {len(self.urls)} feeds polled)"
        failing = [f"{feed_label(url)}: {error}" for url, error in self.last_error.items() if error]
        if len(failing) == len(self.urls):
            return False, "every feed failed its last poll: " + "; ".join(failing)
        return True, f"{len(self.urls) - len(failing)} of {len(self.urls)} feeds answered their last poll" + (
            f" (failing: {'; '.join(failing)})" if failing else "")

    async def run(self, interval_s: float, once: bool, serve: tuple[str, int] | None) -> int:
        from .ops import READINESS, OpsServer

        stop = asyncio.Event()
        if not once:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        server = OpsServer(*serve, setting="[ingest] metrics_port (--metrics-port)") if serve else None
        if server is not None:
            await server.start()
            READINESS.add("feeds", self.readiness)
        try:
            while True:
                failed = 0
                for url in self.urls:
                    failed += not await self.poll(url)
                if once or stop.is_set():
                    return 1 if failed else 0
                try:
                    await asyncio.wait_for(stop.wait(), interval_s)
                    return 0
                except asyncio.TimeoutError:
                    pass
        finally:
            if server is not None:
                READINESS.remove("feeds", self.readiness)
                await server.stop()

    async def poll(self, url: str) -> bool:
        """Poll one feed and produce its new entries; False when the fetch failed."""
        feed = feed_label(url)
        result = await asyncio.to_thread(poll_feed, url, self.state, self.settings.worker.max_text_chars)
        if result.error:
            RSS_POLLS.labels(feed, "failed").inc()
            self.last_error[url] = result.error
            print(f"{url}: fetch failed: {result.error}", file=sys.stderr, flush=True)
            return False
        items = [item for _, item in result.new]
        try:
            produced = await produce_items(self.settings, self.names.news, items, "finpulse-rss") if items else 0
        except KafkaError as exc:     # not marked seen: the next poll sends them again
            if not gave_up_retrying(exc):
                raise                 # refused by the broker (too large, not authorised): polling on would not help
            RSS_POLLS.labels(feed, "failed").inc()
            self.last_error[url] = str(exc)
            print(f"{url}: {len(items)} new entries not sent: {exc}; the next poll tries again", file=sys.stderr,
                  flush=True)
            return False
        # Only once the broker has them: validators kept before were sent back at the next poll, the feed answered
        # "not modified", and the entries the broker never took were lost.
        self.state.seen.update(dict.fromkeys(key for key, _ in result.new))
        if result.validators is not None:
            self.state.validators[url] = result.validators
        self.state.save()
        RSS_POLLS.labels(feed, "not_modified" if result.status == 304 else "ok").inc()
        for outcome, count in (("produced", produced), ("already_seen", result.already_seen),
                               ("skipped", result.rejected)):
            RSS_ENTRIES.labels(feed, outcome).inc(count)
        RSS_LAST_OK.labels(feed).set(time.time())
        self.last_error[url] = ""
        note = "not modified" if result.status == 304 else f"{produced} new, {result.already_seen} already seen"
        print(f"{url}: {note}" + (f", {result.rejected} skipped" if result.rejected else ""), flush=True)
        return True
