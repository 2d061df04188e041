"""models.explain: what the model makes of a text and each word's push, checked against the scorer text by text."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from models.explain import read_texts
from models.labels import SENTIMENTS, TOPICS
from models.scorer import BatchScorer
from tests.models_fixtures import make_tiny_base, save_tiny_model

HEADLINE = "Shares plunge after the company misses estimates"


@pytest.fixture(scope="module")
def scorer(tmp_path_factory) -> BatchScorer:
    model = save_tiny_model(make_tiny_base(tmp_path_factory.mktemp("tiny-bert")), tmp_path_factory.mktemp("m") / "m")
    return BatchScorer.from_pretrained(Path(model), device="cpu", tokenizer_processes=0)


def one(scorer: BatchScorer, text: str):
    [prediction] = scorer.score([text])
    return prediction


def test_a_reading_is_the_scorers_prediction_with_each_words_push(scorer):
    [reading] = read_texts(scorer, [HEADLINE])
    alone = one(scorer, HEADLINE)
    assert reading.prediction.topic == alone.topic and reading.prediction.sentiment == alone.sentiment
    assert reading.prediction.sentiment_score == pytest.approx(alone.sentiment_score, abs=1e-5)
    assert list(reading.sentiments) == list(SENTIMENTS)
    assert sum(reading.sentiments.values()) == pytest.approx(1.0, abs=1e-5)
    assert reading.sentiments["bullish"] - reading.sentiments["bearish"] == pytest.approx(alone.sentiment_score,
                                                                                          abs=1e-5)
    assert reading.topics[0] == (alone.topic, pytest.approx(alone.topic_confidence, abs=1e-5))
    assert len(reading.topics) == 3 and all(t in TOPICS for t, _ in reading.topics)
    assert [p for _, p in reading.topics] == sorted((p for _, p in reading.topics), reverse=True)

    words = HEADLINE.split()
    assert [push.word for push in reading.words] == words and reading.note == ""
    topic_index = TOPICS.index(alone.topic)
    for i, push in enumerate(reading.words):
        without = " ".join(words[:i] + words[i + 1:])
        assert push.sentiment == pytest.approx(alone.sentiment_score - one(scorer, without).sentiment_score, abs=1e-4)
        topic_without = scorer.probabilities([without]).topic[0][topic_index]
        assert push.topic == pytest.approx(alone.topic_confidence - topic_without, abs=1e-4)
    assert any(abs(push.sentiment) > 1e-3 for push in reading.words), "no word moved the score: nothing was tested"


def test_texts_that_cannot_be_explained_are_still_read_and_bad_ones_do_not_stop_the_rest(scorer):
    long_text = " ".join(["stocks"] * 81)
    readings = read_texts(scorer, ["", "Rally", long_text, HEADLINE, "   ", "Read https://t.co/abc123"])
    assert [r.prediction.ok for r in readings] == [False, True, True, True, False, True]
    assert readings[0].prediction.error and not readings[0].words and not readings[0].sentiments
    assert readings[1].words == [] and "single word" in readings[1].note and readings[1].sentiments
    assert readings[2].words == [] and "longer than 80" in readings[2].note
    assert readings[2].prediction.sentiment == one(scorer, long_text).sentiment
    assert [p.word for p in readings[3].words] == HEADLINE.split()
    # Without "Read" only the link is left, which cannot be scored: that push is unknown, not zero.
    unknown, link = readings[5].words
    assert math.isnan(unknown.sentiment) and math.isnan(unknown.topic) and not math.isnan(link.sentiment)
