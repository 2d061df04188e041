"""Text clean-up shared by training and scoring, so the model always reads text the same way.

Posts carry t.co links (random characters: noise to a classifier, and absent from news sentences from other
sources) and HTML entities (``&amp;``). ``with_cleanup`` puts their removal into the tokenizer's own normalizer,
so it runs in the tokenizer's native code, in parallel and without holding Python's GIL: the scorer's throughput
depends on that. Whitespace needs no step: the tokenizer splits on it.

Before tokenizing, a text is cut to ``char_budget(max_length)`` characters: the tokenizer truncates to
``max_length`` tokens anyway, and cutting first keeps a 100 KB text from costing 100 KB of tokenization.
Which clean-up a model was trained with is recorded in its config (``NORMALIZATION``).
"""
from __future__ import annotations

import re

NORMALIZATION = "strip-links-decode-entities-v1"
LINK_PATTERN = r"https?://\S+|www\.\S+"
ENTITIES = {"&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"', "&#39;": "'", "&apos;": "'", "&nbsp;": " "}
# Wordpiece averages 3-5 characters per token on this text; 16 per token leaves room for long words and symbols.
CHARS_PER_TOKEN_BUDGET = 16


def char_budget(max_length: int) -> int:
    return max_length * CHARS_PER_TOKEN_BUDGET


def with_cleanup(tokenizer):
    """``tokenizer`` (a ``tokenizers.Tokenizer``) with link removal and entity decoding before its own normalizer."""
    from tokenizers import Regex, normalizers
    steps = [normalizers.Replace(Regex(LINK_PATTERN), " ")]
    steps += [normalizers.Replace(entity, char) for entity, char in ENTITIES.items()]
    if tokenizer.normalizer is not None:
        steps.append(tokenizer.normalizer)
    tokenizer.normalizer = normalizers.Sequence(steps)
    return tokenizer


def twin_key(text: str) -> str:
    """What a text says once links, entities, case, punctuation and spacing are set aside: the same headline posted
    twice with different t.co links has one key, and the model reads it as one text. The data split keeps such
    twins in one slice (``models.data.twin_groups``), or a test row would be a row trained on."""
    text = re.sub(LINK_PATTERN, " ", text)
    for entity, char in ENTITIES.items():
        text = text.replace(entity, char)
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())
