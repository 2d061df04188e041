"""Record schemas: strict input parsing (every reject reason), normalisation, and JSON round trips."""
from __future__ import annotations

import json
import random
from datetime import datetime, timezone

import pytest

from stream.records import (REJECT_REASONS, AlertRecord, CommentItem, DeadLetter, InvalidRecord, NewsItem,
                            ScoredRecord, TrendRecord, excerpt, extract_cashtags, format_time, parse_input, parse_time)
from stream.simulate import malformed

T = datetime(2026, 3, 2, 9, 30, 15, 250000, tzinfo=timezone.utc)


def news(**fields) -> bytes:
    data = {"id": "n1", "source": "wire", "published_at": "2026-03-02T09:30:15.250Z", "headline": "Oil falls", **fields}
    return json.dumps(data).encode()


def test_news_is_parsed_and_normalised():
    item = parse_input(news(body=" Brent down. ", url="https://x/1", tickers=["xom", "$CVX", "XOM", " "]), "news", 1000)
    assert isinstance(item, NewsItem)
    assert item.published_at == T and item.event_time == T
    assert item.text == "Oil falls. Brent down."
    assert item.tickers == ("XOM", "CVX")          # upper-cased, $ dropped, deduplicated, blanks ignored


def test_comment_takes_cashtags_when_no_tickers_given():
    raw = json.dumps({"id": 7, "created_at": 1_772_443_815_250, "text": "$AAPL and $BRK.B up, not $5 or $aapl",
                      "author": "a", "parent_id": 6}).encode()
    item = parse_input(raw, "comment", 1000)
    assert isinstance(item, CommentItem)
    assert (item.id, item.parent_id, item.source) == ("7", "6", "unknown")
    assert item.created_at == T                     # epoch milliseconds
    assert item.tickers == ("AAPL", "BRK.B")
    assert extract_cashtags("$1.2bn for $TSLA") == ("TSLA",)


@pytest.mark.parametrize("value, expected", [
    ("2026-03-02T09:30:15.250", T),                 # naive means UTC
    ("2026-03-02T10:30:15.250+01:00", T),
    (1_772_443_815.25, T),                          # epoch seconds
])
def test_times_accept_iso_and_epoch(value, expected):
    assert parse_time(value) == expected
    assert parse_time(format_time(expected)) == expected


@pytest.mark.parametrize("raw, reason", [
    (b"\xff{}", "invalid_utf8"),
    (news(headline="a \\ud800 b").replace(b"\\\\", b"\\"), "invalid_utf8"),   # lone surrogate escape
    (b"{nope", "invalid_json"),
    (b"[]", "not_an_object"),
    (news(id=None), "missing_field"),
    (news(tickers="XOM"), "wrong_type"),
    (news(published_at="0001-01-01T00:00:00+05:00"), "bad_timestamp"),
    (news(published_at=1e30), "bad_timestamp"),
    (news(headline="  "), "empty_text"),
    (news(headline="x" * 101), "oversized_text"),
])
def test_each_kind_of_bad_input_has_its_reason(raw, reason):
    with pytest.raises(InvalidRecord) as info:
        parse_input(raw, "news", 100)
    assert info.value.reason == reason and info.value.detail


def test_fuzz_generator_covers_every_input_reason_and_names_it_correctly():
    rng = random.Random(3)
    seen = set()
    for i in range(600):
        kind = ("news", "comment")[i % 2]
        raw, expected = malformed(rng, kind, max_text_chars=300)
        with pytest.raises(InvalidRecord) as info:
            parse_input(raw, kind, 300)
        assert info.value.reason == expected, (raw[:120], info.value)
        seen.add(expected)
    assert seen == set(REJECT_REASONS) - {"unscorable"}     # unscorable is the scorer's verdict, not the parser's


def test_output_records_round_trip_through_json():
    scored = ScoredRecord(id="n1", kind="news", event_time=T, text="Oil falls", topic="Energy | Oil",
                          topic_confidence=0.9, sentiment="bearish", sentiment_score=-0.7, tickers=("XOM",),
                          model_version="m1", scored_at=T)
    letter = DeadLetter(reason="invalid_json", detail="d", source_topic="t", source_partition=1, source_offset=5,
                        original_b64=DeadLetter.encode_bytes(b"\xff raw"), failed_at=T, original_key_b64=None)
    trend = TrendRecord(key_type="topic", key="Energy | Oil", window_s=60, window_start=T, window_end=T, count=3,
                        mean_score=-0.2, bearish_share=0.5, bullish_share=0.1, news_count=1, comment_count=2,
                        final=True, model_version="m1", emitted_at=T, most_negative=({"id": "n1"},))
    alert = AlertRecord(id="a1", status="firing", key_type="topic", key="Energy | Oil", window_s=60, window_start=T,
                        window_end=T, severity="warning", observed={"count": 3}, baseline={}, deviation=3.5,
                        started_at=T, emitted_at=T)
    for record in (scored, letter, trend, alert):
        assert type(record).from_json(record.to_json()) == record
    assert json.loads(scored.to_json())["event_time"] == "2026-03-02T09:30:15.250Z"
    assert DeadLetter.from_json(letter.to_json()).original == b"\xff raw"


def test_excerpt_collapses_whitespace_and_marks_the_cut():
    assert excerpt("a\n\n b") == "a b"
    cut = excerpt("word " * 100, limit=20)
    assert len(cut) <= 20 and cut.endswith("…")
