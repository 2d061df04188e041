"""What the model makes of a text, and which of its words made it so: for an analyst asking "why bearish?".

A ``Reading`` holds a text's prediction, its full sentiment distribution, the likeliest topics and, for each word,
its push: how much the sentiment score (P(bullish) - P(bearish)) and the predicted topic's probability drop when
the text is scored again without that word. Leaving one word out at a time needs no gradients, so it explains the
model exactly as the worker runs it (int8 and bf16 included), and costs one more sequence per word, scored in the
same batch as the texts themselves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .interface import Prediction, text_list
from .labels import SENTIMENTS, TOPICS

if TYPE_CHECKING:   # the scorer brings torch: imported when a text is read, so that strongest() stays light
    from .scorer import BatchScorer, Probabilities

# Longer texts are read without their words' pushes: each word costs a sequence, and a pasted article is not a
# headline whose words an analyst weighs one by one.
MAX_WORDS = 80
TOP_TOPICS = 3


@dataclass(frozen=True)
class WordPush:
    word: str
    sentiment: float   # the sentiment score with the word minus without it: > 0 pushed toward bullish
    topic: float       # the predicted topic's probability with the word minus without it: > 0 made the topic
    # Both are NaN when the text without this word cannot be scored (nothing but a link is left, say).


@dataclass(frozen=True)
class Reading:
    text: str
    prediction: Prediction
    sentiments: dict[str, float] = field(default_factory=dict)     # label -> probability, in SENTIMENTS order
    topics: list[tuple[str, float]] = field(default_factory=list)  # the likeliest first
    words: list[WordPush] = field(default_factory=list)            # in the text's order; empty when not explained
    note: str = ""     # why the words' pushes are missing, when the text was scored but not explained


def read_texts(scorer: BatchScorer, texts: Sequence[str], top_topics: int = TOP_TOPICS,
               max_words: int = MAX_WORDS) -> list[Reading]:
    """One ``Reading`` per text, in order. A text that cannot be scored (empty, not a text) gets its error in
    ``prediction.error`` and nothing else; it does not stop the others."""
    from .scorer import predictions_from
    if not hasattr(scorer, "probabilities"):
        raise TypeError(f"reading texts needs a trained model's probabilities; {scorer.model_version} has none "
                        f"(train one: `finpulse train`)")
    texts = text_list(texts)
    words_of = [_words(text, max_words) for text in texts]
    variants = [" ".join(words[:i] + words[i + 1:]) for words in words_of for i in range(len(words))]
    probs = scorer.probabilities(list(texts) + variants)
    n = len(texts)
    whole = probs.subset(np.arange(n))
    predictions = predictions_from(whole)
    readings, start = [], n
    for row, (text, words, prediction) in enumerate(zip(texts, words_of, predictions)):
        without = probs.subset(np.arange(start, start + len(words)))
        start += len(words)
        if not prediction.ok:
            readings.append(Reading(str(text), prediction))
            continue
        readings.append(Reading(
            text, prediction,
            sentiments={label: float(p) for label, p in zip(SENTIMENTS, whole.sentiment[row])},
            topics=_likeliest(whole.topic[row], top_topics),
            words=_pushes(words, prediction, without, [p.sentiment_score for p in predictions_from(without)]),
            note=_why_not_explained(text, words, max_words)))
    return readings


def _words(text: object, max_words: int) -> list[str]:
    """The words to leave out one at a time; none for a text too long or too short to explain that way."""
    if not isinstance(text, str):
        return []
    words = text.split()
    return words if 2 <= len(words) <= max_words else []


def _why_not_explained(text: str, words: list[str], max_words: int) -> str:
    if words:
        return ""
    count = len(text.split())
    return (f"{count} words: longer than {max_words}, so no word is weighed on its own" if count > max_words
            else "a single word: nothing to weigh it against")


def _likeliest(topic_probabilities: np.ndarray, count: int) -> list[tuple[str, float]]:
    order = np.argsort(-topic_probabilities, kind="stable")[:count]
    return [(TOPICS[i], float(topic_probabilities[i])) for i in order]


def _pushes(words: list[str], prediction: Prediction, without: Probabilities,
            scores_without: list[float]) -> list[WordPush]:
    if not words:
        return []
    topic = TOPICS.index(prediction.topic)
    return [WordPush(word,
                     sentiment=math.nan if error else prediction.sentiment_score - score,
                     topic=math.nan if error else prediction.topic_confidence - float(topic_row[topic]))
            for word, score, topic_row, error in zip(words, scores_without, without.topic, without.errors)]


def push_pairs(words: list[WordPush], of: str = "sentiment") -> list[list]:
    """[word, push] pairs in the text's order, as a JSON report keeps them: the push on the sentiment score or on
    the predicted ``topic``, rounded, None where unknown."""
    return [[push.word, None if math.isnan(value := getattr(push, of)) else round(value, 4)] for push in words]


def strongest(words: Sequence[Sequence], count: int = 3) -> str:
    """The ``count`` words that pushed hardest, strongest first, from (word, push) pairs (a push may be None or
    NaN: unknown): "slides -1.27, as -0.04"."""
    known = [(word, push) for word, push in words if push is not None and not math.isnan(push)]
    return ", ".join(f"{word} {push:+.2f}" for word, push in sorted(known, key=lambda wp: -abs(wp[1]))[:count])
