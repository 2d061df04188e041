"""Scorers that need no trained weights.

``KeywordBaselineScorer`` is a transparent lexicon model: it lets the stream run (and be tested) before any model
is trained, and gives benchmarks a cheap reference. Its version string says what it is, so nobody mistakes its
labels for the fine-tuned model's. ``NoopScorer`` does no work at all: benchmarks use it to measure the stream
path alone.
"""
from __future__ import annotations

import re
from typing import Sequence

from .interface import Prediction, failed, text_list
from .labels import TOPICS

_WORD = re.compile(r"[a-z][a-z'&-]+")

_BEARISH = {
    "miss", "misses", "missed", "plunge", "plunges", "plunged", "slump", "slumps", "tumble", "tumbles", "fall",
    "falls", "fell", "drop", "drops", "dropped", "cut", "cuts", "downgrade", "downgrades", "downgraded", "loss",
    "losses", "lawsuit", "probe", "fraud", "bankruptcy", "default", "recall", "layoffs", "weak", "weaker",
    "warning", "warns", "sell", "selloff", "sell-off", "crash", "crashes", "decline", "declines", "lower",
    "slashes", "halts", "fine", "fined", "investigation", "bearish", "short", "underperform", "sinks", "sink",
    "worst", "fears", "concerns", "scandal", "delay", "delays", "disappointing", "hit", "hurt", "risk",
}
_BULLISH = {
    "beat", "beats", "surge", "surges", "surged", "soar", "soars", "soared", "jump", "jumps", "jumped", "rise",
    "rises", "rose", "gain", "gains", "upgrade", "upgrades", "upgraded", "record", "strong", "stronger", "raise",
    "raises", "raised", "buy", "outperform", "rally", "rallies", "bullish", "growth", "profit", "profits", "boost",
    "boosts", "higher", "tops", "win", "wins", "approval", "approved", "expands", "rebound", "best", "climbs",
}
_TOPIC_WORDS: dict[str, set[str]] = {
    "Analyst Update": {"analyst", "analysts", "upgrade", "downgrade", "upgrades", "downgrades", "target", "rating", "overweight", "underweight"},
    "Fed | Central Banks": {"fed", "powell", "fomc", "ecb", "central", "rate", "rates", "hike", "boj", "lagarde"},
    "Company | Product News": {"launch", "launches", "product", "unveils", "recall", "recalls", "customers", "app", "iphone"},
    "Treasuries | Corporate Debt": {"treasury", "treasuries", "yield", "yields", "bond", "bonds", "debt", "notes", "credit"},
    "Dividend": {"dividend", "dividends", "payout", "buyback", "buybacks", "distribution"},
    "Earnings": {"earnings", "eps", "revenue", "quarter", "quarterly", "guidance", "results", "q1", "q2", "q3", "q4"},
    "Energy | Oil": {"oil", "crude", "opec", "gas", "brent", "energy", "barrel", "wti"},
    "Financials": {"bank", "banks", "lender", "lenders", "jpmorgan", "goldman", "deposits", "insurer"},
    "Currencies": {"dollar", "euro", "yen", "currency", "currencies", "forex", "fx", "sterling", "yuan", "bitcoin"},
    "General News | Opinion": {"opinion", "why", "how", "column", "podcast", "interview"},
    "Gold | Metals | Materials": {"gold", "silver", "copper", "metals", "steel", "lithium", "aluminum", "mining"},
    "IPO": {"ipo", "ipos", "listing", "debut", "spac", "offering"},
    "Legal | Regulation": {"sec", "lawsuit", "court", "judge", "regulator", "regulators", "antitrust", "probe", "fine", "settlement"},
    "M&A | Investments": {"acquire", "acquires", "acquisition", "merger", "deal", "buy", "stake", "takeover", "bid"},
    "Macro": {"inflation", "gdp", "jobs", "payrolls", "cpi", "economy", "recession", "unemployment", "pmi"},
    "Markets": {"stocks", "market", "markets", "s&p", "nasdaq", "dow", "index", "futures", "wall"},
    "Politics": {"biden", "trump", "congress", "senate", "election", "government", "tariff", "tariffs", "white"},
    "Personnel Change": {"ceo", "cfo", "resigns", "appoints", "appointed", "steps", "named", "chairman", "hires"},
    "Stock Commentary": {"bullish", "bearish", "chart", "calls", "puts", "long", "short", "watch", "setup"},
    "Stock Movement": {"shares", "stock", "jumps", "falls", "soars", "plunges", "slides", "rallies", "trading"},
}


class KeywordBaselineScorer:
    """Counts finance polarity words and topic keywords. Deterministic, fast, and clearly a baseline."""

    model_version = "baseline-keywords-1"

    def score(self, texts: Sequence[str]) -> list[Prediction]:
        return [self._score_one(text) for text in text_list(texts)]

    def _score_one(self, text: str) -> Prediction:
        if not isinstance(text, str) or not text.strip():
            return failed("empty text")
        words = _WORD.findall(text.lower())
        bear = sum(w in _BEARISH for w in words)
        bull = sum(w in _BULLISH for w in words)
        total = bear + bull
        score = 0.0 if total == 0 else (bull - bear) / (total + 1.0)
        sentiment = "bullish" if score > 0.2 else "bearish" if score < -0.2 else "neutral"
        hits = {topic: sum(w in vocab for w in words) for topic, vocab in _TOPIC_WORDS.items()}
        best = max(TOPICS, key=lambda t: (hits[t], t == "General News | Opinion"))
        matched = hits[best]
        confidence = 0.05 if matched == 0 else min(0.95, 0.4 + 0.15 * matched)
        return Prediction(topic=best, topic_confidence=round(confidence, 4), sentiment=sentiment,
                          sentiment_score=round(max(-1.0, min(1.0, score)), 4))


class NoopScorer:
    """Returns a fixed neutral prediction without reading the text: isolates the stream path in benchmarks."""

    model_version = "noop"
    _NEUTRAL = Prediction(topic="General News | Opinion", topic_confidence=0.0, sentiment="neutral", sentiment_score=0.0)

    def score(self, texts: Sequence[str]) -> list[Prediction]:
        return [self._NEUTRAL] * len(text_list(texts))
