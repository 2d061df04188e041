"""Silences, in the spirit of Alertmanager's: "do not notify about these alerts from then until then, because ...".

A risk team knows ahead of time when FinPulse would page them for nothing (an earnings call on a ticker, an OPEC
meeting for "Energy | Oil", a vendor outage). A silence names the alerts it covers by matchers on the alert's
fields (``key``, ``key_type``, ``severity``, ``about``: the topic a topic or ticker alert is about) and on the
endpoint (``endpoint``), all of which must match; it runs
from ``starts_at`` to ``ends_at`` and says who made it and why. A silenced alert is still an alert (the topic, the
dashboard and replays have it); only its notification is withheld (see ``alerts.dispatch`` for what the dispatcher
records and sends when a silence ends).

Silences are records on the compacted ``finpulse.silences`` topic, keyed by silence id, so every dispatcher sees the
same ones, they survive restarts, and the dashboard shows them. Expiring a silence early writes it again with
``ends_at`` = now: the latest record per id is the silence.
"""
from __future__ import annotations

import asyncio
import re
import secrets
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import ClassVar, Iterable

from aiokafka import AIOKafkaProducer

from stream.config import ConfigError, KafkaSettings
from stream.kafka_io import FollowedTopic, bootstrap_list, read_topic_async
from stream.kafka_security import client_security
from stream.records import SEVERITIES, AlertRecord, _Record, epoch_ms, format_time, utcnow

# The fields a matcher may name: the alert's own (``about``: the topic it is about, a ticker alert's too), and the
# endpoint the notification would go to.
MATCHABLE = ("key", "key_type", "severity", "about", "endpoint")
# Shorthands a risk team types: ``topic=Energy | Oil`` is ``key_type=topic`` and ``key=Energy | Oil``.
KEY_TYPE_SHORTHANDS = ("topic", "ticker")
OPERATORS = ("!=", "=~", "!~", "=")       # longest first: "!=" must not parse as "=" with a name ending in "!"
MAX_DURATION = timedelta(days=90)          # a silence longer than a quarter is a filter: configure the endpoint


@dataclass(frozen=True)
class Matcher:
    """``name op value``: ``=`` equal, ``!=`` not equal, ``=~`` the whole value matches the regex, ``!~`` it does not."""
    name: str
    op: str
    value: str

    @classmethod
    def parse(cls, text: str) -> list["Matcher"]:
        """One matcher from ``name=value`` (or ``!=``, ``=~``, ``!~``); a ``topic=``/``ticker=`` shorthand gives two."""
        for op in OPERATORS:
            name, found, value = text.partition(op)
            if found:
                break
        else:
            raise ConfigError(f"matcher {text!r}: write NAME=VALUE (or !=, =~, !~), NAME one of "
                              f"{', '.join(MATCHABLE + KEY_TYPE_SHORTHANDS)}")
        name, value = name.strip(), value.strip()
        if name in KEY_TYPE_SHORTHANDS:
            if op not in ("=", "=~"):
                raise ConfigError(f"matcher {text!r}: {name}= takes = or =~ (write key!=... with key_type={name})")
            return [cls("key_type", "=", name), cls("key", op, value)]
        matcher = cls(name, op, value)
        matcher.check()
        return [matcher]

    def check(self) -> None:
        if self.name not in MATCHABLE:
            raise ConfigError(f"matcher {self}: unknown name {self.name!r}; use one of "
                              f"{', '.join(MATCHABLE + KEY_TYPE_SHORTHANDS)}")
        if not self.value:
            raise ConfigError(f"matcher {self}: the value is empty")
        if self.op in ("=~", "!~"):
            try:
                re.compile(self.value)
            except re.error as exc:
                raise ConfigError(f"matcher {self}: not a regular expression ({exc})") from None
        elif self.name == "severity" and self.value not in SEVERITIES:
            raise ConfigError(f"matcher {self}: severity is one of {', '.join(SEVERITIES)}")
        elif self.name == "key_type" and self.value not in KEY_TYPE_SHORTHANDS:
            raise ConfigError(f"matcher {self}: key_type is topic or ticker")

    def matches(self, fields: dict[str, str]) -> bool:
        actual = fields.get(self.name, "")
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        found = re.fullmatch(self.value, actual) is not None
        return found if self.op == "=~" else not found

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.value}"


@dataclass(frozen=True)
class Silence(_Record):
    id: str
    matchers: tuple[str, ...]      # as written: "key_type=topic", "key=Energy | Oil", "severity!=critical"
    starts_at: datetime
    ends_at: datetime
    created_by: str
    comment: str
    created_at: datetime
    updated_at: datetime

    _time_fields: ClassVar[tuple[str, ...]] = ("starts_at", "ends_at", "created_at", "updated_at")

    def parsed(self) -> list[Matcher]:
        return [m for text in self.matchers for m in Matcher.parse(text)]

    def active(self, at: datetime) -> bool:
        return self.starts_at <= at < self.ends_at

    def state(self, at: datetime) -> str:
        return "pending" if at < self.starts_at else "active" if at < self.ends_at else "expired"

    def matches(self, alert: AlertRecord, endpoint: str) -> bool:
        fields = alert_fields(alert, endpoint)
        return all(m.matches(fields) for m in self.parsed())


def alert_fields(alert: AlertRecord, endpoint: str = "") -> dict[str, str]:
    """What matchers see of an alert event going to ``endpoint``."""
    return {"key": alert.key, "key_type": alert.key_type, "severity": alert.severity, "about": alert.about_topic,
            "endpoint": endpoint}


def new_silence(matchers: Iterable[str], starts_at: datetime, ends_at: datetime, created_by: str,
                comment: str) -> Silence:
    """A silence checked for sense: at least one matcher, each valid; it ends after it starts and after now, and
    lasts at most MAX_DURATION; it says who and why."""
    matchers = tuple(matchers)
    if not matchers:
        raise ConfigError("a silence needs at least one --match: one with none would silence every alert")
    parsed = [m for text in matchers for m in Matcher.parse(text)]
    if all(m.op in ("!=", "!~") for m in parsed):
        raise ConfigError("a silence needs at least one = or =~ matcher: negative ones alone silence almost everything")
    if ends_at <= starts_at:
        raise ConfigError(f"the silence ends ({format_time(ends_at)}) before it starts ({format_time(starts_at)})")
    if ends_at <= utcnow():
        raise ConfigError(f"the silence ends in the past ({format_time(ends_at)})")
    if ends_at - starts_at > MAX_DURATION:
        raise ConfigError(f"a silence lasts at most {MAX_DURATION.days} days; for longer, change the endpoint's filters")
    if not comment.strip():
        raise ConfigError("say why in --comment: whoever finds the silence later needs to know")
    if not created_by.strip():
        raise ConfigError("say who in --author")
    now = utcnow()
    return Silence(id="sil_" + secrets.token_hex(6), matchers=tuple(str(m) for m in parsed), starts_at=starts_at,
                   ends_at=ends_at, created_by=created_by.strip(), comment=comment.strip(), created_at=now,
                   updated_at=now)


def expired_now(silence: Silence) -> Silence:
    """The silence ended now (expiring one early); one already over stays as it is."""
    now = utcnow()
    if silence.ends_at <= now:
        return silence
    return replace(silence, ends_at=max(now, silence.starts_at), updated_at=now)


class SilenceBook(FollowedTopic):
    """The silences topic as a dict of latest silences, read to its end at start and followed (``poll``).

    One consumer assigned every partition, no group: every dispatcher reads every silence."""

    def __init__(self, kafka: KafkaSettings, topic: str):
        super().__init__(kafka, topic)
        self.silences: dict[str, Silence] = {}

    def apply(self, raw: bytes | None) -> Silence | None:
        if raw is None:
            return None
        try:
            silence = Silence.from_json(raw)
            silence.parsed()
        except (ValueError, TypeError, KeyError):
            return None  # not a silence this version can read: never let it silence anything
        known = self.silences.get(silence.id)
        if known is None or silence.updated_at >= known.updated_at:
            self.silences[silence.id] = silence
        return silence

    def silencing(self, alert: AlertRecord, endpoint: str, at: datetime) -> Silence | None:
        """The active silence (at ``at``) that covers ``alert`` for ``endpoint``, the one ending last; None if none."""
        covering = [s for s in self.silences.values() if s.active(at) and s.matches(alert, endpoint)]
        return max(covering, key=lambda s: s.ends_at, default=None)

    def active_count(self, at: datetime) -> int:
        return sum(s.active(at) for s in self.silences.values())


# ---------------------------------------------------------------- `finpulse silence` (one-shot reads and writes)

async def read_silences(kafka: KafkaSettings, topic: str) -> dict[str, Silence]:
    book = SilenceBook(kafka, topic)
    for record in await read_topic_async(kafka, topic):
        book.apply(record.value)
    return book.silences


async def write_silence(kafka: KafkaSettings, topic: str, silence: Silence) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_list(kafka.bootstrap_servers), acks="all",
                                client_id="finpulse-silence", **client_security(kafka))
    await producer.start()
    try:
        await producer.send_and_wait(topic, silence.to_json(), key=silence.id.encode("utf-8"),
                                     timestamp_ms=epoch_ms(silence.updated_at))
    finally:
        await producer.stop()


def run_silence(args, settings) -> int:
    """``finpulse silence add|list|expire``."""
    from stream.aggregate import parse_duration_s
    from stream.records import InvalidRecord, parse_time
    from stream.topics import TopicNames, ensure_topics

    names = TopicNames(settings.kafka.topic_prefix)
    if args.silence_action == "add":   # a bad matcher or time is told before anything connects to Kafka
        try:
            starts = parse_time(args.starts, "--starts") if args.starts else utcnow()
            ends = (parse_time(args.until, "--until") if args.until
                    else starts + timedelta(seconds=parse_duration_s(args.duration)))
        except (InvalidRecord, ValueError) as exc:
            raise ConfigError(str(exc)) from None
        silence = new_silence(args.match, starts, ends, args.author or "", args.comment)
        ensure_topics(settings.kafka, [names.silences], names.compacted())
        asyncio.run(write_silence(settings.kafka, names.silences, silence))
        print(silence.id)
        print(f"  {_describe(silence, utcnow())}")
        return 0
    ensure_topics(settings.kafka, [names.silences], names.compacted())
    known = asyncio.run(read_silences(settings.kafka, names.silences))
    now = utcnow()
    if args.silence_action == "expire":
        silence = known.get(args.silence_id)
        if silence is None:
            raise ConfigError(f"no silence {args.silence_id!r} on {names.silences} (`finpulse silence list --all`)")
        if silence.ends_at <= now:
            print(f"{silence.id} had ended already ({format_time(silence.ends_at)}): nothing changed")
            return 0
        ended = expired_now(silence)
        asyncio.run(write_silence(settings.kafka, names.silences, ended))
        print(f"{silence.id} expired now: what it held and is still firing goes out within seconds")
        return 0
    shown = sorted((s for s in known.values() if args.all or s.ends_at > now), key=lambda s: (s.starts_at, s.id))
    if not shown:
        print(f"no silences {'at all' if args.all else 'in force or to come'} on {names.silences}")
    for silence in shown:
        print(f"{silence.id}  {_describe(silence, now)}")
    return 0


def _describe(silence: Silence, now: datetime) -> str:
    state = silence.state(now)
    when = (f"from {format_time(silence.starts_at)} " if state == "pending" else "") + (
        f"ended {format_time(silence.ends_at)}" if state == "expired" else f"until {format_time(silence.ends_at)}")
    return f"{state:<8} {when}  [{', '.join(silence.matchers)}]  by {silence.created_by}: {silence.comment}"
