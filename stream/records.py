"""Every record FinPulse puts on Kafka, defined once: inputs (news, comments) and outputs (scored, dead letters,
window trends, alerts).

All records travel as UTF-8 JSON objects. Times are ISO-8601 UTC strings on the wire (``2026-11-22T12:00:00.250Z``)
and ``datetime`` (tz-aware, UTC) in Python. Producers that write FinPulse topics also set the Kafka record
timestamp to the event time, so a replay can search record timestamps (see ``stream.replay``).

Inputs are parsed strictly by ``parse_input``: anything malformed raises ``InvalidRecord`` with a machine-readable
``reason`` (one of ``REJECT_REASONS``) and the worker sends the original bytes to the dead-letter topic.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar, Literal, Mapping

Kind = Literal["news", "comment"]
SENTIMENTS = ("bearish", "neutral", "bullish")
SEVERITIES = ("info", "warning", "critical")   # alert severities, lowest first

REJECT_REASONS = (
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "bad_timestamp",
    "empty_text",
    "oversized_text",
    "unscorable",
)

# $AAPL, $BRK.B, $RDS-A; not $5 or $1.2bn. Upper-case only, as tickers are written.
_CASHTAG = re.compile(r"(?<![\w$])\$([A-Z]{1,6}(?:[.\-][A-Z]{1,2})?)\b")
EXCERPT_CHARS = 280


class InvalidRecord(ValueError):
    def __init__(self, reason: str, detail: str):
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------- time helpers

def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def format_time(ts: datetime) -> str:
    return ts.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: Any, field_name: str = "time") -> datetime:
    """ISO-8601 (naive means UTC) or epoch seconds / milliseconds."""
    if isinstance(value, bool):
        raise InvalidRecord("wrong_type", f"{field_name} must be an ISO-8601 string or epoch number")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise InvalidRecord("bad_timestamp", f"{field_name} is not finite")
        seconds = value / 1000.0 if value > 1e11 else float(value)
        try:
            return datetime.fromtimestamp(seconds, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise InvalidRecord("bad_timestamp", f"{field_name}={value!r} is out of range") from None
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            ts = datetime.fromisoformat(text)
        except ValueError:
            raise InvalidRecord("bad_timestamp", f"{field_name}={value[:64]!r} is not ISO-8601") from None
        try:
            return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)
        except OverflowError:  # e.g. 0001-01-01T00:00:00+05:00 is before datetime.min in UTC
            raise InvalidRecord("bad_timestamp", f"{field_name}={value[:64]!r} is out of range") from None
    raise InvalidRecord("wrong_type", f"{field_name} must be an ISO-8601 string or epoch number")


def epoch_ms(ts: datetime) -> int:
    return int(round(ts.timestamp() * 1000))


def extract_cashtags(text: str) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for match in _CASHTAG.finditer(text):
        seen.setdefault(match.group(1), None)
    return tuple(seen)


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


# ---------------------------------------------------------------- base

class _Record:
    """JSON (de)serialisation shared by every record: datetimes as ISO strings, tuples as lists."""

    _time_fields: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, datetime):
                value = format_time(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        kwargs = {k: v for k, v in data.items() if k in names}
        for name in cls._time_fields:
            if kwargs.get(name) is not None:
                kwargs[name] = parse_time(kwargs[name], name)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if isinstance(kwargs.get(f.name), list) and "tuple" in str(f.type):
                kwargs[f.name] = tuple(kwargs[f.name])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, raw: bytes | str):
        return cls.from_dict(json.loads(raw))


# ---------------------------------------------------------------- inputs

@dataclass(frozen=True)
class NewsItem(_Record):
    id: str
    source: str
    published_at: datetime
    headline: str
    body: str = ""
    url: str = ""
    tickers: tuple[str, ...] = ()

    kind: ClassVar[str] = "news"
    _time_fields: ClassVar[tuple[str, ...]] = ("published_at",)

    @property
    def event_time(self) -> datetime:
        return self.published_at

    @property
    def text(self) -> str:
        """What the classifier reads: the headline, then the body (the scorer truncates by tokens)."""
        return f"{self.headline}. {self.body}" if self.body else self.headline


@dataclass(frozen=True)
class CommentItem(_Record):
    id: str
    source: str
    created_at: datetime
    text: str
    author: str = ""
    parent_id: str | None = None
    tickers: tuple[str, ...] = ()

    kind: ClassVar[str] = "comment"
    _time_fields: ClassVar[tuple[str, ...]] = ("created_at",)

    @property
    def event_time(self) -> datetime:
        return self.created_at

    @property
    def url(self) -> str:
        return ""


InputItem = NewsItem | CommentItem

# field -> (required, accepted python types)
_NEWS_FIELDS = {
    "id": (True, (str, int)), "source": (False, (str,)), "published_at": (True, (str, int, float)),
    "headline": (True, (str,)), "body": (False, (str, type(None))), "url": (False, (str, type(None))),
    "tickers": (False, (list, type(None))),
}
_COMMENT_FIELDS = {
    "id": (True, (str, int)), "source": (False, (str,)), "created_at": (True, (str, int, float)),
    "text": (True, (str,)), "author": (False, (str, type(None))), "parent_id": (False, (str, int, type(None))),
    "tickers": (False, (list, type(None))),
}
INPUT_FIELDS = frozenset(_NEWS_FIELDS) | frozenset(_COMMENT_FIELDS)  # every name an input message's fields may have


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def parse_input(raw: bytes, kind: Kind, max_text_chars: int) -> InputItem:
    """Strictly parse one input message; raise ``InvalidRecord`` saying exactly what is wrong."""
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRecord("invalid_utf8", f"byte {exc.start} is not valid UTF-8") from None
    try:
        data = json.loads(decoded)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRecord("invalid_json", str(exc)[:200]) from None
    if not isinstance(data, dict):
        raise InvalidRecord("not_an_object", f"expected a JSON object, got {type(data).__name__}")
    if "\\u" in decoded:  # a \ud800-style escape decodes to a lone surrogate, which no UTF-8 output can carry
        for name, value in data.items():
            for text in (value if isinstance(value, list) else [value]):
                if isinstance(text, str) and not _encodable(text):
                    raise InvalidRecord("invalid_utf8", f"'{name}' contains an unpaired UTF-16 surrogate escape")
    spec = _NEWS_FIELDS if kind == "news" else _COMMENT_FIELDS
    for name, (required, types) in spec.items():
        if name not in data or data[name] is None:
            if required:
                raise InvalidRecord("missing_field", f"{kind} message has no '{name}'")
            continue
        if not isinstance(data[name], types) or isinstance(data[name], bool):
            raise InvalidRecord("wrong_type", f"'{name}' must be {'/'.join(t.__name__ for t in types if t is not type(None))}, got {type(data[name]).__name__}")
    tickers = data.get("tickers")
    if tickers is not None and not all(isinstance(t, str) for t in tickers):
        raise InvalidRecord("wrong_type", "'tickers' must be a list of strings")
    ident = str(data["id"]).strip()
    if not ident:
        raise InvalidRecord("missing_field", "'id' is empty")

    if kind == "news":
        item: InputItem = NewsItem(
            id=ident, source=data.get("source") or "unknown",
            published_at=parse_time(data["published_at"], "published_at"),
            headline=data["headline"].strip(), body=(data.get("body") or "").strip(), url=data.get("url") or "",
            tickers=(),
        )
    else:
        parent = data.get("parent_id")
        item = CommentItem(
            id=ident, source=data.get("source") or "unknown",
            created_at=parse_time(data["created_at"], "created_at"),
            text=data["text"].strip(), author=data.get("author") or "",
            parent_id=None if parent is None else str(parent), tickers=(),
        )
    text = item.text
    if not text.strip():
        raise InvalidRecord("empty_text", f"{kind} {ident} has no text to score")
    if len(text) > max_text_chars:
        raise InvalidRecord("oversized_text", f"{kind} {ident} has {len(text)} characters (limit {max_text_chars})")
    given = tuple(dict.fromkeys(t.strip().upper().lstrip("$") for t in (tickers or []) if t.strip()))
    return dataclasses.replace(item, tickers=given or extract_cashtags(text))


# ---------------------------------------------------------------- outputs

@dataclass(frozen=True)
class ScoredRecord(_Record):
    id: str
    kind: str
    event_time: datetime
    text: str                 # an excerpt, not the whole body
    topic: str
    topic_confidence: float
    sentiment: str            # bearish | neutral | bullish
    sentiment_score: float    # P(bullish) - P(bearish), in [-1, 1]
    tickers: tuple[str, ...]
    model_version: str
    scored_at: datetime
    source: str = ""
    url: str = ""
    run_id: str = ""          # empty for live; the replay run otherwise

    _time_fields: ClassVar[tuple[str, ...]] = ("event_time", "scored_at")


@dataclass(frozen=True)
class DeadLetter(_Record):
    reason: str               # one of REJECT_REASONS
    detail: str
    source_topic: str
    source_partition: int
    source_offset: int
    original_b64: str         # the original bytes, exactly as consumed
    failed_at: datetime
    original_key_b64: str | None = None

    _time_fields: ClassVar[tuple[str, ...]] = ("failed_at",)

    @property
    def original(self) -> bytes:
        return base64.b64decode(self.original_b64)

    @staticmethod
    def encode_bytes(raw: bytes | None) -> str | None:
        return None if raw is None else base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class MessageRef(_Record):
    """One message behind a window or an alert (the most negative ones are kept)."""
    id: str
    text: str
    sentiment_score: float
    kind: str = ""
    url: str = ""
    event_time: str = ""


@dataclass(frozen=True)
class TrendRecord(_Record):
    """One window of one key (a topic or a ticker), published when it closes (final) and while open (partial)."""
    key_type: str             # topic | ticker
    key: str
    window_s: int
    window_start: datetime
    window_end: datetime
    count: int
    mean_score: float
    bearish_share: float
    bullish_share: float
    news_count: int
    comment_count: int
    final: bool
    model_version: str
    emitted_at: datetime
    most_negative: tuple[dict, ...] = ()   # MessageRef dicts
    run_id: str = ""
    topic: str = ""           # a ticker window: the topic most of its messages were classified as (ties: first by name)

    _time_fields: ClassVar[tuple[str, ...]] = ("window_start", "window_end", "emitted_at")

    @property
    def about_topic(self) -> str:
        """The topic the window is about: a topic window's key, a ticker window's dominant topic ("" if unknown)."""
        return self.key if self.key_type == "topic" else self.topic

    @property
    def window_id(self) -> str:
        return f"{self.key_type}:{self.key}:{self.window_s}:{format_time(self.window_start)}"


@dataclass(frozen=True)
class AlertRecord(_Record):
    """A negative-spike alert event. ``id`` is stable for one episode: its firing, its escalations and its resolve
    share it. An escalation is a ``firing`` event with ``escalated_from`` set: the episode reached a higher severity
    than any sent before for it (``escalated_from``, the highest one until then)."""
    id: str
    status: str               # firing | resolved
    key_type: str
    key: str
    window_s: int
    window_start: datetime
    window_end: datetime
    severity: str             # one of SEVERITIES; a resolve carries the highest the episode reached
    observed: dict            # {"bearish_share", "mean_score", "count"}
    baseline: dict            # {"bearish_share", "bearish_share_std", "mean_score", "mean_score_std"}
    deviation: float          # how many baseline standard deviations the window moved (the larger of the two signals)
    started_at: datetime
    emitted_at: datetime
    resolved_at: datetime | None = None
    messages: tuple[dict, ...] = ()        # MessageRef dicts, most negative first
    summary: str = ""
    model_version: str = ""
    run_id: str = ""
    escalated_from: str = ""  # an escalation: the severity it rose from; empty for every other event
    topic: str = ""           # what it is about: a topic alert's key; a ticker alert's dominant topic when it fired

    @property
    def about_topic(self) -> str:
        """The topic the alert is about ("" when unknown: a ticker alert emitted before tickers carried one)."""
        return self.key if self.key_type == "topic" else self.topic

    _time_fields: ClassVar[tuple[str, ...]] = ("window_start", "window_end", "started_at", "emitted_at", "resolved_at")

    @property
    def event_kind(self) -> str:
        """``firing`` (opens the episode), ``escalation`` or ``resolved``: what counts episodes counts ``firing``."""
        return "escalation" if self.escalated_from else self.status

    @property
    def episode_id(self) -> str:
        """What receivers deduplicate and group on (webhook-id, PagerDuty dedup_key): the id, plus the run id for a
        replay's alert, so that replays collide neither with live alerts nor with each other. ``id`` itself leaves
        the run out (replay output is the same whatever the run id), and a live alert's stays as it always was."""
        return f"{self.id}@{self.run_id}" if self.run_id else self.id

    @property
    def event_id(self) -> str:
        """Identifies this notification: the unit of delivery dedup. ``<episode>:firing`` and ``<episode>:resolved``
        as always; an escalation names the severity it reached, ``<episode>:firing:critical``."""
        return alert_event_id(self.episode_id, self.status, self.severity if self.escalated_from else "")

    def event_id_of(self, status: str) -> str:
        """The event id of this episode's firing or resolve (a resolve finds its firing's deliveries by it)."""
        return alert_event_id(self.episode_id, status)

    def firing_event_ids(self) -> tuple[str, ...]:
        """The event ids this episode's firing and every escalation it could have had are sent under, lowest first."""
        return (self.event_id_of("firing"),
                *(alert_event_id(self.episode_id, "firing", severity) for severity in SEVERITIES[1:]))


def alert_event_id(episode_id: str, status: str, escalated_to: str = "") -> str:
    """``<episode>:<status>``, or ``<episode>:firing:<severity>`` for the escalation that reached ``escalated_to``."""
    return f"{episode_id}:{status}:{escalated_to}" if escalated_to else f"{episode_id}:{status}"


def severity_rank(severity: str) -> int:
    """0 for info up to 2 for critical; an unknown severity ranks as the highest, so it is never filtered away."""
    return SEVERITIES.index(severity) if severity in SEVERITIES else len(SEVERITIES) - 1
